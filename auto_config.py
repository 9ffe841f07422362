"""Auto-config (docs/METHODS.md, "Auto-config"): every hyperparameter the user did not give, chosen by a rule from the
model, the data and the hardware, measured where possible.

Each choice is a `Decision(value, rule, inputs)`: the value, the rule that produced it (written
"short name: details"; the table shows the short name) and the measured numbers the rule used. The
report keeps all three under report["auto_config"]; `decision_table` prints them at the start of a run.
A user's flag always wins (`auto_config_report`, `decision_table`).

This module holds pure functions and small classes only (torch, numpy, scipy, scikit-learn). It never
imports mmie: the driver runs the model-dependent probes (an LR range test on the retain objective, a
batch-size search, SAE training runs) through the callables these functions take, and passes in what it
measured. Sections:

    0. decisions                 5. LoRA and ReFT              10. power analysis (sample sizes)
    1. learning rate             6. layers                     11. fixed settings, the table
    2. batch sizes               7. token lengths
    3. early stopping, budgets   8. generation
    4. SAE width and k           9. bootstrap resolution

Every rule of thumb names its source in its docstring; "ours" means no published source sets it and the
number is this project's choice, documented so that it can be argued with.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats


# =============================================================================================
# 0. Decisions
# =============================================================================================
def json_safe(value):
    """The value as JSON can hold it, as the report requires: numpy scalars and arrays become Python numbers
    and lists, tuples become lists, non-finite floats become None (the report writes null, never NaN), dict
    keys become strings. Anything else raises TypeError here, not when the report is written at the end."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int, float, bool)) for k in value):
            raise TypeError(f"dict keys must be str or numbers to go into the report: {list(value)[:5]}")
        return {str(k): json_safe(v) for k, v in value.items()}
    raise TypeError(f"{type(value).__name__} cannot go into the JSON report: {value!r}")


@dataclass(frozen=True)
class Decision:
    """One auto-config choice. `rule` reads "short name: details" (the table shows the short name);
    `inputs` are the measured numbers and settings the rule used. Both value and inputs are made JSON-safe
    on creation (json_safe), so a Decision can always be written into the report."""

    value: object
    rule: str
    inputs: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.value, (float, np.floating)) and not math.isfinite(self.value):
            raise ValueError(f"a decision's value must be finite (rule {self.rule!r} gave {self.value})")
        object.__setattr__(self, "value", json_safe(self.value))
        object.__setattr__(self, "inputs", json_safe(dict(self.inputs)))

    @property
    def short_rule(self) -> str:
        return self.rule.split(":", 1)[0]

    def as_dict(self) -> dict:
        return {"value": self.value, "rule": self.rule, "inputs": self.inputs}


# =============================================================================================
# 1. Learning rate
# =============================================================================================
def lr_ladder(min_lr: float, max_lr: float, num_steps: int) -> np.ndarray:
    """num_steps learning rates evenly spaced in log10(lr), both ends included. Lightning's _ExponentialLR
    computes r = (t + 1) / N, so its first step jumps two rungs (open PR #21931 proposes r = t / (N - 1),
    which is what this is)."""
    if not 0 < min_lr < max_lr:
        raise ValueError(f"need 0 < min_lr < max_lr (got {min_lr}, {max_lr})")
    if num_steps < 2:
        raise ValueError(f"num_steps must be at least 2 (got {num_steps})")
    return np.logspace(math.log10(min_lr), math.log10(max_lr), num_steps)


def lr_range_test(step: Callable[[float], float], *, min_lr: float = 1e-7, max_lr: float = 1.0, num_steps: int = 40,
                  beta: float = 0.98, diverge_factor: float = 4.0, deadline: "Deadline | None" = None) -> dict:
    """LR range test (Smith 2017; as Lightning's lr_find, notes section 1): call step(lr), one training step
    at that lr returning its loss, for lrs rising evenly in log10(lr) from min_lr to max_lr. The loss is
    smoothed by an EMA with bias correction (avg = beta*avg + (1-beta)*loss, smoothed = avg / (1 - beta^(i+1)),
    Lightning's _LRCallback); the sweep stops when the smoothed loss is non-finite or exceeds diverge_factor
    times the best so far (Lightning's early_stop_threshold=4). That test is multiplicative, so losses must be
    positive (NLL-like): a KL retain loss starts at exactly 0 for a fresh adapter, so probe with the retain
    NLL. The caller restores the model and optimizer afterwards.

    Returns {"lr", "loss", "smoothed", "stop"}; "smoothed" (causal, lagging) serves the stopping rule only,
    suggest_lr smooths without lag. A `deadline` that expires stops the sweep ("stop" starts "budget"): the curve
    then lacks its high-lr end, and the caller should not read a suggestion from it."""
    if not 0 <= beta < 1 or diverge_factor <= 1:
        raise ValueError(f"need 0 <= beta < 1 and diverge_factor > 1 (got {beta}, {diverge_factor})")
    curve = {"lr": [], "loss": [], "smoothed": [], "stop": "end of the sweep"}
    average, best = 0.0, math.inf
    for i, lr in enumerate(lr_ladder(min_lr, max_lr, num_steps)):
        loss = float(step(float(lr)))
        if math.isfinite(loss) and loss <= 0:
            raise ValueError(f"lr_range_test needs positive (NLL-like) losses; step({lr:.3g}) returned {loss}")
        average = beta * average + (1 - beta) * loss
        smoothed = average / (1 - beta ** (i + 1))
        curve["lr"].append(float(lr))
        curve["loss"].append(loss)
        curve["smoothed"].append(smoothed)
        if not math.isfinite(smoothed):
            curve["stop"] = f"non-finite loss at lr {lr:.3g}"
            break
        best = min(best, smoothed)
        if i > 0 and smoothed > diverge_factor * best:
            curve["stop"] = f"diverged at lr {lr:.3g} (smoothed loss > {diverge_factor:g} x best)"
            break
        if deadline is not None and deadline.expired() and i + 1 < num_steps:
            curve["stop"] = f"budget: stopped after {i + 1} of {num_steps} steps, at lr {lr:.3g}"
            break
    return curve


def centered_mean(values: np.ndarray, half_width: int) -> np.ndarray:
    """Mean over a window of 2*half_width + 1 points centred on each point (shorter at the ends). Centred, so
    it does not lag: a causal EMA with beta=0.98 averages ~50 steps, more than a 40-step sweep, and moves the
    steepest point up by most of a decade (tests/test_auto_config.py measures it)."""
    return np.array([values[max(0, i - half_width): i + half_width + 1].mean() for i in range(len(values))])


def lr_at_minimum_over_10(lrs: np.ndarray, smoothed: np.ndarray) -> float:
    """fastai's `minimum` suggestion (lr_find's SuggestedLRs): the lr of the lowest smoothed loss, divided by
    10, i.e. one decade below where the loss stops falling."""
    return float(lrs[int(np.argmin(smoothed))] / 10)


RISE_FACTOR = 1.5  # a loss this many times the plateau's median has left the plateau (ours)


def rise_lr(lrs: np.ndarray, losses: np.ndarray) -> float | None:
    """The first lr whose loss leaves the plateau: exceeds RISE_FACTOR x the median of the first half of the
    sweep (the lrs too small to move the model), or is not finite; None when the loss never rises."""
    plateau = float(np.median(losses[: max(1, len(losses) // 2)][np.isfinite(losses[: max(1, len(losses) // 2)])]))
    risen = np.nonzero(~np.isfinite(losses) | (losses > RISE_FACTOR * plateau))[0]
    risen = risen[risen >= len(losses) // 2]
    return float(lrs[risen[0]]) if len(risen) else None


def suggest_lr(curve: dict, skip_begin: int = 10, skip_end: int = 1, half_width: int = 2) -> Decision:
    """The lr of steepest descent of the smoothed loss against log10(lr), as Lightning's suggestion() did
    before 2.5.3 and as PR #21171 restores: since 2.5.3 Lightning differentiates against the lr itself, and
    d loss / d lr = (d loss / d log10 lr) / (lr ln 10) blows noise at small lr up by ~1/lr, so the argmin lands
    in the noisy low-lr region (issue #21141, open). Points skip_begin.. and ..-skip_end are used (Lightning's
    defaults 10 and 1), non-finite losses dropped, the raw losses smoothed by centered_mean.

    Fallbacks (the rule says which): fewer than 2*half_width + 3 usable points ("too short": a sweep that
    diverged early) gives fastai's minimum/10 on every finite point; a smoothed loss that never falls by more
    than 3 standard errors of the smoothed points (noise from successive differences) or 0.1% ("flat") gives
    one decade below the lr where the loss rises off its plateau (rise_lr: the objective was at its minimum
    already, as a trained model's retain NLL is, so only the stability limit is informative), or value None
    when it never rises, and choose_lr then uses the model-size rule."""
    lrs, losses = np.asarray(curve["lr"], float), np.asarray(curve["loss"], float)
    stop = curve.get("stop")
    window = slice(skip_begin, len(lrs) - skip_end)
    keep = np.isfinite(losses[window])
    x, y = np.log10(lrs[window][keep]), losses[window][keep]
    if len(y) < 2 * half_width + 3:
        finite = np.isfinite(losses)
        if not finite.any():
            return Decision(None, "no LR suggestion: the range test gave no finite loss", {"stop": stop})
        smoothed = np.asarray(curve["smoothed"], float)[finite]
        lr = lr_at_minimum_over_10(lrs[finite], smoothed)
        return Decision(lr, f"fastai minimum/10 (curve too short: {len(y)} usable points after skipping "
                        f"{skip_begin} + {skip_end})", {"usable_points": len(y), "stop": stop,
                                                        "curve_lr": lrs, "curve_loss": losses})
    smooth = centered_mean(y, half_width)
    noise_sd = float(np.std(np.diff(y), ddof=1) / math.sqrt(2))  # successive differences ignore the trend
    drop = float(smooth[0] - smooth.min())
    needed = max(3 * noise_sd / math.sqrt(2 * half_width + 1), 1e-3 * abs(smooth[0]))
    inputs = {"drop": drop, "drop_needed": needed, "noise_sd": noise_sd, "usable_points": len(y),
              "half_width": half_width, "skip_begin": skip_begin, "skip_end": skip_end, "stop": stop,
              "curve_lr": lrs, "curve_loss": losses}
    if drop <= needed:
        rise = rise_lr(lrs, losses)
        if rise is None:
            return Decision(None, "no LR suggestion: flat curve (the loss never fell beyond its noise)", inputs)
        return Decision(rise / 10, "flat curve, then a rise: one decade below where the loss starts rising (the "
                        "objective is already at its minimum, as a trained model's retain NLL is; Smith 2017's "
                        "maximum useful lr, divided by 10)", {**inputs, "rise_lr": rise})
    slopes = np.gradient(smooth, x)
    best = int(np.argmin(slopes))
    return Decision(float(10 ** x[best]), "LR range test: steepest descent of the smoothed loss vs log10(lr) "
                    "(Lightning lr_find; slope in log space per issue #21141 / PR #21171)",
                    {**inputs, "slope_per_decade": float(slopes[best])})


def model_size_lr(n_params: int) -> Decision:
    """Starting points by model size (ours): 1e-3 below 50M parameters, 3e-4 below 500M, 2e-4 below 2B, 1e-4
    above. The shape follows GPT-3's pretraining table, where the lr falls with size (Brown et al. 2020, Table
    2.1, from memory: 350M 3e-4, 1.3B 2e-4, 13B 1e-4); 2e-4 is also Unsloth's LoRA starting point (notes
    section 4); tiny models train faster still (nanoGPT's 10.7M-parameter shakespeare_char config uses 1e-3)."""
    if n_params < 1:
        raise ValueError(f"n_params must be positive (got {n_params})")
    lr = 1e-3 if n_params < 50e6 else 3e-4 if n_params < 500e6 else 2e-4 if n_params < 2e9 else 1e-4
    return Decision(lr, "model-size starting point: 1e-3 < 50M params, 3e-4 < 500M, 2e-4 < 2B, else 1e-4 (ours, "
                    "GPT-3 Table 2.1's shape, nanoGPT's tiny configs)", {"n_params": n_params})


def choose_lr(curve: dict | None, n_params: int, band: float = 10.0, why: str = "LR probe off") -> Decision:
    """The LR range test's suggestion, clamped to [center / band, center * band] around model_size_lr, so one
    noisy probe cannot move the lr more than a decade (band=10, ours) from a sane starting point. With the
    probe off or over its budget (curve None; `why` says which) or no suggestion (flat, no finite loss), the
    model-size rule alone."""
    if band < 1:
        raise ValueError(f"band must be at least 1 (got {band})")
    center = model_size_lr(n_params)
    if curve is None:
        return Decision(center.value, f"model-size rule ({why}): " + center.rule, center.inputs)
    if str(curve.get("stop", "")).startswith("budget"):
        return Decision(center.value, f"model-size rule (LR probe {curve['stop']}): " + center.rule,
                        {**center.inputs, "probe_steps": len(curve["lr"]), "stop": curve["stop"]})
    suggestion = suggest_lr(curve)
    inputs = {"suggested": suggestion.value, "suggestion_rule": suggestion.rule, "center": center.value,
              "band": band, "n_params": n_params, **suggestion.inputs}
    if suggestion.value is None:
        return Decision(center.value, f"model-size rule (LR probe: {suggestion.rule})", inputs)
    low, high = center.value / band, center.value * band
    value = min(max(suggestion.value, low), high)
    clamp = "" if value == suggestion.value else f", clamped to [{low:.3g}, {high:.3g}] around the model-size rule"
    return Decision(value, f"LR range test{clamp}: {suggestion.rule}", inputs)


# =============================================================================================
# 2. Batch sizes
# =============================================================================================
OOM_MESSAGES = ("out of memory",  # CUDA, HIP, XPU, MPS ("CUDA out of memory", "CUDA error: out of memory", ...)
                "CUBLAS_STATUS_ALLOC_FAILED", "HIPBLAS_STATUS_ALLOC_FAILED",
                "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED.",  # cuDNN's answer to a batch too big for its workspace
                "DefaultCPUAllocator: can't allocate memory")


def is_oom_error(err: BaseException) -> bool:
    """Out of memory, on any backend: torch.OutOfMemoryError (torch.cuda.OutOfMemoryError is the same class),
    or a RuntimeError whose message is one of OOM_MESSAGES (accelerate's should_reduce_batch_size and
    Lightning's is_oom_error, notes section 2, plus cuBLAS/hipBLAS allocation failures)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(message in str(err) for message in OOM_MESSAGES)


def release_cuda_memory() -> None:
    """gc.collect() then torch.cuda.empty_cache() (Lightning's garbage_collection_cuda, accelerate's
    clear_device_cache): the cached blocks of a failed trial go back before the next one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def batch_fits(try_batch: Callable[[int], None], batch: int, release: Callable[[], None]) -> bool:
    """True if try_batch(batch) ran, False if it ran out of memory; any other error propagates. release()
    runs after the except clause has ended, when the exception (whose traceback holds the trial's tensors)
    is gone, so that the memory can really be returned."""
    fits = True
    try:
        try_batch(batch)
    except Exception as err:
        if not is_oom_error(err):
            raise
        fits = False
    release()
    return fits


def search_batch_size_cuda(try_batch: Callable[[int], None], *, start: int = 8, max_batch: int = 1024,
                           safety: float = 0.9, release: Callable[[], None] = release_cuda_memory,
                           deadline: "Deadline | None" = None) -> Decision:
    """Largest batch that fits, times a safety margin. Lightning's binsearch mode (notes section 2): double
    from `start` until a trial runs out of memory (or reaches max_batch), then bisect between the last success
    and the first failure; O(log) trials. Lightning keeps 95% (margin 0.05) and accelerate backs off to 90%;
    we keep `safety` = 90% (rounded down, at least 1) because memory also moves with fragmentation and the
    optimizer's lazily allocated state. try_batch(b) must run one full training step (forward, backward,
    optimizer step) at the longest sequence length used (max_len), which is what memory depends on. A `deadline`
    that expires after a trial that fitted ends the search there (inputs["stop"] says so)."""
    if not 0 < safety <= 1 or start < 1 or max_batch < 1:
        raise ValueError(f"need 0 < safety <= 1, start >= 1, max_batch >= 1 (got {safety}, {start}, {max_batch})")
    largest_ok, smallest_oom, batch, trials = 0, None, min(start, max_batch), []
    stop = "search finished"
    while True:
        fits = batch_fits(try_batch, batch, release)
        trials.append({"batch": batch, "ok": fits})
        if fits:
            largest_ok = batch
        else:
            smallest_oom = batch
        if fits and deadline is not None and deadline.expired():
            stop = f"budget: stopped after {len(trials)} trials"
            break
        if smallest_oom is None:
            if batch >= max_batch:
                break
            batch = min(2 * batch, max_batch)
        elif smallest_oom - largest_ok <= 1:
            break
        else:
            batch = (largest_ok + smallest_oom) // 2
    if largest_ok == 0:
        raise RuntimeError(f"even a batch of 1 runs out of memory (trials: {trials})")
    value = max(1, math.floor(largest_ok * safety))
    return Decision(value, f"batch-size search: largest fitting batch x {safety:g} (Lightning binsearch; "
                    "accelerate's 0.9 back-off)", {"largest_ok": largest_ok, "smallest_oom": smallest_oom,
                                                   "safety": safety, "max_batch": max_batch, "trials": trials,
                                                   "stop": stop})


def choose_batch_size_cpu(measure: Callable[[int], float], candidates: Sequence[int] = (8, 16, 32, 64, 128, 256),
                          tolerance: float = 0.10, repeats: int = 3, deadline: "Deadline | None" = None) -> Decision:
    """The smallest candidate whose seconds per item is within `tolerance` (10%, ours) of the best measured.
    On a CPU a bigger batch stops paying once the matrix kernels are saturated; past that it only costs memory
    and coarser progress, so among near-equal throughputs the smallest wins. measure(b) returns seconds per
    item at batch b. Each candidate's time is the minimum of `repeats` rounds over all candidates (timeit's rule:
    noise only ever adds time; interleaved rounds keep a slow spell of the machine from landing on one candidate),
    so that reruns of one command on one machine choose alike (single timings gave 16 in one run and 8 in the
    next). A `deadline` that expires stops the rounds after the measurement under way; the choice is then among
    the candidates measured (inputs["stop"] says so)."""
    seconds, stop = {}, "all rounds"
    for round_number in range(1, repeats + 1):
        for batch in sorted(candidates):
            value = float(measure(batch))
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"measure({batch}) must return positive seconds per item (got {value})")
            seconds[batch] = min(value, seconds.get(batch, math.inf))
            if deadline is not None and deadline.expired():
                stop = f"budget: stopped in round {round_number} of {repeats} after batch {batch}"
                break
        if stop != "all rounds":
            break
    best = min(seconds.values())
    chosen = min(b for b, s in seconds.items() if s <= best * (1 + tolerance))
    return Decision(chosen, f"CPU throughput: smallest batch within {tolerance:.0%} of the best seconds per item "
                    f"(ours), each the fastest of {repeats} rounds",
                    {"seconds_per_item": seconds, "best_seconds_per_item": best, "tolerance": tolerance,
                     "repeats": repeats, "stop": stop})


class OOMBackoff:
    """Keeps an effective batch when memory runs out mid-training: the batch is split into micro-batches of
    at most `micro_batch` items whose gradients accumulate; on an OOM the micro-batch halves (so accumulation
    roughly doubles) and the step is redone. The effective batch never changes: the last micro-batch is
    smaller when micro_batch does not divide it, and each micro-batch's mean loss is weighted by its share
    of the items, so the accumulated gradient is the full batch's. Every change is logged in `events`."""

    def __init__(self, effective_batch: int, micro_batch: int | None = None):
        if effective_batch < 1 or (micro_batch is not None and micro_batch < 1):
            raise ValueError(f"batch sizes must be at least 1 (got {effective_batch}, {micro_batch})")
        self.effective_batch = effective_batch
        self.micro_batch = min(micro_batch or effective_batch, effective_batch)
        self.events: list[dict] = []

    @property
    def accumulation(self) -> int:
        return math.ceil(self.effective_batch / self.micro_batch)

    def micro_batches(self, n_items: int | None = None) -> list[tuple[slice, float]]:
        """(slice, weight) per micro-batch of n_items (default the effective batch); weights sum to 1."""
        n = n_items or self.effective_batch
        return [(slice(s, min(s + self.micro_batch, n)), (min(s + self.micro_batch, n) - s) / n)
                for s in range(0, n, self.micro_batch)]

    def on_oom(self, err: BaseException, step: int | None = None) -> None:
        """Halve the micro-batch after an OOM; at micro-batch 1 there is nothing left to halve: re-raise."""
        if self.micro_batch == 1:
            err.add_note("OOMBackoff: out of memory at micro-batch 1; nothing left to halve")
            raise err
        old_micro, old_accumulation = self.micro_batch, self.accumulation
        self.micro_batch //= 2
        self.events.append({"step": step, "micro_batch": [old_micro, self.micro_batch],
                            "accumulation": [old_accumulation, self.accumulation], "error": str(err)[:200]})

    def run(self, train_step: Callable[[list[tuple[slice, float]]], object], n_items: int | None = None, *,
            step: int | None = None, release: Callable[[], None] = release_cuda_memory):
        """train_step(micro_batches) until it runs without an OOM; returns what it returns. train_step must
        start from zeroed gradients (call optimizer.zero_grad first), since a step cut short by an OOM leaves
        part of its gradient behind. Errors other than OOM propagate untouched."""
        while True:
            try:
                return train_step(self.micro_batches(n_items))
            except Exception as err:
                if not is_oom_error(err):
                    raise
                self.on_oom(err, step)
            release()  # after the except clause: the failed step's tensors are no longer referenced


# =============================================================================================
# 3. Early stopping, retain budget, deadline (shared with adaptive_unlearning.py)
# =============================================================================================
class EarlyStopping:
    """Stop when the monitored value has not improved by more than min_delta for `patience` evaluations
    (Keras / Lightning EarlyStopping semantics, notes section 7: the change must exceed min_delta to count,
    patience counts evaluations, not steps). A non-finite value stops at once (Lightning's check_finite).
    The caller keeps the best weights (best_step tells which)."""

    def __init__(self, patience: int, min_delta: float = 0.0, mode: str = "min"):
        if patience < 0 or min_delta < 0 or mode not in ("min", "max"):
            raise ValueError(f"need patience >= 0, min_delta >= 0, mode min|max (got {patience}, {min_delta}, {mode})")
        self.patience, self.min_delta, self.mode = patience, min_delta, mode
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.wait, self.stopped, self.reason = 0, False, None
        self.history: list[tuple[int, float]] = []

    def improves(self, value: float) -> bool:
        if self.best_value is None:
            return True
        if self.mode == "min":
            return value < self.best_value - self.min_delta
        return value > self.best_value + self.min_delta

    def update(self, step: int, value: float, eligible: bool = True) -> bool:
        """Record one evaluation; True when training should stop (and from then on). An ineligible evaluation (the
        caller's constraint broken, e.g. a budget) can never be the best and counts as no improvement."""
        value = float(value)
        self.history.append((step, value))
        if self.stopped:
            return True
        if not math.isfinite(value):
            self.stopped, self.reason = True, f"non-finite value {value} at step {step}"
        elif eligible and self.improves(value):
            self.best_value, self.best_step, self.wait = value, step, 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.stopped = True
                self.reason = (f"no improvement beyond {self.min_delta:g} in {self.wait} evaluations "
                               f"(best {self.best_value:.4g} at step {self.best_step})")
        return self.stopped


class RetainBudget:
    """Whether the retain NLL left its budget: value > base * (1 + eps), or value > base + log(ppl_ratio), the form of
    gate G2 (mean per-text NLL increase < log 1.10). Give exactly one of eps and ppl_ratio. A trainer that
    must pass G2 with evidence should use a budget inside the gate's (e.g. ppl_ratio 1.05 against a 1.10 gate),
    since a mean just under the margin does not reject the null. A non-finite value has left the budget."""

    def __init__(self, base: float, *, eps: float | None = None, ppl_ratio: float | None = None):
        if (eps is None) == (ppl_ratio is None):
            raise ValueError("give exactly one of eps and ppl_ratio")
        if not math.isfinite(base) or (eps is not None and (eps <= 0 or base <= 0)) or \
                (ppl_ratio is not None and ppl_ratio <= 1):
            raise ValueError(f"need a finite base (> 0 with eps), eps > 0 or ppl_ratio > 1 (got {base}, {eps}, "
                             f"{ppl_ratio})")
        self.base = float(base)
        if eps is not None:
            self.limit, self.rule = self.base * (1 + eps), f"NLL <= base x (1 + {eps:g})"
        else:
            self.limit, self.rule = self.base + math.log(ppl_ratio), f"NLL <= base + log({ppl_ratio:g})"

    def exceeded(self, value: float) -> bool:
        return not float(value) <= self.limit  # NaN compares False: out of budget


class Deadline:
    """Wall-clock budget of `minutes` from creation (None: no limit). `clock` is injectable for tests."""

    def __init__(self, minutes: float | None, clock: Callable[[], float] = time.monotonic):
        if minutes is not None and minutes <= 0:
            raise ValueError(f"minutes must be positive or None (got {minutes})")
        self.minutes, self.clock, self.start = minutes, clock, clock()

    def elapsed_s(self) -> float:
        return self.clock() - self.start

    def remaining_s(self) -> float:
        return math.inf if self.minutes is None else self.minutes * 60 - self.elapsed_s()

    def expired(self) -> bool:
        return self.remaining_s() <= 0


PROBE_SHARE = 0.10  # auto-config's probes together may take this share of the run they configure (ours)
PROBE_FLOOR_S = 60.0  # ...but never less: probes that cost a minute in all are worth more than rules (ours; on the
# embedded model they take about 40 s, which the floor keeps measured rather than ruled)
# Each probe's slice of the budget, in the order they run; what one leaves unspent passes to the next (ours: the
# layer scoring, a generation pass per layer, is the dearest and decides the most).
PROBE_SHARES = {"batch sizes": 0.15, "power analysis": 0.15, "layer scoring": 0.40, "learning rates": 0.20,
                "sae k": 0.10}


def predicted_run_seconds(*, evaluations: int, prompts_per_evaluation: int, seconds_per_prompt: float,
                          train_steps: int, seconds_per_step: float) -> dict:
    """A lower bound of the run's seconds from its measured unit costs: its evaluations (generation of every
    prompt set, the base, the reference and each arm and seed) and the training steps no early stop can cut.
    A lower bound, so that a budget taken as a share of it is a share of the real run at most."""
    evaluation = evaluations * prompts_per_evaluation * seconds_per_prompt
    training = train_steps * seconds_per_step
    return {"seconds": evaluation + training, "evaluation_s": evaluation, "training_s": training,
            "evaluations": evaluations, "prompts_per_evaluation": prompts_per_evaluation,
            "seconds_per_prompt": seconds_per_prompt, "train_steps": train_steps, "seconds_per_step": seconds_per_step}


class ProbeBudget:
    """The time auto-config's measured probes may spend together: max(PROBE_SHARE x the predicted run,
    PROBE_FLOOR_S), handed out in PROBE_SHARES slices. A probe asks `allows(name, predicted_s)` before it runs
    (no: its rule decides instead, and the table says so) and runs under `deadline(name)`, at which it stops
    with what it has measured. `spent` and `fallbacks` go into the report."""

    def __init__(self, predicted: dict, *, share: float = PROBE_SHARE, floor_s: float = PROBE_FLOOR_S,
                 clock: Callable[[], float] = time.monotonic):
        self.predicted, self.clock = predicted, clock
        self.seconds = max(share * predicted["seconds"], floor_s)
        self.spent: dict[str, float] = {}
        self.fallbacks: dict[str, str] = {}

    def allowance(self, name: str) -> float:
        """Seconds left to probe `name`: the cumulative slices up to it, less what the probes before it spent."""
        order = list(PROBE_SHARES)
        upto = sum(PROBE_SHARES[n] for n in order[: order.index(name) + 1])
        return self.seconds * upto - sum(self.spent.values())

    def allows(self, name: str, predicted_s: float) -> bool:
        fits = predicted_s <= self.allowance(name)
        if not fits:
            self.fallbacks[name] = (f"predicted {predicted_s:.3g}s > {max(0.0, self.allowance(name)):.3g}s left of "
                                    f"the probes' budget ({self.seconds:.3g}s)")
        return fits

    def deadline(self, name: str) -> Deadline:
        return Deadline(max(self.allowance(name), 1e-3) / 60, self.clock)

    def charge(self, name: str, seconds: float) -> None:
        self.spent[name] = self.spent.get(name, 0.0) + seconds

    def stopped(self, name: str, what: str) -> None:
        self.note(name, f"stopped at its budget: {what}")

    def note(self, name: str, what: str) -> None:
        """What the budget made a probe do instead of its full measurement."""
        self.fallbacks[name] = what

    def report(self) -> dict:
        return {"budget_s": self.seconds, "share": PROBE_SHARE, "floor_s": PROBE_FLOOR_S, "slices": PROBE_SHARES,
                "predicted_run": self.predicted, "spent_s": self.spent, "total_spent_s": sum(self.spent.values()),
                "fallbacks": self.fallbacks}


# =============================================================================================
# 4. SAE width and k
# =============================================================================================
SAE_EXPANSIONS = (4, 8, 16, 32)


def sae_training_bytes(d_model: int, expansion: int, n_layers: int, bytes_per_param: int = 4,
                       batch_tokens: int = 0) -> int:
    """Memory to train n_layers TopK SAEs at once: encoder and decoder (2 * d_model * n_latents) plus biases
    (n_latents + d_model), each held four times (weights, gradients, Adam's two moments), plus activations of
    batch_tokens tokens (pre-activations, TopK codes and their gradient: 3 * n_latents floats per token)."""
    n_latents = expansion * d_model
    params = 2 * d_model * n_latents + n_latents + d_model
    return n_layers * (4 * params + 3 * batch_tokens * n_latents) * bytes_per_param


MIN_TOKENS_PER_LATENT = 16  # ours: below this the training text cannot keep every latent alive


def sae_expansion_from_memory(d_model: int, n_layers: int, budget_bytes: float, bytes_per_param: int = 4,
                              batch_tokens: int = 0, n_tokens: int | None = None) -> Decision:
    """The largest power of two in [4, 32] whose SAEs fit budget_bytes (sae_training_bytes) and, when n_tokens
    (the SAE's training tokens) is given, that leaves at least MIN_TOKENS_PER_LATENT tokens per latent (ours:
    dead latents grow as tokens per latent shrink, Gao et al. 2024; a width the data cannot feed only costs
    compute). 32 is sparsify's default expansion_factor and the top of the range; Gao et al.'s GPT-2 SAEs are
    wider still (2^15 latents for d_model 768, ~43x; notes section 3); 4 is the narrowest we consider useful
    (ours). If even 4 does not fit, the decision is 4 and says so (inputs["fits"] is False)."""
    needs = {e: sae_training_bytes(d_model, e, n_layers, bytes_per_param, batch_tokens) for e in SAE_EXPANSIONS}
    fitting = [e for e in SAE_EXPANSIONS if needs[e] <= budget_bytes]
    fed = [e for e in fitting if n_tokens is None or e * d_model * MIN_TOKENS_PER_LATENT <= n_tokens]
    inputs = {"d_model": d_model, "n_layers": n_layers, "budget_bytes": budget_bytes, "bytes_needed": needs,
              "bytes_per_param": bytes_per_param, "batch_tokens": batch_tokens, "fits": bool(fitting),
              "n_tokens": n_tokens, "min_tokens_per_latent": MIN_TOKENS_PER_LATENT}
    if not fitting:
        return Decision(SAE_EXPANSIONS[0], "SAE width: even the narrowest does not fit the memory budget", inputs)
    if not fed:
        return Decision(SAE_EXPANSIONS[0], "SAE width: the narrowest (the training text is too small for more)",
                        inputs)
    limit = "memory and data" if n_tokens is not None else "memory"
    return Decision(max(fed), f"SAE width from {limit}: widest power of two in [4, 32] that fits (params, grads, "
                    f"Adam states) with >= {MIN_TOKENS_PER_LATENT} training tokens per latent", inputs)


def sparse_probe_auc(z_pos: np.ndarray, z_neg: np.ndarray, k: int, *, test_fraction: float = 0.2,
                     seed: int = 0) -> float:
    """SAEBench sparse probing (notes section 3): on a stratified train split, keep the k latents with the
    largest |mean_pos - mean_neg| (Gurnee et al.'s mean_dif), fit LogisticRegression(C=1, max_iter=1000) on
    them, and return the ROC AUC on the held-out split. z_pos, z_neg: [texts, n_latents], SAE codes mean-pooled
    over each text's tokens. SAEBench uses k in {1, 2, 5} and a 4000/1000 split (test_fraction 0.2)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    z_pos, z_neg = np.asarray(z_pos, float), np.asarray(z_neg, float)
    if min(len(z_pos), len(z_neg)) < 10 or not 1 <= k <= z_pos.shape[1]:
        raise ValueError(f"need >= 10 texts per class and 1 <= k <= {z_pos.shape[1]} (got {len(z_pos)}, "
                         f"{len(z_neg)}, k={k})")
    features = np.concatenate([z_pos, z_neg])
    labels = np.concatenate([np.ones(len(z_pos)), np.zeros(len(z_neg))])
    x_train, x_test, y_train, y_test = train_test_split(features, labels, test_size=test_fraction,
                                                        stratify=labels, random_state=seed)
    mean_diff = np.abs(x_train[y_train == 1].mean(0) - x_train[y_train == 0].mean(0))
    top = np.argsort(-mean_diff, kind="stable")[:k]
    probe = LogisticRegression(C=1.0, max_iter=1000).fit(x_train[:, top], y_train)
    return float(roc_auc_score(y_test, probe.decision_function(x_test[:, top])))


def choose_sae_k(candidates: list[dict], *, fvu_cap: float = 0.2, dead_cap: float = 0.1,
                 tie_tol: float = 0.01) -> Decision:
    """TopK k from trained candidates {"k", "fvu", "dead_fraction", "probe_auc_hi_en", "probe_auc_hi_ur"}.

    Only SAEs that reconstruct and train well qualify: fvu <= fvu_cap (0.2, ours: edits through an SAE that
    misses more than a fifth of the variance act on a poor copy of the residual stream) and dead_fraction <=
    dead_cap (0.1: Gao et al. keep dead latents to ~7% at 16M latents with their init and AuxK loss (notes
    section 3); more dead than 10% says the training recipe failed). Among those, the best mean of the two
    sparse-probe AUCs, Hindi-vs-English and Hindi-vs-Urdu weighted equally (Hindi vs Urdu is the informative
    pair: the two share most of their spoken language and differ in script). AUCs within tie_tol (0.01, below
    the ~0.02 standard error of an AUC of 0.9 on 200 texts per class, Hanley-McNeil) tie, and ties go to the
    smaller k (fewer active latents, sparser edits). If none qualifies: the lowest fvu, and the rule says so."""
    required = {"k", "fvu", "dead_fraction", "probe_auc_hi_en", "probe_auc_hi_ur"}
    if not candidates or any(required - set(c) for c in candidates):
        raise ValueError(f"choose_sae_k needs candidates with keys {sorted(required)}")
    rows = [{**c, "score": (c["probe_auc_hi_en"] + c["probe_auc_hi_ur"]) / 2} for c in candidates]
    inputs = {"candidates": rows, "fvu_cap": fvu_cap, "dead_cap": dead_cap, "tie_tol": tie_tol}
    qualified = [r for r in rows if r["fvu"] <= fvu_cap and r["dead_fraction"] <= dead_cap]
    if not qualified:
        best = min(rows, key=lambda r: (r["fvu"], r["k"]))
        return Decision(best["k"], f"SAE k: no candidate has fvu <= {fvu_cap:g} and dead <= {dead_cap:g}; "
                        "lowest fvu", inputs)
    top_score = max(r["score"] for r in qualified)
    chosen = min((r for r in qualified if r["score"] >= top_score - tie_tol), key=lambda r: r["k"])
    return Decision(chosen["k"], "SAE k: best mean sparse-probe AUC (hi-en, hi-ur) among SAEs within the fvu "
                    "and dead-latent caps; ties to the smaller k", inputs)


# =============================================================================================
# 5. LoRA and ReFT
# =============================================================================================
def lora_rank(n_params: int, n_forget_texts: int) -> Decision:
    """Our rule of thumb (no primary source gives rank by model size, notes section 4): 8 below 1B parameters,
    16 below 8B, 32 above; halved below 1,000 forget texts, at least 4. The halving follows the evidence that
    rank matters once the data carries more information than the adapter can hold (Thinking Machines' "LoRA
    Without Regret"; QLoRA found rank itself mattered little), and a small forget set carries little."""
    rank = 8 if n_params < 1e9 else 16 if n_params < 8e9 else 32
    if n_forget_texts < 1000:
        rank //= 2
    rank = max(4, rank)
    return Decision(rank, "LoRA rank (our rule of thumb): 8 < 1B params, 16 < 8B, else 32; halved under 1k "
                    "forget texts; >= 4", {"n_params": n_params, "n_forget_texts": n_forget_texts})


def lora_alpha(rank: int) -> Decision:
    """alpha = 2 x rank: Raschka's rule of thumb ("Finetuning LLMs with LoRA and QLoRA: Insights from Hundreds
    of Experiments", 2023). Not universal: QLoRA's scripts use r=64, alpha=16 (alpha/r = 0.25)."""
    return Decision(2 * rank, "LoRA alpha = 2 x rank (Raschka 2023; QLoRA used alpha/r = 0.25)", {"rank": rank})


def lora_dropout(n_examples: int) -> Decision:
    """More data, less dropout: 0 above 100k examples, 0.05 above 10k, 0.1 above 1k, else 0.2. The nearest
    source is QLoRA (dropout 0.05 helped 7B/13B models, not 33B/65B; its Guanaco scripts use 0.1 for 7B);
    the thresholds are ours."""
    dropout = 0.0 if n_examples > 100_000 else 0.05 if n_examples > 10_000 else 0.1 if n_examples > 1_000 else 0.2
    return Decision(dropout, "LoRA dropout by data size: 0 > 100k examples, 0.05 > 10k, 0.1 > 1k, else 0.2 "
                    "(thresholds ours; QLoRA nearest)", {"n_examples": n_examples})


ATTENTION_BLOCKS = {"attn", "self_attn", "attention", "self_attention"}  # Llama/Qwen/Mistral, GPT-2, GPT-NeoX
MLP_BLOCKS = {"mlp", "feed_forward", "ffn"}


def in_block(module_name: str, blocks: set[str]) -> bool:
    return any(part in blocks for part in module_name.split(".")[:-1])


def peft_target_names(selected: list[str], all_names: list[str]) -> list[str]:
    """The shortest names peft matches (a module matches a target t when its name ends with "." + t) that
    select exactly `selected`: the leaf name, or "block.leaf" when the leaf also names a module outside the
    selection (GPT-2's c_proj is in both attn and mlp: attention-only is "attn.c_proj")."""
    chosen = set(selected)
    leaves_elsewhere = {n.rsplit(".", 1)[-1] for n in all_names if n not in chosen}
    targets = set()
    for name in selected:
        parts = name.split(".")
        targets.add(parts[-1] if parts[-1] not in leaves_elsewhere else ".".join(parts[-2:]))
    return sorted(targets)


def lora_targets(module_names: list[str], memory_gib: float | None, model_type: str,
                 memory_tier_gib: float = 12.0) -> Decision:
    """Which linear modules get LoRA. module_names: the qualified names of the model's Linear (and GPT-2
    Conv1D) modules. Attention and MLP projections both, where memory allows: LoRA on every weight matrix,
    MLP included, matches full fine-tuning where attention-only does not, even at equal parameter count
    (Thinking Machines' "LoRA Without Regret" / Tinker LoRA primer; QLoRA). Below memory_tier_gib of free
    accelerator memory (12 GiB, ours) attention only, as a memory compromise. memory_gib None means no
    accelerator (CPU): no memory tier applies. Names whose blocks are not recognised fall back to peft's
    "all-linear" (every Linear/Conv1D but the output head)."""
    attention = [n for n in module_names if in_block(n, ATTENTION_BLOCKS)]
    mlp = [n for n in module_names if in_block(n, MLP_BLOCKS)]
    inputs = {"memory_gib": memory_gib, "memory_tier_gib": memory_tier_gib, "model_type": model_type,
              "n_attention_modules": len(attention), "n_mlp_modules": len(mlp)}
    if not attention:
        return Decision("all-linear", "LoRA targets: peft all-linear (attention blocks not recognised)", inputs)
    if memory_gib is not None and memory_gib < memory_tier_gib:
        return Decision(peft_target_names(attention, module_names), f"LoRA targets: attention only (under "
                        f"{memory_tier_gib:g} GiB free; ours)", inputs)
    return Decision(peft_target_names(attention + mlp, module_names), "LoRA targets: attention + MLP (LoRA "
                    "Without Regret; QLoRA)", inputs)


def reft_rank(n_forget_texts: int) -> Decision:
    """LoReFT rank: 4 below 1,000 forget texts, else 8. The LoReFT paper's scripts (pyreft
    examples/loreft/README.md) use rank 8 for commonsense-170k and math-10k and rank 4 for UltraFeedback on
    7B LLaMAs, rank 1 for GLUE on RoBERTa-base: ReFT edits a d_model-wide state at a few positions, so its
    rank stays small whatever the model size; the 1k threshold is ours (as lora_rank's)."""
    rank = 4 if n_forget_texts < 1000 else 8
    return Decision(rank, "ReFT rank: 4 under 1k forget texts, else 8 (pyreft LoReFT scripts; threshold ours)",
                    {"n_forget_texts": n_forget_texts})


# =============================================================================================
# 6. Layers
# =============================================================================================
def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)  # Python's round() rounds 2.5 to 2


def first_eligible_layer(depth: int) -> Decision:
    """max(1, round(0.1 * depth)) (ours): the first tenth of the layers sits next to the embeddings, where a
    "Hindi direction" is mostly token and script identity rather than a language representation, and editing
    it disturbs every text written in that script."""
    if depth < 1:
        raise ValueError(f"depth must be positive (got {depth})")
    first = min(depth - 1, max(1, round_half_up(0.1 * depth)))
    return Decision(first, "first eligible layer: max(1, round(0.1 x depth)) (ours)", {"depth": depth})


def kneedle_count(sorted_scores: np.ndarray) -> tuple[int, list[float]]:
    """How many of the descending scores come before the knee, and each point's distance below the chord
    (Satopaa et al. 2011, "Finding a 'Kneedle' in a Haystack"): scale both axes to [0, 1], draw the chord from
    the first to the last point, and cut at the point farthest below it. 0 when no point lies below the chord
    (the scores fall evenly or ever faster: no elbow)."""
    n = len(sorted_scores)
    if n < 3:
        return 0, []
    x = np.linspace(0, 1, n)
    span = sorted_scores[0] - sorted_scores[-1]
    y = (sorted_scores - sorted_scores[-1]) / span if span > 0 else np.zeros(n)
    distances = (1 - x) - y  # the chord runs from (0, 1) to (1, 0)
    knee = int(np.argmax(distances))
    return (knee if distances[knee] > 1e-12 else 0), distances.tolist()


def choose_n_layers(causal_scores: dict[int, float], depth: int, min_layer: int | None = None) -> Decision:
    """How many layers to edit: the elbow (kneedle_count) of the eligible layers' causal scores sorted from
    best, at least 1, at most ceil(depth / 4) (ours: editing more than a quarter of the model is no longer a
    localised intervention) and at most the number of layers with a positive score (ablating the others did
    not lower Hindi at an acceptable retain cost). No elbow: 1, the best layer alone. Eligible: layers from
    min_layer on (default first_eligible_layer)."""
    first = first_eligible_layer(depth).value if min_layer is None else min_layer
    eligible = {layer: float(s) for layer, s in causal_scores.items() if layer >= first}
    if not eligible:
        raise ValueError(f"no causal score for a layer >= {first} (scores for {sorted(causal_scores)})")
    ranked = sorted(eligible, key=lambda layer: -eligible[layer])
    scores = np.array([eligible[layer] for layer in ranked])
    knee, distances = kneedle_count(scores)
    cap, positive = math.ceil(depth / 4), int((scores > 0).sum())
    n = max(1, min(knee or 1, cap, positive or 1))
    how = "elbow of the sorted scores" if knee else "no elbow: the best layer alone"
    return Decision(n, f"number of layers: {how} (Kneedle), 1..ceil(depth/4), positive scores only",
                    {"depth": depth, "first_eligible": first, "knee": knee, "cap": cap, "n_positive": positive,
                     "ranked_layers": ranked, "sorted_scores": scores, "chord_distances": distances,
                     "layers": sorted(ranked[:n])})


# =============================================================================================
# 7. Token lengths
# =============================================================================================
def ceil_int(x: float) -> int:
    """ceil that ignores floating-point dust: 10 / (0.1 / 60) is 6000.000000000001, which is 6000."""
    return math.ceil(x - 1e-9 * max(1.0, abs(x)))


def round_up(x: float, multiple: int) -> int:
    return ceil_int(x / multiple) * multiple


def choose_max_len(token_lengths: Sequence[int], context_limit: int) -> Decision:
    """The 95th percentile of the texts' token lengths (the smallest length at least 95% of texts fit in:
    numpy's inverted_cdf), rounded up to a multiple of 32, clipped to [64, 2048] and to the model's context
    (ours: truncating the longest 5% costs less than padding every batch to the longest text; multiples of
    32 suit GPU kernels; 2048 bounds memory)."""
    lengths = np.asarray(token_lengths, float)
    if len(lengths) == 0 or context_limit < 1:
        raise ValueError(f"need token lengths and a positive context limit (got {len(lengths)}, {context_limit})")
    p95 = float(np.percentile(lengths, 95, method="inverted_cdf"))
    value = min(max(round_up(p95, 32), 64), 2048, context_limit)
    return Decision(value, "max_len: 95th percentile of token lengths, up to a multiple of 32, in [64, 2048] and "
                    "the context (ours)", {"p95": p95, "max": float(lengths.max()), "n_texts": len(lengths),
                                           "context_limit": context_limit,
                                           "share_truncated": float((lengths > value).mean())})


def choose_max_new_tokens(reference_continuation_lengths: Sequence[int]) -> Decision:
    """The 75th percentile of the reference continuations' token lengths (what follows each forget-eval prompt
    in its text), rounded up to a multiple of 8, clipped to [16, 256] (ours). The 75th, not the median, so
    that most outputs have room to show which language the model continues in; not the maximum, since
    generation cost grows with the longest output of every batch and ES is a share of words, which settles
    after a few dozen. 16 tokens is a floor below which LID has too few words to judge."""
    lengths = np.asarray(reference_continuation_lengths, float)
    if len(lengths) == 0:
        raise ValueError("need the token lengths of at least one reference continuation")
    p75 = float(np.percentile(lengths, 75, method="inverted_cdf"))
    value = min(max(round_up(p75, 8), 16), 256)
    return Decision(value, "max_new_tokens: 75th percentile of reference continuation lengths, up to a multiple "
                    "of 8, in [16, 256] (ours)", {"p75": p75, "median": float(np.median(lengths)),
                                                  "n_texts": len(lengths)})


# =============================================================================================
# 8. Generation
# =============================================================================================
def generation_rule() -> Decision:
    """Greedy decoding for every metric (docs/METHODS.md, "Metrics"). Metrics are paired per prompt between base and
    arm; sampling would add variance that belongs to the sampler, not to the model, and make a rerun differ.
    Sampling settings (temperature, top-p) are therefore not metric settings and are not tuned."""
    return Decision({"do_sample": False, "num_beams": 1}, "generation: greedy, deterministic (metrics must be "
                    "reproducible and paired per prompt)", {})


# =============================================================================================
# 9. Bootstrap resolution
# =============================================================================================
def bootstrap_unit(q: float, n_gates: int) -> tuple[int, bool]:
    """The step of "nice" B + 1: a multiple of 1000 and, when n_gates / q is a whole number, of that too, so
    that alpha (B + 1) is an integer at the smallest BH threshold alpha = q / m and at every q k / m (Davidson
    & MacKinnon 2000: a Monte Carlo test at level alpha is exact when alpha (B + 1) is an integer)."""
    ratio = n_gates / q
    if abs(ratio - round(ratio)) < 1e-9:
        return math.lcm(1000, round(ratio)), True
    return 1000, False


def choose_n_boot(q: float, n_gates: int, *, mc_rel_error: float = 0.1, resolution_factor: float = 10.0,
                  cap: int = 20_000) -> Decision:
    """Bootstrap resamples B for the gate p-values, corrected by Benjamini-Hochberg over n_gates (m) at level
    q. A Monte Carlo p-value (1 + hits) / (B + 1) is at least 1 / (B + 1) (Davison & Hinkley 1997; Phipson &
    Smyth 2010), and BH's smallest threshold is q / m, so: (a) 1 / (B + 1) <= (q / m) / resolution_factor
    (factor 10, ours), (b) the Monte Carlo SE of a p-value at q / m, sqrt(p (1 - p) / B), is at most
    mc_rel_error x q / m. B + 1 is rounded up to bootstrap_unit (Davidson & MacKinnon 2000), so B ends in 999
    where it can; B is capped at `cap` (on the unit's grid), and the rule says when."""
    if not 0 < q < 1 or n_gates < 1 or mc_rel_error <= 0 or resolution_factor < 1:
        raise ValueError(f"need 0 < q < 1, n_gates >= 1, mc_rel_error > 0, resolution_factor >= 1 "
                         f"(got {q}, {n_gates}, {mc_rel_error}, {resolution_factor})")
    threshold = q / n_gates
    b_resolution = ceil_int(resolution_factor / threshold) - 1
    b_mc = ceil_int((1 - threshold) / (mc_rel_error ** 2 * threshold))
    unit, exact = bootstrap_unit(q, n_gates)
    if unit > cap + 1:
        unit, exact = 1000, False
    needed = max(b_resolution, b_mc)
    n_boot = round_up(needed + 1, unit) - 1
    capped = n_boot > cap
    if capped:
        n_boot = (cap + 1) // unit * unit - 1
    inputs = {"q": q, "n_gates": n_gates, "smallest_threshold": threshold, "b_for_resolution": b_resolution,
              "b_for_mc_error": b_mc, "unit": unit, "alpha_times_b_plus_1_integer": exact, "cap": cap,
              "capped": capped, "smallest_p": 1 / (n_boot + 1),
              "mc_rel_error_at_threshold": math.sqrt((1 - threshold) / (threshold * n_boot))}
    how = f"capped at {cap}: MC error at q/m is {inputs['mc_rel_error_at_threshold']:.2f}" if capped else \
        f"MC error at q/m <= {mc_rel_error:g}"
    return Decision(n_boot, f"n_boot ({how}): 1/(B+1) <= (q/m)/{resolution_factor:g}, B+1 a multiple of {unit} "
                    "(Davidson & MacKinnon 2000)", inputs)


# =============================================================================================
# 10. Power analysis (sample sizes)
# =============================================================================================
def z(p: float) -> float:
    return float(stats.norm.ppf(p))


def check_levels(alpha: float, power: float) -> None:
    if not 0 < alpha < 0.5 or not 0.5 <= power < 1:
        raise ValueError(f"need 0 < alpha < 0.5 and 0.5 <= power < 1 (got {alpha}, {power})")


def prompts_for_paired_gate(sd: float, margin: float, alpha: float, power: float = 0.8, *,
                            t_correction: bool = False) -> int:
    """Prompts for a one-sided test of a mean paired difference against a boundary: n = ((z_{1-alpha} +
    z_power) sd / margin)^2 (normal approximation), where sd is the SD of the per-prompt differences and
    `margin` the distance from the mean difference expected under the planning alternative to the boundary
    (for a non-inferiority gate planned at "no change", the gate's margin itself). t_correction adds
    z_{1-alpha}^2 / 2 (Guenther 1981), which the t (and bootstrap-t) test needs at small n. At least 2.
    Check (notes section 5): sd 0.1, margin 0.03, alpha 0.05, power 0.8: 69 (71 with the correction)."""
    check_levels(alpha, power)
    if sd < 0 or margin <= 0:
        raise ValueError(f"need sd >= 0 and margin > 0 (got {sd}, {margin})")
    n = ((z(1 - alpha) + z(power)) * sd / margin) ** 2
    if t_correction:
        n += z(1 - alpha) ** 2 / 2
    return max(2, ceil_int(n))


def hanley_mcneil_null_variance(m: int, n: int) -> float:
    """Var(AUC) at AUC 0.5 with m positives and n negatives: (m + n + 1) / (12 m n) (Hanley & McNeil 1982
    with Q1 = Q2 = 1/3; the Mann-Whitney null variance without ties)."""
    return (m + n + 1) / (12 * m * n)


def prompts_for_mia_equivalence(margin: float, alpha: float, power: float = 0.8,
                                ratio: float = 1.0) -> tuple[int, int]:
    """(members, non-members) for the MIA equivalence gate (TOST: AUC within 0.5 +/- margin) to have `power`
    when the true AUC is 0.5: margin / SE_0 >= z_{1-alpha} + z_{1-(1-power)/2} (Chow, Shao & Wang 2007, 3.1.9,
    the TOST approximation), SE_0^2 the Hanley-McNeil null variance; ratio = members / non-members. Solves
    12 r c n^2 - (r + 1) n - 1 = 0 for n non-members, c = (margin / z-sum)^2, members = r n, both rounded up.
    Check (notes section 5): margin 0.05, alpha 0.05, power 0.8, equal sizes: ~571 per class (the notes drop
    the +1, giving 571; with it 572)."""
    check_levels(alpha, power)
    if not 0 < margin < 0.5 or ratio <= 0:
        raise ValueError(f"need 0 < margin < 0.5 and ratio > 0 (got {margin}, {ratio})")
    c = (margin / (z(1 - alpha) + z(1 - (1 - power) / 2))) ** 2
    n = ((ratio + 1) + math.sqrt((ratio + 1) ** 2 + 48 * ratio * c)) / (24 * ratio * c)
    nonmembers = ceil_int(n)
    members = ceil_int(ratio * nonmembers)
    return members, nonmembers


PLANNING_DEFAULTS = {"ratio": {"keep": 0.25, "correlation": 0.0},
                     "fidelity": {"correlation": 0.5},
                     "nll": {"correlation": 0.9}}


def ratio_gate_plan(values: np.ndarray, rho: float, keep: float, correlation: float) -> tuple[float, float, str]:
    """(sd of d, distance to the boundary, assumption) for a ratio gate, d_i = ES_arm_i - rho ES_base_i.
    Planning alternative (ours): the arm keeps `keep` (25%) of the base's ES, i.e. removes 75%; the arm's
    per-prompt values in [0, 1] get the largest variance their mean allows, mu (1 - mu) (0/1 outcomes), and
    their correlation with the base's is `correlation` (0: conservative, real arms correlate positively)."""
    mu_base, var_base = float(values.mean()), float(values.var(ddof=1))
    mu_arm = keep * mu_base
    var_arm = mu_arm * (1 - mu_arm)
    var_d = var_arm + rho ** 2 * var_base - 2 * rho * correlation * math.sqrt(var_arm * var_base)
    return math.sqrt(max(var_d, 0.0)), (rho - keep) * mu_base, \
        f"arm removes {1 - keep:.0%} of base ES; arm values 0/1-like; correlation {correlation:g}"


def no_change_plan(values: np.ndarray, margin: float, correlation: float) -> tuple[float, float, str]:
    """(sd of d, distance, assumption) for a non-inferiority gate planned at "no change" (ours): the arm's mean
    equals the base's, its per-prompt values have the base's variance and correlate `correlation` with them,
    so sd_d = sd_base sqrt(2 (1 - correlation)) and the distance to the boundary is the margin."""
    sd_base = float(values.std(ddof=1))
    return sd_base * math.sqrt(2 * (1 - correlation)), margin, f"no change vs base; correlation {correlation:g}"


def plan_one_set(values: np.ndarray, spec: dict, alpha: float, power: float) -> tuple[int | None, dict]:
    """(prompts needed or None when the gate cannot be planned, inputs) for one set's gate spec."""
    kind = spec["kind"]
    settings = {**PLANNING_DEFAULTS.get(kind, {}), **spec}
    if kind == "ratio":
        if values.mean() <= 0:
            return None, {"why": "base ES is 0 on this set: the gate is uninformative"}
        sd, delta, assumption = ratio_gate_plan(values, settings["rho"], settings["keep"], settings["correlation"])
    elif kind in ("fidelity", "nll"):
        margin = settings["max_drop"] if kind == "fidelity" else math.log(settings["ppl_ratio"])
        sd, delta, assumption = no_change_plan(values, margin, settings["correlation"])
    else:
        raise ValueError(f"unknown gate kind {kind!r} (ratio, fidelity, nll, mia)")
    n = prompts_for_paired_gate(sd, delta, alpha, power, t_correction=True)
    inputs = {"sd_d": sd, "delta": delta, "assumption": assumption, "base_mean": float(values.mean())}
    if kind == "fidelity":  # mmie's test on 0/1 outcomes: even no lost prompt passes only when (1 - drop)^n <= alpha
        floor = ceil_int(math.log(alpha) / math.log(1 - settings["max_drop"]))
        n, inputs["binomial_floor"] = max(n, floor), floor
    return n, inputs


def plan_mia(spec: dict, alpha: float, power: float) -> Decision:
    have = (spec["n_members"], spec["n_nonmembers"])
    need = prompts_for_mia_equivalence(spec["margin"], alpha, power, ratio=have[0] / have[1])
    value = {"members": min(have[0], need[0]), "nonmembers": min(have[1], need[1])}
    short = have[0] < need[0] or have[1] < need[1]
    inputs = {"alpha": alpha, "power": power, "margin": spec["margin"], "n_have": list(have), "n_needed": list(need),
              "assumption": "true AUC 0.5 (Hanley-McNeil null variance), TOST",
              "underpowered": {"n": list(have), "n_needed": list(need)} if short else None}
    return Decision(value, "power analysis: MIA equivalence (TOST, Hanley-McNeil)" +
                    (": underpowered" if short else ": capped at the prompts needed"), inputs)


def plan_sample_sizes(pilot: dict[str, Sequence[float]], gates: dict[str, dict], alpha: float,
                      power: float = 0.8) -> dict[str, Decision]:
    """Per set, the prompts its gate needs for `power` at level alpha, from the base model's per-prompt values
    (pilot[set]). alpha: plan at q / m, BH's smallest threshold (conservative: later ranks get up to q).

    gates[set] = {"kind": "ratio", "rho"} (G1, G1S, G3, G6; per-prompt ES), {"kind": "fidelity",
    "max_drop"} (G4), {"kind": "nll", "ppl_ratio"} (G2; per-text NLL), or {"kind": "mia", "margin",
    "n_members", "n_nonmembers"} (G5; needs no pilot). Optional "keep" and "correlation" override
    PLANNING_DEFAULTS, our planning assumptions (ratio_gate_plan, no_change_plan). Value: the prompts to use,
    min(have, needed) (a set with more is capped there); "underpowered": {"n": have, "n_needed": need} when
    it has fewer. Normal approximation with Guenther's t correction."""
    plans = {}
    for name, spec in gates.items():
        if spec["kind"] == "mia":
            plans[name] = plan_mia(spec, alpha, power)
            continue
        values = np.asarray(pilot[name], float)
        if len(values) < 2:
            raise ValueError(f"set {name!r}: need at least 2 pilot values to plan (got {len(values)})")
        have = int(spec.get("n_available", len(values)))
        need, inputs = plan_one_set(values, spec, alpha, power)
        inputs = {"kind": spec["kind"], "alpha": alpha, "power": power, "n_have": have, "n_needed": need, **inputs}
        if need is None:
            plans[name] = Decision(have, f"power analysis: not planned ({inputs['why']})", inputs)
            continue
        inputs["underpowered"] = {"n": have, "n_needed": need} if have < need else None
        rule = "underpowered: fewer prompts than needed" if have < need else "capped at the prompts needed"
        plans[name] = Decision(min(have, need), f"power analysis ({spec['kind']} gate, power {power:g}): {rule}",
                               inputs)
    return plans


# =============================================================================================
# 11. Fixed settings and the decision table
# =============================================================================================
FIXED_BY_DESIGN: dict[str, str] = {
    "npo_beta": "NPO paper's value: beta 0.1 on summed sequence log-likelihoods (Zhang et al. 2024)",
    "relearn_steps": "part of the benchmark: the relearning attack's grid must not adapt to the arm (settled on the "
                     "embedded model: the base recovers fully, the reference stays clearly below)",
    "relearn_lrs": "part of the benchmark: the relearning attack's grid must not adapt to the arm",
    "relearn_mode": "part of the benchmark: full fine-tuning of the released weights where the model is small, "
                    "a rank-8 LoRA (alpha 16, default targets) otherwise",
    "relearn_prompts": "part of the benchmark: the same forget-eval prompts for every arm, the base and the reference",
    "dsg_quantile": "DSG paper's value: gate when the firing share exceeds the 0.95 quantile on retain text",
    "gate_es_forget_ratio": "the question asked (G1/G1S threshold), not a tuning knob",
    "gate_es_mixed_ratio": "the question asked (G3 threshold), not a tuning knob",
    "gate_es_adv_ratio": "the question asked (G6 threshold), not a tuning knob",
    "gate_ppl_ratio": "the question asked (G2 threshold), not a tuning knob",
    "gate_fidelity_drop": "the question asked (G4 threshold), not a tuning knob",
    "gate_mia_margin": "the question asked (G5 threshold), not a tuning knob",
    "gate_relearn_margin": "the question asked (G7 threshold with a reference), not a tuning knob",
    "gate_relearn_ratio": "the question asked (G7 threshold without a reference), not a tuning knob",
    "fdr_q": "the question asked: the false discovery rate the user accepts",
    "ci_level": "reporting convention: 95% intervals",
    "causal_nll_penalty": "part of the layer score's definition: ES drop traded 1:1 against nats of retain NLL",
    "seeds": "replication, not tuning: the seeds are the experiment's design",
    "stats_seed": "replication, not tuning",
}


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={format_value(v)}" for k, v in value.items())
    return "none" if value is None else str(value)


def key_inputs(inputs: dict, limit: int = 3) -> str:
    """The first `limit` numeric inputs, "name=value": the measured numbers worth a glance."""
    scalars = [(k, v) for k, v in inputs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return " ".join(f"{k}={format_value(v)}" for k, v in scalars[:limit])


def auto_config_report(decisions: dict[str, Decision], user_given: dict[str, object]) -> dict[str, dict]:
    """report["auto_config"]: every decided setting as {"value", "rule", "inputs", "source"}; a user's flag
    wins, and its entry keeps what auto would have chosen ("auto_value")."""
    entries = {}
    for name, decision in decisions.items():
        entry = {**decision.as_dict(), "source": "auto"}
        if name in user_given:
            entry.update(value=json_safe(user_given[name]), source="user", auto_value=decision.value)
        entries[name] = entry
    for name in user_given:
        if name not in decisions:
            entries[name] = {"value": json_safe(user_given[name]), "source": "user",
                             "rule": "given by the user: its probe did not run", "inputs": {}}
    return entries


def decision_table(decisions: dict[str, Decision], user_given: dict[str, object],
                   fixed_values: dict[str, object] | None = None) -> list[str]:
    """One text table, columns as wide as their content: setting, value, source ("auto", "user", "user (auto
    would be X)", "fixed"), rule (short), key inputs. Rows: the decisions in order, then user flags with no
    decision, then fixed settings (FIXED_BY_DESIGN) whose values are given in fixed_values."""
    fixed_values = fixed_values or {}
    rows = []
    for name in [*decisions, *(n for n in user_given if n not in decisions),
                 *(n for n in fixed_values if n not in decisions and n not in user_given)]:
        decision = decisions.get(name)
        if name in user_given:
            source = f"user (auto would be {format_value(decision.value)})" if decision else "user"
            rows.append([name, format_value(user_given[name]), source, "flag", ""])
        elif decision is not None:
            rows.append([name, format_value(decision.value), "auto", decision.short_rule, key_inputs(decision.inputs)])
        else:
            reason = FIXED_BY_DESIGN.get(name, "fixed")
            rows.append([name, format_value(fixed_values[name]), "fixed", reason.split(":", 1)[0], ""])
    header = ["setting", "value", "source", "rule", "key inputs"]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]


# =============================================================================================
# 12. The collector: decisions applied to the run's settings, a user's flag winning
# =============================================================================================
class AutoConfig:
    """Applies decisions to a run's settings (an argparse Namespace) in the order they are made, except for
    settings the user gave, which win (the decision is still recorded: the table says "user (auto would be
    X)"); keeps every decision for the table and the report. `decide` takes a Decision or a zero-argument
    callable returning one."""

    def __init__(self, settings, given: set[str], fixed_values: dict[str, object] | None = None):
        self.settings, self.given = settings, set(given)
        self.decisions: dict[str, Decision] = {}
        self.not_probed: list[str] = []  # user-given settings whose measured probe was skipped
        self.fixed_values = dict(fixed_values or {})

    def decide(self, name: str, decision: Decision | Callable[[], Decision]) -> object:
        """Record the decision for `name` and apply it unless the user gave `name`; returns the value in force.
        A callable is a measured probe: for a setting the user gave it does not run at all (the user's value
        wins anyway, and "auto would be X" is only shown where it comes free, from a rule)."""
        if callable(decision):
            if name in self.given:
                self.not_probed.append(name)
                return getattr(self.settings, name)
            decision = decision()
        self.decisions[name] = decision
        if name not in self.given:
            setattr(self.settings, name, decision.value)
        return getattr(self.settings, name)

    def record(self, name: str, decision: Decision) -> None:
        """A decision that sets no single flag (generation mode, per-set sample sizes): recorded, not applied."""
        self.decisions[name] = decision

    def user_given(self) -> dict[str, object]:
        return {name: getattr(self.settings, name) for name in [*self.decisions, *self.not_probed]
                if name in self.given}

    def table(self) -> list[str]:
        return decision_table(self.decisions, self.user_given(), self.fixed_values)

    def report(self) -> dict[str, dict]:
        return auto_config_report(self.decisions, self.user_given())
