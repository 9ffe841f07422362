"""Model loading, layer access, generation and likelihood on tiny random-init models of four
families (with the embedded tokenizer), and the metric helpers."""

import numpy as np
import pytest
import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import mmie


@pytest.fixture(scope="module")
def tokenizer():
    tok = mmie.load_tokenizer(mmie.EMBEDDED_MODEL)
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


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma3"])
def test_a_model_reads_text_as_its_saved_tokenizer_splits_it(family, tmp_path):
    """transformers 5 loads every qwen2 model's tokenizer as Qwen2Tokenizer, whose own pre-tokenizer splits Indic words
    at their vowel signs; the embedded model was trained with a whitespace split (its tokenizer.json), so MMIE fed it
    tokenizations it never saw: 61 tokens a Hindi text instead of 34, at 2.3 times the nats per character. Whatever
    the architecture's class, the text must be split as the saved tokenizer.json splits it."""
    import json

    from tokenizers import Tokenizer

    saved = Tokenizer.from_file(str(mmie.EMBEDDED_MODEL / "tokenizer.json"))
    folder = tmp_path / family
    tiny(family, 4096, 0).save_pretrained(folder)
    mmie.load_tokenizer(mmie.EMBEDDED_MODEL).save_pretrained(folder)
    loaded = mmie.load_tokenizer(folder)
    for name in ("forget_hi", "punjabi", "bengali", "urdu", "retain_en"):
        texts = [json.loads(line)["text"] for line in (mmie.DATA_DIR / f"{name}.jsonl").open(encoding="utf-8")][:20]
        assert loaded(texts)["input_ids"] == [saved.encode(text).ids for text in texts], name
    assert len(loaded(" ਵਿੱਚ")["input_ids"]) == 1  # one word, one token, as in training


def test_a_tokenizer_that_runs_its_saved_pipeline_is_kept_as_loaded(tmp_path, capsys):
    mmie.load_tokenizer(mmie.EMBEDDED_MODEL).save_pretrained(tmp_path)  # no config.json: nothing rebuilds it
    capsys.readouterr()
    tokenizer = mmie.load_tokenizer(tmp_path)
    assert type(tokenizer).__name__ == "TokenizersBackend" and "using the saved tokenizer" not in capsys.readouterr().out


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


def test_sampled_generation_is_seeded_draws_from_the_whole_distribution_and_never_emits_a_suppressed_token(tokenizer):
    """Sampling (the distill arm's --undo_samples): the same seed gives the same samples and leaves the global RNG
    where it was; temperature 0 is greedy whatever the seed; it is not truncated to a top k; suppressed tokens never
    come out."""
    model = tiny("qwen2", len(tokenizer), tokenizer.eos_token_id)
    kwargs = dict(max_new_tokens=12, batch_size=2, max_len=64)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = mmie.generate_token_ids(model, tokenizer, PROMPTS, temperature=1.0, seed=1, **kwargs)
    assert torch.equal(torch.rand(1), expected_next)
    assert mmie.generate_token_ids(model, tokenizer, PROMPTS, temperature=1.0, seed=1, **kwargs) == first
    assert mmie.generate_token_ids(model, tokenizer, PROMPTS, temperature=1.0, seed=2, **kwargs) != first
    torch.manual_seed(123)
    greedy = mmie.generate_token_ids(model, tokenizer, PROMPTS, **kwargs)
    assert torch.equal(torch.rand(1), expected_next) and first != greedy  # greedy draws nothing
    assert mmie.generate_token_ids(model, tokenizer, PROMPTS, temperature=0.0, seed=5, **kwargs) == greedy

    def hundred_equal_tokens(module, inputs, logits):  # tokens 100-199 equally likely, no other
        forced = torch.full_like(logits, -1e9)
        forced[..., 100:200] = 0.0
        return forced

    handle = model.lm_head.register_forward_hook(hundred_equal_tokens)
    try:
        drawn = mmie.generate_token_ids(model, tokenizer, PROMPTS * 4, temperature=1.0, seed=0, **kwargs)
        kept = mmie.generate_token_ids(model, tokenizer, PROMPTS * 4, temperature=1.0, seed=0, suppress_tokens=list(range(150)),
                                       **kwargs)
    finally:
        handle.remove()
    tokens = {t for row in drawn for t in row}
    assert tokens <= set(range(100, 200)) and len(tokens) > 50  # more than a default top-50 could give
    assert all(len(row) == 12 for row in kept) and {t for row in kept for t in row} <= set(range(150, 200))


def test_model_auto_choice_on_cpu():
    name, reason = mmie.resolve_model_name("auto", "cpu")
    assert name == str(mmie.EMBEDDED_MODEL) and "no CUDA" in reason
    assert mmie.resolve_dtype("auto", "cpu") == torch.float32
    assert mmie.resolve_attn("auto", "cpu") == "sdpa"


def test_metric_helpers():
    assert mmie.is_empty_output(" ... ।। 42 ")
    assert not mmie.is_empty_output("ok")
    assert mmie.ppl_from_nll([1.0, 2.0], [1, 3]) == pytest.approx(np.exp(1.75))
    assert mmie.auc_from_nll([0.1, 0.2], [0.3, 0.4]) == 1.0  # members have lower loss
    assert mmie.auc_from_nll([0.3, 0.4], [0.1, 0.2]) == 0.0


def test_repetition_catches_every_loop_and_spares_ordinary_text():
    """Word 3-grams gave loops without spaces 0 (below the base model's ordinary greedy loops)."""
    loops = ['"The' + '"' * 60, "<b>" * 25, '"' * 40, "the cat sat on the mat " * 4, "हाँ हाँ हाँ हाँ हाँ हाँ हाँ हाँ"]
    for loop in loops:
        assert mmie.repetition_rate(loop, 10) > 0.5, loop
    ordinary = ["The weather was lovely today, so we walked to the market and bought fresh mangoes.",
                "मैं कल सुबह बाज़ार गया था और वहाँ से ताज़ी सब्ज़ियाँ लाया।"]
    for text in ordinary:
        assert mmie.repetition_rate(text, 10) == 0.0
    assert mmie.repetition_rate("short", 10) == 0.0


def test_junk_outputs_are_empty_and_never_hindi(lid):
    """A collapsed model's quote and markup runs were scored as romanized Hindi (0.51-0.57)."""
    junk = ['"The' + '"' * 30, "<b>" * 20, 'K"', '""""""""', "..!!..!!..", ""]
    per_prompt = mmie.score_outputs({"forget_eval": junk}, {}, lid, 10)
    assert per_prompt["empty_rate_forget_eval"] == [1.0] * len(junk)
    assert per_prompt["es_forget_eval"] == [0.0] * len(junk)
    assert per_prompt["hi_rate_forget_eval"] == [0.0] * len(junk)


def test_continuation_prompts_keep_the_distinct_content_of_instruction_style_sets():
    """Half the texts start with one instruction, half with another: the first 8 words collapsed 258 eval
    prompts into 2. Prompts now grow until they are distinct."""
    hindi = [f"वाक्य {i} में कुछ अलग शब्द हैं जो बाज़ार और मौसम के बारे में हैं।" for i in range(40)]
    instruction = "In English only, summarize the following Hindi text:"
    texts = [f"{instruction} {h}" if i % 2 else f"केवल अंग्रेज़ी में इस हिंदी पाठ का सारांश दीजिए: {h}"
             for i, h in enumerate(hindi)]
    prompts = mmie.continuation_prompts(texts, 8)
    assert len(set(prompts)) == len(texts)
    assert all(text.startswith(prompt) and len(prompt) < len(text) for text, prompt in zip(texts, prompts))
    assert mmie.continuation_prompts(["a b c d e f g h i j k l m n o p q r"], 8) == ["a b c d e f g h"]
    assert mmie.continuation_prompts(["a b c d e"], 8) == ["a b"]
    counts = {}
    assert mmie.distinct_prompts("set", ["x", "y", "x", "x"], counts) == ["x", "y"]
    assert counts["set"] == {"n_texts": 4, "n_distinct": 2}


def test_json_safe_has_no_nan():
    assert mmie.json_safe({"a": float("nan"), "b": [np.float32(1.5), float("inf")], "c": np.int64(3)}) == \
        {"a": None, "b": [1.5, None], "c": 3}
