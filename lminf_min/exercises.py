"""Classroom exercises: write the change here, check it, then run it on the default model
(docs/exercises.md). `run` prints the perplexity of the first --tokens tokens of a text with your
change, beside the runs to compare it with, on the NumPy reference forward pass (exact and slow:
keep it short; the other runs are kept in the cache folder after their first time), or, with
--flex, a mask as the mask_mod of the torch model's compiled FlexAttention, at full length
(e.g. --tokens 16384 --n-global 10 --n-local 8192). The checks in tests/test_exercises.py, not
these figures, say whether an answer is right.

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
import json
import math
import runpy
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

BOTCHAN = Path(__file__).resolve().parents[2] / "shared" / "data" / "botchan.txt"
FLAGS = {  # the runner's own flags, beside --n-global, --n-local and --ckpt (cli.FLAGS)
    "text": dict(default=str(BOTCHAN), help="the text to score"),
    "tokens": dict(default=256, help="tokens of the text to score"),
    "answers": dict(help="a file to take the answers from instead (e.g. docs/solutions.py)"),
    "flex": dict(action="store_true", help="mask exercises at full length: compiled FlexAttention"),
    "png": dict(help="draw your answer beside the reference's into this PNG"),
}


def window(G, L):
    """LM-Infinite's settings for a run: G starting tokens, a window of L, d_max = L."""
    return LambdaConfig(G, L, L)


def table(distances, T):
    """A (T, T) array of distances as a function of positions (i, j, lam), the form
    reference.forward takes."""
    if np.shape(distances) != (T, T):
        raise ValueError(f"its (T, T) distances have shape {np.shape(distances)}")
    return lambda i, j, lam: distances[i, j]


# name -> (what it changes, make(f, T, G, L): your function f as the run uses it, a mask(i, j, lam),
#          distances(i, j, lam) or counts (T,); what your run is, {what each run beside it is: its
#          attention, None = full})
RUNS = {
    "window_mask": (
        "mask",
        lambda f, T, G, L: lambda i, j, lam: f(i, j, L),
        "your window alone (L={L}, no starting tokens)",
        lambda G, L: {f"the Λ mask, the same window plus G={G} starting tokens": window(G, L)},
    ),
    "lambda_mask": (
        "mask",
        lambda f, T, G, L: lambda i, j, lam: f(i, j, G, L),
        "your Λ mask (G={G}, L={L})",
        lambda G, L: {f"the window alone (G=0, L={L})": window(0, L)},
    ),
    "keys_seen": ("count", lambda f, T, G, L: np.broadcast_to(f(np.arange(T), G, L), T), "", None),
    "streaming_distance": (
        "distance",
        lambda f, T, G, L: table(f(T, G, L), T),
        "the Λ mask (G={G}, L={L}) at your StreamingLLM distances",
        lambda G, L: {f"LM-Infinite's true distances, capped at d_max={L}": window(G, L)},
    ),
    "dilated_mask": (
        "mask",
        lambda f, T, G, L: lambda i, j, lam: f(i, j, G, L // 2, 2),
        "your dilated window (stride 2: {half} keys spread over {L} positions, plus G={G})",
        lambda G, L: {
            f"a plain window of the same {L // 2} keys (plus G={G})": window(G, L // 2),
            f"a plain window of {L} keys (plus G={G})": window(G, L),
        },
    ),
    "capped_distance": (
        "distance",
        lambda f, T, G, L: table(f(T, L // 4), T),
        "the Λ mask (G={G}, L={L}) with every distance capped at {quarter}",
        lambda G, L: {f"LM-Infinite: distances capped at d_max = L = {L}": window(G, L)},
    ),
}


# name -> what the picture beside yours shows (the answer where lminf_min.mask can draw it, else
# the run to compare with) and its settings
PICTURES = {
    "window_mask": lambda G, L: ("the answer: the window alone", window(0, L)),
    "lambda_mask": lambda G, L: ("the answer: the Λ mask", window(G, L)),
    "keys_seen": lambda G, L: ("the answer: rows of the Λ mask", window(G, L)),
    "streaming_distance": lambda G, L: ("to compare: LM-Infinite's distances", window(G, L)),
    "dilated_mask": lambda G, L: (f"to compare: a plain window of {L // 2}", window(G, L // 2)),
    "capped_distance": lambda G, L: (f"the answer: capped at {L // 4}", LambdaConfig(G, L, L // 4)),
}


def perplexity(cfg, weights, ids, lam, flex, **change):
    """Perplexity of ids with attention lam (None: full), its mask or distances replaced (change:
    mask= or distance=, as reference.forward takes them): under the NumPy forward pass, or with flex
    under the torch model in one pass, the mask as the mask_mod of compiled FlexAttention."""
    if not flex:
        return math.exp(nll(reference.forward(weights, cfg, ids[:-1], lam, **change), ids).mean())
    backend = model.Flex(**change)
    hidden = model.forward(weights, cfg, torch.tensor(ids), lam, hidden_only=True, backend=backend)
    # logits 1,024 rows at a time: (T, V) at once would be GBs
    rows = range(0, len(ids) - 1, 1024)
    nlls = [nll(model.lm_head(weights, cfg, hidden[a : a + 1024]), ids[a : a + 1025]) for a in rows]
    return math.exp(torch.cat(nlls).double().mean())


def nll(logits, ids):
    """-log p (T,) of each next token: logits (T, V) or more rows, ids (T + 1,)."""
    logp = torch.log_softmax(torch.as_tensor(logits[: len(ids) - 1]), -1)
    return -logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def remembered(cfg, weights, ckpt, ids, lam, flex):
    """perplexity(...) of a run with the built-in mask, kept in the cache folder: the runs an answer
    is compared with never change, so only the first run of a setting pays for them."""
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
        known[key] = perplexity(cfg, weights, ids, lam, flex)
        store.parent.mkdir(parents=True, exist_ok=True)
        cli.write_json(store, known)
    return known[key]


def draw(path, name, kind, yours, G, L, n):
    """Your mask (blue: visible, grey: masked), distances or counts beside the reference's
    (PICTURES), over the first n positions."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    title, ref = PICTURES[name](G, L)
    i, j, lam = np.arange(n)[:, None], np.arange(n)[None, :], window(G, L)
    visible = definition.lambda_mask(i, j, ref)  # for distances, also your run's: the same G, L
    if kind == "count":  # the keys in each row of the Λ mask
        pictures = yours[:n], visible.sum(1)
    elif kind == "mask":
        pictures = yours(i, j, lam), visible
    else:  # distances where the Λ mask lets a pair through
        pictures = yours(i, j, lam) * visible, definition.effective_distance(i, j, ref) * visible
    titles = f"yours: {name}", f"{title} (G={ref.n_global}, L={ref.n_local})"
    fig = Figure(figsize=(11, 5.5))
    for ax, title, a in zip(fig.subplots(1, 2), titles, map(np.asarray, pictures)):
        if a.ndim == 1:  # keys per query
            ax.plot(a, marker=".")
            ax.set(xlabel="query position i", ylabel="keys seen m(i)", title=title)
            continue
        shown = np.where(np.tril(np.ones((n, n), bool)), a.astype(float), np.nan)
        colours = ListedColormap(["#dddddd", "#3b75af"]) if a.dtype == bool else "viridis"
        image = ax.imshow(shown, cmap=colours, vmin=0)
        if a.dtype != bool:
            fig.colorbar(image, ax=ax, shrink=0.7, label="distance scored at")
        ax.set(xlabel="key position j", ylabel="query position i", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # the name as given
    print(f"wrote {path}")


def answer(name, path):
    """Your function `name` and the file it is in: this one, or `path` (a .py file like
    docs/solutions.py); a clear error if there is none."""
    if path and (not path.endswith(".py") or not Path(path).is_file()):
        raise UserError(f"--answers {path}: no such .py file; give one like docs/solutions.py")
    try:
        functions = runpy.run_path(path) if path else globals()
    except Exception as e:  # a syntax error, a failing import, ...: the student's file
        raise UserError(
            f"--answers {path} does not run ({type(e).__name__}: {e}); fix it"
        ) from None
    if name not in functions:
        raise UserError(f"{path} has no function {name}; add it")
    return functions[name], functions["__file__"]


def main(argv=None):
    p = cli.add_flags(cli.parser(__doc__), "--n-global", "--n-local", "--ckpt", **FLAGS)
    p.add_argument("command", choices=["run"])
    p.add_argument("exercise", choices=list(RUNS))
    p.set_defaults(n_global=4, n_local=32)  # a small window (and d_max): a short text leaves it
    a = argparse.Namespace(**cli.parse(p, argv))
    name, G, L, T = a.exercise, a.n_global, a.n_local, a.tokens
    if T < 2 or G < 0 or L < 4:
        raise UserError("--tokens must be >= 2, --n-global >= 0 and --n-local >= 4")
    kind, make, label, beside = RUNS[name]
    if a.flex and kind != "mask":
        raise UserError(f"--flex runs mask exercises only; run {name} without it")
    cli.writable(a.png, a.text, a.answers)
    f, where = answer(name, a.answers)

    def tried(T, run):
        """run(), which calls your function at T tokens: not written yet, or a bug, ends in one
        line, as for a file that does not run."""
        try:
            return run()
        except Exception as e:
            wrong = f"failed on a {T}-token grid ({type(e).__name__}: {e}); fix it"
            if isinstance(e, NotImplementedError):
                wrong = "is not written yet: replace its `raise NotImplementedError`"
            raise UserError(f"{name} {wrong} in {where}") from None

    small = tried(4, lambda: make(f, 4, G, L))  # a small grid first, before the model loads
    if kind == "mask":
        tried(4, lambda: small(np.arange(4)[:, None], np.arange(4)[None, :], window(G, L)))
    if kind == "count":
        cli.fits(32 * T, "cpu", f"--tokens {T}: counting keys", "use fewer tokens")
        change = tried(T, lambda: make(f, T, G, L))
        pairs, full = int(change.sum()), T * (T + 1) // 2
        print(
            f"{T} queries, G={G}, L={L}: your m(i) sums to {pairs} (query, key) pairs, against "
            f"{full} for full attention: {pairs / full:.4f} of the work"
        )
    else:
        ckpt, cfg, w, _, _, ids = cli.load_text(a.ckpt, "cpu", "float32", a.text, T)
        T = len(ids)
        if not a.flex:  # the NumPy pass holds every query rotated for every key: (H, T, T, hd)
            need = 2 * cfg.num_attention_heads * T**2 * cfg.head_dim * 8  # float64, and a copy
            what = f"--tokens {a.tokens}: the NumPy pass over {T} tokens"
            cli.fits(need, "cpu", what, "use fewer tokens, or --flex (masks)")
        change = tried(T, lambda: make(f, T, G, L))
        yours = tried(T, lambda: perplexity(cfg, w, ids, window(G, L), a.flex, **{kind: change}))
        engine = "torch FlexAttention" if a.flex else "the NumPy reference"
        print(f"{T} tokens of {Path(a.text).name}, perplexity ({engine}):")
        print(f"  {yours:8.2f}  {label.format(G=G, L=L, half=L // 2, quarter=L // 4)}")
        for run, lam in (beside(G, L) | ({} if a.flex else {"full attention": None})).items():
            print(f"  {remembered(cfg, w, ckpt, ids, lam, a.flex):8.2f}  {run}")
    if a.png:  # the first positions of yours, beside the answer (or what to compare with)
        n = min(T, 256 if kind == "count" else 64)
        tried(n, lambda: draw(a.png, name, kind, change, G, L, n))


if __name__ == "__main__":
    cli.run(main)()
