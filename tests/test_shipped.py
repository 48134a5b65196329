"""The checkpoints that ship in the repository (the demo's "loop at work" table) reproduce the
numbers recorded when they were made (results/shakespeare-char-cpu/shipped/README.md)."""

import json
import shutil
from pathlib import Path

import pytest

from loopmdm.cli import main

SHIPPED = Path(__file__).resolve().parents[1] / "results" / "shakespeare-char-cpu" / "shipped"


def test_shipped_loopmdm_and_mdm_reproduce_their_recorded_test_nelbo(tmp_path, monkeypatch, capsys):
    record = json.loads((SHIPPED / "record.json").read_text())
    for name in ("loop-s0", "mdm-s0"):
        shutil.copytree(SHIPPED / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)  # nothing is written beside the copies (their data goes to the data cache)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    main(["eval", "loop-s0", "--split", "test", "--loops", ",".join(str(s) for s in record["test_loops"]),
          "--batches", str(record["batches"]), "--baseline", "mdm-s0", "--json"])
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert [r["loops"] for r in out["results"]] == record["test_loops"]
    for got, want in zip(out["results"], record["results"]):
        assert got["nll"] == pytest.approx(want["nll"], abs=1e-5), got["loops"]
    assert out["baseline"]["nll"] == pytest.approx(record["baseline"]["nll"], abs=1e-5)
