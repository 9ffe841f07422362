"""Adaptive unlearning (docs/METHODS.md, "Adaptive unlearning"): the parts `--adaptive_unlearning` plugs into mmie.py's one training
loop, and the dynamic DSG clamp. Every component has its own off switch (mmie.py's "adaptive unlearning" group)
and records what it did in the arm's report entry info["adaptive"].

    component        source (what was read)                                   here
    sine_lora        Stable Forgetting, arXiv 2509.24166 (no code) +          SineAdapter, sine_lora()
                     Sine-LoRA, arXiv 2403.19243 (samy-ji/Sine-Low-Rank)
    reweight         LoReUn, arXiv 2507.22499 (vision only, no code)          LossReweighter
    dualoptim        DualOptim, arXiv 2504.15827 (CityU-MLO/DualOptim, LLM/)  make_optimizers, kind_at,
                     + an adapted lr ratio (ours)                             RatioController
    curriculum       MRD, arXiv 2504.06658 (ICML 2025, no code)               Curriculum
    stages           ours (2504.06407 tests no stage switching)               StageSchedule
    dual_ascent      PDU, arXiv 2506.05314 (open-unlearning pdu.py)           DualAscent
    early_stop       auto_config.EarlyStopping / RetainBudget / Deadline      AdaptiveUnlearningTrainer.evaluate
    dynamic_gate     DSG, arXiv 2504.08192 + LID Hindi share (ours)           DynamicClamp
    script_blind     ours                                                     forget_pool
    english_target   IDK-style alternative target: TOFU's IDK (arXiv 2401.   forget_batch_size; the target
                     06121), DualOptim's idk_loss (LLM/trainer/losses.py);    rows: mmie.english_targets,
                     here the "answer" is an English continuation (ours)      mmie.encode_continuations
    sam              Fan et al. ICML 2025, arXiv 2502.05374 (OPTML-Group/     AdaptiveUnlearningTrainer.
                     Unlearn-Smooth, SAMIterativeUnlearner)                   _accumulate

How they combine (one training step):
  * kind: recovery stage -> retain; else DualOptim's f forget : r retain cycle (1:1 here, the forget lr scaled by the
    RatioController's ratio); else, with dual ascent, a combined step forget + lambda * retain; else forget and
    retain alternate (the static trainer).
  * which forget samples: the curriculum (easy first, annealed to uniform); how much each counts: the LoReUn weights
    (hard first). So early steps see mostly easy samples and lean on the harder of them; later, uniform sampling with
    hard-first weights. Both compare NLLs within a source split only (Devanagari, romanized), never across scripts.
  * objective: the stage's (bounded ascent, NPO) with stages on; else --forget_obj throughout. With the English
    target, each forget sample's loss adds w x the NLL of an English continuation of its prompt (an English retain
    text; only the continuation's tokens scored), and a forget step reads half the batch of forget texts, so it
    reads as many rows as without the target. Ascent and NPO only push Hindi down, and on the embedded model the
    mass they free went to loops and empty outputs (a cliff within 10-20 steps); the target gives it somewhere to
    go: the model is taught to answer a Hindi prompt in English, the behaviour the gates ask for. DualOptim's IDK
    loss is the same NLL with "I don't know" answers; there it replaces the forget loss (IDK+AP), here it is added
    to the stage's objective (ours).
  * every --adaptive_eval_every steps, on validation slices carved from the TRAIN splits (held out of training):
    dual ascent updates lambda, the ratio controller the forget lr, the stage schedule checks its triggers (NLLs,
    output health), early stopping records the curve and keeps the best parameters. Early stopping watches what
    gate G1 measures: the ES of greedy continuations of the forget-validation prompts (one batched generation),
    among steps whose outputs stay healthy (empty rate and repetition within gate GH's margins of the base's) and
    whose retain NLL is within the hard budget. The forget NLL is a poor stand-in: on the embedded model the static
    LoRA's forget-val NLL peaked (+11 nats) at a step whose continuations were loops (repetition +0.25), and the
    adaptive LoRA's rose 3.4 nats while its Devanagari ES stayed 0.99; it is scored only while something reads it
    (the ascent's trigger, or early stopping without the probe). Two retain budgets: a soft target
    base x (1 + eps) that the controllers (lambda, the recovery stage) steer by, and a hard limit
    base + log(ppl_ratio), gate G2's form, past which a step can never be the best one (it counts against the
    patience).

This module never imports mmie (mmie may be running as __main__): mmie passes in the objectives, the scoring and the
encoding as callables and composes the trainer: type("AdaptiveTrainer", (AdaptiveUnlearningTrainer, Trainer), {}).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields

import numpy as np
import torch

from auto_config import Deadline, EarlyStopping, RetainBudget

COMPONENTS = ("sine_lora", "reweight", "dualoptim", "curriculum", "stages", "dual_ascent", "early_stop",
              "dynamic_gate", "script_blind", "english_target", "sam")
FORGET, RETAIN, COMBINED = "forget", "retain", "combined"
ASCENT, NPO, RECOVERY = "bounded_ascent", "npo", "recovery"


# =============================================================================================
# 0. Settings
# =============================================================================================
@dataclass(frozen=True)
class AdaptiveSettings:
    """Which components run and their hyperparameters; field names are mmie.py's flag names (see its help)."""
    active: bool = False
    sine_lora: bool = False
    reweight: bool = False
    dualoptim: bool = False
    curriculum: bool = False
    stages: bool = False
    dual_ascent: bool = False
    early_stop: bool = False
    dynamic_gate: bool = False
    script_blind: bool = False
    english_target: bool = False
    english_target_weight: float = 0.5
    sam: bool = False
    sam_rho: float = 0.01
    sine_omega: float | None = None
    reweight_temperature: float = 1.0
    reweight_every: int = 80
    reweight_clip: float = 5.0
    dualoptim_forget_steps: int = 1
    dualoptim_retain_steps: int = 1
    dualoptim_lr_ratio: float = 1.0
    dualoptim_ratio_growth: float = 1.5
    dualoptim_max_lr_ratio: float = 4.0
    curriculum_strength: float = 1.0
    curriculum_share: float = 0.5
    stage_forget_margin: float = 1.0
    stage_ascent_max_share: float = 0.3
    adaptive_retain_eps: float = 0.02
    dual_init: float = 1.0
    dual_step: float = 1.0
    dual_max: float = 10.0
    adaptive_eval_every: int = 20
    adaptive_val_share: float = 0.1
    adaptive_patience: int = 3
    adaptive_min_delta: float = 0.01
    adaptive_max_retain_ppl_ratio: float = 1.10
    budget_minutes: float | None = None
    dyn_gate_min_scale: float = 0.5
    dyn_gate_max_scale: float = 2.0

    @classmethod
    def from_args(cls, args) -> "AdaptiveSettings":
        """Components are on with --adaptive_unlearning unless their --no_<component> flag is given; all off without
        it (an args namespace without the adaptive flags, as older callers build, is "off"), except early stopping
        under --auto_config, whose rule for the number of training steps it is."""
        active = bool(getattr(args, "adaptive_unlearning", False))
        values = {name: active and not getattr(args, f"no_{name}") for name in COMPONENTS}
        if not active and getattr(args, "auto_config", False):  # auto-config's step rule: early stopping alone
            active, values["early_stop"] = True, not getattr(args, "no_early_stop", False)
        hyper = {f.name: getattr(args, f.name) for f in fields(cls)
                 if f.name not in COMPONENTS and f.name != "active" and hasattr(args, f.name)}
        return cls(active=active, **values, **hyper)

    def components(self) -> dict[str, bool]:
        return {name: getattr(self, name) for name in COMPONENTS}

    @property
    def validates(self) -> bool:
        """Validation slices are carved (and held out of training) only when a component reads them."""
        return self.stages or self.dual_ascent or self.early_stop


# =============================================================================================
# 1. Data: script-blind forget pool, validation slices from the train splits
# =============================================================================================
def forget_pool(devanagari: Sequence[str], roman: Sequence[str], script_blind: bool) -> list[str]:
    """Forget-train texts: Devanagari Hindi alone (what every arm forgot before), or, script-blind, both scripts'
    train splits (duplicates kept once), so romanized Hindi is forgotten too, not only its script."""
    return list(dict.fromkeys([*devanagari, *roman])) if script_blind else list(devanagari)


def carve_validation(texts: Sequence[str], share: float) -> tuple[list[str], list[str]]:
    """(train, validation) of a train split: the round(share x n) texts (at least 1, and never all) with the lowest
    content hash are held out. Content-based like the data splits, so the slice does not depend on line order; the
    eval splits the gates use are never touched."""
    texts = list(texts)
    if len(texts) < 2:
        raise ValueError(f"need at least 2 train texts to carve a validation slice, got {len(texts)}")
    n_val = min(len(texts) - 1, max(1, round(share * len(texts))))
    rank = sorted(range(len(texts)), key=lambda i: hashlib.sha256(("mmie-val\0" + texts[i]).encode()).digest())
    held = set(rank[:n_val])
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


# =============================================================================================
# 2. Bounded unlearning: sine-bounded LoRA on the MLP projections
# =============================================================================================
class SineAdapter(torch.nn.Module):
    """Sine-LoRA's update of one nn.Linear (samy-ji/Sine-Low-Rank@6dd03a0, peft/tuners/sinlora.py, Linear.forward):
    dW = (alpha/r) * sin(omega * B A) / sqrt(d_in), the sine elementwise on the weight product; A kaiming-uniform
    (a = sqrt 5), B zero, so dW = 0 at the start and |dW_ij| <= alpha / (r sqrt(d_in)) whatever A and B become.

    omega: the repo ships no default (freq is 0 in finetune.py) and the paper's LLM value is unverified. Near 0,
    sin(w BA) ~ w BA, so training starts as plain LoRA scaled by w alpha / (r sqrt(d_in)): w changes the effective
    learning rate. Default here w = sqrt(d_in): the small-update regime is then exactly peft LoRA's alpha/r scaling,
    so --lr means the same for the bounded and the unbounded LoRA arm and the ablation changes only the bound (each
    entry follows LoRA until it nears alpha/(r sqrt d_in), then saturates). For d_in 1536-8960 (Qwen2.5-1.5B's
    MLP) that is w ~ 39-95, the order of the w ~ 100 reported second-hand for Stable Forgetting."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, omega: float | None, dropout: float):
        super().__init__()
        self.A = torch.nn.Parameter(torch.empty(rank, d_in))
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = torch.nn.Parameter(torch.zeros(d_out, rank))
        self.scaling, self.fan_in = alpha / rank, math.sqrt(d_in)
        self.omega = float(omega) if omega is not None else self.fan_in
        self.dropout = dropout

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * torch.sin(self.omega * (self.B @ self.A)) / self.fan_in

    @property
    def bound(self) -> float:
        return self.scaling / self.fan_in


def mlp_projections(layers: dict[int, torch.nn.Module]) -> dict[str, torch.nn.Linear]:
    """The nn.Linear projections of each decoder layer's MLP (gate/up/down in Llama, Qwen2, Gemma), by name. Stable
    Forgetting bounds the MLP adapters only (which projections is unverified: all of them here). GPT-2's Conv1D
    projections are not nn.Linear: refused with a clear error."""
    found = {}
    for index, layer in layers.items():
        mlp = getattr(layer, "mlp", None)
        linears = {name: module for name, module in (mlp.named_children() if mlp is not None else [])
                   if isinstance(module, torch.nn.Linear)}
        if not linears:
            raise ValueError(f"layer {index} ({type(layer).__name__}) has no nn.Linear MLP projections for sine-LoRA; "
                             "use --no_sine_lora for this model family")
        found.update({f"layers.{index}.mlp.{name}": module for name, module in linears.items()})
    return found


@contextmanager
def sine_lora(targets: dict[str, torch.nn.Linear], switch, *, rank: int, alpha: float,
              omega: float | None = None, dropout: float = 0.0) -> Iterator[torch.nn.ModuleDict]:
    """Within the block each target computes W x + b + dropout(x) dW^T (SineAdapter), added by a forward hook, so
    the targets stay nn.Linear (peft can still wrap them, e.g. the relearning attack's adapter: its base layer is
    the hooked module), except while `switch` is off (mmie.HookSwitch: the unedited model for the NPO reference and
    the KL target). Yields the adapters by target name with '.' -> '_'. Hooks are always removed."""
    first = next(iter(targets.values()))
    adapters = torch.nn.ModuleDict({
        name.replace(".", "_"): SineAdapter(m.in_features, m.out_features, rank, alpha, omega, dropout)
        for name, m in targets.items()}).to(first.weight.device)

    def hook_for(adapter: SineAdapter):
        def hook(module, inputs, output):
            if not switch.on:
                return output
            x = torch.nn.functional.dropout(inputs[0], adapter.dropout, module.training)
            return output + x @ adapter.delta_weight().to(x.dtype).T
        return hook

    handles = []
    try:
        for name, module in targets.items():
            handles.append(module.register_forward_hook(hook_for(adapters[name.replace(".", "_")])))
        yield adapters
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def max_abs_delta(adapters: torch.nn.ModuleDict) -> dict:
    """The largest |dW_ij| over all adapters, and the bound alpha / (r sqrt(d_in)) of the adapter that has it."""
    values = {name: (float(a.delta_weight().abs().max()), a.bound) for name, a in adapters.items()}
    name = max(values, key=lambda k: values[k][0])
    return {"value": values[name][0], "bound": values[name][1], "module": name}


# =============================================================================================
# 3. The controllers, each a small class with its own record
# =============================================================================================
def within_groups(function: Callable[[np.ndarray], np.ndarray], values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """function applied to each group's values separately (a loop over the few groups, not over samples)."""
    out = np.empty(len(values), dtype=np.float64)
    for group in np.unique(groups):
        members = groups == group
        out[members] = function(np.asarray(values, dtype=np.float64)[members])
    return out


def pool_relative(nll: np.ndarray, temperature: float) -> np.ndarray:
    """N softmax(-NLL / T): weights proportional to exp(-NLL_i / T), scaled to mean 1 over the pool."""
    logits = -np.asarray(nll, dtype=np.float64) / temperature
    w = np.exp(logits - logits.max())
    return w / w.mean()


def relative_weights(nll: np.ndarray, temperature: float, clip: float) -> np.ndarray:
    """pool_relative clipped to [1/clip, clip] and scaled to mean 1 again (so max/min <= clip^2): lower NLL (harder
    to forget) -> more weight, and no sample's weight runs away or vanishes."""
    w = np.clip(pool_relative(nll, temperature), 1.0 / clip, clip)
    return w / w.mean()


def standardised(values: np.ndarray) -> np.ndarray:
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)


class LossReweighter:
    """LoReUn-inspired loss-based reweighting (arXiv 2507.22499; direction per the paper, form and T ours). LoReUn
    gives more weight to forget samples with smaller loss, "harder to forget"; its weight function, temperature,
    normalisation and refresh rule are unverified and its experiments are vision only. Here:
        w_i = clip(N_g softmax_g(-NLL_i / T)_i, 1/c, c), rescaled to mean 1 within i's group g;
    a step's batch weights are w_b / sum_batch w (they sum to 1, as Trainer.weights requires). Groups are the source
    splits (Devanagari, romanized): per-token NLLs of two scripts are not comparable (on the embedded model the
    romanized texts sit ~4 nats lower only because of their tokens), so one softmax over a script-blind pool would
    weight by script; within groups each split keeps its share of the weight. Deviation from LoReUn: its one pool.
    NLL_i is the current model's mean next-token NLL of text i: updated from the training forwards themselves
    (observe: no extra per-sample passes) and, every few steps, refreshed in one batched pass for the texts no
    training forward has read within that many steps (stale), so a refresh costs only what training did not see.
    Relation to open-unlearning's WGA (compute_wga_loss): WGA weights each *token* by p^beta = exp(-beta l_t),
    detached and unnormalised, so the same exponential family with T = 1/beta; here per sequence, normalised over
    the pool, and clipped so already-forgotten samples keep a floor 1/c instead of WGA's weight -> 0."""

    def __init__(self, nll: np.ndarray, temperature: float, clip: float, groups: np.ndarray | None = None):
        if temperature <= 0 or clip < 1:
            raise ValueError(f"need temperature > 0 and clip >= 1 (got {temperature}, {clip})")
        self.nll, self.temperature, self.clip = np.asarray(nll, dtype=np.float64).copy(), temperature, clip
        self.groups = np.zeros(len(self.nll), dtype=int) if groups is None else np.asarray(groups)
        self.updated = np.zeros(len(self.nll), dtype=int)  # the step at which each text's NLL was last read
        self.refreshes: list[dict] = []
        self.refresh(np.arange(len(self.nll)), self.nll, 0)

    @property
    def weights(self) -> np.ndarray:
        return within_groups(lambda v: relative_weights(v, self.temperature, self.clip), self.nll, self.groups)

    def observe(self, indices: np.ndarray, nll: np.ndarray, step: int) -> None:
        self.nll[np.asarray(indices)] = nll
        self.updated[np.asarray(indices)] = step

    def stale(self, step: int, age: int) -> np.ndarray:
        """Indices of the texts whose NLL was last read `age` or more steps ago."""
        return np.flatnonzero(step - self.updated >= age)

    def refresh(self, indices: np.ndarray, nll: np.ndarray, step: int) -> None:
        self.nll[indices], self.updated[indices] = nll, step
        self.refreshes.append({"step": step, "rescored": len(indices), **self.summary()})

    def batch_weights(self, indices: np.ndarray) -> np.ndarray:
        w = self.weights[np.asarray(indices)]
        return w / w.sum()

    def summary(self) -> dict:
        w = self.weights
        unclipped = within_groups(lambda v: pool_relative(v, self.temperature), self.nll, self.groups)
        clipped = (unclipped > self.clip) | (unclipped < 1.0 / self.clip)
        return {"min": float(w.min()), "max": float(w.max()), "ess_share": float(w.sum() ** 2 / (w**2).sum() / len(w)),
                "clipped_share": float(clipped.mean()), "nll_mean": float(self.nll.mean())}

    def report(self) -> dict:
        return {"formula": "w_i = clip(N_g softmax_g(-NLL_i / T), 1/c, c), rescaled to mean 1 within each source "
                           "split g; batch weights w_b / sum_batch w", "temperature": self.temperature,
                "clip": self.clip, "groups": {str(g): int((self.groups == g).sum()) for g in np.unique(self.groups)},
                "refreshes": self.refreshes, "final": self.summary()}


class Curriculum:
    """MRD-inspired curriculum (arXiv 2504.06658 prioritises easily forgettable samples; its score, sign convention
    and sampling distribution are unverified, no official code). Difficulty proxy: the base model's per-sample NLL
    (the edit is zero at step 0 in every arm; mmie reads it in the pass that gives NPO its reference): a text the
    model predicts badly is weakly learned and taken as easy to forget, consistent with LoReUn's "low loss = hard".
    MRD's own score
    (likelihood change under N(0, 1e-5^2) parameter noise) is not used: at bf16 that noise is below the weights'
    resolution. Sampling: p_i(t) proportional to exp(s(t) z_i), z the proxy standardised within i's source split
    (as LossReweighter: NLLs of two scripts are not comparable), s(t) = s0 (1 - t / T_a) for t < T_a = share x
    steps, then 0: uniform."""

    def __init__(self, start_nll: np.ndarray, strength: float, anneal_steps: int, groups: np.ndarray | None = None):
        nll = np.asarray(start_nll, dtype=np.float64)
        self.z = within_groups(standardised, nll, np.zeros(len(nll), dtype=int) if groups is None else groups)
        self.strength, self.anneal_steps = strength, max(1, anneal_steps)

    def strength_at(self, step: int) -> float:
        return self.strength * max(0.0, 1.0 - step / self.anneal_steps)

    def probabilities(self, step: int) -> np.ndarray:
        logits = self.strength_at(step) * self.z
        p = np.exp(logits - logits.max())
        return p / p.sum()

    def summary(self) -> dict:
        return {"proxy": "per-sample NLL at step 0, standardised within each source split (higher = easier)",
                "strength": self.strength, "anneal_steps": self.anneal_steps,
                "first_step_max_over_min_probability": float(np.exp(self.strength * (self.z.max() - self.z.min())))}


class DualAscent:
    """PDU's dual update (open-unlearning src/trainer/unlearn/pdu.py): lambda <- max(0, lambda + eta (L_r - eps_abs)),
    here with L_r the retain-validation NLL, eps_abs = base x (1 + eps), and a cap lambda_max (ours: PDU has none;
    lambda also scales a learning rate under DualOptim, where an unbounded value would explode the step). Updated
    at each validation (PDU: per micro-batch with that batch's retain loss, or per epoch)."""

    def __init__(self, init: float, step_size: float, limit: float, maximum: float):
        self.value, self.step_size, self.limit, self.maximum = float(init), step_size, limit, maximum
        self.trajectory: list[dict] = [{"step": 0, "retain_nll": None, "lambda": self.value}]

    def update(self, step: int, retain_nll: float) -> float:
        self.value = min(self.maximum, max(0.0, self.value + self.step_size * (retain_nll - self.limit)))
        self.trajectory.append({"step": step, "retain_nll": float(retain_nll), "lambda": self.value})
        return self.value


class StageSchedule:
    """Stage-based objective (ours; arXiv 2504.06407 studies mode connectivity and tests no stage switching, so the
    ablation must show whether this helps). bounded ascent -> NPO -> retain-only recovery, switched at validations:
      ascent, npo -> recovery  retain-val NLL above the soft budget, or (with the forget probe) the forget-val
                               outputs unhealthy by gate GH's margins: retain-only steps repair a collapse
      ascent   -> npo          forget-val NLL >= base + margin (the ascent did its job), or (fallback, checked after
                               every step, not only at validations) the step cap
      recovery -> npo          retain-val NLL back within the soft budget and the outputs healthy
    (Ending the ascent on forget-val ES at G1's target instead was tried: on the embedded model plain ascent ran on
    until its outputs were loops, repetition +0.7, in all 3 seeds.)
    Steps are counted as "steps done": a stage switched at the validation after step s starts at step index s+1;
    a stage covers [start_step, end_step)."""

    def __init__(self, base_forget_nll: float, margin: float, soft_limit: float, ascent_max_steps: int):
        self.target, self.soft_limit, self.ascent_max_steps = base_forget_nll + margin, soft_limit, ascent_max_steps
        self.current = ASCENT
        self.stages: list[dict] = [{"stage": ASCENT, "start_step": 0, "end_step": None, "trigger": "start"}]

    def next_stage(self, step: int, forget_nll: float | None, retain_nll: float,
                   unhealthy: str | None = None) -> tuple[str, str] | None:
        over = not retain_nll <= self.soft_limit  # NaN is over
        if self.current in (ASCENT, NPO) and over:
            return RECOVERY, f"retain-val NLL {retain_nll:.4g} > soft budget {self.soft_limit:.4g}"
        if self.current in (ASCENT, NPO) and unhealthy:
            return RECOVERY, unhealthy
        if self.current == ASCENT and forget_nll >= self.target:
            return NPO, f"forget-val NLL {forget_nll:.4g} >= base + margin {self.target:.4g}"
        if self.current == RECOVERY and not over and not unhealthy:
            return NPO, f"retain-val NLL {retain_nll:.4g} back within {self.soft_limit:.4g}, outputs healthy"
        return None

    def update(self, step: int, forget_nll: float | None, retain_nll: float, unhealthy: str | None = None
               ) -> str | None:
        """At a validation: switch if a trigger fires; returns the trigger. forget_nll is read only in the ascent."""
        switch = self.next_stage(step, forget_nll, retain_nll, unhealthy)
        if switch is not None:
            self.switch(step, *switch)
        return None if switch is None else switch[1]

    def check_step_cap(self, step: int) -> None:
        """After every step (the fallback needs no validation): ascent -> npo at the cap."""
        if self.current == ASCENT and step >= self.ascent_max_steps:
            self.switch(step, NPO, f"step cap {self.ascent_max_steps} (forget-val NLL below {self.target:.4g})")

    def switch(self, step: int, stage: str, trigger: str) -> None:
        self.current = stage
        self.stages[-1]["end_step"] = step
        self.stages.append({"stage": stage, "start_step": step, "end_step": None, "trigger": trigger})

    def timeline(self, steps_done: int) -> list[dict]:
        return [{**s, "end_step": steps_done if s["end_step"] is None else s["end_step"]} for s in self.stages]


# =============================================================================================
# 4. The trainer (a mixin over mmie.Trainer's replaceable parts)
# =============================================================================================
class RatioController:
    """DualOptim's forget/retain learning-rate ratio, adapted at validations (ours: DualOptim fixes the ratio; its
    decoupled Adam states give each forget and each retain step a step of the same size, so at equal learning rates
    the retain steps undo what the forget steps do). The "bold driver" rule (Battiti 1989) applied to the ratio,
    judged on what early stopping watches:
        step ineligible (outputs unhealthy by gate GH's margins, or retain NLL past the hard budget)
                                                              -> ratio / growth, not below the start ratio
        healthy, but forget-val ES fell by less than min_delta since the last validation
                                                              -> ratio x growth, not above the maximum
        else (forgetting proceeds)                            -> unchanged
    So a model that forgets at the paper's ratio keeps it. Measured on the embedded model (lora, 160 steps, seed 0):
    at a fixed ratio 1 forget-val ES stays 0.99; at 1.5 it reaches 0.50 in 40 steps; at 2 repetition rises +0.36
    within 20 steps; at 4 the outputs collapse (repetition +0.84). Needs the forget probe (early stopping)."""

    def __init__(self, start: float, growth: float, maximum: float, min_delta: float, start_es: float):
        self.value, self.start, self.growth, self.maximum = float(start), float(start), growth, max(maximum, start)
        self.min_delta, self.last_es = min_delta, start_es
        self.trajectory: list[dict] = [{"step": 0, "ratio": self.value, "why": "start"}]

    def update(self, step: int, es: float, eligible: bool, judged: bool = True) -> float:
        """At a validation; judged=False (the recovery stage: no forget steps) only records the ES."""
        previous, self.last_es = self.last_es, es
        if not judged:
            return self.value
        if not eligible:
            value, why = max(self.start, self.value / self.growth), "ineligible step"
        elif not previous - es > self.min_delta:
            value, why = min(self.maximum, self.value * self.growth), f"ES fell {previous - es:+.3g} <= min delta"
        else:
            return self.value
        if value != self.value:
            self.value = value
            self.trajectory.append({"step": step, "ratio": value, "why": why})
        return self.value


class AdaptiveUnlearningTrainer:
    """Overrides mmie.Trainer's replaceable parts; compose as type("AdaptiveTrainer", (AdaptiveUnlearningTrainer,
    Trainer), {}). Takes the Trainer's arguments plus what it needs from mmie as callables:
      pools                 {"forget": texts, "retain": texts}, the training part of each train split
      validation            {"forget": texts, "retain": texts}, slices held out of training (carve_validation)
      forget_objective      (objective name, batch, idx) -> (per-sample loss, per-sample mean NLL), one forward
      retain_objective      (batch, idx) -> per-sample loss
      score_nll             texts -> per-text mean NLL (batched, no grad): pool refreshes and validation
      encode                texts -> batch (the combined step's retain batch)
      reference             context giving the unedited model (the base values of the budgets)
      forget_probe          () -> {"es", "empty_rate", "repetition"} of the forget-validation continuations
      start_nll             the base model's per-text NLL of pools["forget"] if already computed (else scored here)
      health_margins        gate GH's margins over the base's empty rate and repetition
      forget_groups         source split of each forget text (Devanagari, romanized): weights and curriculum
                            compare NLLs within a split only
      static_objective      --forget_obj, the objective when stages are off
      bounded_parameterisation  True when the adapter itself is bounded (sine-LoRA): the ascent stage is then
                            plain gradient ascent, as Stable Forgetting; otherwise the tanh-bounded loss bounded_ga
                            (the proposal's variant)
    DualOptim (arXiv 2504.15827, CityU-MLO/DualOptim LLM/trainer): two AdamW states over the same parameters, one
    per objective, each with its own moments and step count (so its own bias correction); forget steps then retain
    steps in a fixed f:r cycle (the LLM scripts: 1:5 at equal learning rates, forget_lr / retain_lr recorded; our
    default is 1:1, the static loop's alternation: with 1:5 a 160-step run gives the forget objective 27 steps, and
    on the embedded model LoRA's forget-val NLL rose 0.5 nats and its ES stayed 1.00; at 1:1 it forgot, ES 0.52).
    Dual ascent makes its lambda matter: with DualOptim it scales the retain optimizer's learning rate (each state
    has its own moments, so the scale acts on retain updates alone); without it, every step is a combined step
    forget + lambda x retain (PDU's Lagrangian: under one Adam a weight on a retain-only step would be normalised
    away). Deviation from DualOptim: weight decay is the run's --weight_decay (the reference config uses 0.01;
    betas (0.9, 0.999) and eps 1e-8 are torch's AdamW defaults, as the reference's), and no 8-bit states."""

    def __init__(self, model, tokenizer, params, pools: dict[str, list[str]], *, settings: AdaptiveSettings,
                 validation: dict[str, list[str]], forget_objective: Callable, retain_objective: Callable,
                 score_nll: Callable[[list[str]], np.ndarray], encode: Callable[[list[str]], dict],
                 reference: Callable, static_objective: str, bounded_parameterisation: bool,
                 forget_groups: Sequence | None = None, forget_probe: Callable[[], dict[str, float]] | None = None,
                 health_margins: dict[str, float] | None = None, start_nll: np.ndarray | None = None,
                 **trainer_kwargs):
        self.settings, self.validation, self.start_nll = settings, validation, start_nll
        self.forget_probe, self.health_margins = forget_probe, health_margins or {}
        self.forget_groups = None if forget_groups is None else np.asarray(forget_groups)
        self.forget_objective, self.retain_objective = forget_objective, retain_objective
        self.score_nll, self.encode, self.reference = score_nll, encode, reference
        self.static_objective, self.bounded_parameterisation = static_objective, bounded_parameterisation
        self.combined = settings.dual_ascent and not settings.dualoptim
        self._seen: list[tuple[np.ndarray, np.ndarray]] = []  # (indices, NLL) of this step's training forwards
        pools = dict(pools)
        objectives = {FORGET: self._forget_losses, RETAIN: retain_objective}
        if self.combined:
            pools[COMBINED], objectives[COMBINED] = pools[FORGET], self._combined_losses
        super().__init__(model, tokenizer, params, pools, objectives, cycle=[FORGET, RETAIN], **trainer_kwargs)
        self._start_controllers()

    def _start_controllers(self) -> None:
        s = self.settings
        start_nll = None
        if s.reweight or s.curriculum:  # the base model's per-text NLL: mmie's NPO reference pass, when it ran
            start_nll = self.score(self.pools[FORGET]) if self.start_nll is None else self.start_nll
        self.reweighter = (LossReweighter(start_nll, s.reweight_temperature, s.reweight_clip, self.forget_groups)
                           if s.reweight else None)
        self.curriculum = (Curriculum(start_nll, s.curriculum_strength, round(s.curriculum_share * self.steps),
                                      self.forget_groups) if s.curriculum else None)
        self.deadline, self.curve, self.stop = Deadline(s.budget_minutes), [], None
        self.stages = self.dual = self.early = self.best = self.ratio = None
        if not s.validates:
            return
        with self.reference():
            self.base = {kind: float(np.mean(self.score(texts))) for kind, texts in self.validation.items()}
            self.base_probe = self.probe() if s.early_stop else None
        self.soft = RetainBudget(self.base[RETAIN], eps=s.adaptive_retain_eps)
        self.hard = RetainBudget(self.base[RETAIN], ppl_ratio=s.adaptive_max_retain_ppl_ratio)
        if s.stages:
            self.stages = StageSchedule(self.base[FORGET], s.stage_forget_margin, self.soft.limit,
                                        round(s.stage_ascent_max_share * self.steps))
        if s.dual_ascent:
            self.dual = DualAscent(s.dual_init, s.dual_step, self.soft.limit, s.dual_max)
            self._apply_dual()
        if s.early_stop:  # the unedited start is a candidate: if every trained step breaks the budget, it wins
            self.early = EarlyStopping(s.adaptive_patience, s.adaptive_min_delta,
                                       mode="min" if self.forget_probe else "max")
            self.early.update(0, self.monitored(self.base[FORGET], self.base_probe))
            self.best = self._snapshot()
        if s.dualoptim and self.base_probe is not None and s.dualoptim_ratio_growth > 1:
            self.ratio = RatioController(s.dualoptim_lr_ratio, s.dualoptim_ratio_growth, s.dualoptim_max_lr_ratio,
                                         s.adaptive_min_delta, self.base_probe["forget_es"])
        self.curve.append({"step": 0, "stage": self.stage, "forget_nll": self.base[FORGET],
                           "retain_nll": self.base[RETAIN], **(self.base_probe or {}), "eligible": True})

    # --- helpers ---
    @property
    def stage(self) -> str | None:
        return self.stages.current if self.stages else None

    @contextmanager
    def _eval_mode(self):
        """Eval mode (no dropout) for a measurement, back to the caller's mode after."""
        training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(training)

    def score(self, texts: list[str]) -> np.ndarray:
        """Per-text NLL in eval mode."""
        with self._eval_mode():
            return np.asarray(self.score_nll(texts), dtype=np.float64)

    def probe(self) -> dict[str, float] | None:
        """The forget probe's means (ES, empty rate, repetition of greedy continuations of the forget-validation
        prompts) in eval mode, or None without a probe."""
        if self.forget_probe is None:
            return None
        with self._eval_mode():
            return {f"forget_{name}": float(value) for name, value in self.forget_probe().items()}

    @property
    def reads_forget_nll(self) -> bool:
        """Whether a controller reads the forget-val NLL at a validation: the ascent stage's trigger, or early
        stopping without the probe. Otherwise it is not scored (it was over half of a validation's scoring, and a
        validation's scoring is most of the trainer's overhead); the curve then has no forget_nll after the ascent."""
        return self.stage == ASCENT or (self.early is not None and self.forget_probe is None)

    def monitored(self, forget_nll: float | None, probe: dict | None) -> float:
        """What early stopping watches: forget-val ES (lower = more forgotten) with a probe, else forget-val NLL."""
        return probe["forget_es"] if probe else forget_nll

    def unhealthy(self, probe: dict | None) -> str | None:
        """Why the forget-validation outputs are not healthy: empty rate or repetition above the base's by more than
        gate GH's margin (the same margins, so a step the gate would call collapsed is never the best one)."""
        for measure, margin in self.health_margins.items() if probe else ():
            rise = probe[f"forget_{measure}"] - self.base_probe[f"forget_{measure}"]
            if not rise <= margin:
                return f"forget-val {measure} +{rise:.3g} over the base's (margin {margin:g})"
        return None

    def objective_name(self) -> str:
        if self.stage == ASCENT:
            return "ga" if self.bounded_parameterisation else "bounded_ga"
        return NPO if self.stage is not None else self.static_objective

    def _accumulate(self, kind: str, indices: np.ndarray, step: int, micro: list) -> tuple[np.ndarray, float]:
        """With SAM (sharpness-aware unlearning, Fan et al. ICML 2025, as the reference code's SAMIterativeUnlearner
        does it): a forget step's gradient is the forget loss's at theta + eps, eps = rho g / ||g||_2 with g its
        gradient at theta (one extra forward and backward), so the forget objective settles in a flat region that a
        few relearning steps leave less easily. The step's losses and the reweighting's observations are those at
        theta. Deviation: combined steps (without DualOptim) are not perturbed; the reference code perturbs the
        forget loss alone and adds the retain gradient at theta, which DualOptim's separate retain steps do here."""
        if not self.settings.sam or kind != FORGET:
            return super()._accumulate(kind, indices, step, micro)
        per_sample, loss = super()._accumulate(kind, indices, step, micro)
        seen, theta = list(self._seen), self._snapshot()
        with torch.no_grad():
            grads = [p.grad for p in self.params]
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
            for p, g in zip(self.params, grads):
                if g is not None:
                    p.add_(g * (self.settings.sam_rho / (norm + 1e-12)))
        try:
            super()._accumulate(kind, indices, step, micro)
        finally:
            self._restore(theta)  # exactly theta, not theta + eps - eps
            self._seen[:] = seen
        return per_sample, loss

    def _forget_losses(self, batch: dict, idx: np.ndarray) -> torch.Tensor:
        losses, nll = self.forget_objective(self.objective_name(), batch, idx)
        self._seen.append((np.asarray(idx), nll.detach().float().cpu().numpy()))
        return losses

    def _combined_losses(self, batch: dict, idx: np.ndarray) -> torch.Tensor:
        """forget_i + lambda retain_i, retain texts drawn at random: the forget weights (summing to 1) then also
        weight the retain terms, still an unbiased estimate of the retain mean since the pairing is random."""
        forget = self._forget_losses(batch, idx)
        pool = self.pools[RETAIN]
        retain_idx = self.rng.choice(len(pool), size=len(idx), replace=len(idx) > len(pool))
        retain = self.retain_objective(self.encode([pool[i] for i in retain_idx]), retain_idx)
        return forget + self.dual.value * retain

    def _apply_dual(self) -> None:
        if self.dual is not None and self.settings.dualoptim:
            set_lr_scale(self.optimizers[RETAIN], self.dual.value)

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def _restore(self, snapshot: list[torch.Tensor]) -> None:
        for p, saved in zip(self.params, snapshot):
            p.copy_(saved)

    # --- replaceable parts ---
    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if not self.settings.dualoptim:
            return super().make_optimizers()
        optimizers = {kind: torch.optim.AdamW(self.params, lr=self.lr, weight_decay=self.weight_decay)
                      for kind in (FORGET, RETAIN)}
        set_lr_scale(optimizers[FORGET], self.settings.dualoptim_lr_ratio)  # lr_forget = ratio x lr_retain (--lr)
        return optimizers

    def optimizer_for(self, kind: str) -> torch.optim.Optimizer:
        if not self.settings.dualoptim:
            return super().optimizer_for(kind)
        return self.optimizers[RETAIN if kind == RETAIN else FORGET]

    def kind_at(self, step: int) -> str:
        if self.stage == RECOVERY:
            return RETAIN
        if self.settings.dualoptim:
            f, r = self.settings.dualoptim_forget_steps, self.settings.dualoptim_retain_steps
            return FORGET if step % (f + r) < f else RETAIN
        return COMBINED if self.combined else super().kind_at(step)

    @property
    def forget_batch_size(self) -> int:
        """Forget texts per forget step: half the batch with the English target, whose rows (one per forget text,
        scored in the same step) fill the other half, so a forget step reads as many rows as without it."""
        return max(1, self.batch_size // 2) if self.settings.english_target else self.batch_size

    def sample(self, kind: str, step: int) -> np.ndarray:
        if kind == RETAIN:
            return super().sample(kind, step)
        n = len(self.pools[FORGET])
        return self.rng.choice(n, size=min(self.forget_batch_size, n), replace=False,
                               p=None if self.curriculum is None else self.curriculum.probabilities(step))

    def weights(self, kind: str, indices: np.ndarray, step: int) -> torch.Tensor:
        if kind == RETAIN or self.reweighter is None:
            return super().weights(kind, indices, step)
        return torch.as_tensor(self.reweighter.batch_weights(indices), dtype=torch.float32, device=self.device)

    def after_step(self, record: dict) -> bool:
        s, done = self.settings, record["step"] + 1
        used = self.optimizer_for(record["kind"]).param_groups[0]
        self.log[-1].update(stage=self.stage, lr_scale=used.get("lr_scale", 1.0),
                            **({"lambda": self.dual.value} if self.dual else {}))
        if self.reweighter is not None:
            for indices, nll in self._seen:
                self.reweighter.observe(indices, nll, done)
            if done % s.reweight_every == 0 and done < self.steps:
                stale = self.reweighter.stale(done, s.reweight_every)
                pool = self.pools[FORGET]
                self.reweighter.refresh(stale, self.score([pool[i] for i in stale]) if len(stale) else [], done)
        self._seen.clear()
        reason = f"wall-clock budget of {s.budget_minutes:g} min spent" if self.deadline.expired() else None
        if s.validates and (reason or done % s.adaptive_eval_every == 0 or done == self.steps):
            reason = self.evaluate(done, last=reason is not None or done == self.steps) or reason
        if self.stages is not None and reason is None and done < self.steps:  # after the validation, so a
            self.stages.check_step_cap(done)  # measured trigger at this step takes precedence
        if reason or done == self.steps:
            self.finish(done, reason)
        return reason is not None

    # --- validation: dual ascent, stages, early stopping ---
    def evaluate(self, done: int, last: bool = False) -> str | None:
        """Score the validation slices (the forget slice's NLL only while read: reads_forget_nll); update lambda,
        early stopping and (unless this is the last step) the stage. Returns a stop reason."""
        forget_nll = float(np.mean(self.score(self.validation[FORGET]))) if self.reads_forget_nll else None
        retain_nll = float(np.mean(self.score(self.validation[RETAIN])))
        stage, probe = self.stage, self.probe() if self.early is not None else None
        unhealthy = self.unhealthy(probe)
        entry = {"step": done, "stage": stage, **({} if forget_nll is None else {"forget_nll": forget_nll}),
                 "retain_nll": retain_nll, **(probe or {}),
                 "eligible": not self.hard.exceeded(retain_nll) and unhealthy is None}
        if unhealthy:
            entry["unhealthy"] = unhealthy
        self.curve.append(entry)
        if self.dual is not None:
            entry["lambda"] = self.dual.update(done, retain_nll)
            self._apply_dual()
        if self.ratio is not None:
            entry["lr_ratio"] = self.ratio.update(done, probe["forget_es"], entry["eligible"], stage != RECOVERY)
            set_lr_scale(self.optimizers[FORGET], entry["lr_ratio"])
        reason = self._early_stop(done, self.monitored(forget_nll, probe), entry, stage)
        if self.stages is not None and reason is None and not last:  # no stage switch after the last step
            self.stages.update(done, forget_nll, retain_nll, unhealthy)
        return reason

    def _early_stop(self, done: int, value: float, entry: dict, stage: str | None) -> str | None:
        """Monitored (`monitored`): forget-val ES, or NLL without a probe, among steps within the hard retain budget
        and with healthy outputs; an ineligible step counts as no improvement (the retain steps may still bring the
        model back within patience). Recovery steps, and ineligible steps under stages (whose recovery stage handles
        them), never use up the patience: recovery is meant to give back a little forgetting while retain and the
        outputs recover. A recovery step that is eligible and beats the best is still kept: repairing a collapse
        can land on the best healthy model of the run."""
        if self.early is None:
            return None
        judged = stage != RECOVERY and not (self.stages and not entry["eligible"])
        if not judged and not (entry["eligible"] and self.early.improves(value)):
            return None
        if self.early.update(done, value, entry["eligible"]):
            return self.early.reason
        if self.early.best_step == done:
            self.best = self._snapshot()
        return None

    def finish(self, done: int, reason: str | None) -> None:
        self.stop = {"stopped_at": done, "reason": reason or "ran all steps", "restored": False, "best_step": None}
        if self.early is not None:
            self._restore(self.best)
            self.stop.update(restored=True, best_step=self.early.best_step)

    # --- the report ---
    def report(self) -> dict:
        s, done = self.settings, len(self.log)
        kinds = [row["kind"] for row in self.log]
        return {
            "components": {**s.components(), "sine_lora": self.bounded_parameterisation, "dynamic_gate": False},
            "switches": s.components(),
            "objective": {"static": self.static_objective,
                          "bounded_ascent": "ga" if self.bounded_parameterisation else "bounded_ga",
                          "english_target": {"weight": s.english_target_weight,
                                             "forget_texts_per_step": self.forget_batch_size,
                                             "loss": "stage/static loss_i + weight x NLL(English continuation | "
                                                     "prompt_i), the continuation a retain train text"}
                          if s.english_target else None},
            "stages": self.stages.timeline(done) if self.stages else [],
            "weights": self.reweighter.report() if self.reweighter else None,
            "curriculum": self.curriculum.summary() if self.curriculum else None,
            "lr": self.lr_report(),
            "dual": self.dual_report(),
            "early_stop": {**(self.stop or {}), "curve": self.curve, "patience": s.adaptive_patience,
                           "min_delta": s.adaptive_min_delta, "monitor": "forget-val ES of greedy continuations (min)"
                           if self.forget_probe else "forget-val mean NLL (max)", "health_margins": self.health_margins}
            if s.validates else None,
            "budgets": {"base": self.base, "soft_limit": self.soft.limit, "soft_rule": self.soft.rule,
                        "hard_limit": self.hard.limit, "hard_rule": self.hard.rule} if s.validates else None,
            "validation_sizes": {k: len(v) for k, v in self.validation.items()},
            "steps_by_kind": {kind: kinds.count(kind) for kind in dict.fromkeys(kinds)},
        }

    def lr_report(self) -> dict:
        s = self.settings
        ratio = f"{s.dualoptim_forget_steps}:{s.dualoptim_retain_steps}" if s.dualoptim else \
            "every step forget + lambda x retain" if self.combined else "1:1"
        steps = {name: optimizer_steps(opt) for name, opt in self.optimizers.items()}
        return {"base": self.lr, "schedule": f"{self.schedule} (warmup share {self.warmup_share})",
                "dualoptim": s.dualoptim, "forget_over_retain_lr": s.dualoptim_lr_ratio if s.dualoptim else 1.0,
                "forget_over_retain_lr_trajectory": self.ratio.trajectory if self.ratio else None,
                "forget_to_retain_steps": ratio, "optimizer_steps": steps,
                "retain_lr_scale": "dual lambda" if self.dual and s.dualoptim else 1.0}

    def dual_report(self) -> dict | None:
        if self.dual is None:
            return None
        return {"variant": "lambda scales the retain learning rate (DualOptim)" if self.settings.dualoptim
                else "combined steps forget + lambda x retain", "rule": "lambda <- clip(lambda + eta (NLL_r - limit), "
                "0, lambda_max)", "eta": self.dual.step_size, "limit": self.dual.limit, "max": self.dual.maximum,
                "trajectory": self.dual.trajectory}


def set_lr_scale(optimizer: torch.optim.Optimizer, scale: float) -> None:
    """The factor mmie.Trainer multiplies this optimizer's scheduled learning rate by (DualOptim's ratio, lambda)."""
    for group in optimizer.param_groups:
        group["lr_scale"] = scale


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """Optimizer steps taken (AdamW's per-parameter step count, the one its bias correction uses)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if "step" in optimizer.state.get(p, {}):
                return int(optimizer.state[p]["step"])
    return 0


# =============================================================================================
# 5. Dynamic SAE gate: DSG's trigger, a per-sequence clamp from the Hindi share and the activation strength
# =============================================================================================
def strip_template(text: str, prefix: str, suffix: str) -> str:
    """The user's prompt inside a chat-formatted text (unchanged when the template is not there, e.g. scored texts),
    so the template's English words do not dilute the Hindi share."""
    if prefix and text.startswith(prefix):
        text = text[len(prefix):]
    if suffix and text.endswith(suffix):
        text = text[: -len(suffix)]
    return text


def firing_strength(z_chosen: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Per sequence: mean of the chosen features' positive activations over counted tokens (the statistic of
    mmie.mean_firing_activation, per sequence). z_chosen [batch, seq, n], counted bool [batch, seq] -> [batch]."""
    firing = (z_chosen > 0) & counted[..., None]
    return (z_chosen * firing).sum((1, 2)) / firing.sum((1, 2)).clamp(min=1)


class DynamicClamp:
    """dsg_gate's clamp_scale hook (ours): DSG's per-sequence trigger decides as published; a gated sequence's
    clamp is c x scale_b with
        scale_b = clip((m + (1 - m) h_b) x a_b / a_ref, 0, s_max)
    h_b: share of Hindi words (Devanagari or romanized, the LID ensemble) in the input prompt, chat template
    stripped, computed once per distinct prompt (batched over a batch's new prompts, cached); m: the floor for inputs
    with no Hindi words, so an English request for Hindi that trips the trigger is still clamped; a_b: the chosen
    features' mean firing activation in this sequence; a_ref: the same on forget-train text (the static clamp's
    reference), so a typical Hindi sequence gets scale ~ 1 and the static published DSG is scale 1 everywhere."""

    def __init__(self, reference_strength: dict[int, float], hindi_share: Callable[[list[str]], list[float]],
                 decode: Callable[[list[list[int]]], list[str]], *, min_scale: float, max_scale: float):
        self.reference_strength, self.hindi_share, self.decode = reference_strength, hindi_share, decode
        self.min_scale, self.max_scale = min_scale, max_scale
        self.cache: dict[tuple[int, ...], float] = {}
        self.history: dict[int, list[tuple[float, float, float]]] = {layer: [] for layer in reference_strength}

    def shares(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rows = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids.cpu(), attention_mask.cpu())]
        todo = list(dict.fromkeys(row for row in rows if row not in self.cache))
        if todo:
            self.cache.update(zip(todo, self.hindi_share(self.decode([list(row) for row in todo]))))
        return torch.tensor([self.cache[row] for row in rows], dtype=torch.float32)

    def __call__(self, z_chosen: torch.Tensor, layer: int, *, input_ids: torch.Tensor | None,
                 attention_mask: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("the dynamic DSG gate needs the input ids to read the prompt's Hindi share")
        share = self.shares(input_ids, attention_mask).to(z_chosen.device)
        strength = firing_strength(z_chosen.float(), counted)
        reference = self.reference_strength[layer]
        ratio = strength / reference if reference > 0 else torch.ones_like(strength)
        scale = ((self.min_scale + (1 - self.min_scale) * share) * ratio).clamp(0, self.max_scale)
        self.history[layer] += zip(share.tolist(), ratio.tolist(), scale.tolist())
        return scale

    def report(self, decisions: dict[int, list[tuple[float, bool]]], clamp: dict[int, float]) -> dict:
        """Per layer, over the sequences the gate decided on (`decisions`: DSGState.history, same order): how often
        gated, and for gated ones the scale and the effective clamp c x scale next to the static DSG's c."""
        layers = {}
        for layer, rows in self.history.items():
            gated = [row for row, (_, is_gated) in zip(rows, decisions.get(layer, [])) if is_gated]
            scales = np.array([scale for _, _, scale in gated])
            layers[layer] = {"decided": len(rows), "gated": len(gated), "static_clamp": clamp[layer],
                             "mean_hindi_share_gated": float(np.mean([h for h, _, _ in gated])) if gated else None,
                             "scale_quantiles_gated": np.quantile(scales, [0.1, 0.5, 0.9]).tolist() if gated else None,
                             "mean_effective_clamp_gated": float(clamp[layer] * scales.mean()) if gated else None}
        return {"formula": "c_b = c x clip((m + (1 - m) h_b) x a_b / a_ref, 0, s_max)", "min_scale": self.min_scale,
                "max_scale": self.max_scale, "prompts_identified": len(self.cache), "layers": layers}
