"""The embedded tiny model end to end, around one first run: the report, stages read back by what they read,
determinism, and pooling refused across designs (runs that need no shared first run: test_runs.py)."""

import json
from pathlib import Path

import pytest

import mmie

REPO = Path(__file__).resolve().parent.parent


def reject_constant(name):
    raise ValueError(f"report contains {name}")


SMALL = ["--sample_cap", "12", "--n_boot", "200", "--n_boot_gates", "200", "--layer_sample", "12", "--lora_steps", "4", "--reft_steps", "4",
         "--train_sae_steps", "20", "--sae_batch_size", "256", "--relearn_steps", "2", "--probe_folds", "3"]


def run_main(tmp_path, *extra, out="run", ckpt="ckpt"):
    return mmie.main([*SMALL, "--out", str(tmp_path / out), "--ckpt_dir", str(tmp_path / ckpt), *extra])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("e2e")
    return tmp_path, run_main(tmp_path)


def test_report_shape_and_per_prompt_outcomes(first_run):
    tmp_path, report = first_run
    path = tmp_path / "run" / "report.json"
    on_disk = json.loads(path.read_text(encoding="utf-8"), parse_constant=reject_constant)
    assert not list(path.parent.glob("*.tmp"))  # written atomically
    assert set(on_disk) >= {"config", "env", "data", "arms", "summary"}
    assert on_disk["config"]["model_resolved"] == str(mmie.EMBEDDED_MODEL)
    assert on_disk["config_sources"]["lora_steps"] == "user" and on_disk["config_sources"]["lora_lr"] == "default"
    assert on_disk["prompts"]["forget_eval"]["n_distinct"] == 12 and on_disk["facts"]["dtype"] == "torch.float32"
    plan = on_disk["prompt_plan"]  # --prompts planned (the default): a power analysis sized every set
    assert plan["prompts_forget_eval"]["value"] >= 12 and "power analysis" in plan["prompts_forget_eval"]["rule"]
    assert set(plan) >= {"prompts_forget_roman", "prompts_mixed", "prompts_retain", "prompts_xlang_ur", "prompts_mia"}
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
    assert 0.0 <= seed["metrics"]["mia_auc"] <= 1.0  # 12 vs 12 texts here: its size is for the full sets
    assert seed["metrics"]["es_forget_eval"] > 0.5  # the base model continues Hindi in Hindi
    # Every arm ran, was evaluated on the full metric set and met every gate with a decision; the reference model
    # (found automatically for the embedded model) ran too, as a yardstick with no gates.
    assert set(on_disk["arms"]) == {"base", "reference", *mmie.DEFAULT_ARMS} and "reference" not in on_disk["gates"]
    assert on_disk["recoverability"]["reference"] == str(mmie.REFERENCE_MODEL)
    assert "against the reference model" in on_disk["statistics_config"]["G7_rule"]
    attacked = {"reference", "lora"}  # a weight edit and the yardstick; every other arm's edit is removable
    for arm in ["base", "reference", *mmie.DEFAULT_ARMS]:
        outcome = on_disk["arms"][arm]["seeds"]["0"]
        assert outcome["status"] == "ok", (arm, outcome.get("error"))
        assert {"es_forget_eval", "fidelity_pa"} <= set(outcome["per_prompt"])
        assert ("es_relearn" in outcome["per_prompt"]) == (arm in attacked), arm
        assert outcome["recoverability"]["removable"] == (arm not in attacked | {"base"}), arm
        assert len(outcome["probe_auc_by_layer"]["hi_vs_en"]) == 4 and "hi_vs_ur" in outcome["probe_auc_by_layer"]
        assert set(outcome["phase_seconds"]) >= {"build", "evaluate", "probes"} | (
            {"relearn"} if arm in attacked | {"base"} else set())
        if arm in mmie.YARDSTICKS:
            continue
        assert "token_kl_retain" in outcome["per_prompt"]
        assert set(on_disk["gates"][arm]) >= {"G1", "G1S", "G2", "G3", "G4_ur", "G4_pa", "G4_bn", "G5", "G6", "G7", "GH"}
        assert on_disk["decision"][arm] in ("PROCEED", "STOP", "INCONCLUSIVE")
        assert on_disk["outcome"][arm] in ("unlearns", "suppresses", "fails", "inconclusive", "unchanged")
        assert on_disk["gates"][arm]["G7"].get("removable", False) == (arm not in attacked)
    base = on_disk["arms"]["base"]["seeds"]["0"]  # with a reference, the base is not attacked: its ES on those prompts
    assert "not attacked" in base["recoverability"]["not_attacked"] and len(base["per_prompt"]["es_attack_prompts"]) == 12
    lora = on_disk["arms"]["lora"]["seeds"]["0"]["recoverability"]
    assert lora["mode"] == "full" and lora["worst"] in lora["grid"] and set(lora["curves"]) == {"0.0001", "0.001"}
    assert on_disk["gates"]["lora"]["G7"]["rule"] == "reference"
    assert on_disk["layers"]["chosen"] and len(on_disk["layers"]["scores"]) == 4
    assert on_disk["arms"]["reft"]["seeds"]["0"]["info"]["orthonormality_error"] < 1e-5
    assert set(on_disk["arms"]["sae_gate"]["seeds"]["0"]["info"]["sae"]) == {str(i) for i in on_disk["layers"]["chosen"]}


def test_rerun_resumes_and_fresh_run_reproduces(first_run, capsys):
    tmp_path, report = first_run
    again = run_main(tmp_path)
    printed = capsys.readouterr().out
    assert "layer selection read back" in printed
    assert all(f"{arm} seed 0 read back" in printed for arm in ["base", "reference", *mmie.DEFAULT_ARMS])
    assert again["summary"] == report["summary"] and again["gates"] == report["gates"]
    fresh = run_main(tmp_path, "--fresh", "--arms", "lora", "dim", out="fresh")  # only these are redone
    printed = capsys.readouterr().out
    assert "base seed 0 read back" not in printed and "lora seed 0 read back" not in printed
    for arm in fresh["arms"]:
        assert fresh["arms"][arm]["seeds"]["0"]["per_prompt"] == report["arms"][arm]["seeds"]["0"]["per_prompt"], arm


def test_changing_lora_steps_redoes_the_lora_arm_alone(first_run, capsys):
    tmp_path, report = first_run
    run_main(tmp_path, "--lora_steps", "5", "--arms", "lora", "reft", "dim", out="steps5")
    printed = capsys.readouterr().out
    assert "layer selection read back" in printed
    assert all(f"{arm} seed 0 read back" in printed for arm in ("base", "reft", "dim"))
    assert "lora seed 0 read back" not in printed and "lora seed 0: ok" in printed


def test_stage_keys_follow_what_each_stage_reads():
    """A stage is keyed by the settings of the parser groups it reads, the resolved run facts and the source code:
    --lora_steps changes the lora stage alone, a statistics flag none, a dtype or a source file every one."""
    parser = mmie.build_parser()
    facts = {"model": "m", "device": "cpu", "dtype": "torch.float32", "data": {"forget": "x"}}
    stages = ["layers", "sae", "base", "reference", *mmie.ALL_ARMS]

    def keys(argv, facts=facts):
        return {stage: mmie.stage_key(parser, parser.parse_args(argv), stage, facts) for stage in stages}

    base = keys([])
    assert [s for s in stages if keys(["--lora_steps", "9"])[s] != base[s]] == ["lora", "distill"]  # its teacher
    assert [s for s in stages if keys(["--undo_alpha", "0.9"])[s] != base[s]] == ["distill"]
    assert [s for s in stages if keys(["--n_boot", "999", "--fdr_q", "0.05"])[s] != base[s]] == []
    assert all(keys([], {**facts, "dtype": "torch.bfloat16"})[s] != base[s] for s in stages)
    assert [s for s in stages if keys(["--dsg_top_n", "30"])[s] != base[s]] == ["dsg"]
    assert {s for s in stages if keys(["--train_sae_steps", "9"])[s] != base[s]} == {"sae", "sae_gate", "randgate", "dsg"}
    mmie.source_hash.cache_clear()
    try:
        original = mmie.SOURCE_FILES
        mmie.SOURCE_FILES = original[:1]  # a different set of source bytes, as after editing a file
        assert all(keys([])[s] != base[s] for s in stages)
    finally:
        mmie.SOURCE_FILES = original
        mmie.source_hash.cache_clear()


@pytest.mark.parametrize("change,named", [
    (lambda r: r["config"].update(prompt_words=6), "prompt_words differs"),
    (lambda r: r["data"]["forget"].update(sha256="0" * 64), "data differs"),
    (lambda r: r["arms"].pop("dim"), "arms differs"),
])
def test_aggregate_refuses_reports_of_different_designs(first_run, tmp_path, change, named):
    report = json.loads((first_run[0] / "run" / "report.json").read_text(encoding="utf-8"))
    other = json.loads(json.dumps(report))
    other["arms"] = {arm: {**outcome, "seeds": {"1": outcome["seeds"]["0"]}} for arm, outcome in other["arms"].items()}
    change(other)
    (tmp_path / "a.json").write_text(json.dumps(report), encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps(other), encoding="utf-8")
    with pytest.raises(mmie.InputError, match=named):
        mmie.main(["--aggregate", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "p.json")])
