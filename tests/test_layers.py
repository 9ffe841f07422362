"""Layer selection on models with attention sinks: a random-init Llama-style and Gemma-3-style model with a
planted first-token activation 40x a typical token's and a massive dimension on every token (what real models
show: Sun et al. 2024). Difference-in-means directions and their ablation must not be driven by them."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import mmie
from test_model import tiny

HINDI = ["मैं कल सुबह बाज़ार गया था और सब्ज़ियाँ लाया।", "आज मौसम बहुत सुहावना है और हवा ठंडी है।",
         "बच्चे पार्क में फुटबॉल खेल रहे हैं।", "माँ ने दोपहर में अरहर की दाल बनाई।",
         "हम अगले हफ़्ते दिल्ली जाएँगे।", "किताब मेज़ पर रखी है और दरवाज़ा खुला है।"] * 2
ENGLISH = ["The weather was lovely today and we walked to the market.", "My grandmother never measured anything.",
           "The children are playing football in the park.", "We will travel to Delhi next week by train.",
           "The book is on the table and the door is open.", "Made lentil soup tonight with the leftovers."] * 2
LAYER, SINK_SCALE, MASSIVE_DIM, MASSIVE_VALUE = 1, 40.0, 3, 25.0


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(mmie.EMBEDDED_MODEL)


def plant_sinks(model, sink: torch.Tensor):
    """Add `sink` to the first token of every sequence after layer 0 (an attention sink) and a constant to one
    dimension of every token (a massive activation), as forward hooks; returns the handles."""
    mask = {}

    def capture(module, args, kwargs):
        mask["m"] = kwargs.get("attention_mask")

    def add(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[..., MASSIVE_DIM] += MASSIVE_VALUE
        if mask["m"] is not None and mask["m"].shape[1] == hidden.shape[1]:  # prompt or scored text, not a decode step
            first = mask["m"].long().argmax(1)  # the first real token, with left or right padding
            hidden[torch.arange(len(hidden)), first] += sink
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return [model.get_decoder().register_forward_pre_hook(capture, with_kwargs=True),
            mmie.decoder_layers(model)[0].register_forward_hook(add)]


def naive_direction(model, tokenizer, layer):
    """The old estimate: means over every token of each text, first token and massive dimension included."""
    def pooled(texts):
        batch = mmie.encode_texts(tokenizer, texts, 64, "cpu")
        with torch.no_grad(), mmie.record_layer_outputs(model, [layer]) as out:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (out[layer] * mask).sum(1) / mask.sum(1)
    direction = pooled(HINDI).mean(0) - pooled(ENGLISH).mean(0)
    return direction / direction.norm()


def retain_nll_increase(model, tokenizer, edit) -> float:
    base = mmie.text_nll(model, tokenizer, ENGLISH, batch_size=12, max_len=64)[0].mean()
    with mmie.edit_layer_outputs(model, {LAYER: edit}):
        ablated = mmie.text_nll(model, tokenizer, ENGLISH, batch_size=12, max_len=64)[0].mean()
    return float(ablated - base)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_directions_ignore_attention_sinks_and_massive_dimensions(family, tokenizer):
    model = tiny(family, len(tokenizer), tokenizer.eos_token_id)
    with torch.no_grad():
        typical = mmie.content_activations(model, tokenizer, ENGLISH, [LAYER], batch_size=12, max_len=64,
                                           massive_ratio=4.0)[LAYER].pooled
    sink = torch.zeros(32)
    sink[7], sink[11] = 1.0, -1.0
    sink = SINK_SCALE * float(np.linalg.norm(typical, axis=1).mean()) * sink / sink.norm()
    handles = plant_sinks(model, sink)
    try:
        old = naive_direction(model, tokenizer, LAYER)
        acts = {lang: mmie.content_activations(model, tokenizer, texts, [LAYER], batch_size=12, max_len=64,
                                               massive_ratio=4.0)[LAYER] for lang, texts in (("hi", HINDI), ("en", ENGLISH))}
        new = mmie.hindi_direction(acts["hi"], acts["en"])
        sink_unit, massive_unit = sink / sink.norm(), torch.nn.functional.one_hot(torch.tensor(MASSIVE_DIM), 32).float()
        print(f"{family}: |cos(old, sink)| {abs(float(old @ sink_unit)):.3f} -> |cos(new, sink)| "
              f"{abs(float(new @ sink_unit)):.3f}; massive-dim weight {abs(float(old @ massive_unit)):.3f} -> "
              f"{abs(float(new @ massive_unit)):.3f}")
        assert MASSIVE_DIM in acts["hi"].massive_dims and float(new[MASSIVE_DIM]) == 0.0
        assert abs(float(new @ sink_unit)) < 0.2 < abs(float(old @ sink_unit))
        damage_old = retain_nll_increase(model, tokenizer, mmie.project_out(old))
        damage_new = retain_nll_increase(model, tokenizer, mmie.project_out(new, acts["hi"].norm_limit))
        print(f"{family}: retain NLL increase when ablated: old {damage_old:.3f} -> new {damage_new:.3f} nats")
        assert damage_new < damage_old
    finally:
        for handle in handles:
            handle.remove()


def test_warns_when_no_causal_score_is_positive(tokenizer, lid, capsys):
    """A random-init model produces no Hindi, so ablating a direction cannot remove any: no causal score is
    positive, and the run says that the layer choice then means little."""
    model = tiny("qwen2", len(tokenizer), tokenizer.eos_token_id)
    args = mmie.build_parser().parse_args(["--layer_sample", "6", "--max_new_tokens", "4"])
    sets = mmie.load_sets(args)
    eval_sets = {"related": {}, "related_source": {}}
    layers = mmie.select_layers(model, tokenizer, lid, sets, eval_sets, args)
    assert all(score["causal_score"] <= 0 for score in layers["scores"].values())
    assert "no layer's causal score is positive" in capsys.readouterr().err
