"""The classroom exercises' checks (docs/exercises.md): each answer in lminf_min/exercises.py
against a NumPy definition written here, pair by pair, independently of both the exercises and the
solutions.

Unwritten exercises are skipped, or fail with --attempted; --answers FILE checks another file
(docs/solutions.py). Every size in a small grid is checked, smallest first, and a wrong answer fails
with one line in plain words about the first query it gets wrong (no traceback: the definitions
below are the answers).
"""

import importlib.util
import json
import math
import re

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import ROOT, run_module
from lminf_min import mask, reference
from lminf_min.config import LambdaConfig, LlamaConfig
from lminf_min.tokenizer import Tokenizer

T = 40  # queries 0..39: every size below fits, and a mask's answer depends only on (i, j)
SIZES = sorted(((G, L) for G in range(7) for L in range(1, 13)), key=sum)  # smallest first
QUERIES, KEYS = np.arange(T)[:, None], np.arange(T)[None, :]  # what an answer's mask gets


def wrong(message):
    pytest.fail(message, pytrace=False)  # one line, no traceback: it would show the definitions


@pytest.fixture(scope="module")
def ex(request):
    path = request.config.getoption("--answers") or str(ROOT / "lminf_min" / "exercises.py")
    spec = importlib.util.spec_from_file_location("answers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def call(name, *args):
        try:
            return getattr(module, name)(*args)
        except NotImplementedError:
            problem = None
        except Exception as e:  # told outside this block: no "during handling" traceback
            hint = " (on arrays, write &, | and ~, not and, or, not)" * ("truth value" in str(e))
            problem = f"{name} raised {type(e).__name__}: {e}{hint}"
        if problem or request.config.getoption("--attempted"):
            wrong(
                problem
                or f"{name} is not written yet: replace its `raise NotImplementedError` in {path}"
            )
        pytest.skip(f"{name} not attempted yet")

    return call


def each_pair(rule, size=T):
    """(size, size) array of rule(i, j) for every query i and key j <= i, 0 / False above the
    diagonal."""
    return np.array([[rule(i, j) if j <= i else 0 for j in range(size)] for i in range(size)])


def as_array(name, got, dtype):
    got = np.asarray(got)
    try:
        got = np.broadcast_to(got, (T, T))
    except ValueError:
        wrong(f"{name} returned shape {got.shape}; expected ({T}, {T}) for {T} queries and keys")
    if dtype is bool and got.dtype != bool:
        wrong(
            f"{name} returned {got.dtype} values; a mask is True/False: build it from comparisons"
        )
    return got


def number(n, what):
    return f"{['no', 'one', 'two', 'three'][n] if n < 4 else n} {what}{'s' * (n != 1)}"


def span(keys):
    """[0, 1, 2, 3, 7] -> '[0..3, 7]': runs of three keys or more written first..last."""
    runs = []
    for k in keys:
        if runs and k == runs[-1][-1] + 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    parts = [f"{r[0]}..{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs]
    return "[" + ", ".join(parts) + "]"


def same_keys(name, got, expected, setting):
    """Fail, in plain words, at the first query that sees other keys than it should."""
    got = as_array(name, got, bool)
    for i in range(T):
        have, want = np.flatnonzero(got[i]).tolist(), np.flatnonzero(expected[i]).tolist()
        if have != want:
            extra, lacking = sorted(set(have) - set(want)), sorted(set(want) - set(have))
            why = [f"{number(len(extra), 'key')} too many {span(extra)}"] if extra else []
            why += [f"{number(len(lacking), 'key')} missing {span(lacking)}"] if lacking else []
            if any(j > i for j in extra):
                why.append("a query never sees keys after it (j > i)")
            wrong(
                f"{name} with {setting}: query {i} sees keys {span(have)}; "
                f"expected {span(want)}: {'; '.join(why)}"
            )


def same_distances(name, got, expected, setting):
    """Fail, in plain words, at the first visible pair scored at another distance than it should."""
    got = as_array(name, got, int)
    for i, j in zip(*np.nonzero(np.tril(got != expected))):
        wrong(
            f"{name} with {setting}: query {i}, key {j} is scored at distance {got[i, j]}; "
            f"expected {expected[i, j]}"
        )


def test_window_mask(ex):
    for L in range(1, 13):
        expected = each_pair(lambda i, j: i - j < L).astype(bool)
        same_keys("window_mask", ex("window_mask", QUERIES, KEYS, L), expected, f"n_local={L}")


def test_lambda_mask(ex):
    for G, L in SIZES:
        expected = each_pair(lambda i, j: i - j < L or j < G).astype(bool)
        # the definition here is the model's: one meaning of the Λ mask
        np.testing.assert_array_equal(
            expected, mask.lambda_mask(QUERIES, KEYS, LambdaConfig(G, L, L))
        )
        same_keys(
            "lambda_mask",
            ex("lambda_mask", QUERIES, KEYS, G, L),
            expected,
            f"n_global={G}, n_local={L}",
        )


def test_keys_seen(ex):
    for G, L in SIZES:
        counted = each_pair(lambda i, j: i - j < L or j < G).sum(1)  # keys in each row of the mask
        got = np.broadcast_to(np.asarray(ex("keys_seen", np.arange(T), G, L)), (T,))
        for i in np.flatnonzero(got != counted):
            wrong(
                f"keys_seen with n_global={G}, n_local={L}: query {i} gets {got[i]}; "
                f"its row of the Λ mask holds {counted[i]} keys"
            )


def cache_numbers(i, G, L):
    """StreamingLLM's cache in front of query i: the positions it holds, in order; a position's
    number is its index."""
    return sorted(set(range(min(G, i + 1))) | set(range(max(0, i - L + 1), i + 1)))


def test_streaming_distance(ex):
    for G, L in SIZES:
        expected = np.zeros((T, T), int)
        for i in range(T):
            held = cache_numbers(i, G, L)
            expected[i, held] = [held.index(i) - held.index(j) for j in held]
        got = ex("streaming_distance", T, G, L)
        same_distances("streaming_distance", got, expected, f"n_global={G}, n_local={L}")


def test_dilated_mask(ex):
    for (G, L), stride in ((size, stride) for size in SIZES for stride in (1, 2, 3, 4)):
        seen = {i: {i - n * stride for n in range(L)} | set(range(G)) for i in range(T)}
        expected = each_pair(lambda i, j: j in seen[i]).astype(bool)
        got = ex("dilated_mask", QUERIES, KEYS, G, L, stride)
        same_keys("dilated_mask", got, expected, f"n_global={G}, n_local={L}, stride={stride}")


def test_capped_distance(ex):
    for d_max in range(13):
        expected = each_pair(lambda i, j: min(i - j, d_max))
        same_distances(
            "capped_distance", ex("capped_distance", T, d_max), expected, f"d_max={d_max}"
        )


def test_top_k_middle(ex):
    for (G, L), k, seed in (
        (size, k, seed) for size in SIZES[::5] for k in (1, 3, 6) for seed in range(3)
    ):
        # distinct logits: the order of the k largest is then the only right answer
        logits, i = np.random.default_rng(seed).permutation(T) / 10 - 2, T - 1
        middle = [j for j in range(T) if j >= G and i - j >= L]
        expected = sorted(middle, key=lambda j: -logits[j])[:k]
        got = np.asarray(ex("top_k_middle", logits, i, G, L, k)).reshape(-1).tolist()
        if got != expected:
            wrong(
                f"top_k_middle for query {i} with n_global={G}, n_local={L}, k={k}, "
                f"logits {logits.tolist()}: "
                f"returned keys {got}; expected {expected}"
            )


def run_checks(*args):
    return run_module(
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(ROOT / "tests" / "test_exercises.py"),
        "-k",
        "not checks_tell and not a_wrong_answer and not runs_through",
        *args,
    )


def test_checks_tell_the_starting_point_from_the_solutions():
    """With --attempted, every check fails on the unmodified lminf_min/exercises.py and passes on
    docs/solutions.py."""
    stubs = run_checks("--attempted")
    assert stubs.returncode == 1 and re.search(r"\b7 failed\b", stubs.stdout), stubs.stdout[-2000:]
    assert "0 passed" not in stubs.stdout and stubs.stdout.count("is not written yet") >= 7
    solved = run_checks("--attempted", "--answers", ROOT / "docs" / "solutions.py")
    assert solved.returncode == 0 and re.search(r"\b7 passed\b", solved.stdout), solved.stdout[
        -2000:
    ]


def test_a_wrong_answer_fails_in_plain_words_without_showing_the_definition(tmp_path):
    """A planted off-by-one window (a student's likely mistake): the check names the first wrong
    query and what is wrong with it, and prints neither the test's code nor hypothesis's patch
    line nor warnings."""
    solutions = (ROOT / "docs" / "solutions.py").read_text()
    planted = tmp_path / "answers.py"
    planted.write_text(
        solutions.replace("(j <= i) & (i - j < n_local)", "(j <= i) & (i - j <= n_local)", 1)
    )
    assert planted.read_text() != solutions
    r = run_checks("--answers", planted, "-k", "window_mask")
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "1 failed" in out, out[-2000:]
    assert (
        "window_mask with n_local=1: query 1 sees keys [0, 1]; expected [1]: one key too many [0]"
        in out
    )
    for revealing in (
        "each_pair",
        "i - j < L",
        "expected =",
        "def test_",
        "git apply",
        "Warning",
        "Traceback",
    ):
        assert revealing not in out, (revealing, out[-2000:])


def numpy_perplexity(ckpt, ids, lam, mask):
    cfg = LlamaConfig.from_dict(json.loads((ckpt / "config.json").read_text()))
    weights = load_file(str(ckpt / "model.safetensors"))
    logits = reference.forward(weights, cfg, ids[:-1], lam, mask=lambda i, j, lam: mask[i, j])
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return math.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def test_a_mask_answer_runs_through_compiled_flex_on_the_model(sp_ckpt, tmp_path):
    """`run dilated_mask --flex`: the answer becomes the mask_mod of the torch model (compiled
    FlexAttention); its perplexity, and that of the plain window of as many keys printed beside it,
    equal the NumPy forward pass with masks built here pair by pair. --png draws both masks."""
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
        ROOT / "docs" / "solutions.py",
        "--ckpt",
        sp_ckpt,
        "--text",
        text,
        "--tokens",
        T,
        "--n-global",
        G,
        "--n-local",
        L,
        "--png",
        tmp_path / "masks.png",
        env={"XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    figure = lambda what: float(re.search(rf"^ +([\d.]+) +{what}", r.stdout, re.M)[1])
    ids = np.array(Tokenizer(sp_ckpt).encode(text.read_text())[:T])
    assert len(ids) == T
    # stride 2, L/2 keys, d_max = L; and LM-Infinite with a window of L/2 keys, d_max = L/2
    dilated = each_pair(lambda i, j: (i - j) % 2 == 0 and i - j < L or j < G, T).astype(bool)
    plain = each_pair(lambda i, j: i - j < L // 2 or j < G, T).astype(bool)
    for what, visible, d_max in (
        ("your dilated window", dilated, L),
        ("a plain window of the same", plain, L // 2),
    ):
        expected = numpy_perplexity(sp_ckpt, ids, LambdaConfig(G, L, d_max), visible)
        assert abs(figure(what) - expected) <= 0.005 + 1e-4 * expected, (what, r.stdout)
    assert (tmp_path / "masks.png").stat().st_size > 10_000
    assert (tmp_path / "cache" / "lminf_min" / "exercises.json").is_file()  # the contrasts, kept
