"""Bad input gets one clear line naming the file, line or flag, before any slow work; never a traceback.
Most checks run in process (mmie.main raises InputError, which the command line prints as one line with exit
status 2); a few run the real command line to show the line, the status and the absence of a traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mmie

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "mmie.py"), *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("mmie: error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def fails_with(args, *fragments):
    with pytest.raises(mmie.InputError) as caught:
        mmie.main([str(a) for a in args])
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_the_command_line_prints_one_line_and_exits_2(tmp_path):
    assert_one_line_error(run_cli("--npo_beta", "0"), "--npo_beta must be greater than 0 (got 0.0)")
    path = write(tmp_path / "notjson.jsonl", b'{"text": "ok"}\n{"text": broken\n')
    assert_one_line_error(run_cli("--forget", str(path)), "notjson.jsonl:2: not a JSON object")


@pytest.mark.parametrize("name,content,fragments", [
    ("missing.jsonl", None, ["missing.jsonl: file not found", "--forget"]),
    ("empty.jsonl", b"\n\n", ["empty.jsonl: the set is empty", "--forget"]),
    ("notext.jsonl", b'{"text": "ok"}\n{"body": "no text field"}\n', ["notext.jsonl:2:", "\"text\" field"]),
    ("badtext.jsonl", b'{"text": 42}\n', ["badtext.jsonl:1:", "non-empty string"]),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ["latin1.jsonl:2: not UTF-8"]),
])
def test_bad_forget_file(tmp_path, name, content, fragments):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    fails_with(["--forget", path], *fragments)


def test_set_too_small_to_split(tmp_path):
    path = write(tmp_path / "one.jsonl", b'{"text": "just one line of text here"}\n')
    fails_with(["--mixed", path], "one.jsonl", "empty train or eval split")


def test_a_set_of_duplicates_says_duplicates(tmp_path):
    """It said "empty train or eval split", which sends the user looking for the wrong problem."""
    path = write(tmp_path / "dups.jsonl", b'{"text": "the same line again and again"}\n' * 50)
    fails_with(["--mixed", path], "dups.jsonl", "50 lines but only 1 distinct texts (duplicates)")


def test_a_byte_order_mark_is_accepted(tmp_path):
    """Editors on Windows write one; it made the first line "not a JSON object"."""
    source = (REPO / "data/mixed.jsonl").read_bytes()
    path = write(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + source)
    texts, _ = mmie.read_jsonl(path, "--mixed")
    assert texts == mmie.read_jsonl(REPO / "data/mixed.jsonl", "--mixed")[0]


@pytest.mark.parametrize("args,fragments", [
    (["--seeds", "-1"], ["--seeds must be at least 0 (got -1)"]),
    (["--stats_seed", "-1"], ["--stats_seed must be at least 0 (got -1)"]),
    (["--layer_sample", "1"], ["--layer_sample must be at least 2 (got 1)"]),
    (["--npo_beta", "0"], ["--npo_beta must be greater than 0"]),
    (["--dsg_quantile", "1.5"], ["--dsg_quantile must be in (0, 1)", "1.5"]),
    (["--sae_batch_size", "0"], ["--sae_batch_size must be at least 1"]),
    (["--fdr_q", "0"], ["--fdr_q must be in (0, 1)"]),
    (["--ga_bound", "0"], ["--ga_bound must be greater than 0"]),
    (["--sample_cap", "0"], ["--sample_cap must be at least 1"]),
    (["--seeds", "1", "1"], ["--seeds has repeated values"]),
    (["--show_outputs", "-2"], ["--show_outputs must be at least 0"]),
    (["--load_in_8bit", "--device", "cpu"], ["--load_in_8bit needs a CUDA device"]),
    (["--device", "cuda"], ["--device cuda: no CUDA device"]),
    (["--model", "./no/such/folder"], ["--model ./no/such/folder: no such folder", "tiny-lm"]),
])
def test_bad_flags_fail_before_slow_work(args, fragments):
    fails_with(args, *fragments)


def test_every_numeric_flag_has_a_range_check():
    """Validation is declared with each flag, so a new numeric flag without a range is caught here."""
    parser = mmie.build_parser()
    unchecked = [action.option_strings[0] for action in parser._actions
                 if action.type in (int, float) and getattr(action, "check", None) is None]
    assert unchecked == []


@pytest.mark.parametrize("flag", ["--min_layer", "--force_layers"])
def test_layer_flags_beyond_the_model(tmp_path, flag):
    """--min_layer beyond the model silently fell back to all layers; --force_layers was checked only after
    every layer had been scored."""
    fails_with([flag, 9, "--arms", "--out", tmp_path / "r", "--ckpt_dir", tmp_path / "c"], f"{flag} ",
               "the model has layers 0..3")


@pytest.mark.parametrize("flag", ["--out", "--ckpt_dir"])
def test_unwritable_outputs_fail_before_slow_work(tmp_path, flag):
    """A read-only --out or --ckpt_dir crashed with a traceback after layer selection and the base arm. A folder
    below a regular file cannot be created by anyone (root included), like a folder on a read-only mount."""
    blocker = write(tmp_path / "a_file", b"not a folder")
    other = "--ckpt_dir" if flag == "--out" else "--out"
    fails_with([flag, blocker / "inside", other, tmp_path / "fine"], f"{flag} {blocker / 'inside'}: cannot write")


def test_a_forget_set_in_the_wrong_language_is_refused(tmp_path):
    """A forget set that is all English used to give a warning and a meaningless run."""
    path = write(tmp_path / "forget.jsonl", (REPO / "data/retain_en.jsonl").read_bytes())
    fails_with(["--forget", path], "forget.jsonl: 100% of", "not identified as hi in Deva",
               "--max_language_mismatch")
    args = mmie.build_parser().parse_args(["--forget", str(path), "--max_language_mismatch", "1"])
    checks = mmie.check_sets(mmie.load_sets(args), mmie.LIDEnsemble(), args.max_language_mismatch)
    assert checks["forget"]["share_disagree"] == 1.0  # allowed by the flag, and still reported


def test_language_mismatch_is_warned_with_share(tmp_path, lid, capsys):
    english, hindi = lines(REPO / "data/retain_en.jsonl"), lines(REPO / "data/forget_hi.jsonl")
    path = write(tmp_path / "forget.jsonl", "\n".join(hindi[:70] + english[:30]).encode())
    args = mmie.build_parser().parse_args(["--forget", str(path)])
    checks = mmie.check_sets(mmie.load_sets(args), lid, args.max_language_mismatch)
    assert checks["forget"]["share_disagree"] == pytest.approx(0.30)
    assert "30% of 100 texts are not identified as hi in Deva" in capsys.readouterr().err


def test_forget_retain_overlap_is_reported(tmp_path, lid, capsys):
    english, hindi = lines(REPO / "data/retain_en.jsonl"), lines(REPO / "data/forget_hi.jsonl")
    path = write(tmp_path / "forget.jsonl", "\n".join(hindi[:100] + english[:5]).encode())
    args = mmie.build_parser().parse_args(["--forget", str(path)])
    checks = mmie.check_sets(mmie.load_sets(args), lid, args.max_language_mismatch)
    assert checks["forget_retain_overlap"] == 5
    assert "5 texts are in both the forget set" in capsys.readouterr().err


@pytest.mark.parametrize("content,fragment", [("42", "not an MMIE report"), ("{}", "not an MMIE report"),
                                              ('{"arms": {}}', "not an MMIE report"), ("[1, 2", "cannot read")])
def test_aggregate_of_something_that_is_not_a_report(tmp_path, content, fragment):
    """A JSON number printed a traceback; an empty object printed an empty table."""
    path = write(tmp_path / "x.json", content.encode())
    fails_with(["--aggregate", path, "--out", tmp_path / "p.json"], f"{path}: {fragment}")
    fails_with(["--plot", path], f"{path}: {fragment}")


def test_arms_flag_with_no_names_is_the_base_evaluation_alone():
    assert mmie.build_parser().parse_args(["--arms"]).arms == []
    assert mmie.build_parser().parse_args([]).arms == mmie.DEFAULT_ARMS and "distill" not in mmie.DEFAULT_ARMS


def test_given_flags_are_what_the_command_line_names():
    parser = mmie.build_parser()
    assert mmie.given_flags(parser, ["--lora_lr", "0.1", "--seeds", "0", "1", "--fresh"]) == {"lora_lr", "seeds",
                                                                                               "fresh"}
    assert mmie.given_flags(parser, ["--lora_lr=0.1"]) == {"lora_lr"}
    assert mmie.given_flags(parser, []) == set()


# --- the last bad inputs of a new user's sweep: each failed late, with a traceback, or not at all -----------------
def test_parser_errors_are_one_line_with_a_did_you_mean():
    """argparse printed its 89-line usage before the line that matters, and no suggestion for a close flag."""
    result = run_cli("--lid_languagez", "hi")
    assert_one_line_error(result, "unrecognized arguments: --lid_languagez", "did you mean --lid_languages")
    assert "usage:" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,fragments", [
    (["--ga_bound", "inf"], ["--ga_bound must be a finite number (got inf)"]),  # accepted, then a NaN loss at step 0
    (["--lora_lr", "nan"], ["--lora_lr must be a finite number"]),
    (["--plot", "a.json", "--aggregate", "b.json"], ["--plot and --aggregate cannot be combined"]),  # ignored aggregate
    (["--lid_languages", "zz"], ["--lid_languages zz: not a language"]),  # accepted silently
    (["--forget", "data"], ["data: a folder, not a JSONL file (given by --forget)"]),  # said "file not found"
])
def test_more_bad_flags_fail_before_slow_work(args, fragments):
    fails_with(args, *fragments)


@pytest.mark.parametrize("args,fragments", [
    (["--lora_targets", "nosuchmodule"], ["--lora_targets nosuchmodule: no such linear module", "q_proj"]),
    (["--sample_cap", "1"], ["prompt set has 1 distinct prompt(s)", "--sample_cap"]),  # TypeError after 80 s
])
def test_model_dependent_checks_fail_before_layer_selection(tmp_path, args, fragments):
    fails_with([*args, "--out", tmp_path / "r", "--ckpt_dir", tmp_path / "c"], *fragments)


def test_a_tiny_set_that_still_splits_is_refused_up_front(tmp_path):
    """3 train texts and 1 eval text failed every arm after ~65 s (scikit-learn's k-fold with n_splits=1)."""
    hindi = lines(REPO / "data/forget_hi.jsonl")
    from lid_ensemble import is_eval_text
    train = [t for t in hindi if not is_eval_text(json.loads(t)["text"])][:3]
    held = [t for t in hindi if is_eval_text(json.loads(t)["text"])][:2]
    path = write(tmp_path / "tiny.jsonl", "\n".join(train + held).encode())
    fails_with(["--forget", path, "--out", tmp_path / "r", "--ckpt_dir", tmp_path / "c"], "tiny.jsonl",
               "split has", "--probe_folds")


def test_an_empty_model_folder_gets_a_whole_sentence(tmp_path):
    (tmp_path / "empty").mkdir()
    fails_with(["--model", tmp_path / "empty", "--out", tmp_path / "r", "--ckpt_dir", tmp_path / "c"],
               "no config.json in the folder", "--model", "tiny-lm")


@pytest.mark.parametrize("mode", ["--plot", "--aggregate"])
def test_plot_and_aggregate_into_a_folder_that_cannot_be_written(tmp_path, mode):
    """An OSError traceback after the work; the main run checked this up front already."""
    blocker = write(tmp_path / "a_file", b"not a folder")
    report = blocker / "inside" / "report.json"
    args = ["--plot", report] if mode == "--plot" else ["--aggregate", tmp_path / "x.json", "--out", report]
    fails_with(args, "cannot write")


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_an_interrupt_during_set_up_exits_130_with_the_resume_line(signum):
    """Ctrl-C during set-up printed a KeyboardInterrupt traceback; SIGTERM before the handler exited 143 silently."""
    import signal
    import time

    process = subprocess.Popen([sys.executable, str(REPO / "mmie.py"), "--arms"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(3)  # importing torch and transformers, loading the language identifier: set-up
    process.send_signal(getattr(signal, signum))
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "run the same command again to resume" in err


def test_sigterm_is_never_swallowed_by_a_library_that_catches_exceptions():
    """scikit-learn's cross-validation reported the handler's exception as one failed fit and the run went on for
    40 minutes: the interrupt is a BaseException now, which `except Exception` does not catch."""
    assert not issubclass(mmie.Interrupted, Exception) and issubclass(mmie.Interrupted, BaseException)
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    class Interrupting(LogisticRegression):
        def fit(self, X, y):
            raise mmie.Interrupted("SIGTERM")

    X, y = [[0.0], [1.0]] * 5, [0, 1] * 5
    with pytest.raises(mmie.Interrupted):
        cross_val_score(Interrupting(), X, y, cv=2, error_score=float("nan"))
