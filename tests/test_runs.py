"""End-to-end runs of the embedded tiny model that need no shared first run: its quality bar, a failing arm, an
interrupted run and its resumption, pooling single-seed reports, and a smoke rebuild of the training script. (The
runs that share one first run are in test_end_to_end.py; the two files run in parallel under `make test`.)"""

import json
import os
import signal
import subprocess
import sys

import mmie
from test_end_to_end import REPO, SMALL, run_main


def test_quality_bar_on_heldout_prompts():
    quality = mmie.language_continuation_quality(mmie.EMBEDDED_MODEL, mmie.DATA_DIR, n_prompts=80)
    for lang, row in quality["rates"].items():
        assert row["rate"] >= row["bar"], (lang, row)


def test_a_failing_arm_is_recorded_the_others_run_and_the_exit_status_says_so(tmp_path, monkeypatch, capsys):
    class Broken(mmie.LoReFT):
        def forward(self, hidden):
            raise RuntimeError("broken intervention")

    monkeypatch.setattr(mmie, "LoReFT", Broken)
    status = mmie.cli([*SMALL, "--out", str(tmp_path / "run"), "--ckpt_dir", str(tmp_path / "ckpt"), "--arms", "reft",
                       "dim", "--reference", "none", "--relearn_steps", "0"])
    assert status == 1  # a shell sweep notices (it was 0)
    assert "1 arm/seed runs failed (reft seed 0)" in capsys.readouterr().err
    report = json.loads((tmp_path / "run" / "report.json").read_text(encoding="utf-8"))
    failed = report["arms"]["reft"]["seeds"]["0"]
    assert failed["status"] == "failed" and "broken intervention" in failed["error"]
    assert report["arms"]["dim"]["seeds"]["0"]["status"] == "ok"
    assert report["decision"]["reft"] == "STOP"
    assert all(gate["p"] is None and gate["pass"] is False for gate in report["gates"]["reft"].values())


def test_an_interrupted_run_keeps_what_finished_and_resumes(tmp_path):
    """Ctrl-C printed a raw KeyboardInterrupt traceback. Now one line says what was kept and how to resume, the
    report lists the finished stages, and the same command does only what was left."""
    # lora with many steps follows the base arm, so the interrupt lands in training however slowly this test
    # process is scheduled (with a quick arm there the run could finish before the signal arrived)
    command = [sys.executable, str(REPO / "mmie.py"), *SMALL, "--arms", "lora", "--lora_steps", "40", "--reference",
               "none", "--relearn_steps", "0", "--out", str(tmp_path / "run"), "--ckpt_dir", str(tmp_path / "ckpt")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    # a shell without job control starts background jobs with SIGINT ignored, and Python keeps an inherited
    # SIG_IGN: give the run the default disposition, as on a terminal, wherever the test itself was started
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in process.stdout:  # wait until the base arm has finished, then interrupt
        seen.append(line)
        if "base seed 0: ok" in line:
            process.send_signal(signal.SIGINT)
            break
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err and "run the same command again to resume" in err
    report = json.loads((tmp_path / "run" / "report.json").read_text(encoding="utf-8"))
    assert report["interrupted"] and report["arms"]["base"]["seeds"]["0"]["status"] == "ok"
    assert oct((tmp_path / "run" / "report.json").stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
    resumed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "base seed 0 read back" in resumed.stdout and "lora seed 0: ok" in resumed.stdout


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_aggregate_of_single_seed_reports_equals_a_two_seed_run(tmp_path):
    arms = ["--arms", "lora", "dim", "--reference", "none", "--relearn_steps", "0"]  # pooling is what is tested
    run_main(tmp_path, *arms, "--seeds", "0", out="seed0.json")
    run_main(tmp_path, *arms, "--seeds", "1", out="seed1.json")
    both = run_main(tmp_path, *arms, "--seeds", "0", "1", out="both.json")  # its stages read back: the same outcomes
    pooled = mmie.main(["--aggregate", str(tmp_path / "seed0.json"), str(tmp_path / "seed1.json"),
                        "--n_boot", "200", "--n_boot_gates", "200", "--out", str(tmp_path / "pooled.json")])
    assert (tmp_path / "forget_vs_utility.png").is_file()  # figures beside every report, pooled ones too
    assert sorted(pooled["arms"]["lora"]["seeds"]) == ["0", "1"]
    assert list(pooled["arms"]["dim"]["seeds"]) == ["0"]  # deterministic: evaluated once
    assert pooled["summary"] == both["summary"]
    assert pooled["gates"] == both["gates"] and pooled["decision"] == both["decision"]
    assert json.loads((tmp_path / "pooled.json").read_text(encoding="utf-8"))["decision"] == both["decision"]


def test_training_script_smoke_rebuild(tmp_path):
    out = tmp_path / "tiny"
    result = subprocess.run([sys.executable, str(REPO / "data/train_tiny_lm.py"), "--steps", "2", "--out", str(out),
                             "--skip_quality", "--batch_size", "4"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    log = json.loads((out / "training_log.json").read_text(encoding="utf-8"))
    assert [row["step"] for row in log["log"]] == [0, 1]
    assert set(log["data"]) == {"forget_hi", "forget_hi_roman", "retain_en", "mixed", "urdu", "punjabi", "bengali",
                                "adversarial"}
    model, _ = mmie.load_model(str(out), "cpu", mmie.torch.float32, "sdpa", False)
    assert len(mmie.decoder_layers(model)) == 4
