"""The torch forward pass against the NumPy reference and against transformers, on random tiny
checkpoints."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import weights
from conftest import random_weights, tiny_config, write_checkpoint
from lminf_min import caches, model, reference
from lminf_min.config import LlamaConfig

# hidden_size is a multiple of the head count because transformers insists on it
configs = st.builds(
    lambda layers, kv, rep, head_dim, width, tied, theta, vocab: tiny_config(
        num_hidden_layers=layers,
        num_key_value_heads=kv,
        num_attention_heads=kv * rep,
        head_dim=head_dim,
        hidden_size=width * kv * rep,
        intermediate_size=2 * width * kv * rep,
        tie_word_embeddings=tied,
        rope_theta=theta,
        vocab_size=vocab,
    ),
    layers=st.integers(1, 3),
    kv=st.integers(1, 3),
    rep=st.integers(1, 3),
    head_dim=st.sampled_from([2, 4, 8, 16]),
    width=st.sampled_from([2, 4, 8]),
    tied=st.booleans(),
    theta=st.sampled_from([100.0, 1e4, 1e5, 5e5]),
    vocab=st.integers(8, 80),
)


def assert_close(actual, expected, atol, what):
    """Within atol, scaled by the largest logit when that is above 1: float32 keeps about 7 digits,
    so a logit of 10 carries rounding ten times that of a logit of 1."""
    expected = torch.as_tensor(np.asarray(expected, dtype=np.float64))
    diff = (torch.as_tensor(np.asarray(actual, dtype=np.float64)) - expected).abs()
    tol = atol * max(1.0, float(expected.abs().max()))
    assert diff.max() <= tol, (
        f"{what}: max abs diff {diff.max():.3g}, mean {diff.mean():.3g} (tolerance {tol:.3g})"
    )


@settings(max_examples=40, deadline=None)
@given(cfg=configs, T=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_torch_matches_numpy_reference(cfg, T, seed):
    w = random_weights(cfg, seed)
    config = LlamaConfig.from_dict(cfg)
    tokens = np.random.default_rng(seed).integers(0, cfg["vocab_size"], T)
    expected = reference.forward(w, config, tokens)
    actual = model.forward(
        {n: torch.from_numpy(t) for n, t in w.items()}, config, torch.from_numpy(tokens)
    )
    assert actual.shape == (T, cfg["vocab_size"])
    assert_close(actual, expected, 1e-5, "torch float32 vs NumPy float64")


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cfg=configs, shards=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_torch_matches_transformers(tmp_path_factory, cfg, shards, seed):
    """Write a random checkpoint, load it with our strict loader and with transformers'
    LlamaForCausalLM."""
    transformers = pytest.importorskip("transformers")
    path = write_checkpoint(
        tmp_path_factory.mktemp("ckpt"), cfg, random_weights(cfg, seed), shards=shards
    )
    config, w = weights.load_checkpoint(path)
    hf = transformers.LlamaForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = torch.from_numpy(np.random.default_rng(seed).integers(0, cfg["vocab_size"], 20))
    with torch.no_grad():
        expected = hf(tokens[None]).logits[0]
    assert_close(model.forward(w, config, tokens), expected, 1e-4, "ours vs transformers")


def test_cache_prefill_and_decode_match_one_pass(tiny_ckpt):
    """Chunked prefill and token-by-token decode through the KV cache give the one-pass logits."""
    config, w = weights.load_checkpoint(tiny_ckpt)
    tokens = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    full = model.forward(w, config, tokens)
    cache = caches.KVCache(config.num_hidden_layers)
    pieces = [
        model.forward(w, config, tokens[:7], cache=cache),
        model.forward(w, config, tokens[7:30], cache=cache),
    ]
    pieces += [model.forward(w, config, tokens[t : t + 1], cache=cache) for t in range(30, 40)]
    assert cache.length == 40
    assert_close(torch.cat(pieces), full, 1e-5, "cached vs one pass")
    assert_close(model.forward(w, config, tokens, last_only=True), full[-1:], 1e-5, "last_only")


def test_bfloat16_close_to_float32(tiny_ckpt):
    _, w32 = weights.load_checkpoint(tiny_ckpt)
    config, w16 = weights.load_checkpoint(tiny_ckpt, dtype=torch.bfloat16)
    tokens = torch.arange(16) % config.vocab_size
    full, half = model.forward(w32, config, tokens), model.forward(w16, config, tokens)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert_close(half, full, 0.1, "bfloat16 vs float32")


@pytest.mark.cuda
def test_cuda_matches_cpu(tiny_ckpt):
    config, w = weights.load_checkpoint(tiny_ckpt)
    _, wc = weights.load_checkpoint(tiny_ckpt, device="cuda")
    tokens = torch.arange(16) % config.vocab_size
    assert_close(
        model.forward(wc, config, tokens.cuda()).cpu(),
        model.forward(w, config, tokens),
        1e-4,
        "cuda vs cpu",
    )
