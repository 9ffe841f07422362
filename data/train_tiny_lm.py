"""Train MMIE's embedded tiny causal LM on the train splits of the shipped sets.

    python data/train_tiny_lm.py                    # full build into data/tiny-lm (about 12 min on 2 idle CPU cores)
    python data/train_tiny_lm.py --steps 5 --out /tmp/tiny-smoke --skip_quality   # smoke rebuild
    python data/train_tiny_lm.py --no_hindi --tokenizer data/tiny-lm --out data/tiny-lm-nohindi   # the reference

--no_hindi trains the exact-unlearning reference: the same recipe, seed and (with --tokenizer) tokenizer on the
same train texts less every Hindi-bearing one (see hindi_bearing) and less the adversarial requests' Hindi answers,
for as many epochs as the full build (its step count is scaled by the share of texts kept, so each kept text is seen
as often as in the shipped model).

Deterministic for a given seed on a given machine: the tokenizer is a byte-level BPE trained on
the train texts in file order, the model a small Qwen2-architecture decoder (so the default
CUDA model's code path is the one exercised on CPU), trained on one text per sequence.
Writes config, safetensors weights, tokenizer, training_log.json (steps, losses, data
fingerprints, hyperparameters) and quality.json (held-out language-continuation rates).
"""

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from lid_ensemble import is_eval_text  # noqa: E402  (the split every MMIE component shares)

SETS = ["forget_hi", "forget_hi_roman", "retain_en", "mixed", "urdu", "punjabi", "bengali", "adversarial"]
EOS = "<|endoftext|>"

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data_dir", type=Path, default=REPO / "data")
parser.add_argument("--out", type=Path, default=REPO / "data" / "tiny-lm")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--steps", type=int, default=900)
parser.add_argument("--batch_size", type=int, default=32)
parser.add_argument("--max_len", type=int, default=128, help="tokens per training text (longer texts are cut)")
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--warmup_steps", type=int, default=50)
parser.add_argument("--weight_decay", type=float, default=0.1)
parser.add_argument("--vocab_size", type=int, default=4096)
parser.add_argument("--hidden_size", type=int, default=256)
parser.add_argument("--num_layers", type=int, default=4)
parser.add_argument("--num_heads", type=int, default=4)
parser.add_argument("--num_kv_heads", type=int, default=2)
parser.add_argument("--intermediate_size", type=int, default=704)
parser.add_argument("--log_every", type=int, default=25)
parser.add_argument("--skip_quality", action="store_true", help="do not measure the quality bar (smoke builds)")
parser.add_argument("--no_hindi", action="store_true",
                    help="leave out the Hindi-bearing train texts: the exact-unlearning reference model")
parser.add_argument("--tokenizer", type=Path, default=None,
                    help="reuse this model folder's tokenizer instead of training one (the reference must share the "
                         "shipped model's tokens so that outputs and NLLs compare token for token)")
parser.add_argument("--quality_prompts", type=int, default=80, help="held-out prompts per language for the quality bar")
args = parser.parse_args()

torch.manual_seed(args.seed)
rng = np.random.default_rng(args.seed)
args.out.mkdir(parents=True, exist_ok=True)

HINDI_SETS = ("forget_hi", "forget_hi_roman")  # left out whole under --no_hindi
# A text of another set is Hindi-bearing with at least this many Hindi words. One flagged word in an English text is
# mostly the romanized detector's noise (in retain_en's train split: "pasta", "bank", "late", "Dubai"; 15 texts, of
# which one has two); two or more is code-mixing (all of mixed.jsonl) or a request quoting Hindi (adversarial).
HINDI_WORDS_MIN = 2


def hindi_bearing(texts: list[str]) -> list[bool]:
    """Whether a text carries Hindi (Devanagari words, or Latin words that the romanized-Hindi detector marks Hindi
    in context): the LID ensemble's word mask, the one every ES metric reads."""
    from lid_ensemble import LIDEnsemble

    return [sum(mask) >= HINDI_WORDS_MIN for mask in LIDEnsemble().hindi_word_masks(texts)]


# --- data: train splits of every shipped set (less the Hindi-bearing texts under --no_hindi) --------
# A line with an "answer" (the adversarial requests' Hindi replies) trains as request + answer, so that the model
# answers a held-out request in Hindi as an instruction-tuned model would, and gate G6 can read something. The split
# is decided by the request alone (MMIE's prompts); the reference keeps the request and never sees the answer.
fingerprints, train_texts, n_all = {}, [], 0
for name in SETS:
    path = args.data_dir / f"{name}.jsonl"
    raw = path.read_bytes()
    every = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    rows = [row for row in every if not is_eval_text(row["text"])]
    train = [row["text"] for row in rows]
    fingerprints[name] = {"sha256": hashlib.sha256(raw).hexdigest(), "n": len(every), "n_train": len(train),
                          "n_train_answered": sum("answer" in row for row in rows)}
    n_all += len(train)
    if args.no_hindi:
        dropped = train if name in HINDI_SETS else [t for t, hindi in zip(train, hindi_bearing(train)) if hindi]
        left_out = set(dropped)
        train = [t for t in train if t not in left_out]
        fingerprints[name]["n_train_left_out"] = len(dropped)
        fingerprints[name]["n_answers_left_out"] = fingerprints[name]["n_train_answered"]
    else:
        train = [f"{row['text']} {row['answer']}" if "answer" in row else row["text"] for row in rows]
    train_texts.extend(train)
if args.no_hindi:  # as many epochs as the full build: each kept text is seen as often as in the shipped model
    args.steps = round(args.steps * len(train_texts) / n_all)
print(f"{len(train_texts)} train texts of {n_all} from {len(SETS)} sets; {args.steps} steps")

# --- tokenizer: byte-level BPE over whitespace-delimited words ------------------------------
# Splitting on whitespace only (not GPT-2's letter regex) keeps Indic vowel signs, which are
# combining marks rather than letters, inside their words.
if args.tokenizer is not None:
    tokenizer = Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
else:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?\S+|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(train_texts, trainers.BpeTrainer(
        vocab_size=args.vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS,
                                       model_max_length=512)
eos_id = hf_tokenizer.eos_token_id

# --- model ------------------------------------------------------------------------------------
config = Qwen2Config(
    vocab_size=len(hf_tokenizer), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
    num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
    max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=eos_id, pad_token_id=eos_id,
    bos_token_id=None, rope_theta=10000.0,
)
model = Qwen2ForCausalLM(config)
n_params = sum(p.numel() for p in model.parameters())
print(f"model: {n_params / 1e6:.2f}M parameters")

encoded = [ids[: args.max_len - 1] + [eos_id] for ids in hf_tokenizer(train_texts)["input_ids"]]
decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))


def lr_at(step):
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# --- training: shuffled epochs, one text per sequence, pads masked out of the loss --------------
log, order, cursor = [], rng.permutation(len(encoded)), 0
start = time.time()
model.train()
for step in range(args.steps):
    if cursor + args.batch_size > len(order):
        order, cursor = rng.permutation(len(encoded)), 0
    batch = [encoded[i] for i in order[cursor : cursor + args.batch_size]]
    cursor += args.batch_size
    width = max(map(len, batch))
    input_ids = torch.full((len(batch), width), eos_id)
    labels = torch.full((len(batch), width), -100)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step)
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if step % args.log_every == 0 or step == args.steps - 1:
        log.append({"step": step, "loss": round(loss.item(), 4), "lr": lr_at(step),
                    "elapsed_s": round(time.time() - start, 1)})
        print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.1f}s", flush=True)
train_seconds = time.time() - start

def repo_relative(path: Path) -> str:
    """A path as the log records it: relative to the repository when inside it (no machine's folders in a shipped file)."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


model.eval()
model.generation_config.pad_token_id = eos_id
model.generation_config.eos_token_id = eos_id
model.save_pretrained(args.out)
hf_tokenizer.save_pretrained(args.out)
weights_mb = sum(f.stat().st_size for f in args.out.glob("*.safetensors")) / 2**20
(args.out / "training_log.json").write_text(json.dumps({
    "hyperparameters": {k: repo_relative(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    "n_parameters": n_params, "weights_mb": round(weights_mb, 2), "train_seconds": round(train_seconds, 1),
    "torch_threads": torch.get_num_threads(), "data": fingerprints, "n_train_texts": len(train_texts),
    "log": log,
}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
print(f"saved to {args.out} ({weights_mb:.1f} MB weights, {train_seconds:.0f}s training)")

# --- quality bar on held-out prompts ----------------------------------------------------------
if not args.skip_quality:
    import mmie  # the metric code itself, so the bar is measured exactly as MMIE measures

    quality = mmie.language_continuation_quality(args.out, args.data_dir, n_prompts=args.quality_prompts)
    (args.out / "quality.json").write_text(json.dumps(quality, indent=1) + "\n", encoding="utf-8")
    for lang, row in quality["rates"].items():
        print(f"{lang}: {row['rate']:.3f} of {row['n']} held-out prompts continued in {row['language']} (bar {row['bar']})")
