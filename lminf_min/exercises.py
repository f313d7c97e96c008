"""Classroom exercises: write the change here, check it, then run it on the default model (docs/exercises.md).

Each function below is a question: replace its `raise NotImplementedError` with your answer. Then

    python -m pytest tests/test_exercises.py -k window_mask --attempted    # is it right? (against NumPy definitions)
    python -m lminf_min.exercises run window_mask                          # what does it do to the real model?

Masks are (T, T) bool arrays, True where query i (row) may attend to key j (column); distances are (T, T)
int arrays, the relative distance each visible pair is scored at. Worked solutions: docs/solutions.py.
"""
import argparse
import importlib.util
import math
from pathlib import Path

import numpy as np


def window_mask(T, n_local):
    """Exercise 1. A sliding window without starting tokens: query i sees its n_local most recent keys, itself included."""
    raise NotImplementedError


def lambda_mask(T, n_global, n_local):
    """Exercise 2. LM-Infinite's Λ mask (paper §4): the window, plus the first n_global tokens for every later query."""
    raise NotImplementedError


def streaming_distance(T, n_global, n_local):
    """Exercise 3. StreamingLLM's positions: the cache keeps the first n_global and the last n_local tokens and numbers
    them 0, 1, 2, ... in cache order; a pair is scored at the difference of those numbers. (T, T), 0 where not visible."""
    raise NotImplementedError


def dilated_mask(T, n_global, n_local, stride):
    """Exercise 4. A dilated window: query i sees i, i - stride, i - 2·stride, ... (n_local keys in all), and the
    first n_global tokens."""
    raise NotImplementedError


def capped_distance(T, d_max):
    """Exercise 5. The distance limit alone: every pair j <= i scored at min(i - j, d_max), even inside the window."""
    raise NotImplementedError


def top_k_middle(logits, i, n_global, n_local, k):
    """Exercise 6. Paper §4's top-k middle tokens for query i: of the keys neither starting (j < n_global) nor in the
    window (i - j < n_local), the indices of the k with the largest logits (logits: (T,) for this query), largest first."""
    raise NotImplementedError


# ---- running an answer on the default model (NumPy reference forward pass; a short text and a small window) ----

RUNS = {  # name -> (what it changes, how: mask(T, G, L) and distance(T, G, L), None = LM-Infinite's own)
    "window_mask": ("mask", lambda ex, T, G, L: (ex.window_mask(T, L), None)),
    "lambda_mask": ("mask", lambda ex, T, G, L: (ex.lambda_mask(T, G, L), None)),
    "streaming_distance": ("distance", lambda ex, T, G, L: (None, ex.streaming_distance(T, G, L))),
    "dilated_mask": ("mask", lambda ex, T, G, L: (ex.dilated_mask(T, G, L // 2, 2), None)),
    "capped_distance": ("distance", lambda ex, T, G, L: (None, ex.capped_distance(T, L // 4))),
}


def perplexity(cfg, weights, ids, lam, mask=None, distance=None):
    """Perplexity of ids under the NumPy forward pass with attention lam (None: full), its mask or distances replaced."""
    from unittest import mock
    from lminf_min import reference
    patches = []
    if mask is not None:
        patches.append(mock.patch.object(reference, "lambda_mask", lambda T, lam: mask[:T, :T]))
    if distance is not None:
        patches.append(mock.patch.object(reference, "effective_distance", lambda T, lam: distance[:T, :T]))
    for p in patches:
        p.start()
    try:
        logits = reference.forward(weights, cfg, ids[:-1], lam)
    finally:
        for p in patches:
            p.stop()
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return math.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lminf_min.exercises", description="Run an exercise's answer on the default "
                                "model: perplexity of the first --tokens tokens of a text, your change against LM-Infinite "
                                "with the same small window (the NumPy reference forward pass: exact, slow, so keep it short).")
    p.add_argument("command", choices=["run"])
    p.add_argument("exercise", choices=list(RUNS))
    p.add_argument("--text", default="../shared/data/botchan.txt")
    p.add_argument("--tokens", type=int, default=256, help="tokens of the text to score")
    p.add_argument("--n-global", type=int, default=4, help="G: starting tokens")
    p.add_argument("--n-local", type=int, default=32, help="L: the window (and d_max), small so that a short text leaves it")
    p.add_argument("--answers", default=None, help="a file to take the answers from instead (e.g. docs/solutions.py)")
    a = p.parse_args(argv)
    from generate import load_model, read_prompt
    from lminf_min.config import LambdaConfig, UserError
    from lminf_min.tokenizer import Tokenizer
    if a.tokens < 2 or a.n_global < 0 or a.n_local < 4:
        raise UserError("--tokens must be at least 2, --n-global at least 0 and --n-local at least 4")
    if a.answers and not Path(a.answers).is_file():
        raise UserError(f"--answers {a.answers}: no such file; give the path of a .py file like docs/solutions.py")
    if a.answers:
        spec = importlib.util.spec_from_file_location("answers", a.answers)
        ex = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ex)
    else:
        import lminf_min.exercises as ex
    ckpt, cfg, w, _ = load_model(None, "cpu", "float32")
    weights = {name: t.numpy() for name, t in w.items()}
    ids = np.array(Tokenizer(ckpt).encode(read_prompt(a.text))[:a.tokens])
    what, make = RUNS[a.exercise]
    try:
        mask, distance = make(ex, len(ids), a.n_global, a.n_local)
    except NotImplementedError:
        raise UserError(f"{a.exercise} is not written yet: replace its `raise NotImplementedError` in {ex.__file__}") from None
    lam = LambdaConfig(a.n_global, a.n_local, a.n_local)
    full, ours, yours = (perplexity(cfg, weights, ids, *run) for run in ((None,), (lam,), (lam, mask, distance)))
    print(f"{len(ids)} tokens of {Path(a.text).name}, perplexity: full attention {full:.2f}; LM-Infinite G={a.n_global} "
          f"L={a.n_local} {ours:.2f}; with your {a.exercise} ({what}) {yours:.2f}")


if __name__ == "__main__":
    from lminf_min.config import cli
    cli(main)()
