"""auto_config.py: one or more tests per rule, on synthetic inputs whose right answer is known. Power formulas
are checked against hand-computed values and by simulation; simulations are seeded. CPU only, seconds."""

import json
import math

import numpy as np
import pytest
import torch

import auto_config as ac


# ---------------------------------------------------------------------------------------------
# 0. Decisions
# ---------------------------------------------------------------------------------------------
def test_decision_inputs_are_made_json_safe():
    decision = ac.Decision(np.int64(3), "rule: details", {"x": np.float32(0.5), "bad": float("nan"),
                                                         "t": (1, 2), "arr": np.arange(2), 4: np.bool_(True)})
    assert decision.value == 3 and type(decision.value) is int
    assert decision.inputs == {"x": 0.5, "bad": None, "t": [1, 2], "arr": [0, 1], "4": True}
    assert decision.short_rule == "rule"
    json.dumps(decision.as_dict(), allow_nan=False)


def test_decision_refuses_what_json_cannot_hold():
    with pytest.raises(TypeError):
        ac.Decision(1, "r", {"model": object()})
    with pytest.raises(ValueError):
        ac.Decision(float("inf"), "r", {})


# ---------------------------------------------------------------------------------------------
# 1. Learning rate
# ---------------------------------------------------------------------------------------------
def test_lr_ladder_is_even_in_log_space_from_the_first_step():
    lrs = ac.lr_ladder(1e-7, 1.0, 40)
    assert lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(1.0)
    np.testing.assert_allclose(lrs[1:] / lrs[:-1], (1e7) ** (1 / 39))  # no double first rung (Lightning's)


def test_lr_range_test_sweeps_the_ladder_and_smooths_with_bias_correction():
    seen = []
    curve = ac.lr_range_test(lambda lr: seen.append(lr) or 2.0, num_steps=12)
    np.testing.assert_allclose(seen, ac.lr_ladder(1e-7, 1.0, 12))
    # Bias correction: a constant loss smooths to itself from the first step (no EMA warm-up from 0).
    np.testing.assert_allclose(curve["smoothed"], 2.0)
    assert curve["stop"] == "end of the sweep" and len(curve["loss"]) == 12


def test_lr_range_test_stops_when_the_smoothed_loss_diverges():
    calls = []

    def step(lr):
        calls.append(lr)
        return 2.0 if lr < 1e-3 else 2.0 * 1e4 * lr  # explodes past 1e-3

    curve = ac.lr_range_test(step, num_steps=40)
    assert len(calls) < 40 and "diverged" in curve["stop"]
    assert curve["smoothed"][-1] > 4.0 * min(curve["smoothed"])
    assert all(s <= 4.0 * min(curve["smoothed"]) for s in curve["smoothed"][:-1])


def test_lr_range_test_stops_on_a_non_finite_loss():
    curve = ac.lr_range_test(lambda lr: float("nan") if lr > 1e-4 else 1.0, num_steps=40)
    assert "non-finite" in curve["stop"] and math.isnan(curve["loss"][-1]) and curve["lr"][-1] > 1e-4


def test_lr_range_test_refuses_non_positive_losses():
    # A fresh adapter's KL to the base is exactly 0: the multiplicative divergence test would stop at once.
    with pytest.raises(ValueError, match="positive"):
        ac.lr_range_test(lambda lr: 0.0)


def sigmoid_drop(log_lr, center=-3.0, depth=1.0, width=0.4):
    return 3.0 - depth / (1.0 + np.exp(-(log_lr - center) / width))


def test_suggest_lr_takes_the_slope_against_log_lr_not_lr():
    """Steepest descent in log space at lr 1e-3; a gentle 0.01-per-decade decline at small lr. Against the lr
    itself (Lightning >= 2.5.3, issue #21141) that gentle slope is divided by lr ln 10 and wins."""
    lrs = ac.lr_ladder(1e-7, 1.0, 40)
    x = np.log10(lrs)
    loss = sigmoid_drop(x) - 0.01 * (x + 7)
    decision = ac.suggest_lr({"lr": lrs.tolist(), "loss": loss.tolist(), "smoothed": loss.tolist()})
    assert abs(math.log10(decision.value) + 3.0) <= 0.2  # within about one rung (7/39 decade)
    window = slice(10, -1)
    linear_choice = lrs[window][np.argmin(np.gradient(loss[window], lrs[window]))]
    assert linear_choice < 1e-5  # the linear-lr gradient picks the low-lr end instead
    assert "log10" in decision.rule and decision.inputs["slope_per_decade"] < 0


def test_suggest_lr_does_not_inherit_the_lag_of_the_causal_ema():
    """On a noiseless curve through the real sweep, the causal EMA (beta 0.98, Lightning's) puts the steepest
    point most of a decade too high; the centred smoothing used for the suggestion does not."""
    curve = ac.lr_range_test(lambda lr: float(sigmoid_drop(math.log10(lr))), num_steps=40)
    x, smoothed = np.log10(curve["lr"])[10:-1], np.asarray(curve["smoothed"])[10:-1]
    causal_choice = x[np.argmin(np.gradient(smoothed, x))]
    suggested = math.log10(ac.suggest_lr(curve).value)
    assert causal_choice - (-3.0) >= 0.5
    assert abs(suggested - (-3.0)) <= 0.2


def test_suggest_lr_finds_the_drop_through_noise():
    rng = np.random.default_rng(0)
    lrs = ac.lr_ladder(1e-7, 1.0, 40)
    hits = 0
    for _ in range(50):
        loss = sigmoid_drop(np.log10(lrs)) + rng.normal(0, 0.05, 40)
        hits += abs(math.log10(ac.suggest_lr({"lr": lrs, "loss": loss, "smoothed": loss}).value) + 3) <= 0.6
    assert hits >= 45


def test_flat_curve_gives_no_suggestion_and_choose_lr_falls_back_to_model_size():
    rng = np.random.default_rng(1)
    lrs = ac.lr_ladder(1e-7, 1.0, 40)
    curve = {"lr": lrs, "loss": 3.0 + rng.normal(0, 0.05, 40), "smoothed": np.full(40, 3.0)}
    assert ac.suggest_lr(curve).value is None and "flat" in ac.suggest_lr(curve).rule
    decision = ac.choose_lr(curve, n_params=124_000_000)
    assert decision.value == 3e-4 and "model-size" in decision.rule and "flat" in decision.rule


def test_flat_curve_that_rises_gives_one_decade_below_the_rise():
    """A trained model's retain NLL is already at its minimum: the sweep is flat until the lr breaks the model."""
    rng = np.random.default_rng(2)
    lrs = ac.lr_ladder(1e-7, 1.0, 30)
    loss = 3.0 + rng.normal(0, 0.08, 30)
    loss[26:] = [4.6, 16.9, 14.0, 46.8]  # leaves the plateau at lrs[26]
    decision = ac.suggest_lr({"lr": lrs, "loss": loss, "smoothed": loss})
    assert decision.value == pytest.approx(lrs[26] / 10) and "rise" in decision.rule
    assert ac.choose_lr({"lr": lrs, "loss": loss, "smoothed": loss}, n_params=124_000_000).value == pytest.approx(3e-3)


def test_short_curve_falls_back_to_fastai_minimum_over_10():
    lrs = ac.lr_ladder(1e-7, 1e-2, 12)  # diverged early: 12 points, 1 left after skipping 10 + 1
    smoothed = [3.0] * 6 + [2.5, 2.0, 1.8, 2.2, 4.0, 9.0]
    decision = ac.suggest_lr({"lr": lrs, "loss": smoothed, "smoothed": smoothed})
    assert decision.value == pytest.approx(lrs[8] / 10) and "too short" in decision.rule


def test_model_size_lr_tiers():
    assert [ac.model_size_lr(n).value for n in (4e6, 49e6, 124e6, 499e6, 500e6, 1.5e9, 2e9, 7e9)] == \
        [1e-3, 1e-3, 3e-4, 3e-4, 2e-4, 2e-4, 1e-4, 1e-4]


def test_choose_lr_clamps_the_suggestion_to_a_decade_around_the_model_size_rule():
    lrs = ac.lr_ladder(1e-7, 1.0, 40)
    high = sigmoid_drop(np.log10(lrs), center=-1.0)  # steepest at 0.1: far above 2e-4 * 10
    decision = ac.choose_lr({"lr": lrs, "loss": high, "smoothed": high}, n_params=1.5e9)
    assert decision.value == pytest.approx(2e-3) and "clamped" in decision.rule
    inside = sigmoid_drop(np.log10(lrs), center=-3.5)
    decision = ac.choose_lr({"lr": lrs, "loss": inside, "smoothed": inside}, n_params=1.5e9)
    assert 2e-5 < decision.value < 2e-3 and "clamped" not in decision.rule
    assert decision.value == ac.suggest_lr({"lr": lrs, "loss": inside, "smoothed": inside}).value
    off = ac.choose_lr(None, n_params=1.5e9)
    assert off.value == 2e-4 and "probe off" in off.rule


# ---------------------------------------------------------------------------------------------
# 2. Batch sizes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("err, expected", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
    (RuntimeError("HIP out of memory. Tried to allocate 1.00 GiB"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("HIPBLAS_STATUS_ALLOC_FAILED"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: 8 GB"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"), False),
    (ValueError("out of memory"), False),  # not a RuntimeError: not the allocator speaking
])
def test_is_oom_error(err, expected):
    assert ac.is_oom_error(err) is expected


def fake_trainer(limit):
    """try_batch that raises CUDA's OOM above a hidden limit, and a release() that counts its calls."""
    calls = {"release": 0}

    def try_batch(batch):
        if batch > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (batch {batch})")

    def release():
        calls["release"] += 1

    return try_batch, release, calls


@pytest.mark.parametrize("limit", [1, 3, 8, 300, 1000, 5000])
def test_batch_size_search_finds_the_hidden_limit_in_logarithmically_many_trials(limit):
    try_batch, release, calls = fake_trainer(limit)
    decision = ac.search_batch_size_cuda(try_batch, start=8, max_batch=1024, safety=0.9, release=release)
    largest = min(limit, 1024)
    assert decision.inputs["largest_ok"] == largest
    assert decision.value == max(1, math.floor(largest * 0.9)) and decision.value <= max(1, limit * 0.9)
    trials = decision.inputs["trials"]
    assert len(trials) <= 2 * math.ceil(math.log2(1024)) + 2  # doubling, then bisection
    assert calls["release"] == len(trials)  # memory released after every trial
    assert all(t["ok"] == (t["batch"] <= limit) for t in trials)


def test_batch_size_search_propagates_other_errors_and_fails_loudly_when_nothing_fits():
    def broken(batch):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        ac.search_batch_size_cuda(broken, release=lambda: None)
    try_batch, release, _ = fake_trainer(0)
    with pytest.raises(RuntimeError, match="even a batch of 1"):
        ac.search_batch_size_cuda(try_batch, release=release)


def test_cpu_batch_size_is_the_smallest_within_ten_percent_of_the_best_throughput():
    seconds = {8: 1.0, 16: 0.6, 32: 0.43, 64: 0.40, 128: 0.41, 256: 0.5}
    decision = ac.choose_batch_size_cpu(seconds.__getitem__)
    assert decision.value == 32  # 0.43 <= 1.1 * 0.40; 16 (0.6) is not
    assert decision.inputs["seconds_per_item"] == {str(k): v for k, v in seconds.items()}
    with pytest.raises(ValueError):
        ac.choose_batch_size_cpu(lambda b: 0.0)


def test_cpu_batch_size_takes_each_candidates_fastest_round_so_one_slow_timing_does_not_decide():
    rounds = {8: iter([1.0, 1.0, 1.0]), 16: iter([2.0, 0.6, 0.6]), 32: iter([0.55, 0.9, 0.9])}  # 16 hit a slow spell
    decision = ac.choose_batch_size_cpu(lambda b: next(rounds[b]), candidates=(8, 16, 32))
    assert decision.value == 16 and decision.inputs["seconds_per_item"] == {"8": 1.0, "16": 0.6, "32": 0.55}
    assert decision.inputs["repeats"] == 3 and all(next(r, None) is None for r in rounds.values())


def test_oom_backoff_halves_the_micro_batch_until_the_step_fits():
    backoff = ac.OOMBackoff(effective_batch=20)
    sizes_tried = []

    def train_step(micro_batches):
        sizes_tried.append(micro_batches[0][0].stop - micro_batches[0][0].start)
        if any(s.stop - s.start > 5 for s, _ in micro_batches):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return [(s.start, s.stop) for s, _ in micro_batches]

    done = backoff.run(train_step, step=7, release=lambda: None)
    assert sizes_tried == [20, 10, 5]
    assert done == [(0, 5), (5, 10), (10, 15), (15, 20)]  # the effective batch is kept
    assert backoff.micro_batch == 5 and backoff.accumulation == 4
    assert [e["micro_batch"] for e in backoff.events] == [[20, 10], [10, 5]]
    assert [e["accumulation"] for e in backoff.events] == [[1, 2], [2, 4]] and backoff.events[0]["step"] == 7


def test_oom_backoff_weighted_micro_batches_give_the_full_batch_gradient():
    """Micro-batches of 4, 4, 2 for a batch of 10, weighted by their share: same gradient as one batch."""
    torch.manual_seed(0)
    model, x, y = torch.nn.Linear(3, 1), torch.randn(10, 3), torch.randn(10, 1)
    torch.nn.functional.mse_loss(model(x), y).backward()
    full = model.weight.grad.clone()
    model.zero_grad()
    backoff = ac.OOMBackoff(effective_batch=10, micro_batch=4)
    parts = backoff.micro_batches()
    assert [(s.start, s.stop) for s, _ in parts] == [(0, 4), (4, 8), (8, 10)]
    for s, weight in parts:
        (weight * torch.nn.functional.mse_loss(model(x[s]), y[s])).backward()
    torch.testing.assert_close(model.weight.grad, full)


def test_oom_backoff_reraises_at_micro_batch_one_and_passes_other_errors_through():
    backoff = ac.OOMBackoff(effective_batch=2)

    def always_oom(_):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        backoff.run(always_oom, release=lambda: None)
    assert "micro-batch 1" in " ".join(getattr(info.value, "__notes__", []))
    assert len(backoff.events) == 1

    def broken(_):
        raise KeyError("input_ids")

    with pytest.raises(KeyError):
        ac.OOMBackoff(effective_batch=8).run(broken, release=lambda: None)


# ---------------------------------------------------------------------------------------------
# 3. Early stopping, retain budget, deadline
# ---------------------------------------------------------------------------------------------
def test_early_stopping_counts_only_improvements_beyond_min_delta():
    stopper = ac.EarlyStopping(patience=2, min_delta=0.01)
    decisions = [stopper.update(step, v) for step, v in enumerate([1.0, 0.9, 0.895, 0.95])]
    assert decisions == [False, False, False, True]  # 0.895 improves by 0.005 < min_delta: no improvement
    assert stopper.best_step == 1 and stopper.best_value == 0.9
    assert stopper.update(4, 0.1) is True  # stays stopped
    assert [v for _, v in stopper.history] == [1.0, 0.9, 0.895, 0.95, 0.1]


def test_early_stopping_max_mode_patience_zero_and_non_finite():
    stopper = ac.EarlyStopping(patience=0, mode="max")
    assert stopper.update(0, 0.5) is False and stopper.update(1, 0.6) is False and stopper.update(2, 0.6) is True
    stopper = ac.EarlyStopping(patience=5)
    assert stopper.update(0, 1.0) is False and stopper.update(1, float("nan")) is True
    assert "non-finite" in stopper.reason


def test_an_ineligible_evaluation_is_never_the_best_and_counts_toward_patience():
    stopper = ac.EarlyStopping(patience=2, mode="min")
    assert stopper.update(0, 1.0) is False and stopper.update(1, 0.2, eligible=False) is False
    assert stopper.best_step == 0 and stopper.wait == 1
    assert stopper.update(2, 0.5) is False and stopper.best_step == 2 and stopper.wait == 0  # eligible again
    assert stopper.update(3, 0.1, eligible=False) is False and stopper.update(4, 0.6) is True


def test_retain_budget_forms():
    gate_form = ac.RetainBudget(2.0, ppl_ratio=1.10)
    assert gate_form.limit == pytest.approx(2.0 + math.log(1.10))
    assert not gate_form.exceeded(2.09) and gate_form.exceeded(2.1) and gate_form.exceeded(float("nan"))
    relative = ac.RetainBudget(2.0, eps=0.05)
    assert not relative.exceeded(2.1) and relative.exceeded(2.11)
    with pytest.raises(ValueError):
        ac.RetainBudget(2.0, eps=0.05, ppl_ratio=1.1)


def test_deadline_with_a_fake_clock():
    now = [100.0]
    deadline = ac.Deadline(2, clock=lambda: now[0])
    assert not deadline.expired() and deadline.remaining_s() == 120
    now[0] = 221.0
    assert deadline.expired() and deadline.elapsed_s() == 121
    assert not ac.Deadline(None).expired()


# ---------------------------------------------------------------------------------------------
# 4. SAE width and k
# ---------------------------------------------------------------------------------------------
def test_sae_training_bytes_counts_weights_grads_and_adam_states():
    n_latents = 4 * 64
    params = 2 * 64 * n_latents + n_latents + 64
    assert ac.sae_training_bytes(64, 4, 1) == params * 4 * 4
    assert ac.sae_training_bytes(64, 4, 3, batch_tokens=10) == 3 * (4 * params + 3 * 10 * n_latents) * 4


def test_sae_expansion_is_the_widest_power_of_two_that_fits():
    need16 = ac.sae_training_bytes(1536, 16, 2)
    assert ac.sae_expansion_from_memory(1536, 2, need16).value == 16
    assert ac.sae_expansion_from_memory(1536, 2, need16 - 1).value == 8
    assert ac.sae_expansion_from_memory(1536, 2, 1e15).value == 32
    tiny = ac.sae_expansion_from_memory(1536, 2, 1e6)
    assert tiny.value == 4 and tiny.inputs["fits"] is False and "does not fit" in tiny.rule


def test_sparse_probe_auc_finds_the_informative_latent_and_not_noise():
    rng = np.random.default_rng(0)
    z_pos, z_neg = rng.exponential(1.0, (200, 50)), rng.exponential(1.0, (200, 50))
    z_pos[:, 7] += 2.0  # AUC of latent 7 alone: P(X + 2 > Y), X, Y ~ Exp(1), = 1 - exp(-2) / 2 = 0.932
    assert ac.sparse_probe_auc(z_pos, z_neg, k=1) == pytest.approx(1 - math.exp(-2) / 2, abs=0.04)
    assert ac.sparse_probe_auc(z_pos, z_neg, k=1) == ac.sparse_probe_auc(z_pos, z_neg, k=1)  # deterministic
    noise_pos, noise_neg = rng.exponential(1.0, (200, 50)), rng.exponential(1.0, (200, 50))
    assert 0.3 < ac.sparse_probe_auc(noise_pos, noise_neg, k=5) < 0.7
    with pytest.raises(ValueError):
        ac.sparse_probe_auc(z_pos[:5], z_neg, k=1)


def sae_candidate(k, fvu, dead, hi_en, hi_ur):
    return {"k": k, "fvu": fvu, "dead_fraction": dead, "probe_auc_hi_en": hi_en, "probe_auc_hi_ur": hi_ur}


def test_choose_sae_k_filters_by_caps_and_breaks_ties_to_the_smaller_k():
    candidates = [sae_candidate(8, 0.25, 0.01, 0.99, 0.99),   # reconstructs too poorly
                  sae_candidate(16, 0.15, 0.05, 0.90, 0.80),  # mean 0.85
                  sae_candidate(32, 0.12, 0.02, 0.91, 0.795),  # mean 0.8525: a tie within 0.01
                  sae_candidate(64, 0.08, 0.30, 0.99, 0.95)]  # too many dead latents
    decision = ac.choose_sae_k(candidates)
    assert decision.value == 16
    # Hindi vs Urdu counts as much as Hindi vs English: a k that only separates Hindi from English loses.
    candidates = [sae_candidate(16, 0.1, 0.0, 0.99, 0.60), sae_candidate(32, 0.1, 0.0, 0.85, 0.85)]
    assert ac.choose_sae_k(candidates).value == 32


def test_choose_sae_k_without_a_qualifying_candidate_takes_the_lowest_fvu_and_says_so():
    decision = ac.choose_sae_k([sae_candidate(16, 0.4, 0.0, 0.9, 0.9), sae_candidate(32, 0.3, 0.5, 0.6, 0.6)])
    assert decision.value == 32 and "no candidate" in decision.rule
    with pytest.raises(ValueError):
        ac.choose_sae_k([{"k": 8}])


# ---------------------------------------------------------------------------------------------
# 5. LoRA and ReFT
# ---------------------------------------------------------------------------------------------
def test_lora_rank_by_size_and_forget_set():
    cases = {(124e6, 5000): 8, (124e6, 200): 4, (1.5e9, 5000): 16, (1.5e9, 999): 8, (70e9, 2000): 32,
             (70e9, 10): 16, (10e6, 10): 4}
    assert {case: ac.lora_rank(*case).value for case in cases} == cases
    assert ac.lora_alpha(8).value == 16
    assert "rule of thumb" in ac.lora_rank(1e9, 10).rule


def test_lora_dropout_thresholds():
    assert [ac.lora_dropout(n).value for n in (100_001, 100_000, 10_001, 10_000, 1_001, 1_000, 50)] == \
        [0.0, 0.05, 0.05, 0.1, 0.1, 0.2, 0.2]


GPT2_LINEAR = [f"transformer.h.{i}.{m}" for i in range(2)
               for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")] + ["lm_head"]
QWEN_LINEAR = [f"model.layers.{i}.{m}" for i in range(2)
               for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["lm_head"]


def peft_selects(targets, names):
    """peft's rule for a list of targets: a module matches t when its name is t or ends with "." + t."""
    return {n for n in names if any(n == t or n.endswith("." + t) for t in targets)}


def test_lora_targets_gpt2_names_attention_only_below_the_memory_tier():
    low = ac.lora_targets(GPT2_LINEAR, memory_gib=8.0, model_type="gpt2")
    assert low.value == ["attn.c_proj", "c_attn"]
    assert peft_selects(low.value, GPT2_LINEAR) == {n for n in GPT2_LINEAR if ".attn." in n}
    high = ac.lora_targets(GPT2_LINEAR, memory_gib=40.0, model_type="gpt2")
    assert high.value == ["c_attn", "c_fc", "c_proj"]
    assert peft_selects(high.value, GPT2_LINEAR) == set(GPT2_LINEAR) - {"lm_head"}
    assert ac.lora_targets(GPT2_LINEAR, memory_gib=None, model_type="gpt2").value == high.value  # CPU


def test_lora_targets_llama_style_names_and_unknown_blocks():
    assert ac.lora_targets(QWEN_LINEAR, 80.0, "qwen2").value == \
        ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert ac.lora_targets(QWEN_LINEAR, 6.0, "qwen2").value == ["k_proj", "o_proj", "q_proj", "v_proj"]
    unknown = ac.lora_targets(["blocks.0.wq", "blocks.0.w1", "head"], 80.0, "custom")
    assert unknown.value == "all-linear" and "not recognised" in unknown.rule


def test_reft_rank():
    assert ac.reft_rank(500).value == 4 and ac.reft_rank(5000).value == 8


# ---------------------------------------------------------------------------------------------
# 6. Layers
# ---------------------------------------------------------------------------------------------
def test_first_eligible_layer_rounds_half_up():
    assert [ac.first_eligible_layer(d).value for d in (4, 12, 24, 25, 28, 36)] == [1, 1, 2, 3, 3, 4]


def test_choose_n_layers_cuts_at_the_elbow_among_eligible_layers():
    scores = {layer: 0.05 - 0.001 * layer for layer in range(24)}
    scores.update({0: 0.9, 10: 0.50, 11: 0.48, 12: 0.45})  # layer 0 is not eligible (first eligible: 2)
    decision = ac.choose_n_layers(scores, depth=24)
    assert decision.value == 3 and decision.inputs["layers"] == [10, 11, 12]
    single = {layer: 0.02 for layer in range(12)} | {6: 0.6}
    assert ac.choose_n_layers(single, depth=12).value == 1


def test_choose_n_layers_caps_and_falls_back():
    many = {layer: 0.5 for layer in range(1, 6)} | {6: 0.01, 7: 0.0}  # five good layers of depth 8
    assert ac.choose_n_layers(many, depth=8).value == 2  # ceil(8 / 4)
    even = {layer: 1.0 - 0.1 * layer for layer in range(1, 10)}  # no elbow
    decision = ac.choose_n_layers(even, depth=12)
    assert decision.value == 1 and "no elbow" in decision.rule
    # The elbow falls after layer 7, but ablating layer 7 did not lower Hindi at an acceptable cost (score < 0).
    mostly_harmful = {layer: -0.5 for layer in range(2, 24)} | {5: 0.5, 6: 0.48, 7: -0.001}
    decision = ac.choose_n_layers(mostly_harmful, depth=24)
    assert decision.inputs["knee"] == 3 and decision.value == 2 and decision.inputs["layers"] == [5, 6]


# ---------------------------------------------------------------------------------------------
# 7. Token lengths
# ---------------------------------------------------------------------------------------------
def test_choose_max_len_percentile_rounding_and_clipping():
    decision = ac.choose_max_len(list(range(1, 201)), context_limit=4096)
    assert decision.inputs["p95"] == 190 and decision.value == 192
    assert ac.choose_max_len([10] * 50, 4096).value == 64
    assert ac.choose_max_len([5000] * 50, 32768).value == 2048
    assert ac.choose_max_len([1000] * 50, 512).value == 512
    assert ac.choose_max_len([10] * 50, 40).value == 40  # a model whose context is under the floor


def test_choose_max_new_tokens_percentile_rounding_and_clipping():
    decision = ac.choose_max_new_tokens(list(range(1, 101)))
    assert decision.inputs["p75"] == 75 and decision.value == 80
    assert ac.choose_max_new_tokens([3] * 10).value == 16
    assert ac.choose_max_new_tokens([900] * 10).value == 256


def test_generation_is_greedy():
    decision = ac.generation_rule()
    assert decision.value == {"do_sample": False, "num_beams": 1} and "greedy" in decision.rule


# ---------------------------------------------------------------------------------------------
# 9. Bootstrap resolution
# ---------------------------------------------------------------------------------------------
def test_n_boot_for_q_010_and_60_gates_is_capped_and_exact_at_every_bh_threshold():
    decision = ac.choose_n_boot(0.10, 60)
    threshold = 0.10 / 60
    assert decision.value == 17_999 and decision.inputs["capped"] and "capped" in decision.rule
    assert 1 / (decision.value + 1) <= threshold / 10  # resolution holds even when capped
    assert (decision.value + 1) * threshold == pytest.approx(round((decision.value + 1) * threshold))
    assert decision.inputs["b_for_mc_error"] == pytest.approx(59_900, abs=1)  # (1 - t) / (0.01 t)


def test_n_boot_uncapped_meets_both_conditions_minimally():
    decision = ac.choose_n_boot(0.10, 9)  # q/m = 1/90: unit lcm(1000, 90) = 9000
    b, t = decision.value, 0.10 / 9
    assert b == 8_999 and not decision.inputs["capped"]
    assert math.sqrt(t * (1 - t) / b) <= 0.1 * t and 1 / (b + 1) <= t / 10
    assert decision.inputs["b_for_mc_error"] == 8_900  # (1 - t) / (0.01 t) with t = 1/90
    other = ac.choose_n_boot(0.07, 6)  # 6 / 0.07 is not whole: B + 1 on the grid of 1000
    t = 0.07 / 6
    assert other.value == 8_999 and other.inputs["alpha_times_b_plus_1_integer"] is False
    assert math.sqrt(t * (1 - t) / (other.value - 1000)) > 0.1 * t  # one step less would miss the target


# ---------------------------------------------------------------------------------------------
# 10. Power analysis
# ---------------------------------------------------------------------------------------------
def test_paired_gate_sample_size_matches_the_notes():
    # notes section 5(a): sd 0.1, delta 0.03, alpha 0.05, power 0.8 -> 69 (71 with the t correction);
    # sd 0.2, delta 0.05 -> 99 (101).
    assert ac.prompts_for_paired_gate(0.1, 0.03, 0.05) == 69
    assert ac.prompts_for_paired_gate(0.1, 0.03, 0.05, t_correction=True) == 71
    assert ac.prompts_for_paired_gate(0.2, 0.05, 0.05) == 99
    assert ac.prompts_for_paired_gate(0.2, 0.05, 0.05, t_correction=True) == 101


def test_paired_gate_sample_size_has_its_power_in_simulation():
    from scipy import stats

    n = ac.prompts_for_paired_gate(0.1, 0.03, 0.05, t_correction=True)
    d = np.random.default_rng(0).normal(-0.03, 0.1, (4000, n))  # true mean at distance 0.03 past the boundary
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    power = np.mean(t < stats.t.ppf(0.05, n - 1))
    assert 0.77 <= power <= 0.85


def test_mia_equivalence_sample_size_matches_the_notes():
    # notes section 5(b): TOST of AUC against 0.5 +/- margin, alpha 0.05, power 0.8, equal classes:
    # margin 0.10 -> 143, 0.05 -> 571, 0.03 -> 1586 per class (from SE^2 ~ 1/(6N), which drops the +1 of
    # Hanley-McNeil's (m + n + 1) / (12 m n); keeping it adds at most one).
    for margin, notes in ((0.10, 143), (0.05, 571), (0.03, 1586)):
        members, nonmembers = ac.prompts_for_mia_equivalence(margin, 0.05)
        assert members == nonmembers and 0 <= members - notes <= 1


def test_mia_equivalence_unequal_sizes_meet_the_variance_target_tightly():
    members, nonmembers = ac.prompts_for_mia_equivalence(0.05, 0.05, ratio=1.5)
    target = (0.05 / (1.6448536 + 1.2815516)) ** 2
    assert members == math.ceil(1.5 * nonmembers - 1e-9)
    assert ac.hanley_mcneil_null_variance(members, nonmembers) <= target
    assert ac.hanley_mcneil_null_variance(math.floor(1.5 * (nonmembers - 2)), nonmembers - 2) > target


def test_mia_equivalence_sample_size_has_its_power_in_simulation():
    from scipy import stats

    m, n = ac.prompts_for_mia_equivalence(0.05, 0.05)
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2000, m + n))  # members and non-members alike: true AUC 0.5
    ranks = stats.rankdata(scores, axis=1)
    auc = (ranks[:, :m].sum(1) - m * (m + 1) / 2) / (m * n)
    se0 = math.sqrt(ac.hanley_mcneil_null_variance(m, n))
    passes = np.abs(auc - 0.5) <= 0.05 - stats.norm.ppf(0.95) * se0  # both one-sided tests reject
    assert 0.76 <= passes.mean() <= 0.85


def shipped_like_es(rng, n):
    """Per-prompt ES as in test_statistics.py: 30% exact zeros, 25% exact ones, the rest Beta(2, 2)."""
    u = rng.random(n)
    return np.where(u < 0.30, 0.0, np.where(u < 0.55, 1.0, rng.beta(2, 2, n)))


def test_ratio_plan_has_its_power_under_its_own_planning_alternative():
    """The arm keeps 25% of base ES with 0/1 outcomes independent of the base: the planned n rejects
    'mean ES_arm >= rho mean ES_base' (one-sided t on d = arm - rho base) with power about 0.8."""
    from scipy import stats

    rng = np.random.default_rng(0)
    pilot = shipped_like_es(rng, 262)
    alpha = 0.10 / 60
    plan = ac.plan_sample_sizes({"forget_eval": pilot}, {"forget_eval": {"kind": "ratio", "rho": 0.5}}, alpha)
    n = plan["forget_eval"].inputs["n_needed"]
    base = rng.choice(pilot, size=(4000, n))
    arm = (rng.random((4000, n)) < 0.25 * pilot.mean()).astype(float)
    d = arm - 0.5 * base
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    assert 0.77 <= np.mean(t < stats.t.ppf(alpha, n - 1)) <= 0.88


def test_plan_sample_sizes_caps_records_underpowered_and_uninformative_sets():
    rng = np.random.default_rng(1)
    alpha = 0.10 / 60
    pilot = {"forget_eval": shipped_like_es(rng, 262), "adversarial": shipped_like_es(rng, 20),
             "mixed": np.zeros(76), "urdu": np.ones(83), "retain_eval": rng.normal(3.0, 0.5, 256)}
    gates = {"forget_eval": {"kind": "ratio", "rho": 0.5}, "adversarial": {"kind": "ratio", "rho": 0.7},
             "mixed": {"kind": "ratio", "rho": 0.7}, "urdu": {"kind": "fidelity", "max_drop": 0.10},
             "retain_eval": {"kind": "nll", "ppl_ratio": 1.10},
             "forget_mia": {"kind": "mia", "margin": 0.05, "n_members": 398, "n_nonmembers": 262}}
    plans = ac.plan_sample_sizes(pilot, gates, alpha)
    forget = plans["forget_eval"]
    assert forget.value == forget.inputs["n_needed"] < 262 and forget.inputs["underpowered"] is None
    adversarial = plans["adversarial"]
    assert adversarial.value == 20 and adversarial.inputs["underpowered"] == \
        {"n": 20, "n_needed": adversarial.inputs["n_needed"]}
    assert plans["mixed"].value == 76 and "uninformative" in plans["mixed"].rule
    # Base fidelity all 1: no variance, but mmie's test needs (1 - 0.10)^n <= alpha even with no lost prompt.
    assert plans["urdu"].inputs["n_needed"] == math.ceil(math.log(alpha) / math.log(0.9)) == 61
    sd_d = 0.5 * math.sqrt(2 * (1 - 0.9))  # NLL planning: correlation 0.9, no change
    assert plans["retain_eval"].inputs["sd_d"] == pytest.approx(sd_d, rel=0.1)
    mia = plans["forget_mia"]
    assert mia.inputs["underpowered"] is not None and mia.value == {"members": 398, "nonmembers": 262}
    json.dumps({name: d.as_dict() for name, d in plans.items()}, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# 11. Fixed settings and the decision table
# ---------------------------------------------------------------------------------------------
def test_fixed_by_design_covers_the_benchmark_and_the_question():
    for name in ("npo_beta", "relearn_steps", "relearn_lrs", "dsg_quantile", "fdr_q", "gate_es_forget_ratio",
                 "gate_es_mixed_ratio", "gate_es_adv_ratio", "gate_ppl_ratio", "gate_fidelity_drop",
                 "gate_mia_margin"):
        assert ac.FIXED_BY_DESIGN[name]


def test_decision_table_user_flag_wins_and_columns_line_up():
    decisions = {"lr": ac.choose_lr(None, 124e6), "rank": ac.lora_rank(124e6, 200),
                 "n_boot": ac.choose_n_boot(0.1, 9)}
    lines = ac.decision_table(decisions, {"rank": 16, "seeds": [0, 1]}, fixed_values={"npo_beta": 0.1})
    assert lines[0].split() == ["setting", "value", "source", "rule", "key", "inputs"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert list(rows) == ["lr", "rank", "n_boot", "seeds", "npo_beta"]
    assert "user (auto would be 4)" in rows["rank"] and rows["rank"].split()[1] == "16"
    assert "auto" in rows["lr"] and "n_params=1.24e+08" in rows["lr"]
    assert "fixed" in rows["npo_beta"] and "NPO paper" in rows["npo_beta"]
    assert "0,1" in rows["seeds"]
    source_column = lines[0].index("source")
    assert all(line[source_column - 2: source_column] == "  " for line in lines)
    assert {line[source_column:].split()[0] for line in lines[1:]} == {"auto", "user", "fixed"}


def test_auto_config_report_keeps_the_auto_value_under_a_user_flag():
    entries = ac.auto_config_report({"rank": ac.lora_rank(124e6, 200), "lr": ac.choose_lr(None, 124e6)},
                                    {"rank": 16})
    assert entries["rank"]["value"] == 16 and entries["rank"]["source"] == "user"
    assert entries["rank"]["auto_value"] == 4 and entries["lr"]["source"] == "auto"
    json.dumps(entries, allow_nan=False)


def test_sae_width_is_also_limited_by_the_training_text():
    """A width the data cannot feed only costs compute (the embedded model's 55k tokens cannot train 8192
    latents): at least 16 training tokens per latent."""
    plenty = 64 * 2**30
    assert ac.sae_expansion_from_memory(256, 1, plenty).value == 32
    decision = ac.sae_expansion_from_memory(256, 1, plenty, n_tokens=55_000)
    assert decision.value == 8 and decision.inputs["n_tokens"] == 55_000  # 8 x 256 x 16 = 32,768 <= 55,000
    assert ac.sae_expansion_from_memory(1536, 1, plenty, n_tokens=30_000).value == 4


# ---------------------------------------------------------------------------------------------
# The probes' budget: a share of the predicted run, slices in order, deadlines, and no probe for a user's flag
# ---------------------------------------------------------------------------------------------
def fake_clock(start: float = 0.0):
    now = [start]
    return now, (lambda: now[0])


def test_the_probes_budget_is_a_share_of_the_predicted_run_with_a_floor_and_slices_in_order():
    predicted = ac.predicted_run_seconds(evaluations=4, prompts_per_evaluation=288, seconds_per_prompt=0.5,
                                         train_steps=40, seconds_per_step=12.0)
    assert predicted["seconds"] == 4 * 288 * 0.5 + 40 * 12.0 == 1056.0
    budget = ac.ProbeBudget(predicted)
    assert budget.seconds == pytest.approx(105.6)  # 10%, above the floor
    assert ac.ProbeBudget({"seconds": 100.0}).seconds == ac.PROBE_FLOOR_S
    assert budget.allowance("batch sizes") == pytest.approx(0.15 * 105.6)
    budget.charge("batch sizes", 2.0)  # the unspent part of a slice passes to the next probe
    assert budget.allowance("power analysis") == pytest.approx(0.30 * 105.6 - 2.0)
    assert budget.allows("power analysis", 10.0) and "power analysis" not in budget.fallbacks
    assert not budget.allows("layer scoring", 100.0)
    assert budget.fallbacks["layer scoring"].startswith("predicted 100s > ")
    assert sum(ac.PROBE_SHARES.values()) == pytest.approx(1.0)
    json.dumps(budget.report(), allow_nan=False)


def test_a_probe_deadline_is_what_its_slice_has_left():
    now, clock = fake_clock()
    budget = ac.ProbeBudget({"seconds": 1000.0}, clock=clock)  # 100 s in all
    deadline = budget.deadline("batch sizes")
    assert deadline.remaining_s() == pytest.approx(15.0)
    now[0] = 16.0
    assert deadline.expired()


def test_the_cpu_batch_search_stops_at_its_deadline_and_chooses_among_what_it_measured():
    now, clock = fake_clock()
    deadline = ac.Deadline(10 / 60, clock)

    def measure(batch):
        now[0] += 4.0  # each measurement takes 4 s: the deadline passes during the third
        return {8: 1.0, 16: 0.48, 32: 0.45, 64: 0.44}[batch]

    decision = ac.choose_batch_size_cpu(measure, (8, 16, 32, 64), deadline=deadline)
    assert decision.inputs["stop"].startswith("budget: stopped in round 1 of 3 after batch 32")
    assert set(decision.inputs["seconds_per_item"]) == {"8", "16", "32"} and decision.value == 16


def test_the_cuda_batch_search_stops_at_its_deadline_after_a_batch_that_fitted():
    now, clock = fake_clock()
    deadline = ac.Deadline(1 / 60, clock)

    def try_batch(batch):
        now[0] += 0.6

    decision = ac.search_batch_size_cuda(try_batch, start=8, max_batch=1024, release=lambda: None, deadline=deadline)
    assert decision.inputs["stop"] == "budget: stopped after 2 trials" and decision.inputs["largest_ok"] == 16


def test_an_lr_range_test_stopped_at_its_budget_gives_way_to_the_model_size_rule():
    now, clock = fake_clock()
    deadline = ac.Deadline(5 / 60, clock)

    def step(lr):
        now[0] += 1.0
        return 3.0 - 0.01 * len(str(lr))

    curve = ac.lr_range_test(step, num_steps=40, deadline=deadline)
    assert len(curve["lr"]) == 5 and curve["stop"].startswith("budget: stopped after 5 of 40 steps")
    decision = ac.choose_lr(curve, 124e6)
    assert decision.value == ac.model_size_lr(124e6).value and "LR probe budget" in decision.rule
    assert decision.inputs["stop"] == curve["stop"]  # what the run's budget record reads (note_budget_stops)
    assert ac.choose_lr(None, 124e6, why="LR probe over budget").rule.startswith("model-size rule (LR probe over")


def test_a_probe_for_a_setting_the_user_gave_never_runs():
    """--batch_size 32 --train_batch_size 8 ran the whole CPU search anyway, to print "auto would be X"."""
    class Settings:
        batch_size, lr = 32, 0.1

    def probe():
        raise AssertionError("the probe ran")

    auto = ac.AutoConfig(Settings, given={"batch_size"})
    assert auto.decide("batch_size", probe) == 32
    assert auto.decide("lr", ac.Decision(0.01, "rule: free")) == 0.01  # a rule costs nothing: still recorded
    rows = {line.split()[0]: line for line in auto.table()[1:]}
    assert rows["batch_size"].split()[1:3] == ["32", "user"] and "auto would be" not in rows["batch_size"]
    assert auto.report()["batch_size"] == {"value": 32, "source": "user", "inputs": {},
                                           "rule": "given by the user: its probe did not run"}
