"""The tables of scripts/ablation.sh's experiments, from their reports.

    python scripts/ablation_table.py runs/exp

Prints (1) the default run against --auto_config, three seeds each, pooled, with wall times, and the one-seed
--auto_config --adaptive_unlearning run against the default run's first seed; and (2) the adaptive-unlearning
ablation on lora: the static trainer (--auto_config alone), full --adaptive_unlearning, and full minus each
component, all with --arms lora in one stage cache (so one set of auto-config decisions), with each variant's paired
difference from the static trainer and from full (prompts paired, seeds resampled crossed with prompts;
mmie.hierarchical_bootstrap_ci and mmie.ppl_ci).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mmie  # noqa: E402

METRICS = ["es_forget_eval", "es_forget_roman", "es_mixed", "fidelity_ur", "fidelity_pa", "fidelity_bn",
           "es_relearn", "empty_rate_forget_eval", "repetition_forget_eval"]
GATES = ["G1", "G1S", "G2", "G3", "G4_ur", "G4_pa", "G4_bn", "G5", "G6", "GH"]
COMPONENTS = ["sine_lora", "reweight", "dualoptim", "curriculum", "stages", "dual_ascent", "early_stop",
              "script_blind", "english_target"]


def load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def seconds(folder: Path, name: str) -> str:
    path = folder / f"{name}.seconds"
    text = path.read_text().strip() if path.is_file() else ""
    return f"{float(text):.0f}s" if text else "still running"


def rows(report: dict, arm: str, key: str, seeds: set[str] | None = None) -> list[list[float]]:
    """Per-prompt outcomes of each finished seed (only `seeds` when given, so that variants run on fewer seeds
    are paired with the same seeds of the reference)."""
    return [outcome["per_prompt"][key] for seed, outcome in sorted(report["arms"][arm]["seeds"].items())
            if outcome["status"] == "ok" and (seeds is None or seed in seeds)]


def seeds_of(report: dict, arm: str) -> set[str]:
    return {seed for seed, outcome in report["arms"][arm]["seeds"].items() if outcome["status"] == "ok"}


def estimate(row: dict | None, digits: int = 3) -> str:
    if not row or row.get("mean") is None:
        return "-"
    low, high = row["ci"] or (row["mean"], row["mean"])
    return f"{row['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def gate_cells(report: dict, arm: str) -> str:
    gates = report["gates"].get(arm, {})
    return " ".join(f"{name}:{'P' if gates[name]['pass'] else 'f'}" for name in GATES if name in gates)


def arm_block(report: dict, arm: str) -> list[str]:
    summary = report["summary"][arm]
    lines = [f"    {metric:24s} {estimate(summary.get(metric))}" for metric in METRICS]
    ppl = summary.get("ppl_retain", {}).get("ratio_vs_base")
    lines.append(f"    {'ppl_retain / base':24s} {estimate(ppl)}")
    lines.append(f"    {'mia_auc':24s} {estimate(summary.get('mia_auc'))}")
    lines.append(f"    gates {gate_cells(report, arm)}   decision {report['decision'].get(arm)}")
    return lines


def paired_difference(variant: dict, static: dict, arm: str, metric: str, options: dict) -> dict:
    """The variant against the reference on the variant's seeds, prompts paired."""
    seeds = seeds_of(variant, arm)
    if metric == "ppl_retain":
        return mmie.ppl_ci(rows(variant, arm, "nll_retain"), rows(variant, arm, "ntok_retain"),
                           base_nll=rows(static, arm, "nll_retain", seeds),
                           base_ntok=rows(static, arm, "ntok_retain", seeds), **options)
    return mmie.hierarchical_bootstrap_ci(rows(variant, arm, metric), base=rows(static, arm, metric, seeds),
                                          **options)


def first_seed_seconds(report: dict) -> float:
    """A multi-seed run's wall time without seeds after the first: the run's seconds less every later seed's arm
    seconds (seeds run one after another; layer selection and set-up are shared), for the one-seed comparisons."""
    later = sum(outcome.get("seconds", 0.0) for arm in report["arms"].values()
                for seed, outcome in arm["seeds"].items() if seed != "0")
    return report["run_seconds"] - later


def comparison(folder: Path) -> None:
    print("== python mmie.py against python mmie.py --auto_config, seeds 0-2 pooled ==")
    for name, label in (("default3", "python mmie.py"), ("auto3", "--auto_config")):
        report = load(folder, name)
        if report is None or "run_seconds" not in report:
            print(f"{label}: not run or still running")
            continue
        print(f"{label}: {seconds(folder, name)} wall time (run {report['run_seconds']:.0f}s; seed 0 alone "
              f"~{first_seed_seconds(report):.0f}s)")
        for arm in report["summary"]:
            print(f"  {arm}")
            print("\n".join(arm_block(report, arm)))
    adaptive, default = load(folder, "adaptive1"), load(folder, "default3")
    if adaptive is not None and default is not None and "run_seconds" in adaptive:
        ratio = adaptive["run_seconds"] / first_seed_seconds(default)
        print(f"\n--auto_config --adaptive_unlearning, seed 0: run {adaptive['run_seconds']:.0f}s = {ratio:.2f}x the "
              "default run's seed 0 (target <= 1.5x)")
        for arm in adaptive["summary"]:
            print(f"  {arm}")
            print("\n".join(arm_block(adaptive, arm)))


def ablation(folder: Path) -> None:
    static, full = load(folder, "static_lora3"), load(folder, "full_lora3")
    if static is None or full is None or "run_seconds" not in full:
        print("ablation: static_lora3 or full_lora3 missing")
        return
    options = {"n_boot": 2000, "ci_level": 0.95, "seed": 0}
    variants = {"static trainer (--auto_config)": static, "full adaptive": full}
    variants |= {f"full minus {part}": load(folder, f"no_{part}") for part in COMPONENTS}
    print("\n== adaptive unlearning ablation: lora, --arms lora, one set of auto-config decisions ==")
    for label, report in variants.items():
        if report is None or "run_seconds" not in report or "lora" not in report["summary"]:
            print(f"{label}: not run or still running")
            continue
        print(f"{label} (seeds {', '.join(sorted(seeds_of(report, 'lora')))})")
        print("\n".join(arm_block(report, "lora")))
        references = [("static", static)] + ([("full", full)] if report is not full else [])
        for name, reference in references if report is not static else []:
            for metric in ("es_forget_eval", "es_forget_roman", "es_mixed", "fidelity_ur", "ppl_retain"):
                diff = paired_difference(report, reference, "lora", metric, options)
                what = f"ratio to {name}" if metric == "ppl_retain" else f"minus {name}"
                print(f"      {metric} {what}: {estimate(diff)}")
    print("\nnon-finite losses: every variant ran (a NaN or inf stops an arm with NonFiniteLoss, recorded as failed):")
    for label, report in variants.items():
        if report is not None and "run_seconds" in report:
            failed = mmie.failed_arms(report)
            print(f"  {label}: {'none failed' if not failed else failed}")


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/exp")
    comparison(folder)
    ablation(folder)


if __name__ == "__main__":
    main()
