"""Λ attention and the distance limit in torch, every backend against the NumPy definition: one
call, extreme logits, a chunk after cached keys, the whole model, the real model, memory."""

import math
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import weights
from conftest import BACKENDS, ROOT, THETA, rand, random_weights, tiny_config
from lminf_min import mask, model, reference
from lminf_min.config import LambdaConfig, LlamaConfig, UserError


def torch_lambda(q, k, v, lam, dtype=torch.float32, theta=THETA, backend=None):
    """Run the torch path the way forward() does: q and k rotated at positions 0..T-1 first."""
    T, D = q.shape[1], q.shape[2]
    angles = model.rope_angles(torch.arange(T), D, theta)
    qt, kt, vt = (torch.tensor(x, dtype=dtype) for x in (q, k, v))
    pos = torch.arange(T)
    return (
        model.attention(
            model.rope(qt, angles),
            model.rope(kt, angles),
            vt,
            theta,
            lam,
            pos,
            pos,
            backend=backend,
        )
        .double()
        .numpy()
    )


@st.composite
def lambda_cases(draw, d_max_any=False):
    L = draw(st.integers(1, 24))
    return dict(
        T=draw(st.integers(1, 80)),
        G=draw(st.integers(0, 12)),
        L=L,
        d_max=draw(st.integers(0, 40) if d_max_any else st.integers(L - 1, L + 30)),
        H_kv=draw(st.integers(1, 3)),
        rep=draw(st.integers(1, 3)),
        D=draw(st.sampled_from([2, 4, 8, 16])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=60, deadline=None)
@given(
    c=lambda_cases(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    block=st.sampled_from([1, 7, 512]),
    name=st.sampled_from(list(BACKENDS)),
)
def test_torch_path_matches_numpy_definition(c, dtype, block, name):
    """Every backend (for the block loop: any block size, so a ragged last block)."""
    H, T, D = c["H_kv"] * c["rep"], c["T"], c["D"]
    q, k, v = (
        rand((H, T, D), c["seed"]),
        rand((c["H_kv"], T, D), c["seed"] + 1),
        rand((c["H_kv"], T, D), c["seed"] + 2),
    )
    lam = LambdaConfig(c["G"], c["L"], c["d_max"])
    expected = reference.attention(
        q, reference.repeat_kv(k, c["rep"]), reference.repeat_kv(v, c["rep"]), THETA, lam
    )
    backend = partial(BACKENDS[name], most=block) if name.startswith("blocks") else BACKENDS[name]
    got = torch_lambda(q, k, v, lam, dtype, backend=backend)
    tol = 1e-5 if dtype == torch.float32 else 0.05
    assert np.abs(got - expected).max() <= tol, (
        f"max abs diff {np.abs(got - expected).max():.3g} ({dtype}, {c})"
    )


# float16 itself ends at 65504
LARGEST_LOGIT = {torch.float32: 1e30, torch.bfloat16: 1e30, torch.float16: 1e4}


@settings(max_examples=60, deadline=None)
@given(
    c=lambda_cases(),
    dtype=st.sampled_from(list(LARGEST_LOGIT)),
    magnitude=st.floats(0, 1),
    outliers=st.integers(0, 2**16),
    name=st.sampled_from(list(BACKENDS)),
)
# two keys tie at logit 3.56e21: a log-sum-exp merge counted both with weight 1 (output 1112)
@example(
    c=dict(T=52, G=0, L=4, d_max=3, H_kv=1, rep=1, D=8, seed=0),
    dtype=torch.bfloat16,
    magnitude=0.75,
    outliers=0,
    name="blocks written out",
)
def test_masked_keys_never_count_even_at_extreme_logits(c, dtype, magnitude, outliers, name):
    """Logits up to 1e30 (1e4 in float16), some values ±1000: each output is finite and lies between
    the smallest and largest value among the keys its query sees, so no masked key leaked in and no
    row was all -inf."""
    H, T, D = c["H_kv"] * c["rep"], c["T"], c["D"]
    # |q·k| / sqrt(D) reaches about LARGEST_LOGIT ** magnitude
    scale = math.sqrt(LARGEST_LOGIT[dtype] ** magnitude / D)
    q, k = rand((H, T, D), c["seed"], scale), rand((c["H_kv"], T, D), c["seed"] + 1, scale)
    v = np.clip(rand((c["H_kv"], T, D), c["seed"] + 2), -1, 1)
    v[:, np.random.default_rng(outliers).random(T) < 0.3] *= 1000
    lam = LambdaConfig(c["G"], c["L"], c["d_max"])
    got = torch_lambda(q, k, v, lam, dtype, backend=BACKENDS[name])  # (H, T, D)
    assert np.isfinite(got).all()
    visible = mask.lambda_mask(np.arange(T)[:, None], np.arange(T)[None, :], lam)  # (T, T)
    vv = np.repeat(v, c["rep"], axis=0)[:, None, :, :]  # (H, 1, T, D)
    low = np.where(visible[None, :, :, None], vv, np.inf).min(axis=2)  # (H, T, D)
    high = np.where(visible[None, :, :, None], vv, -np.inf).max(axis=2)
    # rounding
    slack = 0.01 * (high - low) + (1e-6 if dtype == torch.float32 else 0.02) * np.maximum(
        abs(low), abs(high)
    )
    assert (got >= low - slack).all() and (got <= high + slack).all()


@settings(max_examples=40, deadline=None)
@given(c=lambda_cases(d_max_any=True))
def test_short_sequences_are_plain_causal_attention(c):
    """T <= n_local: Λ attention is full causal attention whatever G and d_max (d_max >= L - 1 >= T
    - 1)."""
    T = min(c["T"], c["L"])
    assume(c["d_max"] >= T - 1)
    q, k, v = (
        rand((2, T, c["D"]), c["seed"]),
        rand((2, T, c["D"]), c["seed"] + 1),
        rand((2, T, c["D"]), c["seed"] + 2),
    )
    lam = LambdaConfig(c["G"], c["L"], c["d_max"])
    np.testing.assert_allclose(
        reference.attention(q, k, v, THETA, lam), reference.attention(q, k, v, THETA), atol=1e-12
    )
    if c["d_max"] >= c["L"] - 1:
        for backend in BACKENDS.values():
            np.testing.assert_allclose(
                torch_lambda(q, k, v, lam, backend=backend), torch_lambda(q, k, v, None), atol=1e-5
            )


@settings(max_examples=60, deadline=None)
@given(
    S=st.integers(1, 70),
    T=st.integers(1, 70),
    H_kv=st.integers(1, 3),
    rep=st.integers(1, 3),
    D=st.sampled_from([2, 8, 16]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
    cpu_kernel=st.booleans(),
)
def test_a_chunk_after_cached_keys_is_the_last_rows_of_causal_attention(
    S, T, H_kv, rep, D, dtype, seed, cpu_kernel
):
    """Full attention (no lam) of the chunk's T queries at positions S-T..S-1 over all S keys
    (chunked prefill, decoding) equals the last T rows of the NumPy causal definition: cached keys
    unmasked, the chunk's own keys causal."""
    T = 1 + T % S  # any chunk length up to S; T < S is the chunk after cached keys
    q, k, v = (
        rand((H_kv * rep, S, D), seed),
        rand((H_kv, S, D), seed + 1),
        rand((H_kv, S, D), seed + 2),
    )
    expected = reference.attention(
        q, reference.repeat_kv(k, rep), reference.repeat_kv(v, rep), THETA
    )[:, S - T :]
    angles = model.rope_angles(torch.arange(S), D, THETA)
    qt, kt, vt = (torch.tensor(x, dtype=dtype) for x in (q, k, v))
    qt, kt = model.rope(qt, angles)[:, S - T :], model.rope(kt, angles)
    got = model.causal_attention(qt, kt, vt, cpu_kernel).double().numpy()
    tol = 1e-5 if dtype == torch.float32 else 0.05
    assert np.abs(got - expected).max() <= tol, f"max abs diff {np.abs(got - expected).max():.3g}"


def test_queries_inside_the_first_window_need_their_keys_in_order():
    """Queries 2..5 with L = 4: positions 2 and 3 take the causal path, which reads keys 0..3 as the
    first four."""
    q, k = torch.zeros(1, 4, 4), torch.zeros(1, 6, 4)
    with pytest.raises(ValueError, match="in order"):
        model.attention(
            q,
            k,
            k,
            THETA,
            LambdaConfig(1, 4, 4),
            torch.arange(2, 6),
            torch.tensor([0, 2, 1, 3, 4, 5]),
        )


def test_torch_path_refuses_small_d_max():
    q = torch.zeros(1, 4, 4)
    with pytest.raises(UserError, match="reference"):
        model.attention(q, q, q, THETA, LambdaConfig(1, 3, 1), torch.arange(4), torch.arange(4))


@settings(max_examples=10, deadline=None)
@given(
    G=st.integers(0, 6),
    L=st.integers(1, 20),
    extra=st.integers(0, 15),
    T=st.integers(1, 70),
    seed=st.integers(0, 2**16),
    name=st.sampled_from(list(BACKENDS)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_whole_model_lambda_forward_matches_reference(G, L, extra, T, seed, name, dtype):
    """Every backend, float32 and bfloat16 (the definition gets the same rounded weights)."""
    cfg = tiny_config()
    w = {n: torch.from_numpy(t).to(dtype) for n, t in random_weights(cfg, seed).items()}
    config, lam = LlamaConfig.from_dict(cfg), LambdaConfig(G, L, L - 1 + extra)
    tokens = np.random.default_rng(seed).integers(0, cfg["vocab_size"], T)
    got = (
        model.forward(w, config, torch.from_numpy(tokens), lam=lam, backend=BACKENDS[name])
        .float()
        .numpy()
    )
    expected = reference.forward({n: t.float().numpy() for n, t in w.items()}, config, tokens, lam)
    diff, scale = np.abs(got - expected).max(), np.abs(expected).max()
    # bf16 keeps 8 bits of mantissa: through whole tiny models even plain causal attention is off
    # its float64 definition by several percent of the largest logit, so 10%; float32 is exact
    tol = 1e-5 if dtype == torch.float32 else 0.1 * max(1, scale)
    assert diff <= tol, f"max abs diff {diff:.3g} ({name}, {dtype}, largest logit {scale:.3g})"


def test_default_model_lambda_equals_vanilla_within_window(default_ckpt):
    config, w = weights.load_checkpoint(default_ckpt)
    tokens = torch.randint(
        0, config.vocab_size, (1500,), generator=torch.Generator().manual_seed(0)
    )
    lam = LambdaConfig.for_model(config)
    assert (lam.n_global, lam.n_local, lam.d_max) == (10, 8192, 8192)
    diff = (
        (model.forward(w, config, tokens, lam=lam) - model.forward(w, config, tokens)).abs().max()
    )
    assert diff <= 1e-3, f"max abs diff {diff:.3g}"


PEAK_RSS = """
import resource, sys, torch
from lminf_min import model
from lminf_min.config import LambdaConfig
torch.set_num_threads(1)
T = int(sys.argv[1])
q, k, v = torch.randn(9, T, 64), torch.randn(3, T, 64), torch.randn(3, T, 64)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pos = torch.arange(T)
out = model.lambda_attention(q, k, v, 1e4, LambdaConfig(10, 512, 512), pos, pos)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""


def attention_peak_kib(T):
    """Peak RSS growth (KiB) of one Λ attention call over inputs already in memory, in a fresh
    process."""
    r = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(T)], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def test_lambda_attention_memory_is_linear():
    """Peak memory of the attention at 4T is at most about 4x that at T (measured as peak RSS growth
    of the call).

    The output (H, T, D) grows linearly; what one block of queries reads (G + L + BLOCK keys) does
    not grow at all. A T x T score matrix would grow 16x (at 16384: 9 heads x 16384^2 x 4 bytes =
    9.7 GB).
    """
    small, large = attention_peak_kib(4096), attention_peak_kib(16384)
    assert large <= 4.5 * small, f"peak growth {small} KiB at T=4096, {large} KiB at T=16384"
