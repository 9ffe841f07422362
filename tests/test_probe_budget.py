"""Real models without waiting blind: auto-config on a random-init Gemma3 with Gemma-3's 262,144-token vocabulary
(the model on which a new user's run printed nothing for half an hour), a probe budget that leaves no room for
any measurement, user-given settings that skip their probes, and progress lines in a redirected log."""

import functools

import pytest
import torch

import auto_config
import mmie


@pytest.fixture(scope="module")
def gemma3_262k(tmp_path_factory, tokenizer):
    """A random-init Gemma3 text model with Gemma-3's full vocabulary (every forward pays for the 262k-row head),
    a narrow body, saved as a hub folder with the embedded tokenizer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=262_144, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=None)
    folder = tmp_path_factory.mktemp("hub") / "gemma3-262k"
    Gemma3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def small_sets(folder) -> list[str]:
    """The first 60 texts of every shipped set, as flags: every text scored through a 262k-row head costs (the
    adaptive trainer scores its whole forget pool), so the sets are kept small."""
    def first_60(name: str) -> str:
        lines = (mmie.DATA_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:60]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return str(folder / f"{name}.jsonl")

    flags = []
    for flag, name in (("--forget", "forget_hi"), ("--forget_roman", "forget_hi_roman"), ("--retain", "retain_en"),
                       ("--mixed", "mixed"), ("--adversarial", "adversarial"), ("--relearn", "relearn_hi")):
        flags += [flag, first_60(name)]
    return [*flags, "--xlang", *(first_60(name) for name in ("urdu", "punjabi", "bengali"))]


def test_every_probe_falls_back_to_its_rule_when_the_budget_holds_none(gemma3_262k, tmp_path, monkeypatch, capsys):
    """With no time for any probe, auto-config still decides everything (by rules, each saying why), the run
    reaches its arms, the user's batch sizes run no search, and every phase is a line of the log."""
    monkeypatch.setattr(mmie, "ProbeBudget", functools.partial(auto_config.ProbeBudget, share=0.0, floor_s=0.0))
    argv = ["--model", str(gemma3_262k), "--auto_config", "--arms", "lora", "--sample_cap", "8", "--layer_sample",
            "8", "--probe_folds", "2", "--lora_steps", "2", "--relearn_steps", "0", "--batch_size", "16",
            "--train_batch_size", "8", "--n_boot", "99", "--max_new_tokens", "4", *small_sets(tmp_path),
            "--out", str(tmp_path / "run"), "--ckpt_dir", str(tmp_path / "ckpt")]
    report = mmie.main(argv)
    log = capsys.readouterr().out
    decisions = report["auto_config"]
    for name in ("batch_size", "train_batch_size"):  # given: no search ran, and no "auto would be"
        assert decisions[name] == {"value": report["config"][name], "source": "user", "inputs": {},
                                   "rule": "given by the user: its probe did not run"}
    table = log[log.index("auto-config decisions"):]
    assert [line.split()[:3] for line in table.splitlines() if line.split()[:1] == ["batch_size"]] == [
        ["batch_size", "16", "user"]] and "auto would be 16" not in table
    assert decisions["prompt_plan"]["value"] == "all" and "power analysis predicted" in decisions["prompt_plan"]["rule"]
    assert decisions["lora_lr"]["rule"].startswith("model-size rule (LR probe predicted")
    assert "no causal scoring within the budget" in report["layers"]["rule"]
    probes = report["auto_config_probes"]
    assert probes["budget_s"] == 0.0 and set(probes["fallbacks"]) == {"power analysis", "layer scoring",
                                                                      "learning rates"}
    assert probes["predicted_run"]["units"]["generate_s_per_prompt"] > 0
    for phase in ("power analysis", "layer scoring", "learning rates"):
        assert f"mmie: auto-config: {phase} done (" in log
    assert set(report["phase_seconds"]) >= {"set-up (data, language identification, model)",
                                            "auto-config before layer selection", "layer selection",
                                            "auto-config after layer selection", "arms", "statistics", "figures"}
    assert report["arms"]["lora"]["seeds"]["0"]["status"] == "ok"
    assert "mmie: run: arms done (" in log and "mmie: lora seed 0: build done (" in log
    again = mmie.main(argv)  # a rerun replays the decisions: the user's settings are listed as before, no probe runs
    assert again["auto_config"] == decisions and "auto-config: layer scoring" not in capsys.readouterr().out


def test_a_redirected_log_gets_a_progress_line_per_pass(capsys):
    assert not __import__("sys").stderr.isatty()  # as in a log redirected to a file
    assert list(mmie.progress(range(3), "layer scores", every_s=0.0)) == [0, 1, 2]
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("(")[0] for line in lines] == [f"mmie:   layer scores: {i}/3 " for i in (1, 2, 3)]
    assert "min left" in lines[0]
    assert list(mmie.progress(iter("ab"), "quiet")) == ["a", "b"] and capsys.readouterr().out == ""  # < 30 s
