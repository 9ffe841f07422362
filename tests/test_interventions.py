"""Mechanics of the interventions on tiny random-init models: hooks never leak, LoReFT's R stays
orthonormal, NPO's reference is the base model, objectives have their published values, LAPE
finds planted neurons, token KL is zero without an edit."""

import math
from argparse import Namespace

import numpy as np
import pytest
import torch
from peft import LoraConfig
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

import mmie

TEXTS = ["मैं कल सुबह बाज़ार गया था।", "The weather was lovely today.", "ਅੱਜ ਮੀਂਹ ਪਿਆ।", "kal main ghar par tha"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(mmie.EMBEDDED_MODEL)


@pytest.fixture()
def model(tokenizer):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id, bos_token_id=None)
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config).eval()


def logits(model, tokenizer, texts=TEXTS):
    batch = mmie.pad_batch(tokenizer, texts, 64, "cpu")
    with torch.no_grad():
        return model(**batch).logits


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
        per_text = mmie.token_kl(model, tokenizer, TEXTS, arm.reference, batch_size=4, max_len=64)
    assert all(kl > 0 for kl in per_text)
    assert mmie.token_kl(model, tokenizer, TEXTS, mmie.nullcontext, batch_size=2, max_len=64) == [0.0] * 4


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
    batch = mmie.pad_batch(tokenizer, TEXTS, 64, "cpu")
    with torch.no_grad():
        logp, mask, _ = mmie.batch_token_logprobs(model, batch)
        seq_logp, length = logp.sum(1), mask.sum(1)
        nll = -seq_logp / length
        args = objective_args()
        # NPO at the reference point: (2/beta) log(1 + 1) for every sequence.
        npo = mmie.forget_loss("npo", model, batch, seq_logp, args)
        assert npo.item() == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)
        assert mmie.forget_loss("ga", model, batch, None, args).item() == pytest.approx(-nll.mean().item(), rel=1e-5)
        bounded = mmie.forget_loss("bounded_ga", model, batch, None, objective_args(ga_bound=0.5))
        assert -0.5 <= bounded.item() < 0 and bounded.item() == pytest.approx(-(0.5 * torch.tanh(nll / 0.5)).mean().item())
        simnpo = mmie.forget_loss("simnpo", model, batch, None, args)
        expected = (-2 / 0.1 * torch.nn.functional.logsigmoid(0.1 * nll)).mean()
        assert simnpo.item() == pytest.approx(expected.item(), rel=1e-5)


def test_kl_retain_loss_is_zero_against_itself(model, tokenizer):
    batch = mmie.pad_batch(tokenizer, TEXTS, 64, "cpu")
    with torch.no_grad():
        assert mmie.retain_loss("kl", model, batch, mmie.nullcontext).item() == pytest.approx(0.0, abs=1e-6)
        assert mmie.retain_loss("nll", model, batch, mmie.nullcontext).item() > 0


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
