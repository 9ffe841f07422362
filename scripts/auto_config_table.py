"""auto_config.py's decisions for real architectures, built from their configurations on the meta device (no
weights, no download), under simulated accelerator memory tiers.

    python scripts/auto_config_table.py

For each of Qwen2.5-1.5B-Instruct, Llama-3.2-1B and Gemma-3-270M and each tier (8, 24, 80 GiB) it prints the
LoRA rank and targets, the ReFT rank, the SAE width (memory and training text) and the candidates its k is
chosen from, the layer rule, the token lengths and the batch sizes. Batch sizes come from the real CUDA search
(auto_config.search_batch_size_cuda) run against a simulated out-of-memory: a batch "fits" when the memory model
below stays under the tier. The memory model is this script's assumption, not a measurement (on a real card the
search measures): bf16 weights, per sequence of max_len tokens ~34 * hidden bytes per token and layer of
activations for scoring (x 3 with LoRA gradients for training), plus mmie's fixed 256 MiB chunk of vocabulary
logits. Token lengths use the embedded tokenizer as a stand-in (each model's own tokenizer decides at run time).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          Qwen2Config, Qwen2ForCausalLM)

import auto_config as ac  # noqa: E402
import mmie  # noqa: E402

ARCHITECTURES = {
    "Qwen2.5-1.5B-Instruct": (Qwen2ForCausalLM, Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True)),
    "Llama-3.2-1B": (LlamaForCausalLM, LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, tie_word_embeddings=True)),
    "Gemma-3-270M": (Gemma3ForCausalLM, Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=32768, sliding_window=512)),
}
TIERS_GIB = (8, 24, 80)
ACTIVATION_BYTES = 34  # per token, layer and hidden unit in bf16 (attention and MLP intermediates; ours)


def memory_model(n_params: int, config, batch: int, max_len: int, training: bool) -> float:
    activations = batch * max_len * config.num_hidden_layers * config.hidden_size * ACTIVATION_BYTES
    return 2 * n_params + (3 if training else 1) * activations + 2**28


def simulated_search(n_params, config, tier_gib, max_len, training, max_batch) -> ac.Decision:
    limit = tier_gib * 2**30

    def try_batch(batch: int) -> None:
        if memory_model(n_params, config, batch, max_len, training) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    return ac.search_batch_size_cuda(try_batch, max_batch=max_batch, release=lambda: None)


def main() -> None:
    tokenizer = mmie.load_tokenizer(mmie.EMBEDDED_MODEL)
    settings = mmie.build_parser().parse_args([])
    sets = mmie.load_sets(settings)
    texts = sets["retain"].eval + sets["forget"].texts + sets["mixed"].eval + sets["adversarial"].eval
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    prompts = mmie.continuation_prompts(sets["forget"].eval, settings.prompt_words)
    rest = [t[len(p):] for t, p in zip(sets["forget"].eval, prompts)]
    new_tokens = ac.choose_max_new_tokens([len(ids) for ids in tokenizer(rest, add_special_tokens=False)["input_ids"]])
    n_forget, n_retain = len(sets["forget"].train), len(sets["retain"].train)
    sae_tokens = sum(len(ids) - 1 for ids in tokenizer(sets["forget"].train + sets["retain"].train)["input_ids"])
    rows = []
    for name, (model_class, config) in ARCHITECTURES.items():
        with torch.device("meta"):
            model = model_class(config)
        n_params = sum(p.numel() for p in model.parameters())
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        depth = config.num_hidden_layers
        max_len = ac.choose_max_len(lengths, config.max_position_embeddings)
        for tier in TIERS_GIB:
            free = tier - 2 * n_params / 2**30
            targets = ac.lora_targets(names, free, config.model_type)
            sae = ac.sae_expansion_from_memory(config.hidden_size, math.ceil(depth / 4), free * 2**30 * 0.25,
                                               bytes_per_param=4, batch_tokens=settings.sae_batch_size,
                                               n_tokens=sae_tokens)
            scoring = simulated_search(n_params, config, tier, max_len.value, False, 512)
            training = simulated_search(n_params, config, tier, max_len.value, True, 64)
            rows.append([name, f"{n_params / 1e9:.2f}B", f"{tier} GiB", str(ac.lora_rank(n_params, n_forget).value),
                         ",".join(targets.value) if isinstance(targets.value, list) else targets.value,
                         str(ac.reft_rank(n_forget).value), f"x{sae.value} ({sae.value * config.hidden_size})",
                         "8|16|32 by probing",
                         f">= {ac.first_eligible_layer(depth).value}, elbow <= {math.ceil(depth / 4)}",
                         f"{max_len.value}/{new_tokens.value}", str(scoring.value), str(training.value),
                         str(ac.lora_dropout(n_forget + n_retain).value)])
    header = ["model", "params", "memory", "rank", "LoRA targets", "ReFT", "SAE width", "SAE k", "layers",
              "max_len/new", "batch", "train batch", "dropout"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    main()
