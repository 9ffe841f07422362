"""Throughput of lid_ensemble on short unique texts (no cache hits): texts per second for
identify() and for hindi_word_masks(), against the 20,000 texts/s target on 2 cores.

    python scripts/bench_lid.py [--n 20000]
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lid_ensemble import DATA_DIR, LIDEnsemble  # noqa: E402

TARGET_TEXTS_PER_SECOND = 20_000

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--n", type=int, default=20_000, help="unique short texts to identify")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

# Short texts (3-10 words) cut from every shipped set at random offsets: the kind of text
# MMIE identifies (model continuations of up to a few dozen tokens), all distinct.
rng = random.Random(args.seed)
words_per_text = [json.loads(line)["text"].split() for path in sorted(DATA_DIR.glob("*.jsonl"))
                  for line in path.read_text(encoding="utf-8").splitlines()]
texts = set()
while len(texts) < args.n:
    words = rng.choice(words_per_text)
    length = rng.randint(3, 10)
    start = rng.randint(0, max(0, len(words) - length))
    texts.add(" ".join(words[start : start + length]) + f" {len(texts)}")  # a number keeps them unique
texts = sorted(texts)
rng.shuffle(texts)

lid = LIDEnsemble()
start = time.perf_counter()
lid.identify(texts)
identify_rate = len(texts) / (time.perf_counter() - start)
start = time.perf_counter()
lid.identify(texts)
cached_rate = len(texts) / (time.perf_counter() - start)
start = time.perf_counter()
lid.hindi_word_masks(texts)
mask_rate = len(texts) / (time.perf_counter() - start)

print(f"identify (uncached)   {identify_rate:10,.0f} texts/s   {identify_rate / TARGET_TEXTS_PER_SECOND:5.2f}x target")
print(f"identify (cached)     {cached_rate:10,.0f} texts/s   {cached_rate / TARGET_TEXTS_PER_SECOND:5.2f}x target")
print(f"hindi_word_masks      {mask_rate:10,.0f} texts/s   {mask_rate / TARGET_TEXTS_PER_SECOND:5.2f}x target")
