"""MMIE benchmark: ratios measured side by side in one run (never absolute times compared across runs).

    python scripts/bench.py                       # CPU: the embedded model
    python scripts/bench.py --report runs/x/report.json   # also the time split of that run by arm and phase
    python scripts/bench.py --gpu                 # CUDA: a random-init model from Qwen2.5-1.5B's configuration

Sections (each prints its ratio; results go in BENCHMARKS.md):
  1. one base evaluation (evaluate_model: generation, language identification, scoring) against the model work
     it cannot avoid: raw batched `generate` on the same prompts plus the scoring forwards;
  2. our generation (batched, KV cache) against the upstream style (batch 8, no KV cache);
  3. language identification, texts per second;
  4. one training step of the adaptive trainer against the plain loop (same LoRA, same steps), like for like
     (its forget steps as the plain loop's), and with SAM; three rounds in rotated order, the median ratio;
  5. peak memory of one scoring batch on Qwen's 151,936-token vocabulary: the old full log-softmax against the
     chunked scoring from hidden states (each in a fresh process);
  6. with --report, the time of a finished run split by arm and phase, and what recoverability (the attacks and
     the reference arm) costs of it;
  7. the distill arm's --undo_samples: one sampling pass against distillation steps.
Run it alone: a second heavy process on two cores slows both by far more than 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import mmie  # noqa: E402


def timed(function, repeats: int = 1) -> float:
    """Best wall time of `repeats` calls (the first call warms caches when repeats > 1)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def experiment_inputs(args):
    """The default run's data, prompt sets and settings, as mmie.main prepares them."""
    parser = mmie.build_parser()
    settings = parser.parse_args([])
    sets = mmie.load_sets(settings)
    lid = mmie.experiment_lid(sets, settings)
    eval_sets = mmie.build_eval_sets(sets, mmie.check_sets(sets, lid, 1.0), settings)
    return settings, sets, lid, eval_sets


def raw_model_work(model, tokenizer, eval_sets, settings) -> None:
    """What the evaluation cannot avoid: batched greedy generate (longest prompts first, as ours) and one forward
    per scored text."""
    prompts = [p for ps in eval_sets["generation"].values() for p in ps]
    prompts.sort(key=lambda p: -len(tokenizer(p)["input_ids"]))
    with torch.no_grad():
        for start in range(0, len(prompts), settings.batch_size):
            encoded = tokenizer(prompts[start : start + settings.batch_size], return_tensors="pt", padding=True,
                                padding_side="left")
            model.generate(**encoded, max_new_tokens=settings.max_new_tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
        for texts in eval_sets["scoring"].values():
            for start in range(0, len(texts), settings.score_batch_size):
                encoded = tokenizer(texts[start : start + settings.score_batch_size], return_tensors="pt", padding=True)
                model(**encoded)


def upstream_generation(model, tokenizer, prompts, max_new_tokens) -> None:
    """The upstream style: batches of 8 and no KV cache (every step recomputes the whole prefix)."""
    with torch.no_grad():
        for start in range(0, len(prompts), 8):
            encoded = tokenizer(prompts[start : start + 8], return_tensors="pt", padding=True, padding_side="left")
            model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, use_cache=False,
                           pad_token_id=tokenizer.pad_token_id)


def section_evaluation(model, tokenizer, lid, eval_sets, settings) -> None:
    pipeline = timed(lambda: mmie.evaluate_model(model, tokenizer, lid, eval_sets, settings))
    raw = timed(lambda: raw_model_work(model, tokenizer, eval_sets, settings))
    n = sum(map(len, eval_sets["generation"].values()))
    print(f"1. base evaluation ({n} prompts, {sum(map(len, eval_sets['scoring'].values()))} scored texts): "
          f"pipeline {pipeline:.1f}s, raw generate + scoring forwards {raw:.1f}s, ratio {pipeline / raw:.2f} "
          "(target <= 1.15)")


def section_generation(model, tokenizer, eval_sets, settings) -> None:
    prompts = eval_sets["generation"]["forget_eval"][:96]
    ours = timed(lambda: mmie.generate(model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens,
                                       batch_size=settings.batch_size, max_len=settings.max_len))
    upstream = timed(lambda: upstream_generation(model, tokenizer, prompts, settings.max_new_tokens))
    print(f"2. generation of {len(prompts)} prompts x {settings.max_new_tokens} tokens: ours {ours:.2f}s, upstream "
          f"(batch 8, no KV cache) {upstream:.2f}s, speed-up {upstream / ours:.1f}x")


def section_lid(sets) -> None:
    texts = list(dict.fromkeys(t for s in sets.values() for t in s.texts))
    words = [w for t in texts for w in t.split()]
    rng = np.random.default_rng(0)
    samples = [" ".join(rng.choice(words, size=int(rng.integers(3, 30)))) for _ in range(20_000)]
    lid = mmie.LIDEnsemble()
    seconds = timed(lambda: lid.identify(samples))
    print(f"3. language identification: {len(samples) / seconds:,.0f} texts/s uncached ({len(samples)} unique "
          "texts of 3-30 words)")


def section_training(model, tokenizer, sets, settings, rounds: int = 3) -> None:
    """One LoRA training configuration, stepped by the plain Trainer and by the adaptive trainer with every
    component but sine-LoRA, early stopping and SAM on (validation and reweighting refreshes included, amortised over
    the steps), with the forget steps of the plain loop (the controllers' cost alone), and with SAM (its second
    forward and backward on every forget step). The four trainers run
    in turn, `rounds` times, in a rotated order: on 2 shared cores one run's ratio moves about ten points, so the
    line gives each round's ratio and their median."""
    from peft import LoraConfig

    import adaptive_unlearning  # noqa: F401  (the adaptive path of unlearning_trainer)

    steps = settings.lora_steps  # a default run's length, so the periodic passes are amortised as in a run
    adaptive = ["--adaptive_unlearning", "--no_sine_lora", "--no_early_stop", "--no_sam"]
    # like_for_like: a forget step reads 16 Devanagari texts, as the plain loop's (the English target's rows and
    # the romanized texts of the script-blind pool are shorter in tokens): the controllers' cost alone
    variants = {"plain": [], "adaptive": adaptive,
                "like_for_like": [*adaptive, "--no_english_target", "--no_script_blind"],
                "sam": [name for name in adaptive if name != "--no_sam"]}  # SAM's second forward-backward
    per_step = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(rounds):  # each round starts with the next trainer, so none always runs first or last
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            run_settings = mmie.build_parser().parse_args(["--lora_steps", str(steps), *variants[name]])
            ctx = mmie.Experiment(run_settings, model, tokenizer, mmie.LIDEnsemble(), sets,
                                  {"scoring": {"retain": []}, "related": {}, "related_source": {}}, {"chosen": [1, 3]},
                                  lambda stage, seed=None: Path("/tmp"))
            config = LoraConfig(r=8, lora_alpha=16, target_modules=mmie.lora_targets(model, None),
                                layers_to_transform=[1, 3])
            with mmie.lora_adapter(model, config, "bench") as peft_model:
                params = [p for p in peft_model.parameters() if p.requires_grad]
                trainer = mmie.unlearning_trainer(ctx, params, peft_model.disable_adapter, steps=steps, lr=1e-2,
                                                  seed=0, desc=name)
                per_step[name].append(timed(trainer.run) / steps)

    def overhead(name: str, against: str = "plain") -> str:
        ratios = np.asarray(per_step[name]) / np.asarray(per_step[against]) - 1
        rounds_text = " / ".join(f"{r:+.0%}" for r in ratios)
        return f"{np.median(ratios):+.0%} median of {rounds_text}"

    ms = {name: " / ".join(f"{t * 1000:.0f}" for t in times) for name, times in per_step.items()}
    print(f"4. training step ({steps} steps, {rounds} rounds, ms per step by round): plain {ms['plain']}; adaptive "
          "(all components but sine-LoRA and early stopping, auto-config's step rule: its generation probe is not "
          f"timed) {ms['adaptive']}, overhead {overhead('adaptive')} (target <= +15%); without the English target and "
          f"script-blindness (forget steps as the plain loop's) {ms['like_for_like']}, {overhead('like_for_like')}; "
          f"with SAM (on by default) {ms['sam']}, {overhead('sam')} against plain, {overhead('sam', 'adaptive')} "
          "against the adaptive trainer without it")


def section_distillation_samples(model, tokenizer, lid, sets, eval_sets, settings, steps: int = 50) -> None:
    """What --undo_samples costs the distill arm: one sampling pass (a continuation of each distillation text's
    beginning, as the arm draws them, at the default temperature 1) against distillation steps (KL to a teacher,
    batch --train_batch_size), side by side. A fresh student never stops, so its first samplings run every
    continuation to the limit (EOS suppressed here); the base model stops as a trained one does."""
    import copy

    ctx = mmie.Experiment(settings, model, tokenizer, lid, sets, eval_sets, {"chosen": []},
                          lambda stage, seed=None: Path("/tmp"))
    texts, _, prompts, limit = mmie.distillation_texts(ctx, seed=0)  # the arm's own pool and sample length
    student = copy.deepcopy(model)
    trainer = mmie.Trainer(student, tokenizer, list(student.parameters()), {"distill": texts},
                           {"distill": mmie.teacher_kl_objective(model, student, 0, None)}, steps=steps,
                           lr=settings.undo_lr, batch_size=settings.train_batch_size, max_len=settings.max_len, seed=0,
                           max_grad_norm=1.0)
    step = timed(trainer.run) / steps
    ended = timed(lambda: mmie.sampled_texts(model, tokenizer, prompts, settings, max_new_tokens=limit, seed=0))
    unended = timed(lambda: mmie.sampled_texts(model, tokenizer, prompts, settings, max_new_tokens=limit, seed=0,
                                               suppress=[tokenizer.eos_token_id]))
    n_student = -(-settings.undo_steps // mmie.UNDO_RESAMPLE_EVERY)  # samplings at steps 0, 100, ... below the budget
    budget = settings.undo_steps * step
    print(f"7. distillation samples ({len(prompts)} prompts, up to {limit} new tokens): one sampling pass "
          f"{ended:.1f} s when samples end, {unended:.1f} s when none does, = {ended / step:.0f} / {unended / step:.0f} "
          f"distillation steps ({step * 1000:.0f} ms each); over the default {settings.undo_steps} steps, "
          f"--undo_samples teacher adds {ended / budget:+.0%} (one pass), student {n_student} passes, "
          f"{(unended + (n_student - 1) * ended) / budget:+.0%} (the fresh student's first pass unended, the later "
          f"ones ending as a trained model's) to {n_student * unended / budget:+.0%} (none ending)")


MEMORY_PROBE = """
import sys, torch
sys.path.insert(0, {repo!r})
import mmie
from transformers import Qwen2Config, Qwen2ForCausalLM
config = Qwen2Config(vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
model = Qwen2ForCausalLM(config).eval()
ids = torch.randint(0, 151936, ({batch}, {length}))
batch = {{"input_ids": ids, "attention_mask": torch.ones_like(ids),
          "score_mask": torch.ones({batch}, {length} - 1, dtype=torch.bool)}}
def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS: model building left out
before = status("VmRSS:")
with torch.no_grad():
    if {old}:
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])
    else:
        mmie.token_logprobs(model, batch)
print((status("VmHWM:") - before) / 2**30)
"""


def section_memory(batch: int = 8, length: int = 256) -> None:
    peaks = {}  # GiB above the resident set before the batch (Linux: /proc/self/clear_refs resets the peak)
    for name, old in (("full log-softmax (before)", True), ("chunked from hidden states (after)", False)):
        code = MEMORY_PROBE.format(repo=str(REPO), batch=batch, length=length, old=old)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        peaks[name] = float(result.stdout.strip().splitlines()[-1])
    before, after = peaks.values()
    full = batch * (length - 1) * 151936 * 4 / 2**30
    print(f"5. peak memory of one scoring batch ({batch} x {length} tokens, vocabulary 151,936): before "
          f"{before:.2f} GiB, after {after:.2f} GiB ({before / max(after, 1e-3):.0f}x less); the [batch, length, "
          f"vocabulary] float32 tensor alone is {full:.2f} GiB here and {full * 64 / batch:.1f} GiB at batch 64")


def section_report(path: Path) -> None:
    report = json.loads(path.read_text(encoding="utf-8"))
    total = report.get("run_seconds")
    print(f"6. time of {path} ({total}s in all), by run phase (seconds): " + ", ".join(
        f"{name} {seconds:.1f}" for name, seconds in report.get("phase_seconds", {}).items()))
    print("   and by arm and phase (seconds):")
    phases = ["build", "evaluate", "token_kl", "relearn", "probes"]
    print(f"   {'arm':10s}{'seed':>6s}{'total':>8s}" + "".join(f"{p:>10s}" for p in phases))
    for arm, record in report["arms"].items():
        for seed, outcome in record["seeds"].items():
            split = outcome.get("phase_seconds", {})
            print(f"   {arm:10s}{seed:>6s}{outcome.get('seconds', 0):8.0f}" +
                  "".join(f"{split.get(p, 0):10.1f}" for p in phases))
    # What recoverability costs: every attack (the relearn phase of each attacked arm) and the reference arm whole.
    outcomes = [(arm, o) for arm, record in report["arms"].items() for o in record["seeds"].values()]
    attacks = sum(o.get("phase_seconds", {}).get("relearn", 0.0) for _, o in outcomes)
    reference = sum(o.get("seconds", 0.0) - o.get("phase_seconds", {}).get("relearn", 0.0)
                    for arm, o in outcomes if arm == "reference")
    if total:
        print(f"   recoverability: attacks {attacks:.0f}s + the reference arm's evaluation {reference:.0f}s = "
              f"{attacks + reference:.0f}s, {(attacks + reference) / total:.0%} of the run")


def gpu_sections() -> None:
    """A random-init model from Qwen2.5-1.5B-Instruct's configuration (no download): generation tokens per
    second, scoring peak memory (chunked, batch 64 x 256), one LoRA training step."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1e6, tie_word_embeddings=True, torch_dtype="bfloat16")
    model = Qwen2ForCausalLM(config).to("cuda", torch.bfloat16).eval()
    tokenizer = mmie.load_tokenizer(mmie.EMBEDDED_MODEL)
    ids = torch.randint(0, 4096, (64, 16), device="cuda")
    torch.cuda.synchronize()
    seconds = timed(lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=64,
                                           min_new_tokens=64, do_sample=False), repeats=2)
    print(f"G1. generation: {64 * 64 / seconds:,.0f} new tokens/s (batch 64, 64 new tokens, bf16)")
    batch = {"input_ids": torch.randint(0, 151936, (64, 256), device="cuda")}
    batch |= {"attention_mask": torch.ones_like(batch["input_ids"]),
              "score_mask": torch.ones(64, 255, dtype=torch.bool, device="cuda")}
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        mmie.token_logprobs(model, batch)
    print(f"G2. scoring peak memory (batch 64 x 256, chunked): {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    from peft import LoraConfig

    with mmie.lora_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules=mmie.lora_targets(model, None)),
                           "bench") as peft_model:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        train = {k: v[:16] for k, v in batch.items()}

        def step():
            loss = -mmie.token_logprobs(model, train)[0].mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            torch.cuda.synchronize()

        print(f"G3. LoRA training step (batch 16 x 256): {timed(step, repeats=3) * 1000:.0f} ms")
    del tokenizer


SECTIONS = ["evaluation", "generation", "lid", "training", "memory", "distillation_samples"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, default=None, help="a finished run's report.json to split by phase")
    parser.add_argument("--gpu", action="store_true", help="the CUDA sections on a Qwen2.5-1.5B-shaped model")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS, help="which CPU sections to run")
    args = parser.parse_args()
    print(f"mmie benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
    if args.gpu:
        gpu_sections()
        return
    settings, sets, lid, eval_sets = experiment_inputs(args)
    model, tokenizer = mmie.load_model(str(mmie.EMBEDDED_MODEL), "cpu", torch.float32, "sdpa", False)
    run = {"evaluation": lambda: section_evaluation(model, tokenizer, lid, eval_sets, settings),
           "generation": lambda: section_generation(model, tokenizer, eval_sets, settings),
           "lid": lambda: section_lid(sets), "training": lambda: section_training(model, tokenizer, sets, settings),
           "memory": section_memory,
           "distillation_samples": lambda: section_distillation_samples(model, tokenizer, lid, sets, eval_sets,
                                                                        settings)}
    for name in args.sections:
        run[name]()
    if args.report:
        section_report(args.report)


if __name__ == "__main__":
    main()
