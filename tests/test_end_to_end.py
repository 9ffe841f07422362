"""The embedded tiny model end to end: its quality bar, the base-evaluation report, resume and
determinism, and a smoke rebuild of the training script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import mmie

REPO = Path(__file__).resolve().parent.parent


def reject_constant(name):
    raise ValueError(f"report contains {name}")


def run_main(tmp_path, *extra):
    return mmie.main(["--sample_cap", "12", "--n_boot", "200", "--out", str(tmp_path / "run"),
                      "--ckpt_dir", str(tmp_path / "ckpt"), *extra])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("e2e")
    return tmp_path, run_main(tmp_path)


def test_quality_bar_on_heldout_prompts():
    quality = mmie.language_continuation_quality(mmie.EMBEDDED_MODEL, mmie.DATA_DIR, n_prompts=80)
    for lang, row in quality["rates"].items():
        assert row["rate"] >= row["bar"], (lang, row)


def test_report_shape_and_per_prompt_outcomes(first_run):
    tmp_path, report = first_run
    path = tmp_path / "run" / "report.json"
    on_disk = json.loads(path.read_text(encoding="utf-8"), parse_constant=reject_constant)
    assert not list(path.parent.glob("*.tmp"))  # written atomically
    assert set(on_disk) >= {"config", "env", "data", "arms", "summary"}
    assert on_disk["config"]["model_resolved"] == str(mmie.EMBEDDED_MODEL)
    assert on_disk["env"]["packages"]["torch"] and on_disk["env"]["dtype"] == "float32"
    assert on_disk["data"]["forget"]["n"] == on_disk["data"]["forget"]["n_train"] + on_disk["data"]["forget"]["n_eval"]
    assert len(on_disk["data"]["forget"]["sha256"]) == 64
    seed = on_disk["arms"]["base"]["seeds"]["0"]
    assert seed["status"] == "ok" and seed["error"] is None
    per_prompt = seed["per_prompt"]
    for name in ("es_forget_train", "es_forget_eval", "es_semantic", "es_forget_roman", "es_mixed", "es_adversarial",
                 "hi_rate", "fidelity_ur", "fidelity_pa", "fidelity_bn", "es_ur", "es_pa", "es_bn", "nll_retain",
                 "empty_rate_forget_eval", "repetition_forget_eval"):
        assert len(per_prompt[name]) == 12, name
        assert all(0.0 <= v <= 1.0 for v in per_prompt[name]) or name == "nll_retain"
    for name in ("ppl_retain", "mia_auc", "es_forget_eval", "fidelity_ur"):
        row = on_disk["summary"]["base"][name]
        assert row["ci"][0] <= row["mean"] <= row["ci"][1], name
        assert seed["metrics"][name] == pytest.approx(row["mean"])
    # The tiny model was trained on the forget train split, so its members are easier than non-members.
    assert seed["metrics"]["mia_auc"] > 0.5
    assert seed["metrics"]["es_forget_eval"] > 0.5


def test_rerun_resumes_and_fresh_run_reproduces(first_run, capsys):
    tmp_path, report = first_run
    again = run_main(tmp_path)
    assert "read back" in capsys.readouterr().out
    assert again["arms"]["base"]["seeds"]["0"]["metrics"] == report["arms"]["base"]["seeds"]["0"]["metrics"]
    fresh = run_main(tmp_path, "--fresh")
    assert fresh["arms"]["base"]["seeds"]["0"]["per_prompt"] == report["arms"]["base"]["seeds"]["0"]["per_prompt"]
    assert fresh["summary"] == report["summary"]


def test_training_script_smoke_rebuild(tmp_path):
    out = tmp_path / "tiny"
    result = subprocess.run([sys.executable, str(REPO / "data/train_tiny_lm.py"), "--steps", "2", "--out", str(out),
                             "--skip_quality", "--batch_size", "4"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    log = json.loads((out / "training_log.json").read_text(encoding="utf-8"))
    assert [row["step"] for row in log["log"]] == [0, 1]
    assert set(log["data"]) == {"forget_hi", "forget_hi_roman", "retain_en", "mixed", "urdu", "punjabi", "bengali",
                                "adversarial"}
    model, tokenizer = mmie.load_model(str(out), "cpu", mmie.torch.float32, "sdpa", False)
    assert len(mmie.decoder_layers(model)) == 4
