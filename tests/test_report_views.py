"""Report views (mmie.py section 8): figures, the console table with its legend, example outputs and the
closing summary, all from a small synthetic report built here (the pipeline is not run)."""

import re

import numpy as np
import pytest

from mmie import (METRIC_LEGEND, TABLE_METRICS, closing_summary, compact_number, figure_forget_vs_utility,
                  print_table, render_table, table_lines, write_figures)

THRESHOLDS = {"gate_es_forget_ratio": 0.5, "gate_es_mixed_ratio": 0.7, "gate_ppl_ratio": 1.10,
              "gate_fidelity_drop": 0.10, "gate_mia_margin": 0.05, "gate_es_adv_ratio": 0.7}
PROMPTS = ["राम ने कहा कि", "आज मौसम बहुत", "भारत की राजधानी", "मेरे दोस्त ने", "कल हम बाज़ार", "यह किताब बहुत"]


def row(mean, half=0.05):
    return {"mean": mean, "ci": [mean - half, mean + half], "n": 40}


def arm_summary(es, ppl, ratio, fidelity, mia=0.5, empty=0.0):
    summary = {"es_forget_train": row(es + 0.02), "es_forget_eval": row(es), "es_semantic": row(es / 4, 0.02),
               "es_forget_roman": row(es * 0.8), "es_mixed": row(es * 0.6), "es_adversarial": row(es * 0.9),
               "token_kl_retain": row(0.02 if ratio and ratio < 2 else 9.7, 0.01), "mia_auc": row(mia, 0.04),
               "es_relearn": row(min(es * 1.5, 1.0)), "empty_rate_forget_eval": row(empty, 0.01),
               "repetition_forget_eval": row(0.03, 0.01),
               "ppl_retain": {**row(ppl, ppl / 10), **({"ratio_vs_base": row(ratio, ratio / 10)} if ratio else {})}}
    return summary | {f"fidelity_{lang}": row(value) for lang, value in fidelity.items()}


def gate(p_adj, passed, **fields):
    return {"p": p_adj / 2, "p_adj": p_adj, "pass": passed, "evaluated": True, "applicable": True,
            "uninformative": False, "reason": None, **fields}


def ratio_gate(p_adj, passed, ratio, threshold, metric):
    return gate(p_adj, passed, ratio=ratio, threshold=threshold, arm_mean=0.8 * ratio, base_mean=0.8, metric=metric)


def health(p_adj, passed, increase):
    components = {"forget_eval/empty_rate": {"p": p_adj, "increase": increase, "margin": 0.05},
                  "retain/repetition": {"p": 0.01, "increase": 0.01, "margin": 0.05}}
    return gate(p_adj, passed, components=components, worst="forget_eval/empty_rate", metric="output_health")


def arm_gates(es_ratio, nll_increase, drops, auc, empty_increase, passed):
    g = {"G1": ratio_gate(0.01 if passed else 0.62, passed, es_ratio, 0.5, "es_forget_eval"),
         "G1S": ratio_gate(0.02, True, 0.3, 0.5, "es_forget_roman"),
         "G2": gate(0.01 if passed else 0.71, passed, nll_increase=nll_increase, threshold=1.10, metric="nll_retain"),
         "G3": ratio_gate(0.03, True, 0.4, 0.7, "es_mixed")}
    for lang, drop in drops.items():
        g[f"G4_{lang}"] = gate(0.02 if drop < 0.1 else 0.55, drop < 0.1, drop=drop, threshold=0.10,
                               metric=f"fidelity_{lang}")
    g["G5"] = gate(0.04 if abs(auc - 0.5) < 0.05 else 0.48, abs(auc - 0.5) < 0.05, estimate=auc, threshold=0.05,
                   metric="mia_auc")
    g["G6"] = ratio_gate(0.03 if passed else 0.66, passed, 0.4 if passed else 0.91, 0.7, "es_adversarial")
    g["GH"] = health(0.02 if empty_increase < 0.05 else 0.9, empty_increase < 0.05, empty_increase)
    return g


def train_log(steps, seed, forget_start=3.0):
    rng = np.random.default_rng(seed)
    log = []
    for step in range(steps):
        kind = "forget" if step % 2 == 0 else "retain"
        loss = forget_start + 0.04 * step if kind == "forget" else 2.0 + 0.1 * rng.random()
        log.append({"step": step, "kind": kind, "loss": float(loss + 0.2 * rng.random())})
    return log


def outcome(outputs, log=None, stages=None):
    info = {} if log is None else {"train_log": log}
    if stages:
        info["adaptive"] = {"stages": stages}
    return {"status": "ok", "error": None, "outputs": {"forget_eval": outputs}, "info": info}


def make_report():
    """base + lora (passes except G2 and G4_ur) + reft (collapsed: ppl x1.2e6, empty outputs) + prompt
    (deterministic: G2 not applicable, G5 uninformative, G1S not evaluated), 2 seeds of lora with stages."""
    stages = [{"stage": "forget", "start_step": 0, "end_step": 24, "trigger": "start"},
              {"stage": "repair", "start_step": 24, "end_step": 40, "trigger": "retain NLL +5%"}]
    base_fid = {"ur": 0.92, "pa": 0.85, "bn": 0.95}
    summary = {"base": arm_summary(0.82, 23.4, None, base_fid, mia=0.51),
               "lora": arm_summary(0.11, 30.9, 1.32, {"ur": 0.70, "pa": 0.84, "bn": 0.94}, mia=0.52),
               "reft": arm_summary(0.01, 5123456.7, 218945.3, {"ur": 0.02, "pa": 0.01, "bn": 0.0}, mia=0.62,
                                   empty=0.66),
               "prompt": arm_summary(0.7, 23.4, 1.0, {"ur": 0.9, "pa": 0.85, "bn": 0.93}, mia=0.51)}
    gates = {"lora": arm_gates(0.13, np.log(1.32), {"ur": 0.22, "pa": 0.01, "bn": 0.01}, 0.52, 0.0, True),
             "reft": arm_gates(0.85, 12.3, {"ur": 0.9, "pa": 0.84, "bn": 0.95}, 0.62, 0.66, False),
             "prompt": arm_gates(0.85, 0.0, {"ur": 0.02, "pa": 0.0, "bn": 0.02}, 0.51, 0.0, False)}
    gates["lora"]["G2"].update(p_adj=0.31, **{"pass": False})
    gates["lora"]["G3"]["underpowered"] = {"n": 20, "n_needed": 64}
    gates["prompt"]["G2"] = {"p": None, "p_adj": None, "pass": False, "evaluated": True, "applicable": False,
                             "reason": "prompt-only arm: the weights are the base model's", "metric": "nll_retain"}
    gates["prompt"]["G5"].update(uninformative=True, reason="the base model's MIA AUC is already 0.51")
    gates["prompt"]["G1S"] = {"p": None, "p_adj": None, "pass": False, "evaluated": False,
                              "reason": "es_forget_roman missing or empty in the base arm", "metric": "es_forget_roman"}
    lrs = np.geomspace(1e-6, 1, 60)  # a range test: flat, falling, then diverging
    smoothed = 2.5 - 0.8 / (1 + np.exp(-2 * (np.log10(lrs) + 4))) + np.expm1(3 * np.clip(np.log10(lrs) + 1.5, 0, None))
    lr_curve = {"lr": lrs.tolist(), "loss": (smoothed + np.random.default_rng(0).normal(0, 0.05, 60)).tolist(),
                "smoothed": smoothed.tolist()}
    return {
        "config": {**THRESHOLDS, "fdr_q": 0.10, "ci_level": 0.95, "forget_obj": "npo", "retain_obj": "kl"},
        "statistics_config": {**THRESHOLDS, "fdr_q": 0.10, "ci_level": 0.95},
        "auto_config": {"lr": {"value": 3e-4, "rule": "steepest descent of the smoothed loss",
                               "inputs": {"curve": lr_curve}},
                        "train_batch_size": {"value": 16, "rule": "memory", "inputs": {}}},
        "prompts": {"forget_eval": {"n": len(PROMPTS), "prompts": PROMPTS}},
        "arms": {"base": {"deterministic": True, "seeds": {"0": outcome([p + " बाज़ार गए" for p in PROMPTS])}},
                 "lora": {"deterministic": False, "seeds": {
                     str(s): outcome(["The weather is nice today\nand sunny"] * 6, train_log(40, s), stages)
                     for s in (0, 1)}},
                 "reft": {"deterministic": False, "seeds": {
                     "0": outcome(["", "... ... ...", "", "", "", ""], train_log(40, 0, forget_start=50.0)),
                     "1": {"status": "failed", "error": "RuntimeError: CUDA out of memory"}}},
                 "prompt": {"deterministic": True, "seeds": {"0": outcome(["मैं यह नहीं कह सकता " * 20] * 6)}}},
        "summary": summary,
        "gates": gates,
        "decision": {"lora": "STOP", "reft": "STOP", "prompt": "STOP"},
    }


@pytest.fixture
def report():
    return make_report()


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
def test_write_figures_writes_four_readable_pngs(report, tmp_path):
    from matplotlib.image import imread

    paths = write_figures(report, tmp_path / "run")
    assert sorted(p.name for p in paths) == ["forget_vs_utility.png", "gates.png", "related_languages.png",
                                             "training.png"]
    for path in paths:
        assert path.parent == tmp_path / "run" and path.stat().st_size > 20_000
        image = imread(path)
        height, width = image.shape[:2]
        assert 600 <= height <= 3000 and 900 <= width <= 3000, (path.name, image.shape)
        assert image.std() > 0.05  # something is drawn, not a blank canvas


def test_write_figures_skips_only_the_figures_whose_data_is_missing(report, tmp_path):
    for arm in report["arms"].values():
        for seed in arm["seeds"].values():
            seed.get("info", {}).pop("train_log", None)
    del report["auto_config"], report["gates"]
    assert [p.name for p in write_figures(report, tmp_path)] == ["forget_vs_utility.png", "related_languages.png"]
    assert write_figures({"arms": {}, "summary": {}}, tmp_path / "empty") == []


def test_forget_vs_utility_switches_to_log_scale_for_a_collapsed_arm(report):
    assert figure_forget_vs_utility(report).axes[0].get_yscale() == "log"
    del report["summary"]["reft"]
    assert figure_forget_vs_utility(report).axes[0].get_yscale() == "linear"


def test_write_figures_raises_on_malformed_data(report, tmp_path):
    report["arms"]["lora"]["seeds"]["0"]["info"]["adaptive"]["stages"][0].pop("start_step")
    with pytest.raises(KeyError, match="start_step"):
        write_figures(report, tmp_path)


# ---------------------------------------------------------------------------------------------
# Console table
# ---------------------------------------------------------------------------------------------
def test_compact_number_keeps_cells_short():
    assert compact_number(5123456.7) == "5.12e6"
    assert compact_number(5123456.7, 2) == "5.1e6"
    assert compact_number(0.853) == "0.853"
    assert compact_number(0.05) == "0.050"
    assert compact_number(1.1) == "1.10"
    assert compact_number(23.41) == "23.4"
    assert compact_number(0.00012, 2) == "1.2e-4"
    assert compact_number(None) == "-" and compact_number(0.0) == "0"
    assert all(len(compact_number(x)) <= 7 for x in [1e-9, -3e-5, 0.0123, 999.9, 9999.4, 1e12, -7.7e8])


def table_blocks(text, first_label):
    """Every block of the table whose header starts with first_label: lists of lines up to a blank line."""
    lines, blocks = text.splitlines(), []
    for i, line in enumerate(lines):
        if line.startswith(first_label):
            end = next((j for j in range(i, len(lines)) if not lines[j].strip()), len(lines))
            blocks.append(lines[i:end])
    return blocks


def assert_columns_apart(block, n_columns):
    """All rows as long as the header (cells right-aligned in their column), and splitting on two or more
    spaces gives exactly one field per column: no value runs into its neighbour."""
    for line in block:
        assert len(line) == len(block[0]), line
        assert len(re.split(r"\s{2,}", line.strip())) == n_columns, line


@pytest.mark.parametrize("width", [400, 80])
def test_print_table_columns_fit_their_values(report, capsys, monkeypatch, width):
    monkeypatch.setenv("COLUMNS", str(width))
    print_table(report)
    out = capsys.readouterr().out
    metric_blocks, gate_blocks = table_blocks(out, "metric (mean"), table_blocks(out, "gate (result")
    assert len(metric_blocks) == (1 if width == 400 else 2) and len(gate_blocks) >= 1
    for block in metric_blocks + gate_blocks:
        assert_columns_apart(block, len(re.split(r"\s{2,}", block[0].strip())))
        assert all(len(line) <= width for line in block)
    assert {line.split()[0] for block in metric_blocks for line in block[1:]} >= {"ppl_retain", "ppl_retain_ratio"}
    assert "5.12e6 [4.6e6,5.6e6]" in out  # the collapsed arm's perplexity, compact


def test_render_table_aligns_and_splits_wide_tables():
    header, rows = ["name", "a", "b", "c"], [["x", "1", "22222", "3"], ["longer name", "5123456.7", "-", "0.5"]]
    lines = render_table(header, rows, max_width=1000)
    assert lines[0] == "name                 a      b    c"
    assert lines[2] == "longer name  5123456.7      -  0.5"
    split = render_table(header, rows, max_width=25)
    assert "" in split and all(len(line) <= 25 for line in split)
    assert sum(line.startswith("name") for line in split) == 2


def test_gate_table_marks_not_applicable_not_evaluated_and_uninformative(report):
    text = "\n".join(table_lines(report, max_width=400))
    gate_rows = {line.split()[0]: re.split(r"\s{2,}", line.strip())[1:] for line in table_blocks(text, "gate")[0][1:]}
    lora, reft, prompt = zip(*gate_rows.values())
    assert gate_rows["G2"][2] == "n/a" and gate_rows["G1S"][2] == "not evaluated"
    assert gate_rows["G5"][2] == "uninf* 0.040" and gate_rows["G3"][0] == "PASS^ 0.030"
    assert gate_rows["G2"][0] == "fail 0.31" and gate_rows["decision"] == ["STOP", "STOP", "STOP"]
    assert "* uninformative" in text and "^ underpowered" in text and "n/a: " in text and "not evaluated: " in text


def test_legend_describes_every_metric_and_gate_shown(report):
    lines = table_lines(report, max_width=400)
    legend = {line.split()[0]: line.split(None, 1)[1] for line in lines[lines.index("legend:") + 1:]}
    text = "\n".join(lines)
    shown = {line.split()[0] for block in table_blocks(text, "metric") + table_blocks(text, "gate")
             for line in block[1:]} - {"decision"}
    assert shown <= set(legend)
    assert not any("not described" in description for description in legend.values())
    assert legend["G1"] == "forget: ES on forget-eval below 0.5 x base ES"
    assert legend["G4_ur"].startswith("related language: Urdu fidelity drops by less than 0.1")
    assert "switch script" in legend["es_semantic"]
    assert set(TABLE_METRICS) | {"G1", "G1S", "G2", "G3", "G4_ur", "G5", "G6", "GH"} <= set(METRIC_LEGEND)


@pytest.mark.parametrize("n", [0, 2, 10])
def test_show_outputs_prints_the_requested_number_of_examples(report, capsys, monkeypatch, n):
    monkeypatch.setenv("COLUMNS", "100")
    print_table(report, show_outputs=n)
    out = capsys.readouterr().out
    shown = min(n, len(PROMPTS))
    prompt_lines = [line for line in out.splitlines() if re.match(r"\s+#\d+\s+prompt\s+\|", line)]
    assert len(prompt_lines) == shown
    if n == 0:
        assert "example outputs" not in out
        return
    assert f"({shown} of {len(PROMPTS)} prompts" in out
    for arm in ("base", "lora", "reft", "prompt"):
        arm_lines = [line for line in out.splitlines() if re.match(rf"\s+{arm}\s+\|", line)]
        assert len(arm_lines) == shown
        assert all(len(line) <= 100 for line in arm_lines)
    assert "The weather is nice today \u23ce and sunny" in out and "(empty)" in out and "\u2026" in out


# ---------------------------------------------------------------------------------------------
# Closing summary
# ---------------------------------------------------------------------------------------------
def test_closing_summary_names_failed_gates_with_their_numbers(report):
    text = "\n".join(closing_summary(report))
    blocks = {block.split(":")[0]: block for block in re.split(r"\n  (?=\S)", text)[1:]}  # one per arm
    lora, reft, prompt = (blocks[arm].split(": ", 1)[1] for arm in ("lora", "reft", "prompt"))
    assert lora.startswith("STOP (8 of 10 gates passed)")
    assert "G2: retain perplexity x1.32, needs < x1.10 (p_adj 0.31)" in lora
    assert "G4_ur: Urdu fidelity drop 0.22, needs < 0.10" in lora
    assert "underpowered    G3: 20 prompts, about 64 needed" in lora and "G1:" not in lora
    assert "G1: ES 0.85 of base, needs < 0.50" in reft
    assert "G2: retain perplexity x2.2e5, needs < x1.10" in reft
    assert "G5: MIA AUC 0.62, needs 0.45-0.55" in reft
    assert "G6: adversarial ES 0.91 of base, needs < 0.70" in reft
    assert "GH: output collapsed: empty outputs +0.66 on forget_eval (needs < +0.05; p_adj 0.90)" in reft
    assert "seed 1: RuntimeError: CUDA out of memory" in reft
    assert "not applicable  G2: prompt-only arm: the weights are the base model's" in prompt
    assert "not evaluated   G1S: es_forget_roman missing or empty in the base arm" in prompt
    assert "uninformative   G5: the base model's MIA AUC is already 0.51 (MIA AUC 0.51, needs 0.45-0.55)" in prompt


def test_closing_summary_says_when_a_good_estimate_is_not_significant(report):
    report["gates"]["lora"]["G1"].update(ratio=0.45, p_adj=0.21, **{"pass": False})
    text = "\n".join(closing_summary(report))
    assert "G1: ES 0.45 of base, needs < 0.50 (the estimate is within it but not significant: p_adj 0.21 > q 0.1)" \
        in text


def test_closing_summary_proceed_and_missing_fields(report):
    report["gates"] = {"lora": {name: {"p": 0.01, "p_adj": 0.02, "pass": True} for name in ("G1", "G2")},
                       "reft": {"G1": {"p_adj": 0.5, "pass": False}, "G4_ur": {"p_adj": 0.5, "pass": False},
                                "GH": {"p_adj": 0.5, "pass": False, "components": {}}, "G9": {"p_adj": 0.5}}}
    report["decision"] = {"lora": "PROCEED", "reft": "STOP"}
    del report["statistics_config"], report["config"]["fdr_q"]
    lines = closing_summary(report)
    text = "\n".join(lines)
    assert "  lora: PROCEED (all 2 gates passed)" in lines
    assert "G1: ES ratio to base not available (base ES not recorded), threshold not recorded (p_adj 0.50)" in text
    assert "G4_ur: Urdu fidelity drop not recorded, threshold not recorded" in text
    assert "GH: output health components not recorded" in text
    assert "G9: estimate not recorded, threshold not recorded" in text
    assert lines[0].startswith("conclusion (") and "q =" not in lines[0]


def test_read_report_rejects_what_is_not_a_report(report, tmp_path):
    from mmie import InputError, json_safe, read_report, write_json_atomic

    write_json_atomic(tmp_path / "report.json", report)
    assert read_report(tmp_path / "report.json") == json_safe(report)
    (tmp_path / "other.json").write_text('{"summary": {}}', encoding="utf-8")
    with pytest.raises(InputError, match="not an MMIE report"):
        read_report(tmp_path / "other.json")
    with pytest.raises(InputError, match="cannot read a report"):
        read_report(tmp_path / "missing.json")


def test_plot_flag_draws_the_figures_of_a_report_and_prints_its_table(report, tmp_path, capsys):
    import mmie

    mmie.write_json_atomic(tmp_path / "report.json", report)
    mmie.main(["--plot", str(tmp_path / "report.json"), "--show_outputs", "1"])
    out = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["forget_vs_utility.png", "gates.png",
                                                               "related_languages.png", "training.png"]
    assert "legend:" in out and "example outputs on forget_eval (1 of 6" in out and "conclusion" in out
    assert "mmie: 4 figures written beside" in out
