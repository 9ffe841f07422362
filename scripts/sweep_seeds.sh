#!/usr/bin/env bash
# Seed sweep: one MMIE run per seed, then one pooled report whose statistics are redone on the
# pooled per-prompt outcomes (never on seed means).
#
#   scripts/sweep_seeds.sh [OUT_DIR] [SEEDS...] -- [extra mmie.py flags]
#   scripts/sweep_seeds.sh runs/sweep 0 1 2 -- --model Qwen/Qwen2.5-1.5B-Instruct
#
# Every run shares one --ckpt_dir, so an interrupted sweep resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-runs/sweep}"
shift || true
seeds=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do seeds+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2)

mkdir -p "$out"
reports=()
for seed in "${seeds[@]}"; do
  python mmie.py --seeds "$seed" --out "$out/seed$seed.json" --ckpt_dir "$out/ckpt" "$@"
  reports+=("$out/seed$seed.json")
done
python mmie.py --aggregate "${reports[@]}" --out "$out/pooled.json"
