"""Layer selection on models with attention sinks: a random-init Llama-style and Gemma-3-style model with a
planted first-token activation 40x a typical token's and a massive dimension on every token (what real models
show: Sun et al. 2024). Difference-in-means directions and their ablation must not be driven by them."""

import pytest
import torch

import mmie
from test_model import tiny

HINDI = ["मैं कल सुबह बाज़ार गया था और सब्ज़ियाँ लाया।", "आज मौसम बहुत सुहावना है और हवा ठंडी है।",
         "बच्चे पार्क में फुटबॉल खेल रहे हैं।", "माँ ने दोपहर में अरहर की दाल बनाई।",
         "हम अगले हफ़्ते दिल्ली जाएँगे।", "किताब मेज़ पर रखी है और दरवाज़ा खुला है।"] * 2
ENGLISH = ["The weather was lovely today and we walked to the market.", "My grandmother never measured anything.",
           "The children are playing football in the park.", "We will travel to Delhi next week by train.",
           "The book is on the table and the door is open.", "Made lentil soup tonight with the leftovers."] * 2
LAYER, SINK_SCALE, MASSIVE_DIM, MASSIVE_SCALE = 1, 40.0, 3, 40.0


@pytest.fixture(scope="module")
def tokenizer():
    return mmie.load_tokenizer(mmie.EMBEDDED_MODEL)


def plant_sinks(model, sink: torch.Tensor, massive: float):
    """Add `sink` to the first token of every sequence after layer 0 (an attention sink) and `massive` to one
    dimension of every token (a massive activation), as forward hooks; returns the handles."""
    mask = {}

    def capture(module, args, kwargs):
        mask["m"] = kwargs.get("attention_mask")

    def add(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[..., MASSIVE_DIM] += massive
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
        tokens = mmie.collect_token_activations(model, tokenizer, ENGLISH, [LAYER], batch_size=12, max_len=64)[LAYER]
    dim_rms = float(tokens.pow(2).mean(0).sqrt().median())
    sink = torch.zeros(32)
    sink[7], sink[11] = 1.0, -1.0
    sink = SINK_SCALE * float(tokens.norm(dim=1).median()) * sink / sink.norm()  # 40x a typical token's norm

    def content_direction():
        acts = {lang: mmie.content_activations(model, tokenizer, texts, [LAYER], batch_size=12, max_len=64,
                                               massive_ratio=4.0)[LAYER] for lang, texts in (("hi", HINDI), ("en", ENGLISH))}
        return mmie.hindi_direction(acts["hi"], acts["en"]), acts

    clean_old, (clean_new, _) = naive_direction(model, tokenizer, LAYER), content_direction()  # before any sink
    handles = plant_sinks(model, sink, MASSIVE_SCALE * dim_rms)  # relative: Gemma's states are larger than Llama's
    try:
        old = naive_direction(model, tokenizer, LAYER)
        new, acts = content_direction()
        sink_unit, massive_unit = sink / sink.norm(), torch.nn.functional.one_hot(torch.tensor(MASSIVE_DIM), 32).float()
        print(f"{family}: |cos(old, sink)| {abs(float(old @ sink_unit)):.3f} -> |cos(new, sink)| "
              f"{abs(float(new @ sink_unit)):.3f}; massive-dim weight {abs(float(old @ massive_unit)):.3f} -> "
              f"{abs(float(new @ massive_unit)):.3f}")
        assert MASSIVE_DIM in acts["hi"].massive_dims and float(new[MASSIVE_DIM]) == 0.0
        # The planted sink pulls the naive direction away from where it was and leaves the content direction near its
        # own (a random 32-dimensional model's direction already has some cosine with any axis, up to 0.4 here).
        assert abs(float(new @ sink_unit)) <= abs(float(clean_new @ sink_unit)) + 0.05
        assert float(new @ clean_new) > float(old @ clean_old) + 0.2
        # The edit: the old ablation removes much of the sink from the first token; the new one leaves sink tokens
        # alone (and, with no massive-dimension component, every token's massive dimension).
        batch = mmie.encode_texts(tokenizer, ENGLISH, 64, "cpu")
        with torch.no_grad(), mmie.record_layer_outputs(model, [LAYER]) as out:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        first = out[LAYER][:, 0]
        moved_old = (mmie.project_out(old)(first) - first).norm(dim=-1).mean()
        moved_new = (mmie.project_out(new, acts["hi"].norm_limit)(first) - first).norm(dim=-1).mean()
        print(f"{family}: change of the first token's state: old {float(moved_old):.2f} -> new {float(moved_new):.2f} "
              f"(its norm {float(first.norm(dim=-1).mean()):.2f}); retain NLL increase when ablated: old "
              f"{retain_nll_increase(model, tokenizer, mmie.project_out(old)):.3f} -> new "
              f"{retain_nll_increase(model, tokenizer, mmie.project_out(new, acts['hi'].norm_limit)):.3f} nats")
        # (the old share is the naive direction's cosine with the sink: 0.64 on Llama, 0.38 on Gemma with these texts)
        assert float(moved_new) == 0.0 and float(moved_old) > 0.3 * float(first.norm(dim=-1).mean())
    finally:
        for handle in handles:
            handle.remove()


def test_warns_when_no_causal_score_is_positive(tokenizer, lid, capsys, monkeypatch):
    """When ablating no layer's direction lowers Hindi (here: ES forced to 0 everywhere), no causal score is
    positive, and the run says that the layer choice then means little."""
    model = tiny("qwen2", len(tokenizer), tokenizer.eos_token_id)
    monkeypatch.setattr(mmie, "forget_es", lambda model, tokenizer, lid, prompts, args, instruction=None:
                        [0.0] * len(prompts))
    args = mmie.build_parser().parse_args(["--layer_sample", "6"])
    layers = mmie.select_layers(model, tokenizer, lid, mmie.load_sets(args), {"related": {}, "related_source": {}},
                                args)
    assert all(score["causal_score"] <= 0 for score in layers["scores"].values())
    assert "no layer's causal score is positive" in capsys.readouterr().err


def counting_forget_es(monkeypatch):
    """forget_es counted, with a Hindi share that falls with the ablated layer's index (so scores differ)."""
    calls = []

    def forget_es(model, tokenizer, lid, prompts, args, instruction=None):
        calls.append(len(prompts))
        return [0.5] * len(prompts)

    monkeypatch.setattr(mmie, "forget_es", forget_es)
    return calls


def test_forced_layers_are_not_scored_only_their_directions_computed(tokenizer, lid, monkeypatch):
    """--force_layers still scored all 18 layers of a 270M model by generation (25 minutes) before using the one
    the user gave: now no layer is scored, and the arms get their directions."""
    calls = counting_forget_es(monkeypatch)
    model = tiny("qwen2", len(tokenizer), tokenizer.eos_token_id)
    args = mmie.build_parser().parse_args(["--layer_sample", "6", "--force_layers", "2"])
    layers = mmie.select_layers(model, tokenizer, lid, mmie.load_sets(args), {"related": {}, "related_source": {}},
                                args)
    assert calls == [] and layers["scores"] == {} and layers["chosen"] == [2]
    assert set(layers["directions"]) == {2} and float(layers["directions"][2].norm()) == pytest.approx(1.0)
    assert layers["rule"].startswith("--force_layers")


def test_layer_scoring_under_a_budget_scores_the_best_probe_scores_first_and_says_so(tokenizer, lid, monkeypatch):
    calls = counting_forget_es(monkeypatch)
    model = tiny("qwen2", len(tokenizer), tokenizer.eos_token_id)
    args = mmie.build_parser().parse_args(["--layer_sample", "6", "--min_layer", "0"])
    sets, eval_sets = mmie.load_sets(args), {"related": {}, "related_source": {}}
    budget = mmie.ProbeBudget({"seconds": 0.0}, floor_s=1e-6)  # nothing left: no causal pass fits
    layers = mmie.select_layers(model, tokenizer, lid, sets, eval_sets, args, budget=budget)
    assert len(calls) == 1  # the base pass alone, which times a layer's pass
    assert "no causal scoring within the budget" in layers["rule"] and len(layers["chosen"]) == args.select_top_k
    best = max(layers["scores"], key=lambda i: layers["scores"][i]["probe_score"])
    assert best in layers["chosen"] and not any("causal_score" in s for s in layers["scores"].values())
    assert budget.fallbacks["layer scoring"].startswith("causal scoring of 0 of 3 eligible layers")
    calls.clear()
    budget = mmie.ProbeBudget({"seconds": 1e9})  # plenty: every eligible layer, none below min_layer is skipped
    layers = mmie.select_layers(model, tokenizer, lid, sets, eval_sets, args, budget=budget)
    assert len(calls) == 1 + 3 and all("causal_score" in s for s in layers["scores"].values())
    assert "layer scoring" not in budget.fallbacks
