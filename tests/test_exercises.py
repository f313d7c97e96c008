"""The classroom exercises' checks (docs/exercises.md): each answer in lminf_min/exercises.py against a NumPy definition
written here, pair by pair, independently of both the exercises and the solutions.

Unwritten exercises are skipped, or fail with --attempted; --answers FILE checks another file (docs/solutions.py).
"""
import importlib.util
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import ROOT
from lminf_min import reference
from lminf_min.config import LambdaConfig


@pytest.fixture(scope="module")
def ex(request):  # stateless: one per module, so hypothesis may share it
    path = request.config.getoption("--answers") or str(ROOT / "lminf_min" / "exercises.py")
    spec = importlib.util.spec_from_file_location("answers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def call(name, *args):
        try:
            return getattr(module, name)(*args)
        except NotImplementedError:
            if request.config.getoption("--attempted"):
                pytest.fail(f"{name} is not written yet: replace its `raise NotImplementedError` in {path}")
            pytest.skip(f"{name} not attempted yet")
    return call


def each_pair(T, rule):
    """(T, T) array of rule(i, j) for every query i and key j <= i, 0 / False above the diagonal."""
    return np.array([[rule(i, j) if j <= i else 0 for j in range(T)] for i in range(T)])


SIZES = dict(T=st.integers(1, 40), G=st.integers(0, 6), L=st.integers(1, 12))


@settings(max_examples=25, deadline=None)
@given(**SIZES)
def test_window_mask(ex, T, G, L):
    expected = each_pair(T, lambda i, j: i - j < L).astype(bool)
    np.testing.assert_array_equal(ex("window_mask", T, L), expected)


@settings(max_examples=25, deadline=None)
@given(**SIZES)
def test_lambda_mask(ex, T, G, L):
    expected = each_pair(T, lambda i, j: i - j < L or j < G).astype(bool)
    np.testing.assert_array_equal(ex("lambda_mask", T, G, L), expected)
    np.testing.assert_array_equal(expected, reference.lambda_mask(T, LambdaConfig(G, L, L)))  # the paper's, as the model has it


def cache_numbers(i, G, L):
    """StreamingLLM's cache in front of query i: the positions it holds, in order; a position's number is its index."""
    return sorted(set(range(min(G, i + 1))) | set(range(max(0, i - L + 1), i + 1)))


@settings(max_examples=25, deadline=None)
@given(**SIZES)
def test_streaming_distance(ex, T, G, L):
    got = ex("streaming_distance", T, G, L)
    for i in range(T):
        held = cache_numbers(i, G, L)
        for j in range(T):
            assert got[i, j] == (held.index(i) - held.index(j) if j in held else 0), (i, j)


@settings(max_examples=25, deadline=None)
@given(**SIZES, stride=st.integers(1, 4))
def test_dilated_mask(ex, T, G, L, stride):
    seen = lambda i: {i - n * stride for n in range(L) if i - n * stride >= 0} | set(range(min(G, i + 1)))
    expected = each_pair(T, lambda i, j: j in seen(i)).astype(bool)
    np.testing.assert_array_equal(ex("dilated_mask", T, G, L, stride), expected)


@settings(max_examples=25, deadline=None)
@given(T=SIZES["T"], d_max=st.integers(0, 12))
def test_capped_distance(ex, T, d_max):
    got = ex("capped_distance", T, d_max)
    expected = each_pair(T, lambda i, j: min(i - j, d_max))
    np.testing.assert_array_equal(np.tril(got), expected)


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 60), G=SIZES["G"], L=SIZES["L"], k=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_top_k_middle(ex, T, G, L, k, seed):
    logits, i = np.random.default_rng(seed).standard_normal(T), T - 1
    middle = [j for j in range(T) if j >= G and i - j >= L]
    expected = sorted(middle, key=lambda j: -logits[j])[:k]
    np.testing.assert_array_equal(np.asarray(ex("top_k_middle", logits, i, G, L, k)).reshape(-1), expected)


def run_checks(*args):
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_exercises.py"),
                           "-k", "not checks_tell", *args], capture_output=True, text=True, cwd=ROOT)


def test_checks_tell_the_starting_point_from_the_solutions():
    """With --attempted, every check fails on the unmodified lminf_min/exercises.py and passes on docs/solutions.py."""
    stubs = run_checks("--attempted")
    assert stubs.returncode == 1 and re.search(r"\b6 failed\b", stubs.stdout) and "0 passed" not in stubs.stdout, stubs.stdout[-2000:]
    solved = run_checks("--attempted", "--answers", str(ROOT / "docs" / "solutions.py"))
    assert solved.returncode == 0 and re.search(r"\b6 passed\b", solved.stdout), solved.stdout[-2000:]
