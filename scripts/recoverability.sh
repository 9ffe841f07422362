#!/usr/bin/env bash
# The experiments behind the recoverability closing notes (G7 against the reference model): the adaptive LoRA with
# and without SAM, and UNDO (the distill arm) over a sweep of alpha, with top-k distillation and with the Hindi
# script masked in the teacher's outputs, three seeds each, on the embedded model (CPU).
# Every run shares one stage cache, so the distill runs reuse the lora arm's trained teachers and one set of
# auto-config decisions (the adaptive and distill groups stay out of its key). A run whose .seconds file is already
# written is skipped, so the script can be restarted.
#   scripts/recoverability.sh runs/g7
# Then: python scripts/recoverability_table.py runs/g7/*.json
set -euo pipefail
out=${1:-runs/g7}
mkdir -p "$out"
run() {  # name, flags...
    local name=$1
    shift
    if [ -s "$out/$name.seconds" ]; then echo "$name: done before"; return; fi
    /usr/bin/time -f "%e" -o "$out/$name.seconds" .venv/bin/python mmie.py "$@" --ckpt_dir "$out/cache" \
        --out "$out/$name.json" > "$out/$name.log" 2>&1 || echo "$name: exit status $?" >> "$out/failures.txt"
    mkdir -p "$out/figures_$name" && mv "$out"/*.png "$out/figures_$name/" 2>/dev/null || true
    echo "$(date +%T) $name done ($(cat "$out/$name.seconds")s)"
}
# Batch sizes pinned as in the ablation (auto-config's timed CPU search flips between runs; variants must pair).
common=(--auto_config --adaptive_unlearning --seeds 0 1 2 --batch_size 128 --train_batch_size 16)
for alpha in ${ALPHAS:-1.0 0.9 0.6}; do
    run "distill_a$alpha" "${common[@]}" --arms lora distill --undo_alpha "$alpha"
done
# Top-k distillation: the student learns only the teacher's k most likely tokens per position, not its tail
for k in ${TOP_KS:-32 8}; do
    run "distill_a1.0_top$k" "${common[@]}" --arms lora distill --undo_alpha 1.0 --undo_top_k "$k"
done
# The teacher's tokens of the Hindi script get no mass (the student only learns to avoid them, as the reference
# did), distilled from fresh weights for the default 600 steps and for 1500 (more texts than the pretraining saw)
for steps in 600 1500; do
    run "distill_a1.0_mask_s$steps" "${common[@]}" --arms lora distill --undo_alpha 1.0 --undo_mask_forget_script \
        --undo_steps "$steps"
done
# Vectors shrunk toward the architecture's fresh values (norm gains 1) instead of 0; the default student on seeds 3-5
run distill_a1.0_mask_fresh_s600 "${common[@]}" --arms lora distill --undo_alpha 1.0 --undo_mask_forget_script \
    --undo_vector_init fresh
run distill_a1.0_mask_s600_seeds345 "${common[@]}" --arms lora distill --undo_alpha 1.0 --undo_mask_forget_script \
    --seeds 3 4 5
# A smaller noise scale on the seeds where the default student relearned
run distill_a1.0_mask_beta0.03_seeds345 "${common[@]}" --arms lora distill --undo_alpha 1.0 \
    --undo_mask_forget_script --undo_beta 0.03 --seeds 3 4 5
# Half the steps on sampled continuations of the texts' beginnings: the student's own (on-policy, as GKD), on the
# seeds where the default student relearned, then on seeds 0-2
run distill_a1.0_mask_samples_student_seeds345 "${common[@]}" --arms lora distill --undo_alpha 1.0 \
    --undo_mask_forget_script --undo_samples student --seeds 3 4 5
run distill_a1.0_mask_samples_student_seeds012 "${common[@]}" --arms lora distill --undo_alpha 1.0 \
    --undo_mask_forget_script --undo_samples student --seeds 0 1 2
# The teacher's samples instead (sampled once, Devanagari suppressed), on the same seeds 3-5
run distill_a1.0_mask_samples_teacher_seeds345 "${common[@]}" --arms lora distill --undo_alpha 1.0 \
    --undo_mask_forget_script --undo_samples teacher --seeds 3 4 5
run lora_no_sam "${common[@]}" --arms lora --no_sam
# UNDO with the forget-domain texts in the distillation pool, as the reference code does (--undo_forget_domain)
run distill_a0.9_forget_domain "${common[@]}" --arms lora distill --undo_alpha 0.9 --undo_forget_domain
# After the tokenizer fix (runs/g13): the default recipe with the likelihood read of the attack, seeds 0-2 and 3-5, and
# a weaker grid on one seed (does any attack strength separate the arm that hides from the reference by ES?)
run distill_a1.0_mask_s600_nll "${common[@]}" --arms lora distill --undo_alpha 1.0 --undo_mask_forget_script
run distill_a1.0_mask_s600_nll_seeds345 "${common[@]}" --arms lora distill --undo_alpha 1.0 --undo_mask_forget_script \
    --seeds 3 4 5
run lora_weakgrid "${common[@]}" --arms lora --relearn_lrs 1e-5 3e-5 --relearn_steps 5 10 30 --seeds 0
# ... and the student distilled for 1500 steps, seeds 0-2 and 3-5
run distill_a1.0_mask_s1500_nll "${common[@]}" --arms lora distill --undo_alpha 1.0 --undo_mask_forget_script \
    --undo_steps 1500
run distill_a1.0_mask_s1500_nll_seeds345 "${common[@]}" --arms lora distill --undo_alpha 1.0 \
    --undo_mask_forget_script --undo_steps 1500 --seeds 3 4 5
