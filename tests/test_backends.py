"""The Λ attention backends against the NumPy definition: a chunk after cached keys in the ring's
slot order, FlexAttention compiled on fixed shapes, any mask as a mask_mod, and the choice of
backend per device."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import BACKENDS, THETA, rand, random_weights, tiny_config
from lminf_min import caches, mask, model, reference
from lminf_min.config import LambdaConfig, LlamaConfig


def ring_case(N, T, G, L, H_kv, rep, D, seed):
    """The last T of N positions as a chunk after a LambdaCache's keys: the starting tokens, then
    the window before the chunk in ring-slot order (position p >= G in slot G + (p - G) % L), then
    the chunk itself. Returns the NumPy expectation (the last T rows of the dense definition) and
    the torch inputs."""
    q, k, v = (
        rand((H_kv * rep, N, D), seed),
        rand((H_kv, N, D), seed + 1),
        rand((H_kv, N, D), seed + 2),
    )
    start = N - T
    window = [p for p in range(max(G, start - L + 1), start)]
    # slot order: wrapped once the stream passed G + L
    ring = sorted(window, key=lambda p: (p - G) % L)
    k_pos = torch.tensor(
        list(range(min(G, start))) + ring + list(range(start, N)), dtype=torch.int64
    )
    angles = model.rope_angles(torch.arange(N), D, THETA)
    qt, kt = model.rope(torch.tensor(q), angles), model.rope(torch.tensor(k), angles)
    inputs = qt[:, start:], kt[:, k_pos], torch.tensor(v)[:, k_pos], torch.arange(start, N), k_pos
    return inputs, lambda lam: reference.attention(
        q, reference.repeat_kv(k, rep), reference.repeat_kv(v, rep), THETA, lam
    )[:, start:]


@settings(max_examples=40, deadline=None)
@given(
    L=st.integers(1, 16),
    G=st.integers(0, 6),
    wrapped=st.integers(0, 40),
    T=st.integers(1, 20),
    extra=st.integers(0, 20),
    H_kv=st.integers(1, 3),
    rep=st.integers(1, 3),
    D=st.sampled_from([2, 8, 16]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    name=st.sampled_from(list(BACKENDS)),
    seed=st.integers(0, 2**16),
)
def test_a_chunk_after_a_wrapped_ring(L, G, wrapped, T, extra, H_kv, rep, D, dtype, name, seed):
    """Keys come in the ring's slot order; every query is past the first window (as in a long
    stream)."""
    lam = LambdaConfig(G, L, L - 1 + extra)
    (q, k, v, q_pos, k_pos), expected = ring_case(G + L + wrapped + T, T, G, L, H_kv, rep, D, seed)
    got = model.attention(
        q.to(dtype), k.to(dtype), v.to(dtype), THETA, lam, q_pos, k_pos, backend=BACKENDS[name]
    )
    diff = np.abs(got.double().numpy() - expected(lam)).max()
    assert diff <= (1e-5 if dtype == torch.float32 else 0.05), (
        f"max abs diff {diff:.3g} ({name}, {dtype})"
    )


@pytest.fixture(scope="module")
def compiled():
    """One compiled flex for the fixed shapes below (each compiles once). More than dynamo's default
    of 8 recompiles would silently fall back to eager flex, which would no longer test the compiled
    kernel."""
    with torch._dynamo.config.patch(recompile_limit=32, error_on_recompile=False):
        yield model.Flex(compiled=True)


@pytest.mark.parametrize(
    "N, T, G, L, d_max, H_kv, rep, D",
    [
        (300, 300, 4, 64, 64, 2, 3, 16),
        (700, 200, 10, 128, 200, 1, 4, 32),
    ],  # a whole sequence; a chunk after a ring
)
def test_compiled_flex_on_fixed_shapes(compiled, N, T, G, L, d_max, H_kv, rep, D):
    lam = LambdaConfig(G, L, d_max)
    (q, k, v, q_pos, k_pos), expected = ring_case(N, T, G, L, H_kv, rep, D, seed=N)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.05)):
        got = compiled(q.to(dtype), k.to(dtype), v.to(dtype), THETA, lam, q_pos, k_pos)
        diff = np.abs(got.double().numpy() - expected(lam)).max()
        assert diff <= tol, f"max abs diff {diff:.3g} ({dtype})"


def test_compiled_flex_through_the_model_and_the_bounded_cache(compiled):
    """The whole-model forward, then chunked prefill and decoding through the LambdaCache (full
    after the first chunk, so three shapes in all), with compiled flex against the NumPy forward
    pass."""
    cfg = tiny_config()
    w, config, lam = random_weights(cfg, 3), LlamaConfig.from_dict(cfg), LambdaConfig(2, 6, 8)
    tokens = np.random.default_rng(3).integers(0, cfg["vocab_size"], 26)
    expected = reference.forward(w, config, tokens, lam)
    w, tokens = {n: torch.from_numpy(t) for n, t in w.items()}, torch.from_numpy(tokens)
    whole = model.forward(w, config, tokens, lam=lam, backend=compiled)
    cache = caches.LambdaCache(config.num_hidden_layers, lam)
    steps = [tokens[:20]] + [tokens[a : a + 1] for a in range(20, 26)]
    chunked = torch.cat([model.forward(w, config, t, lam, cache, backend=compiled) for t in steps])
    for name, got in (("whole", whole), ("chunked + decode", chunked)):
        diff = np.abs(got.numpy() - expected).max()
        assert diff <= 1e-5, f"max abs diff {diff:.3g} ({name})"


def dilated(i, j, lam):
    """Every second key of a window of 2L, and the starting tokens: a mask the block loop cannot
    compute."""
    d = i - j
    return (d >= 0) & (((d % 2 == 0) & (d < 2 * lam.n_local)) | (j < lam.n_global))


@pytest.mark.parametrize(
    "flex", [model.Flex(dilated, compiled=False), model.Flex(mask.lambda_mask, compiled=False)]
)
def test_flex_runs_any_mask_function(flex):
    """The mask function is the mask_mod: the same function given to the NumPy definition gives the
    same output."""
    T, lam = 90, LambdaConfig(3, 10, 40)
    (q, k, v, q_pos, k_pos), _ = ring_case(T, T, 3, 10, 2, 2, 8, seed=5)
    qn, kn, vn = rand((4, T, 8), 5), rand((2, T, 8), 6), rand((2, T, 8), 7)
    expected = reference.attention(
        qn, reference.repeat_kv(kn, 2), reference.repeat_kv(vn, 2), THETA, lam, mask=flex.mask
    )
    got = flex(q, k, v, THETA, lam, q_pos, k_pos).double().numpy()
    assert np.abs(got - expected).max() <= 1e-5


def test_the_private_cpu_kernel_is_there():
    """lambda_attention needs torch's fused CPU kernel that also returns the log-sum-exp
    (model.cpu_flash_attention)."""
    assert hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"), (
        f"torch {torch.__version__} no longer has "
        "aten._scaled_dot_product_flash_attention_for_cpu: "
        "model.cpu_flash_attention needs another fused CPU kernel that returns the log-sum-exp"
    )
    q, k, v = torch.randn(3, 5, 8), torch.randn(3, 7, 8), torch.randn(3, 7, 8)
    o, lse = model.cpu_flash_attention(q, k, v)
    s = q @ k.transpose(1, 2) / 8**0.5
    torch.testing.assert_close(lse, s.logsumexp(-1))
    torch.testing.assert_close(o, s.softmax(-1) @ v)


def test_backend_is_chosen_once_per_device():
    # the block loop: faster than compiled flex on this CPU
    assert model.pick_backend("cpu") is model.lambda_attention
    assert isinstance(model.pick_backend("cuda"), model.Flex)


@pytest.mark.cuda
def test_flex_on_cuda_matches_numpy():
    lam = LambdaConfig(4, 64, 64)
    (q, k, v, q_pos, k_pos), expected = ring_case(600, 200, 4, 64, 2, 3, 16, seed=1)
    cuda = [x.cuda() for x in (q, k, v, q_pos, k_pos)]
    got = model.pick_backend("cuda")(*cuda[:3], THETA, lam, *cuda[3:]).cpu().double().numpy()
    assert np.abs(got - expected(lam)).max() <= 1e-5
