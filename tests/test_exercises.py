"""The classroom exercises' checks (docs/exercises.md): each answer in lminf_min/exercises.py
against a NumPy definition written here, pair by pair, independently of both the exercises and the
solutions.

Unwritten exercises are skipped, or fail with --attempted; --answers FILE checks another file
(docs/solutions.py).
"""

import importlib.util
import json
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from conftest import ROOT, run_module
from lminf_min import mask, reference
from lminf_min.config import LambdaConfig, LlamaConfig
from lminf_min.tokenizer import Tokenizer


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
                pytest.fail(
                    f"{name} is not written yet: replace its `raise NotImplementedError` in {path}"
                )
            pytest.skip(f"{name} not attempted yet")

    return call


def grid(T):
    return np.arange(T)[:, None], np.arange(T)[None, :]  # an answer's mask function gets these


def each_pair(T, rule):
    """(T, T) array of rule(i, j) for every query i and key j <= i, 0 / False above the diagonal."""
    return np.array([[rule(i, j) if j <= i else 0 for j in range(T)] for i in range(T)])


SIZES = dict(T=st.integers(1, 40), G=st.integers(0, 6), L=st.integers(1, 12))


@settings(max_examples=25, deadline=None)
@given(**SIZES)
def test_window_mask(ex, T, G, L):
    expected = each_pair(T, lambda i, j: i - j < L).astype(bool)
    np.testing.assert_array_equal(ex("window_mask", *grid(T), L), expected)


@settings(max_examples=25, deadline=None)
@given(**SIZES)
def test_lambda_mask(ex, T, G, L):
    expected = each_pair(T, lambda i, j: i - j < L or j < G).astype(bool)
    np.testing.assert_array_equal(ex("lambda_mask", *grid(T), G, L), expected)
    # as the model has it
    np.testing.assert_array_equal(expected, mask.lambda_mask(*grid(T), LambdaConfig(G, L, L)))


def cache_numbers(i, G, L):
    """StreamingLLM's cache in front of query i: the positions it holds, in order; a position's
    number is its index."""
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
    seen = lambda i: (
        {i - n * stride for n in range(L) if i - n * stride >= 0} | set(range(min(G, i + 1)))
    )
    expected = each_pair(T, lambda i, j: j in seen(i)).astype(bool)
    np.testing.assert_array_equal(ex("dilated_mask", *grid(T), G, L, stride), expected)


@settings(max_examples=25, deadline=None)
@given(T=SIZES["T"], d_max=st.integers(0, 12))
def test_capped_distance(ex, T, d_max):
    got = ex("capped_distance", T, d_max)
    expected = each_pair(T, lambda i, j: min(i - j, d_max))
    np.testing.assert_array_equal(np.tril(got), expected)


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 60),
    G=SIZES["G"],
    L=SIZES["L"],
    k=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_top_k_middle(ex, T, G, L, k, seed):
    logits, i = np.random.default_rng(seed).standard_normal(T), T - 1
    middle = [j for j in range(T) if j >= G and i - j >= L]
    expected = sorted(middle, key=lambda j: -logits[j])[:k]
    np.testing.assert_array_equal(
        np.asarray(ex("top_k_middle", logits, i, G, L, k)).reshape(-1), expected
    )


def run_checks(*args):
    return run_module(
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(ROOT / "tests" / "test_exercises.py"),
        "-k",
        "not checks_tell and not runs_through",
        *args,
    )


def test_checks_tell_the_starting_point_from_the_solutions():
    """With --attempted, every check fails on the unmodified lminf_min/exercises.py and passes on
    docs/solutions.py."""
    stubs = run_checks("--attempted")
    assert (
        stubs.returncode == 1
        and re.search(r"\b6 failed\b", stubs.stdout)
        and "0 passed" not in stubs.stdout
    ), stubs.stdout[-2000:]
    solved = run_checks("--attempted", "--answers", str(ROOT / "docs" / "solutions.py"))
    assert solved.returncode == 0 and re.search(r"\b6 passed\b", solved.stdout), solved.stdout[
        -2000:
    ]


def test_a_mask_answer_runs_through_compiled_flex_on_the_model(sp_ckpt, tmp_path):
    """`run dilated_mask --flex`: the answer becomes the mask_mod of the torch model (compiled
    FlexAttention); its perplexity equals the NumPy forward pass with the dilated mask built here
    pair by pair."""
    text = tmp_path / "words.txt"
    text.write_text(
        " ".join(np.random.default_rng(0).choice(["the", "cat", "sat", "on", "a", "mat"], 400))
    )
    T, G, L = 200, 2, 12
    r = run_module(
        "lminf_min.exercises",
        "run",
        "dilated_mask",
        "--flex",
        "--answers",
        str(ROOT / "docs" / "solutions.py"),
        "--ckpt",
        str(sp_ckpt),
        "--text",
        str(text),
        "--tokens",
        str(T),
        "--n-global",
        str(G),
        "--n-local",
        str(L),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = float(re.search(r"FlexAttention\): ([\d.]+)", r.stdout)[1])
    ids = np.array(Tokenizer(sp_ckpt).encode(text.read_text())[:T])
    # stride 2, L/2 keys
    seen = lambda i: (
        {i - n * 2 for n in range(L // 2) if i - n * 2 >= 0} | set(range(min(G, i + 1)))
    )
    dilated = each_pair(len(ids), lambda i, j: j in seen(i)).astype(bool)
    cfg = LlamaConfig.from_dict(json.loads((sp_ckpt / "config.json").read_text()))
    logits = reference.forward(
        load_file(str(sp_ckpt / "model.safetensors")),
        cfg,
        ids[:-1],
        LambdaConfig(G, L, L),
        mask=lambda i, j, lam: dilated[i, j],
    )
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = math.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean())
    assert len(ids) == T and abs(got - expected) <= 0.005 + 1e-4 * expected, (got, expected)
