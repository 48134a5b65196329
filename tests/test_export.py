"""`loopmdm export`: the Hugging Face folder loads with AutoModelForMaskedLM (trust_remote_code)
and AutoTokenizer, gives the project's logits at every loop count, and reads back into loopmdm."""

import ast
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loopmdm
from loopmdm.cli import main
from loopmdm.config import ModelConfig
from loopmdm.export.hf import MODEL_FIELDS, TEMPLATE_DIR, TEMPLATE_FILES, model_fields
from loopmdm.model.denoiser import LoopedDenoiser
from loopmdm.runs import load_run
from tests.conftest import tiny_overrides

ATOL = 1e-5  # fp32; in practice the two are bit-identical (same ops in the same order)


# --------------------------------------------------------------------------- the modelling code alone

def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_modelling_files_import_only_torch_and_transformers():
    for name in TEMPLATE_FILES:
        imports = _imports(TEMPLATE_DIR / name)
        assert not any(i.split(".")[0] == "loopmdm" for i in imports), (name, imports)
        assert {i.split(".")[0] for i in imports if not i.startswith(".")} <= {"math", "torch", "transformers"}, imports
        assert {i for i in imports if i.startswith(".")} <= {".configuration_loopmdm"}, imports
        assert "importlib" not in (TEMPLATE_DIR / name).read_text(encoding="utf-8")  # no import by name either


def _hf_classes():
    from loopmdm.export.hf_template.configuration_loopmdm import LoopMDMConfig
    from loopmdm.export.hf_template.modeling_loopmdm import LoopMDMForMaskedLM
    return LoopMDMConfig, LoopMDMForMaskedLM


def test_config_has_every_exported_field():
    LoopMDMConfig, _ = _hf_classes()
    names = {f.name for f in dataclasses.fields(LoopMDMConfig)}
    assert set(MODEL_FIELDS) | {"num_loops", "max_position_embeddings"} <= names
    assert LoopMDMConfig(max_train_loops=5).num_loops == 5  # default S = S_max
    assert LoopMDMConfig(loop_start=None, loop_end=None).num_loops == 1
    with pytest.raises(ValueError, match="num_loops"):
        LoopMDMConfig(num_loops=0)


VARIANTS = {
    "dit": {},
    "dit-time-sigma": {"time_conditioning": True},
    "dit-time-1000t-cosine": {"time_conditioning": True, "time_input": "1000t", "noise_schedule": "cosine"},
    "dit-injection": {"input_injection": True},
    "llama": {"block": "llama"},
    "mdm-no-loop": {"loop_start": None, "loop_end": None},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_model_matches_the_project_denoiser(variant):
    LoopMDMConfig, LoopMDMForMaskedLM = _hf_classes()
    m = ModelConfig(**{"vocab_size": 40, "n_layers": 4, "d_model": 32, "n_heads": 2, "cond_dim": 16,
                       "loop_start": 1, "loop_end": 3, "max_train_loops": 3, **VARIANTS[variant]})
    torch.manual_seed(0)
    ours = LoopedDenoiser(m).eval()
    with torch.no_grad():  # DiT zero-inits adaLN and the head: perturb so every weight matters
        for p in ours.parameters():
            p.add_(0.2 * torch.randn_like(p))
    hf = LoopMDMForMaskedLM(LoopMDMConfig(**model_fields(m))).eval()
    if m.block == "dit":  # built from a config, it starts as MDLM's init: adaLN and head zeroed
        assert not hf.head.linear.weight.any() and not hf.prelude[0].adaLN_modulation.weight.any()
        assert hf.prelude[0].mlp[0].weight.std() > 0
    hf.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randint(0, 41, (3, 12))  # includes the mask id 40
    key_mask = torch.ones(3, 12, dtype=torch.bool)
    key_mask[1, 8:] = False
    t = torch.tensor([0.1, 0.5, 0.97])
    with torch.no_grad():
        for S in (1, 3, 5):
            want, hidden = ours(x, num_loops=S, t=t, key_mask=key_mask, return_hidden=True)
            out = hf(input_ids=x, attention_mask=key_mask.long(), num_loops=S, t=t, output_hidden_states=True)
            assert out.logits.shape == (3, 12, 40)
            torch.testing.assert_close(out.logits, want, atol=ATOL, rtol=0)
            assert len(out.hidden_states) == len(hidden)
            for a, b in zip(out.hidden_states, hidden):
                torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
        default = hf(input_ids=x, t=t).logits  # config.num_loops = max_train_loops
        torch.testing.assert_close(default, ours(x, num_loops=3 if m.is_looped else 1, t=t), atol=ATOL, rtol=0)
        if m.time_conditioning:  # t matters, and a scalar t means the same t for every row
            assert not torch.allclose(hf(input_ids=x, t=0.9).logits, hf(input_ids=x, t=0.1).logits)
            torch.testing.assert_close(hf(input_ids=x, t=0.3).logits,
                                       ours(x, num_loops=3, t=torch.full((3,), 0.3)), atol=ATOL, rtol=0)
        labels = torch.where(x < 40, x, -100)  # plain cross-entropy, mask positions ignored
        loss, logits = hf(input_ids=x, t=t, labels=labels, return_dict=False)
        torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.reshape(-1, 40), labels.reshape(-1)))
        # bf16 weights without autocast run too (the timestep features follow the weights' dtype)
        fp32 = hf(input_ids=x, t=t).logits
        bf16 = hf.to(torch.bfloat16)(input_ids=x, t=t).logits.float()
        assert bf16.dtype == torch.float32 and (bf16 - fp32).abs().max() < 0.15 * fp32.abs().max()
    with pytest.raises(ValueError, match="num_loops"):
        hf(input_ids=x, num_loops=0)


# --------------------------------------------------------------------------- a real run, exported

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    assert main(["train", "tiny", *tiny_overrides(root), "train.max_steps=4"]) == 0
    out = root / "hf"
    assert main(["export", str(root / "run"), str(out)]) == 0
    return root / "run", out


@pytest.fixture
def hf_modules(tmp_path, monkeypatch):
    """transformers copies remote code into HF_MODULES_CACHE (default under ~): keep it in tmp."""
    import transformers  # in requirements.txt: a missing one is a broken install, not a skip
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return transformers


def test_export_loads_with_auto_classes_and_gives_the_runs_logits(exported, hf_modules):
    run_dir, out = exported
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "configuration_loopmdm.py",
            "modeling_loopmdm.py", "README.md", "loopmdm_config.yaml"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "loopmdm" and config["auto_map"]["AutoModelForMaskedLM"] == "modeling_loopmdm.LoopMDMForMaskedLM"
    assert config["num_loops"] == 3 and config["loopmdm_weights"] == "ema"  # tiny_overrides: max_train_loops=3

    model, info = hf_modules.AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True, local_files_only=True,
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model).__module__.startswith("transformers_modules") and not model.training
    run = load_run(run_dir, device="cpu")  # EMA weights, as the export
    V = run.cfg.model.vocab_size
    torch.manual_seed(1)
    x = torch.randint(0, V + 1, (2, run.cfg.data.seq_len))
    attention = torch.ones_like(x)
    attention[0, 20:] = 0
    with torch.no_grad():
        for S in (1, 3, 6):
            got = model(input_ids=x, attention_mask=attention, num_loops=S).logits
            torch.testing.assert_close(got, run.model(x, num_loops=S, key_mask=attention.bool()), atol=ATOL, rtol=0)
        torch.testing.assert_close(model(input_ids=x).logits, run.model(x, num_loops=3), atol=ATOL, rtol=0)
        assert not torch.equal(model(input_ids=x, num_loops=1).logits, model(input_ids=x, num_loops=3).logits)

    # The tokenizer: the run's ids, plus the diffusion mask token at id V.
    for trust in (True, False):  # False: no custom code and no prompt, the tokenizer needs none
        tokenizer = hf_modules.AutoTokenizer.from_pretrained(out, trust_remote_code=trust, local_files_only=True)
        text = "The new phone from Apple sold well."
        ids = tokenizer(text)["input_ids"]
        assert ids == run.tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.mask_token_id == V and len(tokenizer) == V + 1
        assert tokenizer.pad_token_id == run.tokenizer.pad_id and tokenizer.eos_token_id == run.tokenizer.eos_id
        masked = tokenizer(f"The new {tokenizer.mask_token}{tokenizer.mask_token} sold well.")["input_ids"]
        assert masked.count(V) == 2


BLOCKED_LOAD = """
import sys
class BlockLoopmdm:  # the folder must work where loopmdm is not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "loopmdm":
            raise ImportError("loopmdm is blocked")
sys.meta_path.insert(0, BlockLoopmdm())
import torch
from transformers import AutoModelForMaskedLM
out, ref = sys.argv[1], torch.load(sys.argv[2])
model = AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True, local_files_only=True)
with torch.no_grad():
    logits = model(input_ids=ref["x"], num_loops=2).logits
assert not [m for m in sys.modules if m.split(".")[0] == "loopmdm"]
print((logits - ref["logits"]).abs().max().item())
"""


def test_export_loads_where_loopmdm_cannot_be_imported(exported, tmp_path):
    run_dir, out = exported
    run = load_run(run_dir, device="cpu")
    x = torch.randint(0, run.model.mask_id + 1, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"x": x, "logits": run.model(x, num_loops=2)}, tmp_path / "ref.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", BLOCKED_LOAD, str(out), str(tmp_path / "ref.pt")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) <= ATOL


def test_model_card_examples_run(exported, hf_modules, capsys):
    run_dir, out = exported
    card = (out / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 2 and "num_loops=3" in blocks[0]
    namespace = {}
    for block in blocks:  # as a reader would paste them, in order
        exec(compile(block, str(out / "README.md"), "exec"), namespace)
    V = json.loads((out / "config.json").read_text())["vocab_size"]
    assert namespace["log_probs"].shape[-1] == V
    assert not (namespace["ids"] == V).any()  # every mask filled
    assert capsys.readouterr().out.startswith("The new phone")


def test_export_reads_back_into_the_project(exported, capsys):
    run_dir, out = exported
    run, back = load_run(run_dir, device="cpu"), load_run(out, device="cpu")
    assert back.run_dir == out and back.step == run.step and back.cfg == run.cfg
    assert back.tokenizer.fingerprint() == run.tokenizer.fingerprint()  # the mask token is taken off again
    state, state_back = run.model.state_dict(), back.model.state_dict()
    assert state.keys() == state_back.keys() and all(torch.equal(state[k], state_back[k]) for k in state)
    x = torch.randint(0, run.model.mask_id + 1, (2, 16))
    torch.testing.assert_close(back.model(x, num_loops=2), run.model(x, num_loops=2), atol=0, rtol=0)

    # The CLI takes the export wherever it takes a run.
    def cli_json(*argv):
        assert main(list(argv)) == 0
        return json.loads(capsys.readouterr().out)

    evals = [cli_json("eval", str(d), "--loops", "1,3", "--json") for d in (run_dir, out)]
    assert [r["nll"] for r in evals[0]] == [r["nll"] for r in evals[1]]
    samples = [cli_json("sample", str(d), "--loops", "2", "--steps", "4", "--num", "2", "--length", "12", "--json")
               for d in (run_dir, out)]
    assert samples[0]["samples"] == samples[1]["samples"]
    assert main(["sample", str(out), "--no-ema", "--steps", "2"]) == 2
    assert "only the ema weights" in capsys.readouterr().err


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), err
    for needle in needles:
        assert needle in err[-1], (needle, err[-1])


def test_export_bad_inputs_are_one_line_errors(exported, tmp_path, capsys):
    run_dir, out = exported
    _one_line_error(capsys, ["export", str(tmp_path / "nope"), str(tmp_path / "o")], "does not exist")
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, ["export", str(tmp_path / "empty"), str(tmp_path / "o")], "no checkpoint")
    _one_line_error(capsys, ["export", str(run_dir), str(out)], "not empty", "--overwrite")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    _one_line_error(capsys, ["export", str(run_dir), str(foreign), "--overwrite"], "not a loopmdm export")
    assert (foreign / "notes.txt").read_text() == "mine"
    _one_line_error(capsys, ["export", str(run_dir), str(run_dir)], "run directory itself")
    _one_line_error(capsys, ["export", str(run_dir), str(tmp_path / "o"), "--num-loops", "0"], "--num-loops 0")
    assert not (tmp_path / "o").exists()
    # finetune --init needs the run itself (config.yaml, the tokenizer without the export's mask token).
    _one_line_error(capsys, ["finetune", "gsm8k-test", "--init", str(out)], "is a `loopmdm export` folder")

    # A damaged export read back by the CLI: one line naming the file.
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    (damaged / "model.safetensors").write_bytes(b"not safetensors")
    _one_line_error(capsys, ["eval", str(damaged)], "model.safetensors", "corrupt")
    (damaged / "config.json").write_text(json.dumps({"model_type": "bert"}))
    _one_line_error(capsys, ["sample", str(damaged)], "not a LoopMDM config", "bert")
    (damaged / "config.json").write_text("{")
    _one_line_error(capsys, ["solve", str(damaged)], "config.json", "not readable JSON")


def test_export_overwrite_raw_weights_and_num_loops(exported, tmp_path, capsys):
    run_dir, out = exported
    again = tmp_path / "again"
    assert main(["export", str(out), str(again), "--num-loops", "5", "--json"]) == 0  # an export re-exports
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_loops"] == 5 and summary["weights"] == "ema"
    assert main(["export", str(run_dir), str(again), "--overwrite", "--no-ema", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == "raw"
    raw, plain = load_run(again, device="cpu", use_ema=False), load_run(run_dir, device="cpu", use_ema=False)
    assert all(torch.equal(v, plain.model.state_dict()[k]) for k, v in raw.model.state_dict().items())
    assert json.loads((again / "config.json").read_text())["num_loops"] == 3
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


# --------------------------------------------------------------------------- inference without the trainer

def test_inference_and_export_do_not_import_the_trainer():
    code = ("import sys, loopmdm.runs, loopmdm.export.hf, loopmdm.evaluation.nelbo, loopmdm.evaluation.solve, "
            "loopmdm.evaluation.judge, loopmdm.evaluation.sample_bench, loopmdm.sampling.generate, "
            "loopmdm.sampling.infill, loopmdm.sampling.show, loopmdm.analysis.loop_diagnostics, loopmdm.cli; "
            "loopmdm.cli.build_parser(); "
            "bad = sorted(m for m in ('loopmdm.training.trainer', 'loopmdm.training.run', 'transformers') if m in sys.modules); "
            "assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": str(Path(loopmdm.__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
