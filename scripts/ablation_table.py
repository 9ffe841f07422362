"""The tables of scripts/ablation.sh's experiments, from their reports.

    python scripts/ablation_table.py runs/exp

Prints (1) the default run against --auto_config, three seeds each, pooled, with wall times; and (2) the
adaptive-unlearning ablation: the static trainer (static3: --auto_config alone, in the adaptive runs' stage cache so
that it shares their auto-config decisions), full --adaptive_unlearning, and full minus each component, with each
variant's paired difference from the static trainer (prompts paired, seeds resampled crossed with prompts;
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
              "script_blind"]


def load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def seconds(folder: Path, name: str) -> str:
    path = folder / f"{name}.seconds"
    return f"{float(path.read_text()):.0f}s" if path.is_file() else "-"


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


def comparison(folder: Path) -> None:
    print("== python mmie.py against python mmie.py --auto_config ==")
    runs = (("default1", "python mmie.py, seed 0"), ("auto1", "--auto_config, seed 0"),
            ("default3", "python mmie.py, seeds 0-2"), ("auto3", "--auto_config, seeds 0-2"))
    for name, label in runs:
        report = load(folder, name)
        if report is None:
            print(f"{label}: not run")
            continue
        print(f"{label}: {seconds(folder, name)} wall time")
        for arm in report["summary"]:
            print(f"  {arm}")
            print("\n".join(arm_block(report, arm)))


def ablation(folder: Path) -> None:
    static, full = load(folder, "static3"), load(folder, "adaptive3")
    if static is None or full is None:
        print("ablation: static3 or adaptive3 missing")
        return
    options = {"n_boot": 2000, "ci_level": 0.95, "seed": 0}
    # the one-seed component variants are compared with one-seed references run with their --arms (auto-config
    # decisions depend on the arms, and the CPU batch-size rule on the machine's load at the time)
    static1, full1 = load(folder, "static_lora1") or static, load(folder, "full_lora1") or full
    variants = {"static trainer (--auto_config)": static, "full adaptive": full,
                "static trainer, same decisions as the variants": static1, "full adaptive, same decisions": full1}
    variants |= {f"full minus {part}": load(folder, f"no_{part}") for part in COMPONENTS}
    print("\n== adaptive unlearning ablation: lora (3 seeds) ==")
    for label, report in variants.items():
        if report is None or "lora" not in report["summary"]:
            print(f"{label}: missing")
            continue
        print(f"{label} (seeds {', '.join(sorted(seeds_of(report, 'lora')))})")
        print("\n".join(arm_block(report, "lora")))
        one_seed = report not in (static, full)
        references = [("static", static1 if one_seed else static)]
        references += [("full", full1 if one_seed else full)] if report not in (full, full1) else []
        for name, reference in references if report not in (static, static1) else []:
            for metric in ("es_forget_eval", "es_forget_roman", "es_mixed", "fidelity_ur", "ppl_retain"):
                diff = paired_difference(report, reference, "lora", metric, options)
                what = f"ratio to {name}" if metric == "ppl_retain" else f"minus {name}"
                print(f"      {metric} {what}: {estimate(diff)}")
    for arm in ("reft", "dsg"):
        if arm in full["summary"] and arm in static["summary"]:
            print(f"\n== {arm}: static vs full adaptive (3 seeds) ==")
            for label, report in (("static", static), ("full adaptive", full)):
                print(f"{label}")
                print("\n".join(arm_block(report, arm)))
            diff = paired_difference(full, static, arm, "es_forget_eval", options)
            print(f"      es_forget_eval full minus static: {estimate(diff)}")
    no_gate = load(folder, "no_dynamic_gate")
    if no_gate is not None and "dsg" in no_gate["summary"]:
        print("\n== dsg under --adaptive_unlearning without the dynamic gate (the static published clamp) ==")
        print("\n".join(arm_block(no_gate, "dsg")))
        diff = paired_difference(full, no_gate, "dsg", "es_forget_eval", options)
        print(f"      es_forget_eval dynamic minus static clamp: {estimate(diff)}")
    print("\nnon-finite losses: every variant ran (a NaN or inf stops an arm with NonFiniteLoss, recorded as failed):")
    for label, report in variants.items():
        if report is not None:
            failed = mmie.failed_arms(report)
            print(f"  {label}: {'none failed' if not failed else failed}")


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/exp")
    comparison(folder)
    ablation(folder)


if __name__ == "__main__":
    main()
