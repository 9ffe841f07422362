"""Settle the relearning attack's grid: the attack on the base model and on the reference model (trained without
Hindi) over a wide grid of learning rates and step counts, for several attack seeds. A usable grid is one where the
base recovers fully and the reference stays clearly below it at every point, so that the worst case over the grid
can tell recovery from new learning (docs/METHODS.md, "Recoverability").

    python scripts/relearn_grid.py --lrs 3e-5 1e-4 3e-4 1e-3 3e-3 --steps 10 30 100 300 --seeds 0 1 2

Prints the mean ES on the attack's prompts per model, learning rate, step count and seed (the base under the first
seed only: it knows Hindi, so the attack has little to add) with the mean NLL per token of the held-out Hindi texts,
and the base - reference gap in ES; --out writes the same as JSON. Uses mmie.py's own attack (attack_trajectory) on the embedded model.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mmie  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4, 1e-3, 3e-3])
parser.add_argument("--steps", type=int, nargs="+", default=[10, 30, 100, 300])
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
parser.add_argument("--prompts", type=int, default=mmie.RELEARN_PROMPTS)
parser.add_argument("--out", type=Path, default=None)
options = parser.parse_args()

mmie_parser = mmie.build_parser()
argv = ["--relearn_prompts", str(options.prompts), "--relearn_steps", *map(str, options.steps)]
args = mmie_parser.parse_args(argv)
mmie.check_args(args, mmie_parser)
args.out, args.ckpt_dir = Path("/tmp/mmie-relearn-grid/report.json"), Path("/tmp/mmie-relearn-grid/ckpt")
run = mmie.prepare(args, mmie_parser, argv)
if run["reference_weights"] is None:
    sys.exit("relearn_grid: no reference model (data/tiny-lm-nohindi) to compare with")
model = run["model"]
ctx = SimpleNamespace(model=model, tokenizer=run["tokenizer"], args=args, lid=run["lid"], sets=run["sets"],
                      eval_sets=run["eval_sets"], base_params=list(model.parameters()),
                      attack_mode=mmie.attack_mode(args, model))
arm = mmie.ArmEdit(removable=False)
results, likelihood = {}, {}  # mean ES on the attack's prompts; mean NLL per token of the held-out Hindi texts
for name in ("base", "reference"):
    weights = run["reference_weights"] if name == "reference" else [p.detach().clone() for p in ctx.base_params]
    with mmie.loaded_weights(ctx.base_params, weights):
        for lr in options.lrs:
            for seed in options.seeds if name == "reference" else options.seeds[:1]:  # the base is at ES ~1 anyway
                started = time.time()
                scores = mmie.attack_trajectory(ctx, arm, run["sets"]["relearn"].texts, lr, options.steps, seed,
                                                f"{name} lr {lr:g}")
                results.setdefault(name, {}).setdefault(f"{lr:g}", {})[str(seed)] = {
                    str(step): float(np.mean(score["es"])) for step, score in scores.items()}
                likelihood.setdefault(name, {}).setdefault(f"{lr:g}", {})[str(seed)] = {
                    str(step): float(np.mean(score["nll"])) for step, score in scores.items()}
                print(f"{name:9s} lr {lr:<7g} seed {seed}: " + "  ".join(
                    f"{step}: ES {np.mean(score['es']):.3f} NLL {np.mean(score['nll']):.2f}"
                    for step, score in sorted(scores.items())) + f"  ({time.time() - started:.0f}s)", flush=True)

print("\nmean over seeds (base / reference / gap)")
for lr in map(lambda v: f"{v:g}", options.lrs):
    cells = []
    for step in map(str, options.steps):
        b, r = (float(np.mean([results[m][lr][s][step] for s in results[m][lr]])) for m in ("base", "reference"))
        sd = float(np.std([results["reference"][lr][s][step] for s in results["reference"][lr]], ddof=1)) \
            if len(options.seeds) > 1 else float("nan")
        cells.append(f"{step}: {b:.2f}/{r:.2f}/{b - r:+.2f} (ref sd {sd:.2f})")
    print(f"lr {lr:<7}" + "  ".join(cells))
if options.out:
    options.out.write_text(json.dumps({"options": {k: str(v) for k, v in vars(options).items()}, "results": results,
                                       "nll": likelihood}, indent=1) + "\n", encoding="utf-8")
