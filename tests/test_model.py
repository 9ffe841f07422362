"""Model loading, layer access, generation and likelihood on tiny random-init models of four
families (with the embedded tokenizer), and the metric helpers."""

import numpy as np
import pytest
import torch
from transformers import (AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import mmie


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(mmie.EMBEDDED_MODEL)
    tok.padding_side = "left"
    return tok


def tiny(family, vocab_size, eos_id):
    common = dict(vocab_size=vocab_size, eos_token_id=eos_id, pad_token_id=eos_id, bos_token_id=None)
    if family == "gpt2":
        config, cls = GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=256, **common), GPT2LMHeadModel
    else:
        sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256)
        config, cls = {"llama": (LlamaConfig(**sizes, **common), LlamaForCausalLM),
                       "qwen2": (Qwen2Config(**sizes, **common), Qwen2ForCausalLM),
                       "gemma3": (Gemma3TextConfig(**sizes, head_dim=8, **common), Gemma3ForCausalLM)}[family]
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(config).eval()


FAMILIES = ["llama", "qwen2", "gemma3", "gpt2"]
PROMPTS = ["मैं कल सुबह", "The weather today is", "آج موسم", "ਅੱਜ ਸਵੇਰੇ ਬਹੁਤ ਮੀਂਹ ਪਿਆ ਅਤੇ ਅਸੀਂ"]


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_generation_and_nll_for_each_family(family, tokenizer):
    model = tiny(family, len(tokenizer), tokenizer.eos_token_id)
    layers = mmie.decoder_layers(model)
    assert len(layers) == 3
    outputs = mmie.generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=4, max_len=64)
    one_by_one = [mmie.generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1, max_len=64)[0] for p in PROMPTS]
    assert outputs == one_by_one  # left padding and the attention mask make batching invisible
    nll, count = mmie.text_nll(model, tokenizer, PROMPTS, batch_size=4, max_len=64)
    alone = [mmie.text_nll(model, tokenizer, [p], batch_size=1, max_len=64)[0][0] for p in PROMPTS]
    np.testing.assert_allclose(nll, alone, rtol=1e-4)  # pads are masked out of the NLL
    assert list(count) == [len(tokenizer(p)["input_ids"]) - 1 for p in PROMPTS]


def test_generation_strips_prompt_and_stops_at_max_new_tokens_or_eos(tokenizer):
    model = tiny("qwen2", len(tokenizer), tokenizer.eos_token_id)
    ids = mmie.generate_token_ids(model, tokenizer, PROMPTS, max_new_tokens=3, batch_size=2, max_len=64)
    assert [len(row) for row in ids] == [3, 3, 3, 3]
    longer = mmie.generate_token_ids(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=2, max_len=64)
    assert [row[:3] for row in longer] == ids  # greedy: the first tokens do not depend on the budget
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert all(row[: len(p)] != p for row, p in zip(longer, prompt_ids))  # the prompt is stripped
    # A model that always predicts EOS stops at once, leaving an empty continuation.
    def only_eos(module, inputs, logits):
        forced = torch.full_like(logits, -1e9)
        forced[..., tokenizer.eos_token_id] = 0.0
        return forced

    handle = model.lm_head.register_forward_hook(only_eos)
    try:
        eos_only = mmie.generate_token_ids(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=4, max_len=64)
    finally:
        handle.remove()
    assert eos_only == [[], [], [], []]


def test_model_auto_choice_on_cpu():
    name, reason = mmie.resolve_model_name("auto", "cpu")
    assert name == str(mmie.EMBEDDED_MODEL) and "no CUDA" in reason
    assert mmie.resolve_dtype("auto", "cpu") == torch.float32
    assert mmie.resolve_attn("auto", "cpu") == "sdpa"


def test_metric_helpers():
    assert mmie.repetition_rate("a b c a b c a b c") == pytest.approx(1 - 3 / 7)
    assert mmie.repetition_rate("one two") == 0.0
    assert mmie.is_empty_output(" ... ।। 42 ")
    assert not mmie.is_empty_output("ok")
    assert mmie.ppl_from_nll([1.0, 2.0], [1, 3]) == pytest.approx(np.exp(1.75))
    assert mmie.auc_from_nll([0.1, 0.2], [0.3, 0.4]) == 1.0  # members have lower loss
    assert mmie.auc_from_nll([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert mmie.continuation_prompt("a b c d e f g h i j k l m n o p q r", 8) == "a b c d e f g h"
    assert mmie.continuation_prompt("a b c d e", 8) == "a b"


def test_json_safe_has_no_nan():
    assert mmie.json_safe({"a": float("nan"), "b": [np.float32(1.5), float("inf")], "c": np.int64(3)}) == \
        {"a": None, "b": [1.5, None], "c": 3}
