"""Bad input gets one clear line naming the file, line or flag; never a traceback."""

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


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("name,content,fragments", [
    ("missing.jsonl", None, ["missing.jsonl: file not found", "--forget"]),
    ("empty.jsonl", b"\n\n", ["empty.jsonl: the set is empty", "--forget"]),
    ("notjson.jsonl", b'{"text": "ok"}\n{"text": broken\n', ["notjson.jsonl:2: not a JSON object"]),
    ("notext.jsonl", b'{"text": "ok"}\n{"body": "no text field"}\n', ["notext.jsonl:2:", "\"text\" field"]),
    ("badtext.jsonl", b'{"text": 42}\n', ["badtext.jsonl:1:", "non-empty string"]),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ["latin1.jsonl:2: not UTF-8"]),
])
def test_bad_forget_file(tmp_path, name, content, fragments):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    assert_one_line_error(run_cli("--forget", str(path)), *fragments)


def test_set_too_small_to_split(tmp_path):
    path = write(tmp_path / "one.jsonl", b'{"text": "just one line of text here"}\n')
    assert_one_line_error(run_cli("--mixed", str(path)), "one.jsonl", "empty train or eval split")


@pytest.mark.parametrize("args,fragments", [
    (["--model", "./no/such/folder"], ["--model ./no/such/folder: no such folder", "--model", "tiny-lm"]),
    (["--model", "no-such-org/no-such-model-xyz"], ["no-such-org/no-such-model-xyz: cannot be loaded", "tiny-lm"]),
    (["--load_in_8bit", "--device", "cpu"], ["--load_in_8bit needs a CUDA device"]),
    (["--device", "cuda"], ["--device cuda: no CUDA device"]),
    (["--sample_cap", "0"], ["--sample_cap must be at least 1"]),
    (["--seeds", "1", "1"], ["--seeds has repeated values"]),
])
def test_bad_flags_and_models(args, fragments):
    assert_one_line_error(run_cli(*args), *fragments)


def test_language_mismatch_is_warned_with_share(tmp_path, lid, capsys):
    english = [json.loads(line) for line in (REPO / "data/retain_en.jsonl").read_text(encoding="utf-8").splitlines()]
    hindi = [json.loads(line) for line in (REPO / "data/forget_hi.jsonl").read_text(encoding="utf-8").splitlines()]
    mixed_up = hindi[:70] + english[:30]  # 30% English in the "Hindi" forget set
    path = write(tmp_path / "forget.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in mixed_up).encode())
    args = mmie.build_parser().parse_args(["--forget", str(path)])
    checks = mmie.check_sets(mmie.load_sets(args), lid)
    assert checks["forget"]["share_disagree"] == pytest.approx(0.30)
    assert "30% of 100 texts are not identified as hi in Deva" in capsys.readouterr().err


def test_forget_retain_overlap_is_reported(tmp_path, lid, capsys):
    english = (REPO / "data/retain_en.jsonl").read_text(encoding="utf-8").splitlines()
    hindi = (REPO / "data/forget_hi.jsonl").read_text(encoding="utf-8").splitlines()
    path = write(tmp_path / "forget.jsonl", "\n".join(hindi[:100] + english[:5]).encode())
    args = mmie.build_parser().parse_args(["--forget", str(path)])
    checks = mmie.check_sets(mmie.load_sets(args), lid)
    assert checks["forget_retain_overlap"] == 5
    assert "5 texts are in both the forget set" in capsys.readouterr().err


def test_arms_flag_with_no_names_is_the_base_evaluation_alone():
    assert mmie.build_parser().parse_args(["--arms"]).arms == []
    assert mmie.build_parser().parse_args([]).arms == mmie.ALL_ARMS
