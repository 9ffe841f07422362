"""Shared fixtures: everything runs offline on CPU."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each (and in the
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # runs they start), or four threads contend for two cores
    import torch

    torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def lid():
    from lid_ensemble import LIDEnsemble

    return LIDEnsemble()


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded model's tokenizer (modules that need another padding side define their own)."""
    import mmie

    return mmie.load_tokenizer(mmie.EMBEDDED_MODEL)


@pytest.fixture()
def model(tokenizer):
    """A fresh random-init 3-layer Qwen2 on the embedded tokenizer (modules that share one define their own)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id, bos_token_id=None)
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config).eval()
