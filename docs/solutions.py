"""Worked solutions to lminf_min/exercises.py (docs/exercises.md). Look only after trying.

Check them as the tests check yours: python -m pytest tests/test_exercises.py --answers
docs/solutions.py
"""

import numpy as np


def _pairs(T):
    return np.arange(T)[:, None], np.arange(T)[None, :]  # i (query) down, j (key) across


def window_mask(i, j, n_local):
    return (j <= i) & (i - j < n_local)


def lambda_mask(i, j, n_global, n_local):
    return (j <= i) & ((i - j < n_local) | (j < n_global))


def keys_seen(i, n_global, n_local):
    # the window holds min(i + 1, L) keys; the starting tokens add those j < G it no longer holds,
    # j <= i - L: min(G, i - L + 1) of them once i - L + 1 > 0
    return np.minimum(i + 1, n_local) + np.clip(i - n_local + 1, 0, n_global)


def streaming_distance(T, n_global, n_local):
    # The cache in front of query i holds the starting tokens 0..G-1 and the window i-L+1..i,
    # numbered in order. A window key keeps its true distance i - j (the numbers between them are
    # consecutive). The query is number min(i, G + L - 1) (the count of cached tokens before it) and
    # a starting token j is number j, so a starting token that has left the window is scored at
    # min(i, G + L - 1) - j: bounded, like LM-Infinite's.
    i, j = _pairs(T)
    in_window = (j <= i) & (i - j < n_local)
    starting = (j <= i) & (j < n_global) & ~in_window
    return np.where(
        in_window, i - j, np.where(starting, np.minimum(i, n_global + n_local - 1) - j, 0)
    )


def dilated_mask(i, j, n_global, n_local, stride):
    d = i - j
    return (d >= 0) & (((d % stride == 0) & (d < n_local * stride)) | (j < n_global))


def capped_distance(T, d_max):
    i, j = _pairs(T)
    return np.minimum(i - j, d_max)


def top_k_middle(logits, i, n_global, n_local, k):
    j = np.arange(len(logits))
    middle = (j >= n_global) & (i - j >= n_local)
    candidates = j[middle]
    return candidates[np.argsort(-logits[middle], kind="stable")[:k]]
