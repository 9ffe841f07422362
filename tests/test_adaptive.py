"""Adaptive unlearning (adaptive_unlearning.py) on a tiny random-init Qwen2 model with the embedded tokenizer and
synthetic texts: sine-LoRA's bound and reference switch, DualOptim's two Adam states and 1:5 cycle, LoReUn-style
weights, the curriculum, stage triggers, dual ascent, early stopping with best-step restore, the dynamic DSG clamp,
the script-blind pool, the mmie wiring, and a short end-to-end adaptive run."""

import dataclasses
import json
import math
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft import LoraConfig

import adaptive_unlearning as ad
import mmie

HINDI = ["मैं कल सुबह बाज़ार गया था।", "आज माँ ने दाल बनाई।", "बच्चे पार्क में खेल रहे हैं।", "सर्दियों में साग अच्छा लगता है।",
         "हम शाम को घर लौटे।", "वह रोज़ किताब पढ़ती है।", "बारिश के बाद मौसम ठंडा हो गया।", "दादी ने कहानी सुनाई।"]
ROMAN = ["main kal subah bazaar gaya tha", "aaj maa ne daal banayi", "bachche park mein khel rahe hain",
         "hum shaam ko ghar laute"]
ENGLISH = ["The weather was lovely today.", "My grandmother never measured anything.", "Made lentil soup tonight.",
           "Does anyone know a substitute for buttermilk?", "The train was late again.", "We walked along the river.",
           "She reads a book every day.", "The garden needs watering."]
FORGET_VAL, RETAIN_VAL = ["दादा जी अख़बार पढ़ते हैं।"], ["The bus stop is near the school."]
OBJECTIVE_ARGS = SimpleNamespace(npo_beta=0.1, simnpo_gamma=0.0, ga_bound=5.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared 2-core box: threads only add synchronisation
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def sine(model):
    """The model frozen, with sine-LoRA on layer 1's MLP projections: (adapters, switch)."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = ad.mlp_projections({1: mmie.decoder_layers(model)[1]})
    switch = mmie.HookSwitch()
    with ad.sine_lora(targets, switch, rank=4, alpha=8) as adapters:
        yield adapters, switch


def logits(model, tokenizer, texts=HINDI[:3] + ENGLISH[:2]):
    batch = mmie.encode_texts(tokenizer, texts, 64, "cpu")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def settings(**overrides) -> ad.AdaptiveSettings:
    """Every component off unless turned on here."""
    return ad.AdaptiveSettings(active=True, **{**{name: False for name in ad.COMPONENTS}, **overrides})


def make_trainer(model, tokenizer, params, s, *, steps=6, score_nll=None, retain_objective=None,
                 objective_log=None, pools=None, reference=nullcontext, **kwargs):
    """The composed AdaptiveTrainer with mmie's objectives (retain NLL) on the synthetic texts."""
    pools = pools or {"forget": HINDI, "retain": ENGLISH}
    ref = mmie.sequence_logprobs(model, tokenizer, pools["forget"], batch_size=8, max_len=64)

    def forget(name, batch, idx):
        if objective_log is not None:
            objective_log.append(name)
        seq_logp, length = mmie.token_logprobs(model, batch)
        losses = mmie.forget_losses_from_logprobs(name, seq_logp, length, ref[torch.as_tensor(idx)], OBJECTIVE_ARGS)
        return losses, -seq_logp / length

    def score(texts):
        return mmie.text_nll(model, tokenizer, texts, batch_size=8, max_len=64)[0]

    trainer_class = type("AdaptiveTrainer", (ad.AdaptiveUnlearningTrainer, mmie.Trainer), {})
    return trainer_class(
        model, tokenizer, params, pools, settings=s, validation={"forget": FORGET_VAL, "retain": RETAIN_VAL},
        forget_objective=forget,
        retain_objective=retain_objective or (lambda b, i: mmie.retain_losses("nll", model, b, None)),
        score_nll=score_nll or score, encode=lambda texts: mmie.encode_texts(tokenizer, texts, 64, "cpu"),
        reference=reference, static_objective="ga", bounded_parameterisation=True, steps=steps,
        **{"lr": 1e-2, "batch_size": 4, "max_len": 64, "seed": 0, **kwargs})


class ScriptedValidation:
    """A fake score_nll: validation slices get scripted (forget, retain) means, one pair per validation (the
    first pair is the base; the retain slice, scored at every validation and after the forget slice, moves on to
    the next pair); other texts get their real NLL. Records the parameters and which slices each validation
    scored."""

    def __init__(self, pairs, real=None, params=()):
        self.pairs, self.real, self.params = list(pairs), real, list(params)
        self.seen_params, self.scored, self._forget_scored = [], [], False

    def __call__(self, texts):
        if texts == FORGET_VAL:
            self._forget_scored = True
            return np.array([self.pairs[0][0]])
        if texts == RETAIN_VAL:
            self.seen_params.append([p.detach().clone() for p in self.params])
            self.scored.append(self._forget_scored)
            self._forget_scored = False
            return np.array([self.pairs.pop(0)[1]])
        return self.real(texts) if self.real else np.linspace(1.0, 2.0, len(texts))


# ---------------------------------------------------------------------------------------------
# Bounded unlearning: sine-LoRA
# ---------------------------------------------------------------------------------------------
def test_sine_lora_is_zero_at_init_and_bounded_however_large_a_and_b_grow():
    torch.manual_seed(0)
    adapter = ad.SineAdapter(d_in=64, d_out=32, rank=4, alpha=8, omega=None, dropout=0.0)
    assert torch.equal(adapter.delta_weight(), torch.zeros(32, 64))
    bound = 8 / 4 / math.sqrt(64)
    assert adapter.bound == pytest.approx(bound)
    with torch.no_grad():
        adapter.A.normal_(std=1e3)
        adapter.B.normal_(std=1e3)
    delta = adapter.delta_weight()
    unbounded = adapter.scaling * (adapter.B @ adapter.A)  # peft LoRA's update with the same factors
    assert delta.abs().max() <= bound * (1 + 1e-6) and delta.abs().max() > 0.9 * bound
    assert unbounded.abs().max() > 1e5 * bound


def test_default_omega_makes_small_sine_updates_equal_to_lora_scaling():
    """omega = sqrt(d_in) cancels Sine-LoRA's 1/sqrt(d_in): near 0, dW = (alpha/r) B A exactly as peft LoRA."""
    torch.manual_seed(0)
    adapter = ad.SineAdapter(d_in=64, d_out=32, rank=4, alpha=8, omega=None, dropout=0.0)
    assert adapter.omega == 8.0
    with torch.no_grad():
        adapter.B.normal_(std=1e-4)
    torch.testing.assert_close(adapter.delta_weight(), adapter.scaling * adapter.B @ adapter.A, rtol=1e-4, atol=1e-9)
    slow = ad.SineAdapter(d_in=64, d_out=32, rank=4, alpha=8, omega=1.0, dropout=0.0)
    with torch.no_grad():
        slow.A.copy_(adapter.A)
        slow.B.copy_(adapter.B)
    torch.testing.assert_close(slow.delta_weight() * 8, adapter.delta_weight(), rtol=1e-4, atol=1e-9)


def test_sine_switch_gives_the_base_model_and_peft_still_wraps_the_projections(model, tokenizer):
    base = logits(model, tokenizer)
    targets = ad.mlp_projections({1: mmie.decoder_layers(model)[1]})
    assert sorted(targets) == ["layers.1.mlp.down_proj", "layers.1.mlp.gate_proj", "layers.1.mlp.up_proj"]
    switch = mmie.HookSwitch()
    with ad.sine_lora(targets, switch, rank=4, alpha=8) as adapters:
        torch.testing.assert_close(logits(model, tokenizer), base, rtol=0, atol=0)  # B = 0: no edit yet
        with torch.no_grad():
            for adapter in adapters.values():
                adapter.B.normal_(std=1.0)
        edited = logits(model, tokenizer)
        assert not torch.allclose(edited, base, atol=1e-3)
        with switch.off():
            torch.testing.assert_close(logits(model, tokenizer), base, rtol=0, atol=0)
        # The relearning attack's peft adapter wraps the hooked projections; its zero start keeps the edit.
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"])
        with mmie.lora_adapter(model, config, "relearn") as peft_model:
            torch.testing.assert_close(logits(model, tokenizer), edited, rtol=1e-5, atol=1e-5)
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(param)
            assert not torch.allclose(logits(model, tokenizer), edited, atol=1e-3)
        torch.testing.assert_close(logits(model, tokenizer), edited, rtol=0, atol=0)
        assert all(type(m) is torch.nn.Linear for m in targets.values())
        assert ad.max_abs_delta(adapters)["value"] <= ad.max_abs_delta(adapters)["bound"] * (1 + 1e-6)
    assert mmie.active_hooks(model) == 0
    torch.testing.assert_close(logits(model, tokenizer), base, rtol=0, atol=0)


def test_mlp_projections_refuses_layers_without_linear_mlp_projections():
    layer = torch.nn.Module()
    layer.mlp = torch.nn.Module()
    with pytest.raises(ValueError, match="--no_sine_lora"):
        ad.mlp_projections({0: layer})


# ---------------------------------------------------------------------------------------------
# DualOptim
# ---------------------------------------------------------------------------------------------
def test_dualoptim_keeps_two_adam_states_with_their_own_step_counts_and_a_1_to_5_cycle(model, tokenizer, sine):
    adapters, _ = sine
    params = list(adapters.parameters())
    trainer = make_trainer(model, tokenizer, params, settings(dualoptim=True, dualoptim_lr_ratio=0.5,
                                                                     dualoptim_retain_steps=5), steps=12)
    assert [trainer.kind_at(i) for i in range(12)] == (["forget"] + ["retain"] * 5) * 2
    model.train()
    trainer.train_step(0)
    forget_state = {k: v.clone() for k, v in trainer.optimizers["forget"].state[params[0]].items()}
    forget_lr = trainer.optimizers["forget"].param_groups[0]["lr"]
    for step in range(1, 6):
        trainer.train_step(step)
    retain_state = trainer.optimizers["retain"].state[params[0]]
    assert ad.optimizer_steps(trainer.optimizers["forget"]) == 1 and ad.optimizer_steps(trainer.optimizers["retain"]) == 5
    for key, value in forget_state.items():  # five retain steps left the forget moments untouched
        assert torch.equal(trainer.optimizers["forget"].state[params[0]][key], value)
    assert not torch.allclose(retain_state["exp_avg"], forget_state["exp_avg"])
    assert forget_lr == pytest.approx(0.5 * 1e-2 * trainer.lr_factor(0))
    assert trainer.optimizers["retain"].param_groups[0]["lr"] == pytest.approx(1e-2 * trainer.lr_factor(5))
    assert trainer.lr_report()["forget_to_retain_steps"] == "1:5"


# ---------------------------------------------------------------------------------------------
# Loss-based reweighting and the curriculum
# ---------------------------------------------------------------------------------------------
def test_reweighting_gives_lower_loss_more_weight_normalised_and_clipped():
    reweighter = ad.LossReweighter(np.array([1.0, 2.0, 3.0, 12.0]), temperature=1.0, clip=5.0)
    w = reweighter.weights
    assert w[0] > w[1] > w[2] > w[3] and w.mean() == pytest.approx(1.0)
    assert w.max() / w.min() <= 25 * (1 + 1e-9)  # exp(11) unclipped
    assert reweighter.summary()["clipped_share"] > 0
    batch = reweighter.batch_weights(np.array([2, 0]))
    assert batch.sum() == pytest.approx(1.0) and batch[1] > batch[0]
    reweighter.observe(np.array([0]), np.array([20.0]), step=1)  # sample 0 is now forgotten: least weight
    assert reweighter.weights.argmin() == 0
    flat = ad.LossReweighter(np.array([1.0, 2.0, 3.0]), temperature=1e3, clip=5.0).weights
    np.testing.assert_allclose(flat, 1.0, atol=2e-3)


def test_weights_and_curriculum_compare_nlls_within_each_script_only():
    """Romanized texts have much lower per-token NLL (their tokens): one softmax over a script-blind pool would weight
    by script. Within groups, each split keeps mean weight 1 and its own order."""
    nll = np.array([7.0, 7.5, 8.0, 3.0, 3.5, 4.0])
    groups = np.array(["deva"] * 3 + ["roman"] * 3)
    w = ad.LossReweighter(nll, temperature=1.0, clip=5.0, groups=groups).weights
    assert w[:3].mean() == pytest.approx(1.0) and w[3:].mean() == pytest.approx(1.0)
    np.testing.assert_allclose(w[:3], w[3:])  # the same offsets within each script give the same weights
    pooled = ad.LossReweighter(nll, temperature=1.0, clip=5.0).weights
    assert pooled[3:].min() > pooled[:3].max()  # without groups: every romanized text outweighs every Devanagari one
    p = ad.Curriculum(nll, strength=1.0, anneal_steps=10, groups=groups).probabilities(0)
    np.testing.assert_allclose(p[:3], p[3:])


def test_reweighting_reads_training_forwards_and_refreshes_only_the_stale_texts_in_one_batched_pass(
        model, tokenizer, sine):
    adapters, _ = sine
    calls = []

    def score(texts):
        calls.append(list(texts))
        return mmie.text_nll(model, tokenizer, texts, batch_size=8, max_len=64)[0]

    trainer = make_trainer(model, tokenizer, list(adapters.parameters()), settings(reweight=True, reweight_every=2),
                           steps=6, score_nll=score)
    model.train()
    trainer.log_indices = []
    for step in range(6):
        record = trainer.train_step(step)
        trainer.log.append({key: record[key] for key in ("step", "kind", "loss", "lr")})
        if record["kind"] == "forget":
            trainer.log_indices.append(record["indices"])
        if record["kind"] == "forget" and step == 2:  # a step right after a refresh: read from its own forward
            trainer.after_step(record)
            np.testing.assert_allclose(trainer.reweighter.nll[record["indices"]], -record["per_sample"], rtol=1e-5)
            continue
        trainer.after_step(record)
    # the start reads the whole pool; each refresh (after steps 2 and 4) one batched call over the texts that no
    # forward read in the last 2 steps: the forget step 0 read 4 of the 8 texts, so the refresh at 2 reads the rest
    first_batch = [HINDI[i] for i in trainer.log_indices[0]]
    assert calls[0] == HINDI and len(calls) == 3
    assert sorted(calls[1]) == sorted(set(HINDI) - set(first_batch))
    assert [(r["step"], r["rescored"]) for r in trainer.reweighter.refreshes][:2] == [(0, 8), (2, 4)]


def test_curriculum_prefers_easy_samples_first_and_anneals_to_uniform():
    curriculum = ad.Curriculum(np.array([1.0, 2.0, 3.0, 4.0]), strength=1.0, anneal_steps=10)
    start, middle, end = curriculum.probabilities(0), curriculum.probabilities(5), curriculum.probabilities(10)
    assert np.all(np.diff(start) > 0)  # higher start NLL = easier to forget = sampled more
    assert start[-1] / start[0] > middle[-1] / middle[0] > 1
    np.testing.assert_allclose(end, 0.25)
    np.testing.assert_allclose(curriculum.probabilities(50), 0.25)


def test_curriculum_and_reweighting_combine_sampling_easy_and_weighting_hard(model, tokenizer, sine):
    adapters, _ = sine
    nll = np.array([1.0, 1.8, 1.1, 1.6, 1.2, 1.4, 1.3, 1.35])  # start NLL per HINDI text, none clipped
    s = settings(curriculum=True, reweight=True, curriculum_strength=30.0, reweight_every=100)
    trainer = make_trainer(model, tokenizer, list(adapters.parameters()), s, steps=20, batch_size=2,
                           score_nll=lambda texts: nll if texts == HINDI else np.ones(len(texts)))
    first = trainer.sample("forget", 0)
    assert sorted(first.tolist()) == [1, 3]  # the two easiest (highest NLL)
    weights = trainer.weights("forget", first, 0)
    assert weights[first.tolist().index(3)] > weights[first.tolist().index(1)]  # the harder of the two counts more


# ---------------------------------------------------------------------------------------------
# Stages, dual ascent, early stopping
# ---------------------------------------------------------------------------------------------
def test_stages_switch_on_measured_triggers_and_record_the_timeline(model, tokenizer, sine):
    adapters, _ = sine
    validation = ScriptedValidation([(2.0, 3.0),  # base: soft retain budget 3.0 x 1.1 = 3.3, forget target 3.0
                                     (2.5, 3.0), (3.2, 3.1), (3.5, 3.5), (3.4, 3.35), (3.4, 3.2), (3.6, 3.2),
                                     (3.6, 3.2), (3.6, 3.2)])
    objectives = []
    s = settings(stages=True, adaptive_eval_every=1, adaptive_retain_eps=0.1, stage_forget_margin=1.0,
                 stage_ascent_max_share=0.9)
    trainer = make_trainer(model, tokenizer, list(adapters.parameters()), s, steps=8, score_nll=validation,
                           objective_log=objectives)
    trainer.bounded_parameterisation = False  # so the ascent stage uses the tanh-bounded loss
    log = trainer.run()
    timeline = trainer.report()["stages"]
    assert [(t["stage"], t["start_step"], t["end_step"]) for t in timeline] == [
        ("bounded_ascent", 0, 2), ("npo", 2, 3), ("recovery", 3, 5), ("npo", 5, 8)]
    assert "forget-val NLL 3.2" in timeline[1]["trigger"] and "soft budget 3.3" in timeline[2]["trigger"]
    assert "back within" in timeline[3]["trigger"]
    assert validation.scored == [True] * 3 + [False] * 6  # the forget slice only while the ascent's trigger reads it
    assert [row["kind"] for row in log[3:5]] == ["retain", "retain"]
    assert [row["stage"] for row in log] == ["bounded_ascent"] * 2 + ["npo"] + ["recovery"] * 2 + ["npo"] * 3
    forget_steps = [row["step"] for row in log if row["kind"] == "forget"]
    expected = {0: "bounded_ga", 2: "npo", 6: "npo"}
    assert [objectives[k] for k, step in enumerate(forget_steps)] == [expected[step] for step in forget_steps]


def test_stage_schedule_falls_back_to_its_step_cap_between_validations():
    schedule = ad.StageSchedule(base_forget_nll=2.0, margin=5.0, soft_limit=3.3, ascent_max_steps=4)
    assert schedule.update(2, forget_nll=2.5, retain_nll=3.0) is None
    schedule.check_step_cap(3)
    assert schedule.current == "bounded_ascent"
    schedule.check_step_cap(4)
    assert schedule.current == "npo" and "step cap 4" in schedule.stages[-1]["trigger"]
    schedule.check_step_cap(5)  # only the ascent has a cap
    assert [t["stage"] for t in schedule.timeline(9)] == ["bounded_ascent", "npo"]
    assert schedule.timeline(9)[-1]["end_step"] == 9


def test_stage_schedule_sends_unhealthy_outputs_to_recovery_until_they_are_healthy():
    loops = "forget-val repetition +0.3 over the base's (margin 0.05)"
    schedule = ad.StageSchedule(base_forget_nll=2.0, margin=10.0, soft_limit=3.3, ascent_max_steps=100)
    assert schedule.update(1, forget_nll=9.0, retain_nll=3.0) is None
    assert schedule.update(2, 9.0, 3.0, loops) == loops  # a collapse goes to recovery
    assert schedule.update(3, 9.0, 3.0, loops) is None  # still unhealthy: recovery goes on
    assert "outputs healthy" in schedule.update(4, 9.0, 3.0, None)
    assert schedule.update(5, 9.0, 3.0, loops) == loops and schedule.current == "recovery"  # npo -> recovery
    assert [t["stage"] for t in schedule.timeline(6)] == ["bounded_ascent", "recovery", "npo", "recovery"]


def test_a_healthy_recovery_step_that_beats_the_best_is_kept_and_recovery_never_uses_up_patience(model, tokenizer,
                                                                                                  sine):
    adapters, _ = sine
    params = list(adapters.parameters())
    probes = iter([(1.0, 0.0), (0.9, 0.0), (0.2, 0.4), (0.95, 0.0), (0.6, 0.0), (0.7, 0.0)])
    seen = []

    def probe():  # (ES, repetition): base, then steps 1-5
        seen.append([p.detach().clone() for p in params])
        es, repetition = next(probes)
        return {"es": es, "empty_rate": 0.0, "repetition": repetition}

    # retain 3.05 at step 3: over the soft budget 3.03 (recovery goes on), within the hard 3 + log 1.1 (eligible)
    validation = ScriptedValidation([(2.0, 3.0), (2.0, 3.0), (2.0, 3.0), (2.0, 3.05), (2.0, 3.0), (2.0, 3.0)])
    s = settings(stages=True, early_stop=True, adaptive_eval_every=1, adaptive_patience=1, adaptive_min_delta=0.0,
                 adaptive_retain_eps=0.01)
    trainer = make_trainer(model, tokenizer, params, s, steps=8, forget_probe=probe, score_nll=validation, health_margins={"empty_rate": 0.05, "repetition": 0.05})
    trainer.run()
    report = trainer.report()
    assert [(t["stage"], t["start_step"]) for t in report["stages"]] == [
        ("bounded_ascent", 0), ("recovery", 2), ("npo", 4)]
    stop = report["early_stop"]  # 2 collapsed (not judged); recovery: 3 worse (skipped, no patience used), 4 best
    assert stop["best_step"] == 4 and stop["stopped_at"] == 5
    assert all(torch.equal(p, b) for p, b in zip(params, seen[4]))


def test_dual_ascent_raises_lambda_over_budget_lowers_it_within_and_is_projected():
    dual = ad.DualAscent(init=1.0, step_size=1.0, limit=3.3, maximum=10.0)
    assert dual.update(1, 3.8) == pytest.approx(1.5)
    assert dual.update(2, 3.0) == pytest.approx(1.2)
    assert dual.update(3, 0.0) == 0.0
    assert dual.update(4, 100.0) == 10.0
    assert [row["lambda"] for row in dual.trajectory] == pytest.approx([1.0, 1.5, 1.2, 0.0, 10.0])


def test_dual_ascent_scales_the_retain_term_of_combined_steps(model, tokenizer, sine):
    adapters, _ = sine
    validation = ScriptedValidation([(2.0, 3.0), (2.1, 4.0), (2.2, 4.0)])
    s = settings(dual_ascent=True, adaptive_eval_every=1, adaptive_retain_eps=0.1, dual_init=1.0, dual_step=1.0)
    trainer = make_trainer(model, tokenizer, list(adapters.parameters()), s, steps=2, score_nll=validation,
                           retain_objective=lambda batch, idx: torch.full((len(idx),), 2.0))
    model.train()
    assert trainer.kind_at(0) == "combined"
    record = trainer.train_step(0)
    trainer.log.append({"step": 0, "kind": "combined", "loss": record["loss"], "lr": record["lr"]})
    nll = trainer._seen[0][1]
    np.testing.assert_allclose(record["per_sample"], -nll + 1.0 * 2.0, rtol=1e-5)  # ga + lambda x retain
    trainer.after_step(record)
    assert trainer.dual.value == pytest.approx(1.0 + (4.0 - 3.3))  # retain 4.0 over the limit 3.3
    record = trainer.train_step(1)
    np.testing.assert_allclose(record["per_sample"], -trainer._seen[0][1] + 1.7 * 2.0, rtol=1e-5)


def test_dual_ascent_under_dualoptim_scales_the_retain_learning_rate(model, tokenizer, sine):
    adapters, _ = sine
    validation = ScriptedValidation([(2.0, 3.0), (2.1, 2.0)])
    s = settings(dual_ascent=True, dualoptim=True, adaptive_eval_every=1, adaptive_retain_eps=0.1, dual_init=1.0)
    trainer = make_trainer(model, tokenizer, list(adapters.parameters()), s, steps=1, score_nll=validation)
    trainer.run()
    assert trainer.dual.value == pytest.approx(0.0)  # 1 + (2.0 - 3.3) < 0: projected to 0
    assert trainer.optimizers["retain"].param_groups[0]["lr_scale"] == 0.0
    assert trainer.optimizers["forget"].param_groups[0]["lr_scale"] == 1.0
    assert trainer.report()["dual"]["variant"].startswith("lambda scales the retain learning rate")


def test_early_stopping_restores_the_best_steps_parameters(model, tokenizer, sine):
    adapters, _ = sine
    params = list(adapters.parameters())
    validation = ScriptedValidation([(2.0, 3.0), (2.5, 3.0), (3.0, 3.0), (2.9, 3.0), (2.8, 3.0), (2.7, 3.0)],
                                    params=params)
    s = settings(early_stop=True, adaptive_eval_every=1, adaptive_patience=2, adaptive_min_delta=0.0)
    trainer = make_trainer(model, tokenizer, params, s, steps=10, score_nll=validation)
    log = trainer.run()
    stop = trainer.report()["early_stop"]
    assert len(log) == 4 and stop["stopped_at"] == 4 and stop["best_step"] == 2 and stop["restored"]
    assert "no improvement" in stop["reason"]
    assert [row["step"] for row in stop["curve"]] == [0, 1, 2, 3, 4]
    best, last = validation.seen_params[2], validation.seen_params[4]
    assert all(torch.equal(p, b) for p, b in zip(params, best))
    assert not all(torch.equal(p, l) for p, l in zip(params, last))


def test_steps_outside_the_retain_budget_are_never_best_and_use_up_patience_and_the_deadline_stops(
        model, tokenizer, sine):
    adapters, _ = sine
    validation = ScriptedValidation([(2.0, 3.0), (2.5, 3.02), (2.9, 3.2), (3.5, 3.3)])  # > 3.0 + log 1.05 = 3.049
    s = settings(early_stop=True, adaptive_eval_every=1, adaptive_max_retain_ppl_ratio=1.05, adaptive_patience=2)
    trainer = make_trainer(model, tokenizer, list(adapters.parameters()), s, steps=10, score_nll=validation)
    trainer.run()
    stop = trainer.report()["early_stop"]
    assert stop["stopped_at"] == 3 and stop["best_step"] == 1 and "no improvement" in stop["reason"]
    assert [row["eligible"] for row in stop["curve"]] == [True, True, False, False]
    late = make_trainer(model, tokenizer, list(adapters.parameters()), settings(budget_minutes=1e-9), steps=10)
    assert len(late.run()) == 1 and "wall-clock" in late.stop["reason"]


def test_with_a_forget_probe_early_stopping_keeps_the_lowest_healthy_forget_es(model, tokenizer, sine):
    """The generation probe (ES, empty rate, repetition of the forget-validation continuations) is what early
    stopping watches: the lowest ES wins among healthy steps; a step whose empty rate rose past GH's margin is never
    the best (here ES 0.1 at step 3 is a collapse) and uses up the patience."""
    adapters, _ = sine
    params = list(adapters.parameters())
    probes = iter([(1.0, 0.0), (0.8, 0.0), (0.5, 0.02), (0.1, 0.3)])  # (ES, empty rate): base, steps 1-3
    seen = []

    def probe():
        seen.append([p.detach().clone() for p in params])
        es, empty = next(probes)
        return {"es": es, "empty_rate": empty, "repetition": 0.0}

    s = settings(early_stop=True, adaptive_eval_every=1, adaptive_patience=1, adaptive_min_delta=0.0)
    trainer = make_trainer(model, tokenizer, params, s, steps=10, forget_probe=probe,
                           health_margins={"empty_rate": 0.05, "repetition": 0.05})
    trainer.run()
    stop = trainer.report()["early_stop"]
    assert stop["monitor"].startswith("forget-val ES") and stop["best_step"] == 2 and stop["stopped_at"] == 3
    assert stop["curve"][-1]["unhealthy"] == "forget-val empty_rate +0.3 over the base's (margin 0.05)"
    assert [row["forget_es"] for row in stop["curve"]] == [1.0, 0.8, 0.5, 0.1]
    assert [row["eligible"] for row in stop["curve"]] == [True, True, True, False]
    assert all(torch.equal(p, b) for p, b in zip(params, seen[2]))


def test_ratio_controller_grows_on_a_stall_shrinks_on_an_ineligible_step_and_stays_within_bounds():
    ratio = ad.RatioController(1.0, 1.5, 3.0, min_delta=0.01, start_es=0.99)
    assert ratio.update(20, 0.985, eligible=True) == 1.5  # fell 0.005 <= 0.01: a stall
    assert ratio.update(40, 0.70, eligible=True) == 1.5  # forgetting proceeds: unchanged
    assert ratio.update(60, 0.695, eligible=True) == 2.25
    assert ratio.update(80, 0.60, eligible=True, judged=False) == 2.25  # recovery: recorded, not judged
    assert ratio.update(100, 0.60, eligible=True) == 3.0  # capped
    assert ratio.update(120, 0.20, eligible=False) == 2.0
    assert ratio.update(140, 0.20, eligible=False) == pytest.approx(4 / 3)
    assert ratio.update(160, 0.20, eligible=False) == 1.0  # not below the start
    assert [row["step"] for row in ratio.trajectory] == [0, 20, 60, 100, 120, 140, 160]


def test_dualoptim_forget_learning_rate_follows_the_ratio_controller(model, tokenizer, sine):
    """With the probe, the forget optimizer's lr scale is the controller's ratio from the validation on: a stall
    raises it, an unhealthy step lowers it; both are in the curve and the lr report."""
    adapters, _ = sine
    params = list(adapters.parameters())
    probes = iter([(1.0, 0.0), (1.0, 0.0), (0.5, 0.0), (0.2, 0.4)])  # (ES, repetition): base, validations 1-3
    s = settings(dualoptim=True, early_stop=True, adaptive_eval_every=2, adaptive_patience=5, dualoptim_ratio_growth=2.0)
    forget_lrs = []

    def probe():
        es, repetition = next(probes)
        return {"es": es, "empty_rate": 0.0, "repetition": repetition}

    trainer = make_trainer(model, tokenizer, params, s, steps=6, forget_probe=probe,
                           health_margins={"empty_rate": 0.05, "repetition": 0.05})
    original = trainer.train_step

    def train_step(step):
        record = original(step)
        if record["kind"] == "forget":
            forget_lrs.append(trainer.optimizers["forget"].param_groups[0]["lr"] / trainer.lr / trainer.lr_factor(step))
        return record

    trainer.train_step = train_step
    trainer.run()
    assert forget_lrs == pytest.approx([1.0, 2.0, 2.0])  # forget steps 0, 2, 4; the stall at step 2 doubled it
    curve = trainer.report()["early_stop"]["curve"]
    assert [row.get("lr_ratio") for row in curve] == [None, 2.0, 2.0, 1.0]
    assert [row["ratio"] for row in trainer.lr_report()["forget_over_retain_lr_trajectory"]] == [1.0, 2.0, 1.0]


# ---------------------------------------------------------------------------------------------
# Dynamic SAE gate
# ---------------------------------------------------------------------------------------------
def test_dynamic_gate_scale_grows_with_hindi_share_and_activation_strength(lid):
    prompts = ["The weather is nice today and we walked", "The weather आज बहुत अच्छा है", "आज मौसम बहुत अच्छा है और हम"]
    ids = [[10 + k] * 4 for k in range(3)]
    calls = []

    def hindi_share(texts):
        calls.append(list(texts))
        return [mmie.share_true(mask) for mask in lid.hindi_word_masks(texts)]

    clamp = ad.DynamicClamp({1: 2.0}, hindi_share, lambda rows: [prompts[row[0] - 10] for row in rows],
                            min_scale=0.5, max_scale=3.0)
    z = torch.zeros(3, 4, 2)
    z[:, 1:, 0] = 2.0  # the same strength as the forget-text reference: ratio 1
    mask = torch.ones(3, 4, dtype=torch.long)
    counted = mmie.content_positions(mask)
    scale = clamp(z, 1, input_ids=torch.tensor(ids), attention_mask=mask, counted=counted)
    shares = torch.tensor(hindi_share(prompts))
    assert shares[0] == 0 and 0 < shares[1] < 1 and shares[2] == 1
    torch.testing.assert_close(scale, 0.5 + 0.5 * shares)
    assert scale[0] < scale[1] < scale[2]
    stronger = clamp(2 * z, 1, input_ids=torch.tensor(ids), attention_mask=mask, counted=counted)
    torch.testing.assert_close(stronger, (2 * scale).clamp(max=3.0))
    assert len(calls) == 2  # one batched call for the three new prompts, then the test's own; cached after
    report = clamp.report({1: [(0.5, True), (0.5, False), (0.5, True)] * 2}, {1: 4.0})
    assert report["layers"][1]["gated"] == 4 and report["prompts_identified"] == 3


def test_dynamic_gate_runs_inside_dsg_on_a_model_and_strips_the_chat_template(model, tokenizer):
    torch.manual_seed(0)
    sae = mmie.TopKSAE(32, 128, k=8, seed=0)
    features = {1: list(range(128))}  # every latent: the chosen ones fire on every token
    prompts = ["आज मौसम बहुत अच्छा है", "The weather is nice today"]
    shares = {"आज मौसम बहुत अच्छा है": 1.0, "The weather is nice today": 0.0}
    clamp = ad.DynamicClamp({1: 1.0}, lambda texts: [shares[t.strip()] for t in texts],
                            lambda rows: tokenizer.batch_decode(rows, skip_special_tokens=True),
                            min_scale=0.25, max_scale=1e9)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad(), mmie.dsg_gate(model, {1: sae}, features, -1.0, 1.0, clamp_scale=clamp) as state:
        model.generate(**encoded, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    share_part = torch.tensor([h for h, _, _ in clamp.history[1]])
    torch.testing.assert_close(share_part, torch.tensor([1.0, 0.0]))  # read from the prompt ids, pads dropped
    assert state.scale[1].shape == (2,) and state.scale[1][0] > state.scale[1][1]
    assert ad.strip_template("<s>user: आज\nassistant:", "<s>user: ", "\nassistant:") == "आज"
    assert ad.strip_template("plain text", "<s>user: ", "\nassistant:") == "plain text"


def test_dynamic_gate_reads_the_prompt_without_the_chat_template():
    """The Hindi share is taken over the user's prompt: the template's English words would dilute it."""
    chat = mmie.load_tokenizer(mmie.EMBEDDED_MODEL)
    chat.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\nYou are helpful. {{ m.content }}"
                          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    seen = []
    lid = SimpleNamespace(hindi_word_masks=lambda texts: seen.extend(texts) or [[True] for _ in texts])
    ctx = SimpleNamespace(args=mmie.build_parser().parse_args([]), tokenizer=chat, lid=lid)
    clamp = mmie.dynamic_clamp(ctx, {1: 1.0})
    prompt = "आज मौसम बहुत अच्छा है"
    formatted = mmie.format_prompts(chat, [prompt], chat=True)[0]
    ids = torch.tensor([chat(formatted, add_special_tokens=False)["input_ids"]])
    clamp.shares(ids, torch.ones_like(ids))
    assert seen == [prompt]


# ---------------------------------------------------------------------------------------------
# Pools, settings and the mmie wiring
# ---------------------------------------------------------------------------------------------
def test_script_blind_pool_includes_romanized_texts_and_validation_is_held_out():
    assert ad.forget_pool(HINDI, ROMAN, script_blind=False) == HINDI
    assert ad.forget_pool(HINDI, ROMAN + HINDI[:1], script_blind=True) == HINDI + ROMAN
    train, val = ad.carve_validation(HINDI + ROMAN, 0.25)
    assert len(val) == 3 and not set(train) & set(val) and sorted(train + val) == sorted(HINDI + ROMAN)
    assert ad.carve_validation(list(reversed(HINDI + ROMAN)), 0.25)[1] == [t for t in reversed(HINDI + ROMAN)
                                                                        if t in val]
    assert len(ad.carve_validation(HINDI[:2], 0.9)[0]) == 1


def test_settings_follow_the_flags_and_every_setting_has_a_flag():
    parser = mmie.build_parser()
    titles = [group.title for group in parser._action_groups]
    assert titles.index("adaptive unlearning") == titles.index("relearning attack") + 1
    off = ad.AdaptiveSettings.from_args(parser.parse_args([]))
    assert not off.active and not any(off.components().values())
    on = ad.AdaptiveSettings.from_args(parser.parse_args(["--adaptive_unlearning", "--no_stages", "--dual_max", "3"]))
    assert on.components() == {name: name != "stages" for name in ad.COMPONENTS} and on.dual_max == 3.0
    args = parser.parse_args([])
    missing = [f.name for f in dataclasses.fields(ad.AdaptiveSettings) if f.name != "active" and f.name not in ad.COMPONENTS
               and not hasattr(args, f.name)]
    assert missing == [] and all(hasattr(args, f"no_{name}") for name in ad.COMPONENTS)
    group = next(g for g in parser._action_groups if g.title == "adaptive unlearning")
    unchecked = [a.option_strings[0] for a in group._group_actions if a.type in (int, float) and a.check is None]
    assert unchecked == []
    with pytest.raises(mmie.InputError, match="--reweight_clip"):
        mmie.check_args(parser.parse_args(["--reweight_clip", "0.5"]), parser)
    for arm in ("lora", "reft", "dsg"):
        assert "adaptive unlearning" in mmie.ARMS[arm].reads


def forward_counter(model):
    counts = {"n": 0}
    handle = model.get_decoder().register_forward_pre_hook(lambda *_: counts.__setitem__("n", counts["n"] + 1))
    return counts, handle


def test_adaptive_steps_make_no_per_sample_passes(model, tokenizer, sine):
    """A step's forwards do not grow with the batch: per-sample losses come from the training forward itself."""
    adapters, _ = sine
    s = settings(reweight=True, curriculum=True, dualoptim=True, reweight_every=100)
    forwards = {}
    for batch_size in (2, 8):
        trainer = make_trainer(model, tokenizer, list(adapters.parameters()), s, steps=50, batch_size=batch_size)
        counts, handle = forward_counter(model)
        model.train()
        for step in range(3):
            record = trainer.train_step(step)
            trainer.log.append({key: record[key] for key in ("step", "kind", "loss", "lr")})
            trainer.after_step(record)
        handle.remove()
        forwards[batch_size] = counts["n"]
    assert forwards[2] == forwards[8] == 3


def experiment(model, tokenizer, argv, lid=None):
    def text_set(name, texts):
        return mmie.TextSet(name, f"--{name}", mmie.DATA_DIR / f"{name}.jsonl", list(texts), "0" * 64, len(texts))

    # Distinct texts (numbered copies), so the content-hash split has enough of each for train and eval.
    sets = {name: text_set(name, [f"{t} {k}" for k in range(3) for t in texts])
            for name, texts in (("forget", HINDI), ("forget_roman", ROMAN), ("retain", ENGLISH))}
    args = mmie.build_parser().parse_args(argv)
    return SimpleNamespace(model=model, tokenizer=tokenizer, args=args, sets=sets, lid=lid)


def test_adaptive_trainer_end_to_end_on_a_tiny_model(model, tokenizer, sine, lid):
    adapters, switch = sine
    argv = ["--adaptive_unlearning", "--train_batch_size", "4", "--max_len", "48",
            "--adaptive_eval_every", "3", "--reweight_every", "4", "--adaptive_val_share", "0.2",
            "--stage_forget_margin", "0.05", "--adaptive_patience", "20", "--max_new_tokens", "8"]
    ctx = experiment(model, tokenizer, argv, lid)
    trainer = mmie.unlearning_trainer(ctx, list(adapters.parameters()), switch.off, steps=18, lr=5e-2, seed=0,
                                      desc="lora", bounded_parameterisation=True)
    assert type(trainer).__mro__[1:3] == (ad.AdaptiveUnlearningTrainer, mmie.Trainer)
    roman = set(ctx.sets["forget_roman"].train)
    assert roman & set(trainer.pools["forget"]) and roman <= set(trainer.pools["forget"]) | set(trainer.validation["forget"])
    assert not set(trainer.pools["forget"]) & set(trainer.validation["forget"])
    log = trainer.run()
    assert len(log) == 18 and all(math.isfinite(row["loss"]) for row in log)
    report = json.loads(json.dumps(mmie.json_safe({**trainer.report(), "pools": trainer.pool_sizes}), allow_nan=False))
    assert report["components"] == {**{name: True for name in ad.COMPONENTS}, "dynamic_gate": False}
    stages = report["stages"]
    assert stages[0]["start_step"] == 0 and stages[-1]["end_step"] == 18
    assert all(a["end_step"] == b["start_step"] for a, b in zip(stages, stages[1:]))
    assert report["weights"]["refreshes"][0]["step"] == 0 and len(report["weights"]["refreshes"]) >= 2
    assert report["lr"]["optimizer_steps"]["forget"] + report["lr"]["optimizer_steps"]["retain"] == 18
    assert [row["step"] for row in report["early_stop"]["curve"]] == [0, 3, 6, 9, 12, 15, 18]
    assert report["early_stop"]["best_step"] in (0, 3, 6, 9, 12, 15, 18)
    assert report["early_stop"]["monitor"].startswith("forget-val ES")  # the generation probe, as G1 measures
    assert all(0 <= row["forget_es"] <= 1 and "forget_repetition" in row for row in report["early_stop"]["curve"])
    assert report["dual"]["trajectory"][-1]["step"] == 18
    assert report["pools"]["forget_roman"] == len(ctx.sets["forget_roman"].train)
    assert ad.max_abs_delta(adapters)["value"] <= ad.max_abs_delta(adapters)["bound"] * (1 + 1e-6)


def test_a_non_finite_loss_stops_the_adaptive_trainer_naming_the_step(model, tokenizer, sine):
    adapters, _ = sine
    s = settings(dual_ascent=True, reweight=True)
    trainer = make_trainer(model, tokenizer, list(adapters.parameters()), s, steps=4,
                           retain_objective=lambda batch, idx: torch.full((len(idx),), float("inf")))
    with pytest.raises(mmie.NonFiniteLoss, match="the combined loss is inf at step 0"):
        trainer.run()


def test_without_the_master_switch_the_static_trainer_runs(model, tokenizer, sine):
    adapters, switch = sine
    ctx = experiment(model, tokenizer, ["--train_batch_size", "4", "--max_len", "48"])
    trainer = mmie.unlearning_trainer(ctx, list(adapters.parameters()), switch.off, steps=2, lr=1e-2, seed=0, desc="lora")
    assert type(trainer) is mmie.Trainer and trainer.pools["forget"] == ctx.sets["forget"].train


def test_with_every_component_off_the_adaptive_trainer_is_the_static_one(model, tokenizer, sine):
    """The ablation's floor: --adaptive_unlearning with all nine --no_ flags trains exactly as the static Trainer."""
    adapters, switch = sine
    params = list(adapters.parameters())
    off = ["--no_" + name for name in ad.COMPONENTS]
    start = [p.detach().clone() for p in params]
    logs, weights = [], []
    for argv in ([], ["--adaptive_unlearning", *off]):
        with torch.no_grad():
            for p, initial in zip(params, start):
                p.copy_(initial)
        ctx = experiment(model, tokenizer, ["--train_batch_size", "4", "--max_len", "48", "--forget_obj", "ga",
                                            "--retain_obj", "nll", *argv])
        trainer = mmie.unlearning_trainer(ctx, params, switch.off, steps=4, lr=1e-2, seed=0, desc="lora")
        logs.append([(row["kind"], row["loss"]) for row in trainer.run()])
        weights.append([p.detach().clone() for p in params])
    assert logs[0] == logs[1]
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_english_targets_pair_each_forget_prompt_with_its_own_retain_text():
    targets = mmie.english_targets(HINDI, ENGLISH[:5], prompt_words=3, seed=0)
    assert [prompt for prompt, _ in targets] == mmie.continuation_prompts(HINDI, 3)
    continuations = [text for _, text in targets]
    assert sorted(continuations[:5]) == sorted(ENGLISH[:5])  # without replacement while the pool lasts
    assert continuations[5:] == continuations[:3] and continuations == [t for _, t in
                                                                         mmie.english_targets(HINDI, ENGLISH[:5], 3, 0)]


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("chat", [False, True])
def test_encode_continuations_scores_only_the_continuation(model, tokenizer, chat):
    """log p(prompt + continuation) - log p(prompt) = log p(continuation | prompt), where the tokens split there;
    under a chat template the prompt is the user turn and the continuation the assistant's reply."""
    if chat:
        tokenizer = mmie.load_tokenizer(mmie.EMBEDDED_MODEL)
        tokenizer.chat_template = CHAT_TEMPLATE
    prompts, continuations = [HINDI[0].split()[0], "आज माँ ने"], [ENGLISH[0], ENGLISH[3]]
    heads = mmie.format_prompts(tokenizer, prompts, chat)
    assert all(("<|im_start|>assistant" in head) == chat for head in heads)
    joined = [head + c if chat else f"{head} {c}" for head, c in zip(heads, continuations)]
    with torch.no_grad():
        part, count = mmie.token_logprobs(model, mmie.encode_continuations(tokenizer, prompts, continuations, 64, "cpu",
                                                                           chat=chat))
        whole, whole_count = mmie.token_logprobs(model, mmie.encode_texts(tokenizer, joined, 64, "cpu",
                                                                          special_tokens=not chat))
        prompt, prompt_count = mmie.token_logprobs(model, mmie.encode_texts(tokenizer, heads, 64, "cpu",
                                                                            special_tokens=not chat))
    assert count.tolist() == (whole_count - prompt_count).tolist() and (count > 0).all()
    torch.testing.assert_close(part, whole - prompt, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("curriculum", [False, True])
def test_with_the_english_target_a_forget_step_reads_half_a_batch_of_forget_texts(model, tokenizer, sine, curriculum):
    adapters, _ = sine
    for target, size in ((False, 8), (True, 4)):
        s = settings(english_target=target, curriculum=curriculum)
        trainer = make_trainer(model, tokenizer, list(adapters.parameters()), s, steps=4, batch_size=8)
        assert len(trainer.sample(ad.FORGET, 0)) == size and len(trainer.sample(ad.RETAIN, 0)) == 8


def test_the_english_target_adds_its_continuation_nll_to_each_forget_loss(model, tokenizer, sine, lid):
    """mmie's forget objective with the target: loss_i = stage loss_i + w x NLL(English continuation | prompt_i);
    the NLL it returns for the reweighter stays the forget text's own."""
    adapters, switch = sine
    losses = {}
    for extra in ([], ["--no_english_target"]):
        ctx = experiment(model, tokenizer, ["--adaptive_unlearning", "--train_batch_size", "4", "--max_len", "48",
                                            "--english_target_weight", "0.5", *extra], lid)
        trainer = mmie.unlearning_trainer(ctx, list(adapters.parameters()), switch.off, steps=4, lr=1e-2, seed=0,
                                          desc="lora", bounded_parameterisation=True)
        idx = np.arange(3)
        batch = trainer.encode([trainer.pools["forget"][i] for i in idx])
        with torch.no_grad():
            losses[bool(extra)] = trainer.forget_objective("ga", batch, idx)
    targets = mmie.english_targets(trainer.pools["forget"], trainer.pools["retain"], 8, seed=0)[:3]
    with torch.no_grad():
        logp, count = mmie.token_logprobs(model, mmie.encode_continuations(
            tokenizer, [p for p, _ in targets], [c for _, c in targets], 48, "cpu"))
    torch.testing.assert_close(losses[False][0], losses[True][0] - 0.5 * logp / count)
    torch.testing.assert_close(losses[False][1], losses[True][1])


def test_the_start_nll_comes_from_the_npo_reference_pass(model, tokenizer, sine, lid):
    """One pass under the reference serves NPO's reference log-likelihoods and the curriculum's and reweighting's
    start NLLs (the edit is zero at the start, so the edited model's own scores agree)."""
    adapters, switch = sine
    ctx = experiment(model, tokenizer, ["--adaptive_unlearning", "--train_batch_size", "4", "--max_len", "48"], lid)
    trainer = mmie.unlearning_trainer(ctx, list(adapters.parameters()), switch.off, steps=4, lr=1e-2, seed=0,
                                      desc="lora", bounded_parameterisation=True)
    assert trainer.start_nll is not None and len(trainer.start_nll) == len(trainer.pools["forget"])
    np.testing.assert_allclose(trainer.start_nll, trainer.score(trainer.pools["forget"]), rtol=1e-5)


def test_take_rows_gives_the_batch_encode_texts_gives_for_those_texts(tokenizer):
    texts = HINDI[:3] + ENGLISH[:3]
    whole = mmie.encode_texts(tokenizer, texts, 64, "cpu")
    for rows in ([4, 1], [3], [5, 0, 2]):
        alone = mmie.encode_texts(tokenizer, [texts[i] for i in rows], 64, "cpu")
        taken = mmie.take_rows(whole, np.array(rows))
        assert taken.keys() == alone.keys() and all(torch.equal(taken[k], alone[k]) for k in alone)


# ---------------------------------------------------------------------------------------------
# SAM on the forget objective
# ---------------------------------------------------------------------------------------------
def test_sam_takes_the_forget_gradient_at_the_perturbed_point_and_restores_the_weights(model, tokenizer, sine):
    """A forget step with SAM uses the gradient at theta + rho g/||g|| (checked against computing it by hand), leaves
    the weights where they were before the optimizer step, and retain steps are untouched."""
    adapters, _ = sine
    params = list(adapters.parameters())
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)  # away from the zero start, so the forget gradient is not degenerate
    rho = 0.05
    trainer = make_trainer(model, tokenizer, params, settings(sam=True, sam_rho=rho))
    indices, micro = np.arange(4), [(slice(0, 4), 1.0)]
    start = [p.detach().clone() for p in params]
    trainer._accumulate("forget", indices, 0, micro)
    with_sam = [p.grad.clone() for p in params]
    assert all(torch.equal(p, s) for p, s in zip(params, start))  # perturbation undone
    plain = make_trainer(model, tokenizer, params, settings())
    plain._accumulate("forget", indices, 0, micro)
    g = [p.grad.clone() for p in params]
    norm = torch.sqrt(sum((x ** 2).sum() for x in g))
    with torch.no_grad():
        for p, x in zip(params, g):
            p.add_(rho * x / norm)
    plain._accumulate("forget", indices, 0, micro)
    by_hand = [p.grad.clone() for p in params]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(with_sam, by_hand))
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(with_sam, g))  # it does change the gradient
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    trainer._accumulate("retain", indices, 0, micro)
    retain_sam = [p.grad.clone() for p in params]
    plain._accumulate("retain", indices, 0, micro)
    assert all(torch.equal(a, p.grad) for a, p in zip(retain_sam, params))
