"""The recoverability table of one or more reports (markdown): per arm, Hindi before and after each attack beside the
reference model's, the relearning curve, G7 and G5, and the outcome.

    python scripts/recoverability_table.py runs/g7/adaptive3.json runs/g7/distill_a0.6.json

A row per arm of each report (the base and the reference once per report); CIs and p-values are the report's own
(each report is its own Benjamini-Hochberg family).
"""

import argparse
import json
from pathlib import Path

import numpy as np

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("reports", type=Path, nargs="+")
args = parser.parse_args()


def estimate(summary: dict, metric: str, key: str | None = None) -> str:
    row = summary.get(metric) or {}
    row = row.get(key) if key else row
    if not row or row.get("mean") is None:
        return "-"
    low, high = row.get("ci") or (None, None)
    return f"{row['mean']:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")


def curve(record: dict) -> str:
    """ES at each grid point, mean over the arm's attacked seeds: 'lr: steps->ES, ...' per learning rate."""
    seeds = [o["recoverability"] for o in record["seeds"].values()
             if o.get("status") == "ok" and (o.get("recoverability") or {}).get("curves")]
    if not seeds:
        return "removable" if any((o.get("recoverability") or {}).get("removable") for o in record["seeds"].values()) \
            else "-"
    parts = []
    for lr, points in seeds[0]["curves"].items():
        means = {step: np.mean([s["curves"][lr][step] for s in seeds]) for step in points}
        parts.append(f"{lr}: " + " ".join(f"{step}→{value:.2f}" for step, value in means.items()))
    return "; ".join(parts)


def gate(gates: dict, name: str) -> str:
    result = gates.get(name)
    if not result:
        return "-"
    if result.get("removable"):
        return "removable"
    if result.get("p_adj") is None:
        return "n/a"
    word = "uninf." if result.get("uninformative") else "PASS" if result.get("pass") else "fail"
    return f"{word} {result['p_adj']:.3g}"


header = ["report", "arm", "seeds", "ES forget-eval", "ES relearned (worst)", "relearned − reference",
          "ES benign", "ES 4-bit", "ES 8-bit", "ppl / base", "curve (lr: steps→ES)", "G7", "G5", "outcome"]
print("| " + " | ".join(header) + " |")
print("|" + "---|" * len(header))
for path in args.reports:
    report = json.loads(path.read_text(encoding="utf-8"))
    summary, gates = report.get("summary", {}), report.get("gates", {})
    for arm, record in report["arms"].items():
        s = summary.get(arm, {})
        ratio = (s.get("ppl_retain") or {}).get("ratio_vs_base") or {}
        cells = [path.stem, arm, str(sum(o.get("status") == "ok" for o in record["seeds"].values())),
                 estimate(s, "es_forget_eval"), estimate(s, "es_relearn"),
                 estimate(s, "es_relearn", "diff_vs_reference"), estimate(s, "es_relearn_benign"),
                 estimate(s, "es_quant4"), estimate(s, "es_quant8"),
                 f"×{ratio['mean']:.3f}" if ratio.get("mean") is not None else "-", curve(record),
                 gate(gates.get(arm, {}), "G7"), gate(gates.get(arm, {}), "G5"),
                 f"{report.get('decision', {}).get(arm, '')} {report.get('outcome', {}).get(arm, '')}".strip() or "-"]
        print("| " + " | ".join(cells) + " |")
