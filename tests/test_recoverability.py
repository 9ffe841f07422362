"""Recoverability (G7) and the decisions it feeds: the reference model, the attacks on the released weights, the
gate's rules, removable edits, and the numbers-to-trust defects of the second review (each test here failed on the
code before the change): output health on every generated set, ties at zero, uninformative gates that passed, arms
restored to their start reported as edited, and files cited from outside the repository."""

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import mmie

REPO = Path(__file__).resolve().parent.parent


# --- the reference model -------------------------------------------------------------------------
def test_reference_model_ships_with_the_shipped_tokenizer_and_never_learned_hindi(tokenizer):
    folder = mmie.REFERENCE_MODEL
    assert (folder / "tokenizer.json").read_bytes() == (mmie.EMBEDDED_MODEL / "tokenizer.json").read_bytes()
    log = json.loads((folder / "training_log.json").read_text(encoding="utf-8"))
    assert log["hyperparameters"]["no_hindi"] is True
    assert log["data"]["forget_hi"]["n_train_left_out"] == log["data"]["forget_hi"]["n_train"]
    assert log["data"]["mixed"]["n_train_left_out"] == log["data"]["mixed"]["n_train"]
    quality = json.loads((folder / "quality.json").read_text(encoding="utf-8"))["rates"]
    assert quality["hi"]["rate"] <= 0.05  # almost no Hindi on held-out Hindi prompts
    assert quality["adversarial"]["rate"] <= 0.05  # nor on held-out requests for Hindi (it never saw an answer)
    assert log["data"]["adversarial"]["n_answers_left_out"] == log["data"]["adversarial"]["n_train"]
    assert all(quality[lang]["rate"] >= quality[lang]["bar"] for lang in ("en", "ur", "pa", "bn"))
    model, ref_tokenizer = mmie.load_model(str(mmie.EMBEDDED_MODEL), "cpu", torch.float32, "sdpa", False)
    weights = mmie.load_reference_weights(folder, model, ref_tokenizer)
    assert [w.shape for w in weights] == [p.shape for p in model.parameters()]
    assert mmie.resolve_reference("auto", str(mmie.EMBEDDED_MODEL), model, tokenizer)[0] == folder
    assert mmie.resolve_reference("auto", "Qwen/Qwen2.5-1.5B-Instruct", model, tokenizer)[0] is None


def qwen2(tokenizer, layers: int, hidden: int = 32, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return Qwen2ForCausalLM(config).eval()


def test_a_reference_of_another_architecture_or_tokenizer_is_refused(tmp_path, model, tokenizer):
    qwen2(tokenizer, layers=2).save_pretrained(tmp_path / "two_layers")
    tokenizer.save_pretrained(tmp_path / "two_layers")
    with pytest.raises(mmie.InputError, match="not the model's architecture"):
        mmie.load_reference_weights(tmp_path / "two_layers", model, tokenizer)
    model.save_pretrained(tmp_path / "other_tokens")
    grown = mmie.load_tokenizer(mmie.EMBEDDED_MODEL)
    grown.add_tokens(["<new-token>"])
    grown.save_pretrained(tmp_path / "other_tokens")
    with pytest.raises(mmie.InputError, match="tokenizer differs"):
        mmie.load_reference_weights(tmp_path / "other_tokens", model, tokenizer)
    with pytest.raises(mmie.InputError, match="no such folder"):
        mmie.resolve_reference(str(tmp_path / "missing"), "m", model, tokenizer)


# --- the attacks on the released weights ----------------------------------------------------------
def attack_context(model, tokenizer, lid, **settings):
    args = mmie.build_parser().parse_args(["--relearn_prompts", "6", "--max_new_tokens", "4", "--batch_size", "8",
                                           *settings.get("argv", [])])
    prompts = ["नमस्ते आप कैसे हैं", "मेरा नाम राम है", "आज मौसम अच्छा है", "हम बाजार गए", "यह किताब मेरी है",
               "वह स्कूल जाता है"]
    return SimpleNamespace(model=model, tokenizer=tokenizer, args=args, lid=lid, base_params=list(model.parameters()),
                           eval_sets={"generation": {"forget_eval": prompts}, "attack": prompts,
                                      "attack_texts": [prompt + " और फिर घर लौट आए।" for prompt in prompts]},
                           attack_mode=mmie.attack_mode(args, model))


def with_left_padding(tokenizer):
    tokenizer.padding_side = "left"
    return tokenizer


def test_released_weights_merge_a_lora_edit_exactly_and_restore_the_model(model, tokenizer):
    from peft import LoraConfig

    ctx = attack_context(model, tokenizer, None)
    before = [p.detach().clone() for p in ctx.base_params]
    batch = mmie.encode_texts(tokenizer, ["a short text", "another one here"], 16, "cpu")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    with mmie.lora_adapter(model, config, "unlearn") as peft_model:
        torch.manual_seed(1)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.5)  # a non-trivial edit (peft starts B at zero)
        arm = mmie.ArmEdit(reference=peft_model.disable_adapter, peft_model=peft_model, removable=False,
                           weight_deltas=lambda: mmie.peft_weight_deltas(peft_model))
        with torch.no_grad():
            edited = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
            with mmie.released_weights(ctx, arm):
                merged = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
                changed = any(not torch.equal(p, b) for p, b in zip(ctx.base_params, before))
        assert changed and torch.allclose(merged, edited, atol=1e-4)
    assert all(torch.equal(p, b) for p, b in zip(ctx.base_params, before))


def test_attack_trajectory_scores_each_checkpoint_and_leaves_the_model_as_it_was(model, tokenizer, lid):
    ctx = attack_context(model, with_left_padding(tokenizer), lid)
    before = [p.detach().clone() for p in ctx.base_params]
    texts = ["मैं रोज़ सुबह पार्क में टहलने जाता हूँ और ताज़ी हवा लेता हूँ।"] * 4
    scores = mmie.attack_trajectory(ctx, mmie.ArmEdit(removable=False), texts, 1e-2, [1, 3], seed=0, desc="test")
    assert sorted(scores) == [1, 3] and all(len(s["es"]) == 6 and len(s["nll"]) == 6 for s in scores.values())
    # training on Hindi lowers the NLL of other Hindi text: the likelihood read moves with the attack
    assert np.mean(scores[3]["nll"]) < np.mean(scores[1]["nll"])
    assert all(torch.equal(p, b) for p, b in zip(ctx.base_params, before))
    assert not any(p.requires_grad is False for p in model.parameters())  # the flags are put back too


def test_attack_mode_is_full_fine_tuning_for_small_models_and_lora_above(model):
    args = mmie.build_parser().parse_args([])
    assert mmie.attack_mode(args, model)[0] == "full"
    big = SimpleNamespace(parameters=lambda: [torch.empty(mmie.FULL_ATTACK_MAX_PARAMS + 1, device="meta")])
    assert mmie.attack_mode(args, big)[0] == "lora"
    assert mmie.attack_mode(mmie.build_parser().parse_args(["--relearn_mode", "lora"]), model)[0] == "lora"


def test_round_to_nearest_uses_at_most_two_to_the_bits_levels_per_group():
    torch.manual_seed(0)
    weight = torch.randn(6, 256)
    for bits in (8, 4):
        quantized = mmie.round_to_nearest(weight, bits)
        for group in quantized.reshape(6, 2, 128).reshape(12, 128):
            assert len(torch.unique(group)) <= 2 ** bits
        scale = weight.reshape(6, 2, 128).abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
        assert torch.all((quantized - weight).reshape(6, 2, 128).abs() <= scale / 2 + 1e-6)
    odd = torch.randn(3, 100)  # rows that 128 does not divide: one group per row
    assert len(torch.unique(mmie.round_to_nearest(odd, 4)[0])) <= 16


def test_relearning_options_are_checked():
    parser = mmie.build_parser()
    with pytest.raises(mmie.InputError, match="--relearn_steps"):
        mmie.check_args(parser.parse_args(["--relearn_steps", "0", "10"]), parser)
    mmie.check_args(parser.parse_args(["--relearn_steps", "0"]), parser)  # 0 alone: no attack
    assert not mmie.attacks_run(parser.parse_args(["--relearn_steps", "0"]))


# --- G7 and G5 against the reference, and the outcomes ----------------------------------------------
def lumpy(n, share, rng):
    return (rng.random(n) < share).astype(float)


def test_recoverability_gate_against_the_reference_and_without_one():
    rng = np.random.default_rng(0)
    reference = lumpy(128, 0.3, rng)
    close = np.clip(reference + lumpy(128, 0.03, rng), 0, 1)  # relearns about as much as the reference
    recovered = np.ones(128)  # the Hindi comes back in full
    passed = mmie.recoverability_gate(close, reference, rule="reference", margin=0.10, ratio=0.5, n_boot=999)
    failed = mmie.recoverability_gate(recovered, reference, rule="reference", margin=0.10, ratio=0.5, n_boot=999)
    assert passed["p"] < 0.01 and failed["p"] > 0.5 and passed["rule"] == "reference"
    assert passed["yardstick_mean"] == pytest.approx(reference.mean())
    base = np.ones(128)
    by_base = mmie.recoverability_gate(close, base, rule="base", margin=0.10, ratio=0.5, n_boot=999)
    assert by_base["rule"] == "base" and by_base["p"] < 0.01 and by_base["threshold"] == 0.5


def test_privacy_gate_compares_with_the_reference_auc():
    rng = np.random.default_rng(1)
    ref_m, ref_n = rng.normal(3.0, 0.5, 200), rng.normal(3.0, 0.5, 150)
    same = mmie.mia_reference_gate(ref_m + rng.normal(0, 0.01, 200), ref_n, ref_m, ref_n, margin=0.05, n_boot=999)
    memorised = mmie.mia_reference_gate(ref_m - 0.6, ref_n, ref_m, ref_n, margin=0.05, n_boot=999)
    assert same["p"] < 0.01 and abs(same["estimate"]) < 0.02
    assert memorised["p"] > 0.5 and memorised["estimate"] > 0.2  # members' lower loss gives them away


def gate(p, **extra):
    return {"p": p, "evaluated": True, **extra}


def test_outcomes_unlearns_suppresses_fails_inconclusive_unchanged():
    passing = {name: gate(0.001) for name in ("G1", "G2", "G5", "GH")}
    cases = {"unlearns": {**passing, "G7": gate(0.001)},
             "suppresses": {**passing, "G7": gate(0.9)},
             "removable": {**passing, "G7": {**mmie.not_evaluated(mmie.REMOVABLE_REASON), "applicable": False,
                                              "removable": True}},
             "fails": {**passing, "G2": gate(0.9), "G7": gate(0.001)},
             "inconclusive": {**passing, "G5": gate(0.0001, uninformative=True), "G7": gate(0.001)},
             "unchanged": mmie.mark_not_applicable({**passing, "G7": gate(0.001)}, "unchanged")}
    gates = mmie.apply_fdr(json.loads(json.dumps(cases)), q=0.10)
    decision, outcome = mmie.decide(gates), {arm: mmie.arm_outcome(g) for arm, g in gates.items()}
    assert outcome == {"unlearns": "unlearns", "suppresses": "suppresses", "removable": "suppresses", "fails": "fails",
                       "inconclusive": "inconclusive", "unchanged": "unchanged"}
    assert decision == {"unlearns": "PROCEED", "suppresses": "STOP", "removable": "STOP", "fails": "STOP",
                        "inconclusive": "INCONCLUSIVE", "unchanged": "STOP"}
    assert "removable" in mmie.outcome_line("suppresses", gates["removable"])
    assert "comes back under the relearning attack" in mmie.outcome_line("suppresses", gates["suppresses"])
    assert mmie.outcome_line("unchanged", gates["unchanged"]).startswith("did nothing")


def test_an_uninformative_gate_is_never_a_pass():
    """An uninformative gate with a tiny p used to pass, and an arm with one reached PROCEED."""
    gates = mmie.apply_fdr({"arm": {"G1": gate(0.0001), "G5": gate(0.0001, uninformative=True), "G7": gate(0.0001)}})
    assert gates["arm"]["G5"]["pass"] is False and gates["arm"]["G5"]["p_adj"] is not None
    assert mmie.decide(gates)["arm"] == "INCONCLUSIVE"
    assert mmie.gate_cell(gates["arm"]["G5"]).startswith("uninf*")


# --- numbers to trust: the second review's defects ------------------------------------------------
SETS = ("forget_train", "forget_eval", "forget_roman", "mixed", "adversarial", "retain", "xlang_ur")


def per_prompt(n, empty_sets=(), es=1.0):
    values = {f"empty_rate_{s}": [1.0 if s in empty_sets else 0.0] * n for s in SETS}
    values.update({f"repetition_{s}": [0.0] * n for s in SETS})
    values.update({key: [es] * n for key in ("es_forget_eval", "es_forget_roman", "es_mixed", "es_adversarial")})
    return values


def test_output_health_covers_every_generated_set():
    """An arm silent on romanized, mixed and adversarial prompts passed GH (only forget-eval, retain and the
    related languages were read) and with them G1S, G3 and G6."""
    base = per_prompt(40)
    silent = per_prompt(40, empty_sets=("forget_roman", "mixed", "adversarial"), es=0.0)
    gates = mmie.evaluate_gates(base, [silent], n_boot=199)
    assert {"forget_roman/empty_rate", "mixed/empty_rate", "adversarial/empty_rate"} <= set(gates["GH"]["components"])
    assert gates["GH"]["p"] > 0.5 and gates["GH"]["worst"].endswith("empty_rate")


@pytest.mark.parametrize("carriers", [1, 3, 9])
def test_ties_at_zero_do_not_collapse_the_null(carriers):
    """85 prompts, base Hindi on 1, 3 or 9 of them, the arm none: the tilted null was a point mass at 0 and every
    case read p = 1/(B+1) = 0.0005. Now the evidence grows with the carriers."""
    base, arm = np.zeros(85), np.zeros(85)
    base[:carriers] = 1.0
    p = mmie.ratio_gate(arm, base, rho=0.5, n_boot=1999)["p"]
    assert p > 1 / 2000
    expected = {1: (0.2, 0.7), 3: (0.05, 0.35), 9: (0.0005, 0.05)}[carriers]
    assert expected[0] < p < expected[1], p


def test_a_constant_difference_gives_a_finite_statistic_and_the_binomial_p():
    """A difference that is constant in floating point (here d = 0.5 - 0.5 - 0.25 = -0.25 exactly) had se 0,
    t = -inf and a NaN comparison with the resamples (the tie tolerance was inf too)."""
    exact = mmie.fidelity_gate(np.full(64, 0.5), np.full(64, 0.5), max_drop=0.25, n_boot=1999)
    assert exact["se"] > 0 and np.isfinite(exact["statistic"]) and exact["p"] == pytest.approx(1 / 2000)
    near = mmie.fidelity_gate(np.ones(64), np.ones(64), max_drop=0.10, n_boot=1999)  # float noise of ~1e-17
    assert np.isfinite(near["statistic"]) and abs(near["statistic"]) < 1e3  # was -5.7e16
    assert near["p"] == pytest.approx(max(0.9 ** 64, 1 / 2000), abs=0.003)  # the exact binomial answer


def test_ratio_gate_keeps_its_level_at_the_null_boundary_with_ties():
    """Rejection rate at most the nominal level where most prompts are exact 0s in base and arm."""
    rng, rejections, runs = np.random.default_rng(7), 0, 300
    for _ in range(runs):
        base = np.zeros(85)
        base[:9] = 1.0
        arm = np.zeros(85)
        arm[:9] = rng.random(9) < 0.5  # E[arm] = 0.5 E[base]: on the boundary
        rejections += mmie.ratio_gate(arm, base, rho=0.5, n_boot=199, seed=int(rng.integers(1 << 30)))["p"] <= 0.05
    assert rejections / runs <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / runs)


def test_an_arm_restored_to_its_start_is_unchanged():
    """reft under --auto_config restored step 0 (token KL 2e-9) and was reported as edited, passing G2, G4, GH."""
    restored = {"adaptive": {"early_stop": {"restored": True, "best_step": 0}}}
    assert mmie.restored_to_start(restored)
    assert not mmie.restored_to_start({"adaptive": {"early_stop": {"restored": True, "best_step": 40}}})
    assert not mmie.restored_to_start({})
    report = {"arms": {"base": {"seeds": {"0": {"status": "ok", "per_prompt": per_prompt(20)}}},
                       "reft": {"seeds": {"0": {"status": "ok", "unchanged": True, "per_prompt": per_prompt(20)}}}}}
    args = mmie.build_parser().parse_args(["--n_boot", "99", "--n_boot_gates", "99"])
    mmie.compute_statistics(report, args)
    assert report["outcome"]["reft"] == "unchanged" and report["decision"]["reft"] == "STOP"
    assert all(result["applicable"] is False for result in report["gates"]["reft"].values())
    assert any("did nothing" in line for line in mmie.closing_summary(report))


def test_the_reference_models_own_gates_say_which_gates_no_arm_that_matches_it_can_pass():
    """The reference is silent on Hindi requests where the base answered: output health against the base fails
    for the yardstick itself, which the conclusion states (outside BH and the decisions)."""
    base, silent = per_prompt(40), per_prompt(40, empty_sets=("adversarial",), es=0.0)
    report = {"arms": {"base": {"seeds": {"0": {"status": "ok", "per_prompt": base}}},
                       "reference": {"seeds": {"0": {"status": "ok", "per_prompt": silent}}},
                       "lora": {"seeds": {"0": {"status": "ok", "per_prompt": per_prompt(40, es=0.0)}}}}}
    args = mmie.build_parser().parse_args(["--n_boot", "99", "--n_boot_gates", "99"])
    mmie.compute_statistics(report, args)
    own = report["reference_gates"]
    assert "G5" not in own and "G7" not in own and not own["GH"]["pass"] and own["G1"]["pass"]
    assert own["GH"]["worst"] == "adversarial/empty_rate" and set(report["gates"]) == {"lora"}  # not in BH
    line = next(line for line in mmie.closing_summary(report) if "reference model itself fails" in line)
    assert "GH" in line and "adversarial" in line


def test_g7_is_also_read_per_seed_so_one_relearning_seed_does_not_hide_in_the_mean():
    """Five seeds' models hold no Hindi after the attack and one relearns it in full: the gate (which averages each
    prompt over the seeds) passes, and the per-seed read says that one model of six does not meet the criterion."""
    rng = np.random.default_rng(0)

    def outcome(relearned_share):
        return {"status": "ok", "per_prompt": {**per_prompt(64, es=0.0),
                                               "es_relearn": list((rng.random(64) < relearned_share).astype(float))}}

    reference = {**per_prompt(64, es=0.0), "es_relearn": [1.0] * 16 + [0.0] * 48}  # 0.25, as the embedded pair's
    report = {"arms": {"base": {"seeds": {"0": {"status": "ok", "per_prompt": per_prompt(64)}}},
                       "reference": {"seeds": {"0": {"status": "ok", "per_prompt": reference}}},
                       "distill": {"seeds": {str(seed): outcome(0.95 if seed == 3 else 0.02) for seed in range(6)}}}}
    args = mmie.build_parser().parse_args(["--n_boot", "99", "--n_boot_gates", "199"])
    mmie.compute_statistics(report, args)
    g7 = report["gates"]["distill"]["G7"]
    assert g7["pass"] and g7["arm_mean"] < 0.25 + 0.10
    per_seed = g7["per_seed"]
    assert per_seed["n_meeting"] == 5 and per_seed["meets"]["3"] is False and per_seed["es_relearn"]["3"] > 0.8
    line = next(line for line in mmie.closing_summary(report) if "by seed" in line)
    assert "(0, 1, 2, 3, 4, 5)" in line and "5 of 6 meet" in line
    uninformative = mmie.per_seed_recoverability_line({**g7, "uninformative": True})
    assert "meet" not in uninformative and "uninformative" in uninformative


def test_no_file_cites_anything_outside_the_repository():
    """Eight places cited a design document that is not in the repository; what a reader needs is in docs/."""
    outside = ["DESIGN" + ".md", "DESIGN" + " section", "/wo" + "rk/", "sha" + "red/", "no" + "tes/"]
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO, check=True).stdout.split()
    offenders = []
    for name in tracked:
        if name.endswith((".py", ".md", ".sh", ".sbatch", "Makefile", "run", ".json")):
            text = (REPO / name).read_text(encoding="utf-8")
            offenders += [f"{name}: {line.strip()[:80]}" for line in text.splitlines()
                          if any(pattern in line for pattern in outside)]
    assert not offenders, offenders


TINY_PROTOCOL = ["--sample_cap", "10", "--n_boot", "99", "--n_boot_gates", "99", "--layer_sample", "10", "--lora_steps",
                 "2", "--relearn_steps", "1", "--probe_folds", "2", "--relearn_prompts", "6", "--max_new_tokens", "6"]


def run_hub_style(model, tokenizer, tmp_path, *flags: str) -> dict:
    """The model and the shipped tokenizer saved as a hub folder, run through the whole protocol at its smallest
    (TINY_PROTOCOL, then `flags`, which override it)."""
    folder = tmp_path / f"hub-{model.config.model_type}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return mmie.main(["--model", str(folder), *TINY_PROTOCOL, *flags, "--out", str(tmp_path / "run"),
                      "--ckpt_dir", str(tmp_path / "ckpt")])


def test_a_hub_style_model_runs_the_whole_protocol_without_a_reference(tmp_path, tokenizer):
    """A random-init Qwen2 saved as a hub folder: no reference is known, so G7 uses the stated base rule, the
    lora arm is attacked on its released weights and the removable dim arm is not."""
    report = run_hub_style(qwen2(tokenizer, layers=2, hidden=64), tokenizer, tmp_path, "--relearn_steps", "1", "2",
                           "--arms", "lora", "dim")
    assert "reference" not in report["arms"] and report["recoverability"]["reference"] is None
    assert report["statistics_config"]["G7_rule"].startswith("no reference")
    lora = report["arms"]["lora"]["seeds"]["0"]
    assert lora["recoverability"]["mode"] == "full" and set(lora["recoverability"]["grid"]) == {
        f"lr={lr:g} steps={step}" for lr in mmie.RELEARN_LRS for step in (1, 2)}
    assert {"es_relearn", "nll_relearn", "es_relearn_benign", "es_quant8", "es_quant4"} <= set(lora["per_prompt"])
    record = lora["recoverability"]  # the likelihood read: its lowest grid point, on the held-out Hindi texts
    assert set(record["grid_nll"]) == set(record["grid"])
    assert lora["per_prompt"]["nll_relearn"] == min(record["grid_nll"].values(), key=np.mean)
    assert "nll_relearn" in report["summary"]["lora"]
    assert report["gates"]["lora"]["G7"].get("rule") == "base"
    assert report["gates"]["dim"]["G7"]["removable"] and "es_relearn" not in report["arms"]["dim"]["seeds"]["0"]["per_prompt"]
    assert report["outcome"]["dim"] in ("suppresses", "fails", "inconclusive")
    assert (tmp_path / "run" / "relearning.png").is_file()


# --- the distill arm (UNDO) ------------------------------------------------------------------------
def test_shrink_perturb_mixes_matrices_with_noise_and_shrinks_vectors_toward_their_targets():
    torch.manual_seed(0)
    matrix, gain, bias = (torch.nn.Parameter(torch.ones(64, 32)), torch.nn.Parameter(torch.full((32,), 3.0)),
                          torch.nn.Parameter(torch.full((32,), 3.0)))
    targets = {"gain": torch.ones(32), "bias": torch.zeros(32)}
    mmie.shrink_perturb({"matrix": matrix, "gain": gain, "bias": bias}, targets, alpha=0.6, beta=0.1,
                        generator=torch.Generator().manual_seed(0))
    assert torch.allclose(gain, torch.full((32,), 0.4 * 3 + 0.6)) and torch.allclose(bias, torch.full((32,), 1.2))
    noise = (matrix - 0.4) / (0.6 * 0.1)
    bound = (6 / (64 + 32)) ** 0.5  # Xavier-uniform's bound
    assert noise.abs().max() <= bound + 1e-6 and noise.std() > bound / 3


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma3"])
def test_fresh_vector_values_are_each_architectures_own_initialisation(family):
    """What --undo_vector_init fresh shrinks toward: a fresh norm gain is 1 on Qwen2 and Llama (x * w) and 0 on Gemma3
    (x * (1 + w)), a bias 0 (the reference code's 0 is a fresh norm on Gemma only)."""
    from test_model import tiny

    model = tiny(family, vocab_size=64, eos_id=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # as a trained model: no vector at its initial value
    names = [name for name, _ in model.named_parameters()]
    fresh = mmie.fresh_vector_values(model, names)
    vectors = {name for name, p in model.named_parameters() if p.ndim == 1}
    assert set(fresh) == vectors and vectors
    norm_gain = 0.0 if family == "gemma3" else 1.0
    for name, value in fresh.items():
        assert torch.equal(value, torch.full_like(value, norm_gain if "norm" in name else 0.0)), name
    assert mmie.fresh_vector_values(model, [n for n in names if "mlp" in n]) == {}  # MLP scope: no vectors


def test_top_k_distillation_ignores_the_teachers_tail_and_k_of_the_vocabulary_is_the_full_kl():
    torch.manual_seed(0)
    teacher, student = torch.randn(5, 50) * 3, torch.randn(5, 50, requires_grad=True)
    full = mmie.distillation_kl(teacher, student, top_k=0)
    expected = torch.nn.functional.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1),
                                          log_target=True, reduction="none").sum(-1)
    assert torch.allclose(full, expected, atol=1e-5) and (full >= 0).all()
    assert torch.allclose(mmie.distillation_kl(teacher, student, top_k=50), full, atol=1e-5)
    top = mmie.distillation_kl(teacher, student, top_k=4)
    tail = teacher.clone()
    tail[tail < tail.topk(4, -1).values[:, -1:]] -= 7.0  # the teacher ranks its tail differently: nothing changes
    assert torch.allclose(mmie.distillation_kl(tail, student, top_k=4), top, atol=1e-6)
    assert not torch.allclose(mmie.distillation_kl(tail, student, top_k=0), full, atol=1e-3)
    assert (top >= 0).all()


def test_masked_distillation_gives_the_forget_script_no_mass_and_only_pushes_the_student_away(tokenizer):
    blocked = mmie.script_token_ids(tokenizer, "Deva")
    texts = tokenizer.batch_decode([[i] for i in blocked])
    assert blocked and all(any("\u0900" <= c <= "\u097f" for c in text) for text in texts)
    shared = set("\u0964\u0965") | {chr(0x0966 + d) for d in range(10)}  # no letters (lid_ensemble)
    others = "".join(tokenizer.decode([i]) for i in set(range(len(tokenizer))) - set(blocked))
    assert not {c for c in others if "\u0900" <= c <= "\u097f"} - shared
    torch.manual_seed(0)
    teacher, student = torch.randn(6, 50) * 3, torch.randn(6, 50, requires_grad=True)
    ids = torch.tensor([1, 7, 30])
    masked = mmie.distillation_kl(teacher, student, 0, ids)
    kept = torch.ones(50, dtype=torch.bool)
    kept[ids] = False
    target = torch.softmax(teacher[:, kept], -1)  # the teacher renormalised over the other tokens
    expected = (target * (target.log() - torch.log_softmax(student, -1)[:, kept])).sum(-1)
    assert torch.allclose(masked, expected, atol=1e-5)
    masked.sum().backward()
    assert torch.isfinite(student.grad).all() and (student.grad[:, ids] > 0).all()  # descent lowers them only
    shifted = teacher.clone()
    shifted[:, ids] += 5.0  # how the teacher ranks the blocked tokens no longer matters
    assert torch.allclose(mmie.distillation_kl(shifted, student, 0, ids), masked, atol=1e-5)
    assert torch.allclose(mmie.distillation_kl(shifted, student, 4, ids),
                          mmie.distillation_kl(teacher, student, 4, ids))


def test_undo_scope_is_every_weight_when_small_and_the_top_mlps_when_large(model):
    args = mmie.build_parser().parse_args([])
    names, rule = mmie.undo_scope(args, model)
    assert names == [name for name, _ in model.named_parameters()] and rule.startswith("all")
    top, rule = mmie.undo_scope(mmie.build_parser().parse_args(["--undo_scope", "top_mlp"]), model)
    assert top and all(".mlp." in name and int(name.split("layers.")[1].split(".")[0]) >= 1 for name in top)
    assert "MLPs of layers 1-2" in rule


def test_distillation_samples_alternate_with_the_texts_and_the_students_are_drawn_again(tmp_path, tokenizer, monkeypatch):
    """--undo_samples student: every other step trains on the student's sampled continuations of the texts'
    beginnings, drawn again every UNDO_RESAMPLE_EVERY steps (2 here), never longer than training keeps a text."""
    monkeypatch.setattr(mmie, "UNDO_RESAMPLE_EVERY", 2)
    report = run_hub_style(qwen2(tokenizer, layers=2), tokenizer, tmp_path, "--arms", "distill", "--undo_steps", "5",
                           "--undo_samples", "student", "--max_len", "24")
    outcome = report["arms"]["distill"]["seeds"]["0"]
    assert outcome["status"] == "ok", outcome.get("error")
    info = outcome["info"]
    assert [record["kind"] for record in info["train_log"]] == ["distill", "samples"] * 2 + ["distill"]
    samples = info["samples"]
    assert samples["source"] == "student" and samples["n_prompts"] == info["n_distill_texts"]
    assert [s["step"] for s in samples["samplings"]] == [0, 2, 4] and samples["max_new_tokens"] == 24
    assert all(0 < s["new_tokens"] <= 24 for s in samples["samplings"])


def test_the_distill_arm_runs_its_partial_path_on_a_hub_style_gemma3(tmp_path, tokenizer):
    """A random-init Gemma3 (Gemma-3's architecture, soft-capped logits) saved as a hub folder: the partial path
    perturbs and distils the top half's MLPs only; the output head is the base's, so token KL reads it as usual."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, bos_token_id=None)
    report = run_hub_style(Gemma3ForCausalLM(config), tokenizer, tmp_path, "--arms", "distill", "--undo_steps", "3",
                           "--undo_scope", "top_mlp", "--undo_forget_domain", "--undo_mask_forget_script",
                           "--undo_samples", "teacher", "--max_len", "24")
    outcome = report["arms"]["distill"]["seeds"]["0"]
    assert outcome["status"] == "ok", outcome.get("error")
    info = outcome["info"]
    n_forget = report["data"]["forget"]["n_train"]  # --undo_forget_domain: the forget-train texts are in the pool
    assert info["forget_domain"] and info["n_distill_texts"] > n_forget
    assert info["masked_forget_script_tokens"] == len(mmie.script_token_ids(tokenizer, "Deva")) > 0
    assert info["scope"].startswith("the MLPs of layers 2-3") and info["teacher"]["arm"] == "lora"
    assert len(info["train_log"]) <= 3 and info["stop"]["reason"]
    assert info["vector_init"] == "zero" and info["vector_targets"] == {}  # Gemma3's MLPs hold no vectors
    teacher_samples = info["samples"]["samplings"]
    assert [s["step"] for s in teacher_samples] == [0] and teacher_samples[0]["share_with_Deva"] == 0  # suppressed
    assert outcome["recoverability"]["removable"] is False and "es_relearn" in outcome["per_prompt"]
    assert report["gates"]["distill"]["G7"]["rule"] == "base"
    saved = next((tmp_path / "ckpt" / "distill").glob("*/seed0/student.safetensors"))
    from safetensors.torch import load_file
    changed = set(load_file(str(saved)))  # the scope, and the weights the teacher's LoRA changed (merged)
    assert {name for name in changed if ".mlp." in name and name.split("layers.")[1][0] in "23"} >= {
        f"model.layers.{i}.mlp.{proj}.weight" for i in (2, 3) for proj in ("gate_proj", "up_proj", "down_proj")}
    assert not any("embed" in name or "norm" in name for name in changed)
