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
import dataclasses
import hashlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from lminf_min import cli, model, reference
from lminf_min import mask as definition
from lminf_min.config import LambdaConfig, UserError


def window_mask(i, j, n_local):
    """Exercise 1. A sliding window without starting tokens: query i sees its n_local most recent
    keys, itself included."""
    raise NotImplementedError


def lambda_mask(i, j, n_global, n_local):
    """Exercise 2. LM-Infinite's Λ mask (paper §4): the window, plus the first n_global tokens for
    every later query."""
    raise NotImplementedError


def keys_seen(i, n_global, n_local):
    """Exercise 2, second part. m(i), the number of keys query i sees under the Λ mask, as a
    formula in i (an array of positions), without building the mask."""
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


def window(G, L):
    """LM-Infinite's settings for a run: G starting tokens, a window of L, d_max = L."""
    return LambdaConfig(G, L, L)


# name -> (what it changes, make(ex, T, G, L): mask(i, j, lam) or distance(i, j, lam),
#          what your run is, {what each run beside it is: its attention, None = full})
RUNS = {
    "window_mask": (
        "mask",
        lambda ex, T, G, L: lambda i, j, lam: ex.window_mask(i, j, L),
        "your window alone (L={L}, no starting tokens)",
        lambda G, L: {f"the Λ mask, the same window plus G={G} starting tokens": window(G, L)},
    ),
    "lambda_mask": (
        "mask",
        lambda ex, T, G, L: lambda i, j, lam: ex.lambda_mask(i, j, G, L),
        "your Λ mask (G={G}, L={L})",
        lambda G, L: {f"the window alone (G=0, L={L})": window(0, L)},
    ),
    "keys_seen": ("count", lambda ex, T, G, L: ex.keys_seen(np.arange(T), G, L), "", None),
    "streaming_distance": (
        "distance",
        lambda ex, T, G, L: table(ex.streaming_distance(T, G, L)),
        "the Λ mask (G={G}, L={L}) at your StreamingLLM distances",
        lambda G, L: {f"LM-Infinite's true distances, capped at d_max={L}": window(G, L)},
    ),
    "dilated_mask": (
        "mask",
        lambda ex, T, G, L: lambda i, j, lam: ex.dilated_mask(i, j, G, L // 2, 2),
        "your dilated window (stride 2: {half} keys spread over {L} positions, plus G={G})",
        lambda G, L: {
            f"a plain window of the same {L // 2} keys (plus G={G})": window(G, L // 2),
            f"a plain window of {L} keys (plus G={G})": window(G, L),
        },
    ),
    "capped_distance": (
        "distance",
        lambda ex, T, G, L: table(ex.capped_distance(T, L // 4)),
        "the Λ mask (G={G}, L={L}) with every distance capped at {quarter}",
        lambda G, L: {f"LM-Infinite: distances capped at d_max = L = {L}": window(G, L)},
    ),
}


# name -> what the picture beside yours shows (the answer where lminf_min.mask can draw it, else
# the run to compare with) and its settings
PICTURES = {
    "window_mask": lambda G, L: ("the answer: the window alone", window(0, L)),
    "lambda_mask": lambda G, L: ("the answer: the Λ mask", window(G, L)),
    "streaming_distance": lambda G, L: ("to compare: LM-Infinite's distances", window(G, L)),
    "dilated_mask": lambda G, L: (f"to compare: a plain window of {L // 2}", window(G, L // 2)),
    "capped_distance": lambda G, L: (f"the answer: capped at {L // 4}", LambdaConfig(G, L, L // 4)),
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


def flex_perplexity(cfg, weights, ids, lam, mask=definition.lambda_mask):
    """Perplexity of ids under the torch model in one pass, `mask` as the mask_mod of compiled
    FlexAttention."""
    ids = torch.tensor(ids)
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


def remembered(score, ckpt, ids, lam, flex):
    """score(lam), the perplexity of a run with the built-in mask, kept in the cache folder: the
    runs an answer is compared with never change, so only the first run of a setting pays for
    them."""
    from weights import CACHE

    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(ckpt.glob("*.*"))]
    what = [str(ckpt.resolve()), files, list(ids), lam and dataclasses.astuple(lam), flex]
    key, store = hashlib.sha256(json.dumps(what).encode()).hexdigest(), CACHE / "exercises.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError, RecursionError):
        known = {}
    known = known if isinstance(known, dict) else {}  # a damaged cache is simply rebuilt
    if key not in known:
        known[key] = score(lam)
        store.parent.mkdir(parents=True, exist_ok=True)
        cli.write_json(store, known)
    return known[key]


def draw(path, yours, reference, n):
    """Your mask (blue: visible, grey: masked), distances or counts beside the reference's, over the
    first n positions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.5))
    for ax, (title, a) in zip(axes, (yours, reference)):
        if a.ndim == 1:  # keys per query
            ax.plot(a[:n], marker=".")
            ax.set(xlabel="query position i", ylabel="keys seen m(i)", title=title)
            continue
        shown = np.where(np.tril(np.ones((n, n), bool)), a[:n, :n].astype(float), np.nan)
        colours = ListedColormap(["#dddddd", "#3b75af"]) if a.dtype == bool else "viridis"
        image = ax.imshow(shown, cmap=colours, vmin=0)
        if a.dtype != bool:
            fig.colorbar(image, ax=ax, shrink=0.7, label="distance scored at")
        ax.set(xlabel="key position j", ylabel="query position i", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # the name as given
    print(f"wrote {path}")


def answers(path):
    """The module of answers in `path` (a .py file like docs/solutions.py), or a clear error."""
    spec = importlib.util.spec_from_file_location("answers", path)
    if spec is None:
        raise UserError(f"--answers {path} is not a .py file; give one like docs/solutions.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a syntax error, a failing import, ...: the student's file
        raise UserError(
            f"--answers {path} does not run ({type(e).__name__}: {e}); fix it"
        ) from None
    return module


def main(argv=None):
    p = cli.Parser(
        prog="python -m lminf_min.exercises",
        description="Run an exercise's answer on the default model: perplexity of the first "
        "--tokens tokens of a text with your change, beside the runs it should be compared with "
        "(the NumPy reference forward pass: exact, slow, so keep it short; those other runs are "
        "kept in the cache folder after their first time). With --flex, a mask exercise runs "
        "instead as the mask_mod of the torch model's compiled FlexAttention, at full length "
        "(e.g. --tokens 16384 --n-global 10 --n-local 8192). The checks in "
        "tests/test_exercises.py, not these figures, say whether an answer is right.",
    )
    p.add_argument("command", choices=["run"])
    p.add_argument("exercise", choices=list(RUNS))
    p.add_argument(
        "--text",
        default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "botchan.txt"),
        help="the text to score (default: ../shared/data/botchan.txt beside the repository)",
    )
    p.add_argument("--tokens", type=int, default=256, help="tokens of the text to score")
    cli.add_flags(p, "--n-global", "--n-local")
    p.set_defaults(n_global=4, n_local=32)  # a small window (and d_max): a short text leaves it
    p.add_argument(
        "--answers",
        default=None,
        help="a file to take the answers from instead (e.g. docs/solutions.py)",
    )
    p.add_argument(
        "--flex",
        action="store_true",
        help="mask exercises: through the torch model's compiled FlexAttention (minutes at 16k "
        "tokens on 2 cores)",
    )
    p.add_argument("--png", help="draw your answer beside the reference's into this PNG")
    cli.add_flags(p, "--ckpt")
    a = argparse.Namespace(**cli.parse(p, argv))
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
    cli.writable(a.png, a.text, a.answers)
    what, make, label, beside = RUNS[a.exercise]
    if a.flex and what != "mask":
        raise UserError(
            f"--flex runs mask exercises only; {a.exercise} is not a mask: run it without --flex"
        )
    ex = answers(a.answers) if a.answers else sys.modules[__name__]
    G, L, T = a.n_global, a.n_local, a.tokens
    try:  # your function, on a small grid first: NotImplementedError shows up here
        small = make(ex, 4, G, L)
        if what == "mask":
            small(np.arange(4)[:, None], np.arange(4)[None, :], window(G, L))
    except NotImplementedError:
        raise UserError(
            f"{a.exercise} is not written yet: replace its `raise NotImplementedError` in "
            f"{ex.__file__}"
        ) from None
    except AttributeError:
        raise UserError(f"{ex.__file__} has no function {a.exercise}; add it") from None
    if what == "count":
        cli.fits(32 * T, "cpu", f"--tokens {T}: counting keys", "use fewer tokens")
        return count(np.asarray(make(ex, T, G, L)), T, G, L, a.png)
    ckpt, cfg, w, _ = cli.load_model(a.ckpt, "cpu", "float32")
    ids = Tokenizer(ckpt, cfg.vocab_size).encode(cli.read_prompt(a.text))[:T]
    # the NumPy pass holds every query rotated for every key: (H, T, T, hd) float64, and a copy
    need = 2 * cfg.num_attention_heads * len(ids) ** 2 * cfg.head_dim * 8
    if not a.flex:
        what_needs = f"--tokens {T}: the NumPy pass over {len(ids)} tokens"
        cli.fits(need, "cpu", what_needs, "use fewer tokens, or --flex (masks)")
    change = make(ex, len(ids), G, L)
    runs = beside(G, L) if a.flex else beside(G, L) | {"full attention": None}
    if a.flex:
        score = lambda lam, mask=definition.lambda_mask: flex_perplexity(cfg, w, ids, lam, mask)
        yours = score(window(G, L), change)
    else:
        arrays = {name: t.numpy() for name, t in w.items()}
        score = lambda lam, **kw: perplexity(cfg, arrays, np.array(ids), lam, **kw)
        yours = score(window(G, L), **{what: change})
    theirs = {run: remembered(score, ckpt, ids, lam, a.flex) for run, lam in runs.items()}
    engine = "torch FlexAttention" if a.flex else "the NumPy reference"
    print(f"{len(ids)} tokens of {Path(a.text).name}, perplexity ({engine}):")
    print(f"  {yours:8.2f}  {label.format(G=G, L=L, half=L // 2, quarter=L // 4)}")
    for run, ppl in theirs.items():
        print(f"  {ppl:8.2f}  {run}")
    if a.png:  # the first 64 positions of yours, beside the answer (or what to compare with)
        n = min(len(ids), 64)
        i, j, lam = np.arange(n)[:, None], np.arange(n)[None, :], window(G, L)
        title, ref = PICTURES[a.exercise](G, L)
        if what == "mask":
            pictures = change(i, j, lam), definition.lambda_mask(i, j, ref)
        else:  # distances where the Λ mask lets a pair through
            visible = definition.lambda_mask(i, j, lam)
            pictures = (
                change(i, j, lam) * visible,
                definition.effective_distance(i, j, ref) * visible,
            )
        names = (f"yours: {a.exercise}", f"{title} (G={ref.n_global}, L={ref.n_local})")
        draw(a.png, *zip(names, map(np.asarray, pictures)), n)


def count(m, T, G, L, png):
    """What keys_seen says about the cost: (query, key) pairs the Λ mask keeps, against full
    attention's."""
    pairs, full = int(np.broadcast_to(m, (T,)).sum()), T * (T + 1) // 2
    print(
        f"{T} queries, G={G}, L={L}: your m(i) sums to {pairs} (query, key) pairs, against {full} "
        f"for full attention: {pairs / full:.4f} of the work"
    )
    if png:  # the first 256 queries: the keys in each row of the Λ mask beside your count
        i = np.arange(min(T, 256))
        reference = definition.lambda_mask(i[:, None], i[None, :], window(G, L)).sum(1)
        yours = np.broadcast_to(m, (T,))[: len(i)]
        draw(
            png, ("yours: keys_seen", yours), ("the answer: rows of the Λ mask", reference), len(i)
        )


if __name__ == "__main__":
    cli.run(main)()
