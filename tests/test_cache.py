"""The bounded LambdaCache: chunked prefill + decode through it == one Λ forward; positions far
into a stream score as near its start."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import BACKENDS, random_weights, tiny_config
from lminf_min import caches, model, reference
from lminf_min.config import LambdaConfig, LlamaConfig


def tiny(seed):
    cfg = tiny_config()
    w = random_weights(cfg, seed)
    return LlamaConfig.from_dict(cfg), {n: torch.from_numpy(t) for n, t in w.items()}, w


@settings(max_examples=25, deadline=None)
@given(
    G=st.integers(0, 5),
    L=st.integers(1, 12),
    extra=st.integers(0, 6),
    T=st.integers(1, 60),
    chunks=st.lists(st.integers(1, 20), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
    name=st.sampled_from(list(BACKENDS)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_chunked_prefill_and_decode_equal_one_pass(G, L, extra, T, chunks, seed, name, dtype):
    """Random chunk sizes, then token-by-token decode, over lengths of several windows, through
    every backend (the ring's slot order included), float32 and bfloat16."""
    config, w, _ = tiny(seed)
    lam = LambdaConfig(G, L, L - 1 + extra)
    tokens = torch.from_numpy(np.random.default_rng(seed).integers(0, config.vocab_size, T))
    w = {n: t.to(dtype) for n, t in w.items()}  # the definition gets the same (rounded) weights
    expected = reference.forward(
        {n: t.float().numpy() for n, t in w.items()}, config, tokens.numpy(), lam
    )
    cache, got, a = caches.LambdaCache(config.num_hidden_layers, lam), [], 0
    for size in chunks + [1] * T:
        if a >= T:
            break
        got.append(
            model.forward(
                w, config, tokens[a : a + size], lam, cache, backend=BACKENDS[name]
            ).float()
        )
        a = min(a + size, T)
        held = cache.pos[cache.pos != cache.EMPTY]
        assert len(held) <= G + L and all(k.shape[1] == G + L for k in cache.k)
        # exactly what the next query can still need: the starting tokens (never evicted) and the
        # last L
        assert set(held.tolist()) == set(range(min(G, a))) | set(range(max(0, a - L), a))
    diff, scale = np.abs(torch.cat(got).numpy() - expected).max(), np.abs(expected).max()
    # bf16 keeps 8 bits of mantissa: through whole tiny models even plain causal attention is off
    # its float64 definition by several percent of the largest logit, so 10%; float32 is exact
    tol = 1e-4 if dtype == torch.float32 else 0.1 * max(1, scale)
    assert diff <= tol, f"max abs diff {diff:.3g} ({dtype}, largest logit {scale:.3g})"


def test_translation_far_into_the_stream():
    """Decode logits at stream offset 10^11 equal those at offset 10^4 for identical window
    contents: keys stay stored at their absolute positions, and RoPE's float64 angles are exact
    enough there (their error grows with the position: about 1e-4 of a logit at 10^12, 1 at 10^15;
    the paper streams 2·10^8 tokens)."""
    config, w, _ = tiny(0)
    lam = LambdaConfig(3, 16, 16)
    starting, window = torch.arange(3) + 5, torch.arange(40) % config.vocab_size
    logits = []
    for offset in (10**4, 10**11):
        cache = caches.LambdaCache(config.num_hidden_layers, lam)
        model.forward(w, config, starting, lam, cache)
        # jump: positions 3..offset-1 passed long ago and have left the window
        cache.length = offset
        model.forward(w, config, window[:-1], lam, cache)
        logits.append(model.forward(w, config, window[-1:], lam, cache))
    diff = (logits[0] - logits[1]).abs().max()
    assert diff <= 1e-4, f"max abs diff {diff:.3g}"


def test_cache_memory_is_constant():
    config, w, _ = tiny(1)
    lam = LambdaConfig(2, 8, 8)
    cache = caches.LambdaCache(config.num_hidden_layers, lam)
    tokens = torch.randint(0, config.vocab_size, (300,), generator=torch.Generator().manual_seed(0))
    sizes = []
    for t in tokens:
        model.forward(w, config, t.view(1), lam, cache)
        sizes.append(cache.nbytes())
    assert (
        sizes[9]
        == sizes[-1]
        == config.num_hidden_layers * 2 * (2 + 8) * config.num_key_value_heads * config.head_dim * 4
    )


@settings(max_examples=20, deadline=None)
@given(
    G=st.integers(0, 4),
    L=st.integers(1, 8),
    K=st.integers(1, 6),
    from_layer=st.integers(0, 2),
    distance=st.integers(0, 10),
    prompt=st.integers(1, 40),
    new=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_top_k_middle_decode_matches_definition(G, L, K, from_layer, distance, prompt, new, seed):
    """Prefill without top-k, then decode with it: the logits of the NumPy definition (decoding_from
    = prompt)."""
    config, w, w_np = tiny(seed)
    lam = LambdaConfig(G, L, L, top_k=K, top_k_from_layer=from_layer, top_k_distance=distance)
    tokens = torch.from_numpy(
        np.random.default_rng(seed).integers(0, config.vocab_size, prompt + new)
    )
    expected = reference.forward(w_np, config, tokens.numpy(), lam, decoding_from=prompt)
    cache = caches.new_cache(config, lam)
    assert isinstance(cache, caches.KVCache)  # top-k may pick any key: nothing is evicted
    got = [model.forward(w, config, tokens[:prompt], lam, cache)]
    got += [
        model.forward(w, config, tokens[t : t + 1], lam, cache, decoding=True)
        for t in range(prompt, prompt + new)
    ]
    diff = np.abs(torch.cat(got).numpy() - expected).max()
    assert diff <= 1e-4, f"max abs diff {diff:.3g}"


def test_top_k_changes_what_decoding_sees():
    """With middle keys present, top-k decoding differs from plain Λ decoding (the check above is
    not vacuous)."""
    config, w, w_np = tiny(5)
    tokens = np.random.default_rng(5).integers(0, config.vocab_size, 30)
    plain = reference.forward(w_np, config, tokens, LambdaConfig(1, 4, 4))
    top = reference.forward(
        w_np, config, tokens, LambdaConfig(1, 4, 4, top_k=3, top_k_distance=2), decoding_from=20
    )
    assert np.abs(plain[:20] - top[:20]).max() == 0 and np.abs(plain[20:] - top[20:]).max() > 1e-3


def test_full_cache_grows_past_its_buffers():
    """The full cache (vanilla) across two doublings of its buffers, one within a prefill chunk and
    one while decoding: the logits of the NumPy definition."""
    config, w, w_np = tiny(7)
    tokens = torch.from_numpy(np.random.default_rng(7).integers(0, config.vocab_size, 620))
    expected = reference.forward(w_np, config, tokens.numpy())
    cache = caches.new_cache(config, None)
    got = [model.forward(w, config, tokens[:100], None, cache)]
    capacity = cache.k[0].shape[1]
    got.append(model.forward(w, config, tokens[100:300], None, cache))
    assert cache.k[0].shape[1] > capacity  # grown with a chunk
    capacity = cache.k[0].shape[1]
    got += [
        model.forward(w, config, tokens[t : t + 1], None, cache, decoding=True)
        for t in range(300, 620)
    ]
    assert cache.k[0].shape[1] > capacity and cache.length == 620  # and while decoding
    diff = np.abs(torch.cat(got).numpy() - expected).max()
    assert diff <= 1e-4, f"max abs diff {diff:.3g}"


def test_misuse_is_refused_before_the_cache_changes():
    """A LambdaCache is bound to the LambdaConfig it was made for, and decoding takes one token:
    other calls raise before anything is stored."""
    config, w, _ = tiny(1)
    lam = LambdaConfig(2, 8, 8)
    cache = caches.LambdaCache(config.num_hidden_layers, lam)
    model.forward(w, config, torch.arange(5), lam, cache)
    before = [k.clone() for k in cache.k], cache.pos.clone(), cache.length
    with pytest.raises(ValueError, match="made for"):
        model.forward(w, config, torch.arange(3), LambdaConfig(2, 9, 9), cache)
    with pytest.raises(ValueError, match="takes one token"):
        model.forward(w, config, torch.arange(3), lam, cache, decoding=True)
    assert all(torch.equal(a, b) for a, b in zip(before[0], cache.k))
    assert torch.equal(before[1], cache.pos) and before[2] == cache.length == 5
