"""The maths of DESIGN.md §1-2 on the NumPy definition: the mask's row counts and picture, the
reductions to causal and window attention, the entropy bounds, RoPE's use of distance only."""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import THETA, rand, run_module
from lminf_min import mask, reference
from lminf_min.config import LambdaConfig


def m(i, G, L):
    """Keys row i sees under the Λ mask (DESIGN.md §1)."""
    return min(i + 1, L) + max(0, min(G, i - L + 1))


def entropy(p):
    return -(p * np.log(np.where(p > 0, p, 1))).sum(-1)


def test_reductions_window_and_vanilla():
    """G = 0 is a sliding window; L = D = infinity (here: > T) is vanilla."""
    T, D = 40, 8
    q, k, v = rand((2, T, D), 1), rand((2, T, D), 2), rand((2, T, D), 3)
    np.testing.assert_allclose(
        reference.attention(q, k, v, THETA, LambdaConfig(0, 10**9, 10**9)),
        reference.attention(q, k, v, THETA),
        atol=1e-12,
    )
    w = reference.attention_weights(q, k, THETA, LambdaConfig(0, 7, 7))
    i, j = np.indices((T, T))
    assert np.all(w[:, (i - j >= 7) | (j > i)] == 0) and np.all(w[:, (i - j < 7) & (j <= i)] > 0)


@given(T=st.integers(1, 300), G=st.integers(0, 20), L=st.integers(1, 50))
def test_mask_row_counts(T, G, L):
    i = np.arange(T)
    mask_ = mask.lambda_mask(i[:, None], i[None, :], LambdaConfig(G, L, L))
    assert mask_.sum(1).tolist() == [m(i, G, L) for i in range(T)]
    assert mask_.diagonal().all() and mask_[:, :G][np.tril_indices(min(G, T), m=min(G, T))].all()
    assert mask_.sum(1).max() <= G + L


@given(n=st.integers(1, 200), B=st.floats(0, 20), seed=st.integers(0, 2**16))
def test_entropy_bounds(n, B, seed):
    """For logits w in [-B, B]^n: ln n - 2B <= H <= ln n, and ln n - (max w - min w) <= H."""
    w = np.random.default_rng(seed).uniform(-B, B, n)
    H = entropy(reference.softmax(w))
    assert math.log(n) - 2 * B - 1e-9 <= H <= math.log(n) + 1e-9
    assert math.log(n) - (w.max() - w.min()) - 1e-9 <= H


@settings(max_examples=20, deadline=None)
@given(
    G=st.integers(0, 8),
    L=st.integers(1, 16),
    T=st.integers(30, 120),
    scale=st.floats(0, 3),
    seed=st.integers(0, 2**16),
)
def test_lambda_entropy_bounded_full_attention_not(G, L, T, scale, seed):
    """Every Λ row has H <= ln m(i) <= ln(G+L) at any length; full attention rows pass ln(G+L) past
    G+L."""
    q, k = rand((2, T, 8), seed, scale), rand((2, T, 8), seed + 1, scale)
    H_lam = entropy(reference.attention_weights(q, k, THETA, LambdaConfig(G, L, L)))  # (2, T)
    bound = np.log([m(i, G, L) for i in range(T)])
    assert np.all(H_lam <= bound + 1e-9) and np.all(bound <= math.log(G + L) + 1e-12)
    zeros = np.zeros((1, T, 8))  # all logits equal: full attention is uniform over i + 1 keys
    H_full = entropy(reference.attention_weights(zeros, zeros, THETA))[0]
    assert np.all(H_full[G + L :] > math.log(G + L))


@given(
    D=st.sampled_from([2, 4, 8, 64]),
    m_=st.integers(-(10**6), 10**6),
    n_=st.integers(-(10**6), 10**6),
    shift=st.integers(-(10**6), 10**6),
    seed=st.integers(0, 2**16),
)
def test_rope_preserves_norms_and_depends_only_on_distance(D, m_, n_, shift, seed):
    q, k = rand((1, D), seed), rand((1, D), seed + 1)
    rot = lambda x, p: reference.rope(x, reference.rope_angles([p], D, THETA))
    assert np.isclose(np.linalg.norm(rot(q, m_)), np.linalg.norm(q))
    assert np.isclose(
        (rot(q, m_) * rot(k, n_)).sum(), (rot(q, m_ + shift) * rot(k, n_ + shift)).sum(), atol=1e-6
    )
    assert np.isclose((rot(q, m_) * rot(k, n_)).sum(), (rot(q, m_ - n_) * k).sum(), atol=1e-6)


def test_mask_picture_rows_count_m_i(tmp_path):
    png = tmp_path / "m.png"
    r = run_module(
        "lminf_min.mask", "--length", "24", "--n-global", "3", "--n-local", "6", "--png", png
    )
    assert r.returncode == 0, r.stderr
    rows = [s.split() for s in r.stdout.splitlines() if s.strip() and s.split()[0].isdigit()]
    assert len(rows) == 24
    for i, row in enumerate(rows):
        m = min(i + 1, 6) + max(0, min(3, i - 6 + 1))
        assert sum(c in "#G+" for c in row[1:25]) == m and row[-1] == f"m={m}"
        assert row[1 + i] == "#" and all(row[1 + j] in "#G" for j in range(min(3, i + 1)))
    assert png.stat().st_size > 1000


@settings(max_examples=30, deadline=None)
@given(
    G=st.integers(1, 4),
    L=st.integers(1, 8),
    extra=st.integers(0, 12),
    T=st.integers(2, 40),
    seed=st.integers(0, 2**16),
)
def test_paper_and_authors_code_differ_only_for_starting_tokens_closer_than_d_max(
    G, L, extra, T, seed
):
    """With D > L the authors' code scores every starting token outside the window at one
    distance, min(D, T - 1) (DESIGN.md §1); the paper, and this code, at min(i - j, D) pair by
    pair. Both rules written here from those words: they differ exactly for starting tokens with
    L <= i - j < D (where i - j is not that one distance), and so do the rows that see one."""
    D = L + extra
    lam = LambdaConfig(G, L, D)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    paper = np.minimum(i - j, D)
    authors = np.where((j < G) & (i - j >= L), min(D, T - 1), i - j)
    visible = mask.lambda_mask(i, j, lam)
    expected = visible & (j < G) & (L <= i - j) & (i - j < D) & (i - j != min(D, T - 1))
    np.testing.assert_array_equal(visible & (paper != authors), expected)
    np.testing.assert_array_equal(
        np.where(visible, mask.effective_distance(i, j, lam), 0), np.where(visible, paper, 0)
    )
    q, k, v = rand((2, T, 8), seed), rand((2, T, 8), seed + 1), rand((2, T, 8), seed + 2)
    ours = reference.attention(q, k, v, THETA, lam)
    theirs = reference.attention(q, k, v, THETA, lam, distance=lambda i, j, lam: authors[i, j])
    rows_differ = np.abs(ours - theirs).max(axis=(0, 2)) > 1e-12
    np.testing.assert_array_equal(rows_differ, expected.any(axis=1))
