"""A new user's first run on a hub-sized model, without the download: a random-init Gemma3 text model with
Gemma-3-270M's shape (262,144-token vocabulary, 18 layers of width 640) and the embedded tokenizer, run with
--auto_config as a new user would. It prints where the time went: auto-config's probes (report
["auto_config_probes"]) against the whole run (report["run_seconds"], report["phase_seconds"]).

    python scripts/hub_sized_run.py --out runs/hub270m -- --arms lora reft dim --sample_cap 32

Everything after "--" goes to mmie.py as given (the log is <out>/run.log). Random weights: the numbers are
about time, not about unlearning. Run it alone (two cores: a second heavy process distorts every share).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402

import mmie  # noqa: E402

# Gemma-3-270M's text configuration (its config.json on the hub), but for the vocabulary's token ids, which are the
# embedded tokenizer's: the model keeps all 262,144 rows, so every forward pays for the full output head.
GEMMA3_270M = dict(vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                   max_position_embeddings=32_768, query_pre_attn_scalar=256, tie_word_embeddings=True)


def build_model(folder: Path) -> None:
    if (folder / "config.json").is_file():
        return
    tokenizer = mmie.load_tokenizer(REPO / "data" / "tiny-lm")
    torch.manual_seed(0)
    config = Gemma3TextConfig(**GEMMA3_270M, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=tokenizer.bos_token_id)
    model = Gemma3ForCausalLM(config)
    print(f"hub_sized_run: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters -> {folder}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the model, the log and the report")
    parser.add_argument("mmie_args", nargs=argparse.REMAINDER, help="-- then mmie.py's flags")
    args = parser.parse_args()
    extra = args.mmie_args[1:] if args.mmie_args[:1] == ["--"] else args.mmie_args
    build_model(args.out / "gemma3-270m-random")
    command = [sys.executable, str(REPO / "mmie.py"), "--model", str(args.out / "gemma3-270m-random"), "--auto_config",
               "--out", str(args.out / "report.json"), "--ckpt_dir", str(args.out / "ckpt"), *extra]
    print("hub_sized_run:", " ".join(command[1:]), flush=True)
    started = time.time()
    with open(args.out / "run.log", "w", encoding="utf-8") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    print(f"hub_sized_run: exit {status} after {time.time() - started:.0f}s (log: {args.out / 'run.log'})")
    report = json.loads((args.out / "report.json").read_text(encoding="utf-8"))
    probes = report["auto_config_probes"]
    print(f"auto-config probes: {probes['total_spent_s']:.0f}s of a {report['run_seconds']:.0f}s run "
          f"({probes['total_spent_s'] / report['run_seconds']:.1%}); budget {probes['budget_s']:.0f}s "
          f"(predicted run {probes['predicted_run']['seconds']:.0f}s)")
    for name, seconds in probes["spent_s"].items():
        print(f"  {name:15s} {seconds:7.1f}s  {probes['fallbacks'].get(name, '')}")
    print("phases:", ", ".join(f"{name} {seconds:.0f}s" for name, seconds in report["phase_seconds"].items()))
    sys.exit(status)


if __name__ == "__main__":
    main()
