"""Shared fixtures: tiny random models of four architectures, and the real embedded model."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub; everything is made or shipped here
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest
import torch

import mansu

TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128)


def tiny_config(arch: str, vocab_size: int):
    """A 2-layer config of `arch` sized for fast tests; GQA where the architecture supports it."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    h, n, heads, kv, ffn = TINY["hidden"], TINY["layers"], TINY["heads"], TINY["kv_heads"], TINY["ffn"]
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=h, intermediate_size=ffn, num_hidden_layers=n,
                           num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, hidden_size=h, intermediate_size=ffn, num_hidden_layers=n,
                           num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=h, n_layer=n, n_head=heads, n_inner=ffn, n_positions=256)
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=h, intermediate_size=ffn, num_hidden_layers=n,
                             num_attention_heads=heads, max_position_embeddings=256)
    raise ValueError(arch)


ARCHS = ["llama", "qwen2", "gpt2", "gpt_neox"]

# Devices the device tests (marked `device`) run on: "meta" always, since it exposes constants made on the
# CPU without a GPU; "cuda" where one is present (scripts/gpu_check.py runs `pytest -m device` there).
DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


def boundary_heavy_edit(qt: str, dtype: torch.dtype, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A 300x250 weight (1171 full blocks and a padded tail: the compiled path) and an edit that also puts
    weights exactly on their block's decision boundaries, where a rounding slip would show."""
    torch.manual_seed(8)
    before = (torch.randn(300, 250) * 0.05).to(dtype)
    after = before.clone()
    mask = torch.rand(before.shape) < density
    after[mask] += (torch.randn(int(mask.sum())) * 0.01).to(dtype)
    blocks = after.view(-1)[: 64 * 200].view(200, 64).float()
    mids = mansu.quant.get_format(qt).midpoints()
    absmax = blocks.abs().amax(1, keepdim=True)
    blocks[:, 1:16] = (mids * absmax).to(dtype).float()  # position 0 may hold the absmax: leave it
    after.view(-1)[: 64 * 200] = blocks.view(-1).to(dtype)
    return before, after


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer (converted once into the cache)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mansu.models.embedded_model_dir())
    mansu.models.prepare_tokenizer(tok)
    return tok


def make_tiny(arch: str, tokenizer, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer)), dtype=torch.float32)
    return model.eval()


@pytest.fixture(params=ARCHS)
def tiny_model(request, tokenizer):
    """(model, tokenizer) for each of the four tiny architectures."""
    return make_tiny(request.param, tokenizer), tokenizer


@pytest.fixture(scope="session")
def embedded():
    """The real SmolLM2-135M-Instruct, loaded once per session. Tests must not modify it in place."""
    return mansu.load_model()


@pytest.fixture(scope="session")
def capitals():
    return mansu.load_bundled("capitals")
