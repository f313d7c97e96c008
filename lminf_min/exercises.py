"""Classroom exercises: write the change here, check it, then run it on the default model
(docs/exercises.md).

Each function below is a question: replace its `raise NotImplementedError` with your answer. Then

    python -m pytest tests/test_exercises.py -k window_mask --attempted  # is it right?
    python -m lminf_min.exercises run window_mask  # what does it do to the real model?

Masks are functions of positions, like lminf_min.mask.lambda_mask: True where query i may attend to
key j. i and j are arrays that broadcast (NumPy in the checks, torch tensors inside the model's
FlexAttention call), so use only comparisons, arithmetic, %, &, | and ~ on them. Distances are (T,
T) int arrays, the relative distance each visible pair is scored at (NumPy only). Worked solutions:
docs/solutions.py.
"""

import argparse
import importlib.util
import math
from pathlib import Path

import numpy as np
import torch

from lminf_min import cli, model, reference
from lminf_min import mask as definition


def window_mask(i, j, n_local):
    """Exercise 1. A sliding window without starting tokens: query i sees its n_local most recent
    keys, itself included."""
    raise NotImplementedError


def lambda_mask(i, j, n_global, n_local):
    """Exercise 2. LM-Infinite's Λ mask (paper §4): the window, plus the first n_global tokens for
    every later query."""
    raise NotImplementedError


def streaming_distance(T, n_global, n_local):
    """Exercise 3. StreamingLLM's positions: the cache keeps the first n_global and the last n_local
    tokens and numbers them 0, 1, 2, ... in cache order; a pair is scored at the difference of those
    numbers. (T, T), 0 where not visible."""
    raise NotImplementedError


def dilated_mask(i, j, n_global, n_local, stride):
    """Exercise 4. A dilated window: query i sees i, i - stride, i - 2·stride, ... (n_local keys in
    all), and the first n_global tokens."""
    raise NotImplementedError


def capped_distance(T, d_max):
    """Exercise 5. The distance limit alone: every pair j <= i scored at min(i - j, d_max), even
    inside the window."""
    raise NotImplementedError


def top_k_middle(logits, i, n_global, n_local, k):
    """Exercise 6. Paper §4's top-k middle tokens for query i: of the keys neither starting (j <
    n_global) nor in the window (i - j < n_local), the indices of the k with the largest logits
    (logits: (T,) for this query), largest first."""
    raise NotImplementedError


# ---- running an answer on the default model ----

# name -> (what it changes, make(ex, T, G, L): mask(i, j, lam) or distance(i, j, lam))
RUNS = {
    "window_mask": ("mask", lambda ex, T, G, L: lambda i, j, lam: ex.window_mask(i, j, L)),
    "lambda_mask": ("mask", lambda ex, T, G, L: lambda i, j, lam: ex.lambda_mask(i, j, G, L)),
    "streaming_distance": ("distance", lambda ex, T, G, L: table(ex.streaming_distance(T, G, L))),
    "dilated_mask": (
        "mask",
        lambda ex, T, G, L: lambda i, j, lam: ex.dilated_mask(i, j, G, L // 2, 2),
    ),
    "capped_distance": ("distance", lambda ex, T, G, L: table(ex.capped_distance(T, L // 4))),
}


def table(distances):
    """A (T, T) array of distances as a function of positions (i, j, lam), the form
    reference.forward takes."""
    return lambda i, j, lam: distances[i, j]


def perplexity(
    cfg, weights, ids, lam, mask=definition.lambda_mask, distance=definition.effective_distance
):
    """Perplexity of ids under the NumPy forward pass with attention lam (None: full), its mask or
    distances replaced."""
    logits = reference.forward(weights, cfg, ids[:-1], lam, mask=mask, distance=distance)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return math.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def flex_perplexity(cfg, weights, ids, lam, mask):
    """Perplexity of ids under the torch model in one pass, `mask` as the mask_mod of compiled
    FlexAttention."""
    # (T, C)
    hidden = model.forward(weights, cfg, ids, lam=lam, hidden_only=True, backend=model.Flex(mask))
    nll = []
    # logits 1,024 rows at a time: (T, V) at once would be GBs
    for a in range(0, len(ids) - 1, 1024):
        logp = torch.log_softmax(
            model.lm_head(weights, cfg, hidden[a : min(a + 1024, len(ids) - 1)]), -1
        )
        nll.append(-logp.gather(1, ids[a + 1 : a + 1 + len(logp), None])[:, 0])
    return math.exp(torch.cat(nll).double().mean())


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m lminf_min.exercises",
        description="Run an exercise's answer on the default "
        "model: perplexity of the first --tokens tokens of a text, your change against LM-Infinite "
        "with the same small window (the NumPy reference forward pass: exact, slow, so keep it "
        "short). With --flex, a mask exercise runs instead as the mask_mod of the torch model's "
        "compiled FlexAttention, at full length "
        "(e.g. --tokens 16384 --n-global 10 --n-local 8192).",
    )
    p.add_argument("command", choices=["run"])
    p.add_argument("exercise", choices=list(RUNS))
    p.add_argument(
        "--text",
        default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "botchan.txt"),
        help="the text to score (default: ../shared/data/botchan.txt beside the repository)",
    )
    p.add_argument("--tokens", type=int, default=256, help="tokens of the text to score")
    p.add_argument("--n-global", type=int, default=4, help="G: starting tokens")
    p.add_argument(
        "--n-local",
        type=int,
        default=32,
        help="L: the window (and d_max), small so that a short text leaves it",
    )
    p.add_argument(
        "--answers",
        default=None,
        help="a file to take the answers from instead (e.g. docs/solutions.py)",
    )
    p.add_argument(
        "--flex",
        action="store_true",
        help="mask exercises: your mask alone, through the torch model's "
        "compiled FlexAttention (minutes at 16k tokens on 2 cores; compare with eval ppl, "
        "docs/results.md)",
    )
    cli.add_flags(p, "--ckpt")
    a = p.parse_args(argv)
    from lminf_min.config import LambdaConfig, UserError
    from lminf_min.tokenizer import Tokenizer

    if a.tokens < 2 or a.n_global < 0 or a.n_local < 4:
        raise UserError(
            "--tokens must be at least 2, --n-global at least 0 and --n-local at least 4"
        )
    if a.answers and not Path(a.answers).is_file():
        raise UserError(
            f"--answers {a.answers}: no such file; give the path of a .py file like "
            "docs/solutions.py"
        )
    what, make = RUNS[a.exercise]
    if a.flex and what != "mask":
        raise UserError(
            f"--flex runs mask exercises only; {a.exercise} changes distances: run it without "
            "--flex"
        )
    if a.answers:
        spec = importlib.util.spec_from_file_location("answers", a.answers)
        ex = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ex)
    else:
        import lminf_min.exercises as ex
    ckpt, cfg, w, _ = cli.load_model(a.ckpt, "cpu", "float32")
    ids = Tokenizer(ckpt).encode(cli.read_prompt(a.text))[: a.tokens]
    lam = LambdaConfig(a.n_global, a.n_local, a.n_local)
    try:
        change = make(ex, len(ids), a.n_global, a.n_local)
        # your function, on a small grid first: NotImplementedError shows up here
        if what == "mask":
            change(np.arange(4)[:, None], np.arange(4)[None, :], lam)
    except NotImplementedError:
        raise UserError(
            f"{a.exercise} is not written yet: replace its `raise NotImplementedError` in "
            f"{ex.__file__}"
        ) from None
    head = f"{len(ids)} tokens of {Path(a.text).name}, perplexity"
    if a.flex:
        yours = flex_perplexity(cfg, w, torch.tensor(ids), lam, change)
        print(
            f"{head} with your {a.exercise} (G={a.n_global}, L={a.n_local}, torch FlexAttention): "
            f"{yours:.2f}"
        )
        return
    weights = {name: t.numpy() for name, t in w.items()}
    ids = np.array(ids)
    runs = (
        (None,),
        (lam,),
        (lam, change) if what == "mask" else (lam, definition.lambda_mask, change),
    )
    full, ours, yours = (perplexity(cfg, weights, ids, *run) for run in runs)
    print(
        f"{head}: full attention {full:.2f}; LM-Infinite G={a.n_global} "
        f"L={a.n_local} {ours:.2f}; with your {a.exercise} ({what}) {yours:.2f}"
    )


if __name__ == "__main__":
    cli.run(main)()
