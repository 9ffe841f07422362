"""Language identification measured on held-out labelled text (eval splits, which the
romanized-Hindi detector never trains on), plus its script rules and interface."""

import json

import pytest

from lid_ensemble import DATA_DIR, dominant_script, is_eval_text, script_letter_counts

NATIVE = {"forget_hi": "hi", "retain_en": "en", "urdu": "ur", "punjabi": "pa", "bengali": "bn"}


def eval_texts(name):
    lines = (DATA_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [t for t in (json.loads(line)["text"] for line in lines) if is_eval_text(t)]


@pytest.mark.parametrize("name,lang", NATIVE.items())
def test_native_script_accuracy_on_heldout(lid, name, lang):
    texts = eval_texts(name)
    accuracy = sum(g.lang == lang for g in lid.identify(texts)) / len(texts)
    assert len(texts) >= 60
    assert accuracy >= 0.97, f"{lang}: {accuracy:.3f}"


def test_romanized_hindi_vs_english_accuracy_on_heldout(lid):
    hindi, english = eval_texts("forget_hi_roman"), eval_texts("retain_en")
    correct = sum(g.lang == "hi" and g.script == "Latn" for g in lid.identify(hindi))
    correct += sum(g.lang == "en" for g in lid.identify(english))
    assert correct / (len(hindi) + len(english)) >= 0.90


def test_danda_and_digits_are_not_letters():
    bengali = "আমি আজ বাজারে যাব। ১২৩"
    punjabi = "ਮੈਂ ਅੱਜ ਘਰ ਜਾਵਾਂਗਾ। ੧੨"
    assert script_letter_counts(bengali)["Deva"] == 0
    assert script_letter_counts(punjabi)["Deva"] == 0
    assert dominant_script(bengali) == ("Beng", 1.0)
    assert dominant_script(punjabi) == ("Guru", 1.0)
    assert dominant_script("। ॥ 123 ...") == ("Zyyy", 0.0)


def test_bengali_and_punjabi_with_danda_are_identified(lid):
    guesses = lid.identify(["আজ সকালে খুব বৃষ্টি হয়েছে। তাই আমরা বাড়িতেই ছিলাম।",
                            "ਅੱਜ ਸਵੇਰੇ ਬਹੁਤ ਮੀਂਹ ਪਿਆ। ਇਸ ਲਈ ਅਸੀਂ ਘਰ ਹੀ ਰਹੇ।"])
    assert [(g.lang, g.script) for g in guesses] == [("bn", "Beng"), ("pa", "Guru")]


def test_identify_interface_and_cache(lid):
    texts = ["मैं कल दिल्ली जा रहा हूँ।", "kal main dilli ja raha hoon yaar", "I am going to Delhi tomorrow.", "", "..."]
    guesses = lid.identify(texts)
    assert [(g.lang, g.script) for g in guesses] == [("hi", "Deva"), ("hi", "Latn"), ("en", "Latn"),
                                                     ("und", "Zyyy"), ("und", "Zyyy")]
    assert all(0.0 <= g.confidence <= 1.0 for g in guesses)
    assert guesses[0].confidence > 0.5
    assert lid.identify(texts) == guesses  # cached answers are the same answers


def test_hindi_word_mask_per_word_in_context(lid):
    mask = lid.hindi_word_mask("I told my friend ki main kal nahi aaunga because of work")
    assert len(mask) == 12
    assert mask[:4] == [False, False, False, False]
    assert sum(mask[4:9]) >= 4  # ki main kal nahi aaunga
    assert mask[-3:] == [False, False, False]
    assert lid.hindi_word_mask("आज मेरी online class है") == [True, True, False, False, True]
    assert lid.hindi_word_mask("") == []


def test_cached_word_ngrams_equal_direct_hashing(lid):
    from sklearn.feature_extraction.text import HashingVectorizer

    texts = ["Kal office mein  meeting thi, BUT boss ne", "hello world hello", "", "x y"]
    direct = HashingVectorizer(analyzer="char_wb", ngram_range=(1, 4), n_features=2**18, alternate_sign=False,
                               norm=None).transform(texts)
    assert abs(direct - lid.roman._ngram_counts([t.split() for t in texts])).max() == 0
