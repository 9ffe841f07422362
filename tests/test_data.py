"""The shipped sets: schema, sizes, length, duplicates, topics and language purity."""

import json
import re
from collections import Counter

import pytest

from lid_ensemble import DATA_DIR

MIN_SIZES = {"forget_hi": 600, "forget_hi_roman": 200, "retain_en": 600, "mixed": 200, "urdu": 200,
             "punjabi": 200, "bengali": 200, "adversarial": 200, "relearn_hi": 100}
NATIVE_LANG = {"forget_hi": "hi", "retain_en": "en", "urdu": "ur", "punjabi": "pa", "bengali": "bn", "relearn_hi": "hi"}


def five_word_runs(text):
    words = text.split()
    return {tuple(words[i : i + 5]) for i in range(len(words) - 4)}


def records(name):
    lines = (DATA_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("name", MIN_SIZES)
def test_schema_size_and_length(name):
    rows = records(name)
    assert len(rows) >= MIN_SIZES[name]
    for row in rows:
        text = row["text"]
        assert isinstance(text, str) and text == text.strip()
        assert 60 <= len(text) <= 300, text
        assert not re.search(r'["\\\t\n]|\\u[0-9a-f]{4}', text), text


def test_no_duplicates_within_or_across_sets():
    seen = Counter(row["text"] for name in MIN_SIZES for row in records(name))
    assert [text for text, count in seen.items() if count > 1] == []


def test_topics_cover_every_set():
    topics = {name: Counter(row["topic"] for row in records(name)) for name in MIN_SIZES}
    every = set.intersection(*(set(counter) for counter in topics.values()))
    assert len(every) >= 20, every


@pytest.mark.parametrize("name,lang", NATIVE_LANG.items())
def test_language_purity(lid, name, lang):
    texts = [row["text"] for row in records(name)]
    share = sum(g.lang == lang for g in lid.identify(texts)) / len(texts)
    assert share >= 0.95, f"{name}: {share:.3f} identified as {lang}"


def test_romanized_set_is_latin_hindi(lid):
    texts = [row["text"] for row in records("forget_hi_roman")]
    guesses = lid.identify(texts)
    assert sum(g.lang == "hi" and g.script == "Latn" for g in guesses) / len(texts) >= 0.95


def test_relearn_set_shares_no_five_word_run_with_the_forget_set():
    forget_runs = set().union(*(five_word_runs(row["text"]) for row in records("forget_hi")))
    assert not [row["text"] for row in records("relearn_hi") if five_word_runs(row["text"]) & forget_runs]


def test_every_adversarial_request_has_a_hindi_answer_the_relearn_set_never_saw(lid):
    """The embedded model trains on request + answer (data/train_tiny_lm.py), so that it answers held-out requests in
    Hindi and G6 has something to measure; the relearning attack's texts must stay unseen."""
    rows = records("adversarial")
    answers = [row["answer"] for row in rows]
    for answer in answers:
        assert isinstance(answer, str) and answer == answer.strip() and 40 <= len(answer) <= 220, answer
        assert not re.search(r'["\\\t\n]', answer), answer
    guesses = lid.identify(answers)
    assert all(g.lang == "hi" for g in guesses), [a for a, g in zip(answers, guesses) if g.lang != "hi"]
    by_kind = Counter(row["kind"] for row, g in zip(rows, guesses) if g.script == "Latn")
    assert by_kind == Counter({"romanized": 46})  # romanized requests get romanized answers, the rest Devanagari
    assert len(set(answers)) == len(answers)

    relearn_runs = set().union(*(five_word_runs(row["text"]) for row in records("relearn_hi")))
    assert not [answer for answer in answers if five_word_runs(answer) & relearn_runs]
