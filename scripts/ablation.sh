#!/usr/bin/env bash
# The experiments behind the closing notes of the auto-config and adaptive-unlearning issues, run one after the
# other on the embedded model (CPU). A run whose .seconds file is already written is skipped, so the script can be
# restarted. The adaptive runs share one stage cache (and so one set of auto-config decisions: the adaptive group
# stays out of their key); the static trainer of the ablation is --auto_config alone in that same cache.
#   scripts/ablation.sh runs/exp
# Then: python scripts/ablation_table.py runs/exp
set -euo pipefail
out=${1:-runs/exp}
mkdir -p "$out"
run() {  # name, stage cache, flags...
    local name=$1 cache=$2
    shift 2
    if [ -s "$out/$name.seconds" ]; then echo "$name: done before"; return; fi
    /usr/bin/time -f "%e" -o "$out/$name.seconds" .venv/bin/python mmie.py "$@" --ckpt_dir "$out/$cache" \
        --out "$out/$name.json" > "$out/$name.log" 2>&1 || echo "$name: exit status $?" >> "$out/failures.txt"
    mkdir -p "$out/figures_$name" && mv "$out"/*.png "$out/figures_$name/" 2>/dev/null || true
    echo "$(date +%T) $name done ($(cat "$out/$name.seconds")s)"
}
run default1 cache_default
run auto1 cache_auto --auto_config
run adaptive1 cache_adaptive --auto_config --adaptive_unlearning
run auto3 cache_auto --auto_config --seeds 0 1 2
run adaptive3 cache_adaptive --auto_config --adaptive_unlearning --arms lora reft dsg --seeds 0 1 2
run static3 cache_adaptive --auto_config --arms lora reft --seeds 0 1 2
for part in sine_lora reweight dualoptim curriculum stages dual_ascent early_stop script_blind; do
    run "no_$part" cache_adaptive --auto_config --adaptive_unlearning "--no_$part" --arms lora --seeds 0 1 2
done
run no_dynamic_gate cache_adaptive --auto_config --adaptive_unlearning --no_dynamic_gate --arms dsg --seeds 0 1 2
run default3 cache_default --seeds 0 1 2
