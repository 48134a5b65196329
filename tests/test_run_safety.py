"""Runs that never lose data or get stuck: overwrite, locking, crash windows, full disks,
non-finite training, one-line errors, eval on any text (issue "Runs that never lose data")."""

import subprocess
import sys


def test_inference_code_does_not_import_the_trainer():
    code = ("import sys, loopmdm.runs, loopmdm.cli, loopmdm.evaluation.nelbo, loopmdm.sampling.samplers, "
            "loopmdm.evaluation.solve, loopmdm.sampling.infill; "
            "assert 'loopmdm.training.trainer' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
