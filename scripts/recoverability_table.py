"""The recoverability table of one or more reports (markdown): per arm, Hindi before and after each attack beside the
reference model's, the relearning curve, G7 and G5, and the outcome.

    python scripts/recoverability_table.py runs/g7/adaptive3.json runs/g7/distill_a0.6.json

A row per arm of each report (the base and the reference once per report); CIs and p-values are the report's own
(each report is its own Benjamini-Hochberg family). With --target, a row per gated arm against what unlearning asks
of it: ES on forget-eval at most 0.10, worst-case relearned ES within 0.10 of the reference's (and how many seeds'
models meet G7 alone, from the report's per-seed read), retain perplexity within 5% of the base's, related-language
fidelity within 0.05 of the base's, benign relearning and 4-bit quantization within 0.10 of the reference's, and the
gates that did not pass, with the relearned Hindi NLL beside the reference's (nll_relearn: below 0, the attack brings
back more Hindi than it teaches the reference). Reports written before the per-seed read: pool each alone with
`mmie.py --aggregate`.
"""

import argparse
import json
from pathlib import Path

import numpy as np

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("reports", type=Path, nargs="+")
parser.add_argument("--target", action="store_true", help="the table against the unlearning target (see above)")
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


def mean(summary: dict, metric: str, key: str | None = None) -> float | None:
    row = summary.get(metric) or {}
    row = row.get(key) if key else row
    return None if not row or row.get("mean") is None else float(row["mean"])


def number(value: float | None, form: str = "{:.3f}") -> str:
    return "-" if value is None else form.format(value)


def target_row(path: Path, report: dict, arm: str) -> list[str]:
    s, gates = report["summary"].get(arm, {}), report["gates"][arm]
    per_seed = gates.get("G7", {}).get("per_seed") or {}
    relearned = per_seed.get("es_relearn") or {}
    drops = [mean(s, f"fidelity_{lang}", "diff_vs_base") for lang in ("ur", "pa", "bn")]
    failed = [name for name, result in gates.items() if not result.get("pass")]
    return [path.stem, arm, str(len(relearned) or "-"), number(mean(s, "es_forget_eval")),
            number(mean(s, "es_relearn", "diff_vs_reference"), "{:+.3f}"),
            number(mean(s, "nll_relearn", "diff_vs_reference"), "{:+.2f}"),
            ("uninformative" if gates["G7"].get("uninformative") else f"{per_seed['n_meeting']} of {len(relearned)}")
            + ": " + " / ".join(f"{v:.2f}" for v in relearned.values()) if relearned else "-",
            number(mean(s.get("ppl_retain") or {}, "ratio_vs_base"), "×{:.3f}"),
            " / ".join(number(None if d is None else -d, "{:.2f}") for d in drops),
            number(mean(s, "es_relearn_benign", "diff_vs_reference"), "{:+.3f}") + ", " +
            number(mean(s, "es_quant4", "diff_vs_reference"), "{:+.3f}"),
            ", ".join(failed) or "none"]


if args.target:
    header = ["report", "arm", "seeds", "ES forget-eval (≤ 0.10)", "relearned − reference (< 0.10)",
              "relearned Hindi NLL − reference (nats)",
              "seeds meeting G7 alone: worst-case ES", "ppl / base (≤ ×1.05)", "fidelity drop ur / pa / bn (≤ 0.05)",
              "benign, 4-bit − reference (< 0.10)", "gates not passed"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for path in args.reports:
        report = json.loads(path.read_text(encoding="utf-8"))
        for arm in report.get("gates", {}):
            print("| " + " | ".join(target_row(path, report, arm)) + " |")
    raise SystemExit(0)

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
