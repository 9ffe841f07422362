"""Mechanics of the interventions on tiny random-init models: hooks never leak, LoReFT's R stays
orthonormal, NPO's reference is the base model, objectives have their published values, LAPE
finds planted neurons, token KL is zero without an edit."""

import math
from argparse import Namespace

import numpy as np
import pytest
import torch
from peft import LoraConfig

import mmie

TEXTS = ["मैं कल सुबह बाज़ार गया था।", "The weather was lovely today.", "ਅੱਜ ਮੀਂਹ ਪਿਆ।", "kal main ghar par tha"]


def logits(model, tokenizer, texts=TEXTS):
    batch = mmie.encode_texts(tokenizer, texts, 64, "cpu")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def objective_args(**overrides):
    return Namespace(**{"npo_beta": 0.1, "simnpo_gamma": 0.0, "ga_bound": 5.0, **overrides})


def test_hooks_are_removed_after_every_edit_even_on_error(model, tokenizer):
    before = logits(model, tokenizer)
    direction = torch.randn(32)
    switch = mmie.HookSwitch()
    edits = [
        lambda: mmie.edit_layer_outputs(model, {0: mmie.project_out(direction / direction.norm())}),
        lambda: mmie.hook_arm(model, {1: mmie.LoReFT(32, 4, gated=True)}),
        lambda: mmie.zero_mlp_neurons(model, {0: [1, 2, 3]}, switch),
        lambda: mmie.record_layer_outputs(model, [0, 2]),
        lambda: mmie.lora_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]), "unlearn"),
    ]
    for make in edits:
        with pytest.raises(RuntimeError, match="boom"):
            with make():
                assert mmie.active_hooks(model) > 0 or any("lora" in n for n, _ in model.named_modules())
                raise RuntimeError("boom")
        assert mmie.active_hooks(model) == 0
        assert not any("lora" in name for name, _ in model.named_modules())
    torch.testing.assert_close(logits(model, tokenizer), before, rtol=0, atol=0)


def test_switch_off_gives_the_unedited_model(model, tokenizer):
    before = logits(model, tokenizer)
    with mmie.hook_arm(model, {0: lambda h: h * 0.5}) as arm:
        assert not torch.allclose(logits(model, tokenizer), before)
        with arm.reference():
            torch.testing.assert_close(logits(model, tokenizer), before, rtol=0, atol=0)
        per_text = mmie.text_token_kl(model, tokenizer, TEXTS, arm.reference, batch_size=4, max_len=64)
    assert all(kl > 0 for kl in per_text)
    assert mmie.text_token_kl(model, tokenizer, TEXTS, mmie.nullcontext, batch_size=2, max_len=64) == [0.0] * 4


def test_loreft_rotation_stays_orthonormal_while_training():
    torch.manual_seed(0)
    reft = mmie.LoReFT(32, 6, gated=True)
    optimizer = torch.optim.AdamW(reft.parameters(), lr=5e-2)
    target = torch.randn(64, 32)
    for _ in range(50):
        loss = (reft(torch.randn(64, 32)) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rotation = reft.rotate.weight
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(6), atol=1e-5, rtol=0)
    assert reft.last_gate.shape == (64, 1) and ((reft.last_gate > 0) & (reft.last_gate < 1)).all()


def test_loreft_is_the_identity_when_w_equals_r_and_b_is_zero():
    reft = mmie.LoReFT(16, 4, gated=False)
    with torch.no_grad():
        reft.learned.weight.copy_(reft.rotate.weight)
        reft.learned.bias.zero_()
    hidden = torch.randn(3, 5, 16)
    torch.testing.assert_close(reft(hidden), hidden, atol=1e-5, rtol=0)


def test_npo_reference_is_the_base_model_through_the_disabled_adapter(model, tokenizer):
    base = logits(model, tokenizer)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    with mmie.lora_adapter(model, config, "unlearn") as peft_model:
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param)
        assert not torch.allclose(logits(model, tokenizer), base)
        with peft_model.disable_adapter():
            torch.testing.assert_close(logits(model, tokenizer), base, rtol=0, atol=0)
            reference = mmie.sequence_logprobs(model, tokenizer, TEXTS, batch_size=4, max_len=64)
    torch.testing.assert_close(reference, mmie.sequence_logprobs(model, tokenizer, TEXTS, batch_size=4, max_len=64))


def test_forget_objectives_have_their_published_values(model, tokenizer):
    batch = mmie.encode_texts(tokenizer, TEXTS, 64, "cpu")
    with torch.no_grad():
        seq_logp, length = mmie.token_logprobs(model, batch)
        nll = -seq_logp / length
        args = objective_args()
        # NPO at the reference point: (2/beta) log(1 + 1) for every sequence.
        npo = mmie.forget_losses("npo", model, batch, seq_logp, args)
        assert npo.shape == (4,) and npo.tolist() == pytest.approx([2 / 0.1 * math.log(2)] * 4, rel=1e-5)
        assert mmie.forget_losses("ga", model, batch, None, args).tolist() == pytest.approx((-nll).tolist(), rel=1e-5)
        bounded = mmie.forget_losses("bounded_ga", model, batch, None, objective_args(ga_bound=0.5))
        assert ((-0.5 <= bounded) & (bounded < 0)).all()
        assert bounded.tolist() == pytest.approx((-(0.5 * torch.tanh(nll / 0.5))).tolist())
        simnpo = mmie.forget_losses("simnpo", model, batch, None, args)
        expected = -2 / 0.1 * torch.nn.functional.logsigmoid(0.1 * nll)
        assert simnpo.tolist() == pytest.approx(expected.tolist(), rel=1e-5)


def test_kl_retain_loss_is_zero_against_itself(model, tokenizer):
    batch = mmie.encode_texts(tokenizer, TEXTS, 64, "cpu")
    with torch.no_grad():
        base = mmie.reference_hidden(model, batch, mmie.nullcontext)
        assert mmie.retain_losses("kl", model, batch, lambda: base).tolist() == pytest.approx([0.0] * 4, abs=1e-6)
        assert (mmie.retain_losses("nll", model, batch, None) > 0).all()


def test_lape_finds_planted_hindi_neurons():
    rng = np.random.default_rng(0)
    probabilities = {lang: torch.tensor(rng.uniform(0.2, 0.4, size=(2, 200)), dtype=torch.float32)
                     for lang in ("hi", "en", "ur", "pa", "bn")}
    probabilities["hi"][1, [7, 42]] = 0.99  # fire almost always on Hindi, rarely elsewhere
    for lang in ("en", "ur", "pa", "bn"):
        probabilities[lang][1, [7, 42]] = 0.01
    neurons = mmie.lape_hindi_neurons(probabilities, bottom_share=0.01, prob_quantile=0.95)
    assert neurons == {1: [7, 42]}


def test_lape_zeroing_changes_only_through_the_chosen_neurons(model, tokenizer):
    switch = mmie.HookSwitch()
    before = logits(model, tokenizer)
    with mmie.zero_mlp_neurons(model, {1: list(range(64))}, switch):
        assert not torch.allclose(logits(model, tokenizer), before)
        with switch.off():
            torch.testing.assert_close(logits(model, tokenizer), before, rtol=0, atol=0)
    probabilities = mmie.activation_probabilities(model, tokenizer, TEXTS, batch_size=2, max_len=64)
    assert probabilities.shape == (3, 64) and ((probabilities >= 0) & (probabilities <= 1)).all()


def test_loreft_starts_from_the_model():
    """pyreft's random W made the first forward replace h's component in a random subspace (NPO's loss ~0 at
    step 0 on a real model); the identity start leaves h exactly as it is until training moves W or b."""
    torch.manual_seed(0)
    reft = mmie.LoReFT(32, 6, gated=False)
    hidden = 50 * torch.randn(2, 7, 32)
    torch.testing.assert_close(reft(hidden), hidden, atol=1e-4, rtol=0)


def test_lape_finds_planted_hindi_neurons_among_rarely_firing_ones():
    """Tang et al. exclude neurons that clear the probability bar in no language before taking the lowest-entropy
    share. Taking the share first let rarely-firing neurons (entropy ~0) fill it and then be removed: nothing was
    selected. Here 30% of neurons fire almost never (and always on one language)."""
    rng = np.random.default_rng(1)
    langs = ("hi", "en", "ur", "pa", "bn")
    probabilities = {lang: torch.tensor(rng.uniform(0.2, 0.4, size=(2, 300)), dtype=torch.float32) for lang in langs}
    rare = [divmod(int(index), 300) for index in rng.choice(600, size=180, replace=False)]
    for layer, neuron in rare:  # fires (rarely) on one language only: entropy 0
        for lang in langs:
            probabilities[lang][layer, neuron] = 1e-4 if lang == langs[neuron % 5] else 0.0
    planted = [(0, 5), (1, 7), (1, 42)]
    for layer, neuron in planted:
        for lang in langs:
            probabilities[lang][layer, neuron] = 0.95 if lang == "hi" else 0.02
    neurons = mmie.lape_hindi_neurons(probabilities, bottom_share=0.01, prob_quantile=0.95)
    found = {(layer, neuron) for layer, picked in neurons.items() for neuron in picked}
    assert set(planted) <= found and not found & set(rare)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2"])
def test_scoring_from_hidden_states_equals_the_models_logits(family, tokenizer, monkeypatch):
    """Per-token log-probabilities without a [batch, length, vocabulary] tensor: chunked over positions (a chunk
    budget of a few positions forces many chunks), equal to the full logits, with gradients equal too."""
    from test_model import tiny

    model = tiny(family, len(tokenizer), tokenizer.eos_token_id)
    if family == "gemma3":
        model.config.final_logit_softcapping = 3.0  # Gemma 2 style soft-capping must be applied as the model does
    mmie.check_scoring_path(model, tokenizer)
    batch = mmie.encode_texts(tokenizer, TEXTS, 64, "cpu")
    full = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1],
                             -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    expected = (full * batch["score_mask"]).sum(1)
    monkeypatch.setattr(mmie, "LOGIT_CHUNK_BYTES", 4 * len(tokenizer) * 3)  # three positions per chunk
    summed, count = mmie.token_logprobs(model, batch)
    torch.testing.assert_close(summed, expected, rtol=1e-4, atol=1e-4)
    assert count.tolist() == batch["score_mask"].sum(1).float().tolist()
    summed.sum().backward()
    chunked_grad = next(model.parameters()).grad.clone()
    model.zero_grad()
    expected.sum().backward() if expected.requires_grad else None
    model.zero_grad()
    (torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1], -1)
     .gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1) * batch["score_mask"]).sum().backward()
    torch.testing.assert_close(chunked_grad, next(model.parameters()).grad, rtol=1e-3, atol=1e-5)


def test_context_scores_the_same_text_tokens(model, tokenizer):
    """The prompt arm scores texts after its instruction: the same text tokens, so NLLs pair with the base's."""
    plain = mmie.encode_texts(tokenizer, TEXTS, 64, "cpu")
    with_context = mmie.encode_texts(tokenizer, TEXTS, 64, "cpu", context="Answer only in English.")
    assert plain["score_mask"].sum(1).tolist() == with_context["score_mask"].sum(1).tolist()
    for row in range(len(TEXTS)):
        scored_plain = plain["input_ids"][row, 1:][plain["score_mask"][row]]
        scored_context = with_context["input_ids"][row, 1:][with_context["score_mask"][row]]
        assert torch.equal(scored_plain, scored_context)
    kl = mmie.text_token_kl(model, tokenizer, TEXTS, mmie.nullcontext, batch_size=4, max_len=64, context="Hello.")
    assert all(value > 0 for value in kl)  # the base read with and without the instruction differs


def test_trainer_keeps_the_batch_after_out_of_memory_and_stops_on_a_non_finite_loss(model, tokenizer):
    params = [p for p in model.parameters()]
    calls = {"n": 0}

    def objective(batch, idx):
        calls["n"] += 1
        if len(idx) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return mmie.retain_losses("nll", model, batch, None)

    trainer = mmie.Trainer(model, tokenizer, params, {"retain": TEXTS * 2}, {"retain": objective}, steps=2, lr=1e-3,
                           batch_size=8, max_len=64, seed=0)
    log = trainer.run()
    assert [row["step"] for row in log] == [0, 1] and trainer.backoff.micro_batch == 2
    assert [event["micro_batch"] for event in trainer.backoff.events] == [[8, 4], [4, 2]]

    def exploding(batch, idx):
        return torch.full((len(idx),), float("nan"))

    bad = mmie.Trainer(model, tokenizer, params, {"forget": TEXTS}, {"forget": exploding}, steps=3, lr=1e-3,
                       batch_size=4, max_len=64, seed=0, desc="lora")
    with pytest.raises(mmie.NonFiniteLoss, match="lora: the forget loss is nan at step 0"):
        bad.run()


def test_reference_states_equal_a_fresh_read_of_the_base_model(model, tokenizer):
    states = mmie.ReferenceStates(model, tokenizer, TEXTS, max_len=64, batch_size=3)
    switch = mmie.HookSwitch()
    with mmie.edit_layer_outputs(model, {1: lambda h: h * 0.5}, switch):
        cached = states.get([2, 0, 3], switch.off)
        batch = mmie.encode_texts(tokenizer, [TEXTS[2], TEXTS[0], TEXTS[3]], 64, "cpu")
        torch.testing.assert_close(cached, mmie.reference_hidden(model, batch, switch.off))
        kl = mmie.text_token_kl(model, tokenizer, TEXTS, switch.off, batch_size=2, max_len=64, states=states)
        fresh = mmie.text_token_kl(model, tokenizer, TEXTS, switch.off, batch_size=2, max_len=64)
    assert kl == pytest.approx(fresh, rel=1e-3, abs=1e-6) and all(value > 0 for value in kl)  # batches differ: float noise
