"""The Λ mask and the distance limit, written once as functions of positions; and the mask's
picture.

Every engine calls these two functions: the NumPy reference on the (T, T) grid i[:, None], j[None,
:], the FlexAttention backend as its mask_mod (model.Flex), the cache's eviction test, and the
checks. An exercise that changes the mask replaces lambda_mask (docs/exercises.md).

    python -m lminf_min.mask --length 24 --n-global 3 --n-local 6 [--d-max 6] [--png mask.png]
"""

import numpy as np

from .config import LambdaConfig, UserError


def lambda_mask(i, j, lam):
    """True where key j is visible to query i: j <= i and (i - j < L or j < G) (DESIGN.md §1).

    i, j: positions as NumPy arrays or torch tensors that broadcast. Plain causal if lam is None.
    """
    causal = j <= i
    if lam is None:
        return causal
    return causal & ((i - j < lam.n_local) | (j < lam.n_global))


def effective_distance(i, j, lam):
    """The distance a visible pair is scored at: min(i - j, d_max); just i - j if lam is None."""
    return i - j if lam is None else (i - j).clip(max=lam.d_max)


LEGEND = (
    "row i = query, column j = key\n"
    "# in the window, scored at distance i - j    + in the window, distance capped at d_max\n"
    "G starting token outside the window, scored at min(i - j, d_max)    . masked"
)


def mask_codes(T, lam):
    """(T, T) ints: 0 masked, 1 window at true distance, 2 starting token outside the window, 3
    capped in the window."""
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    visible, capped = lambda_mask(i, j, lam), effective_distance(i, j, lam) < i - j
    in_window = visible & (i - j < lam.n_local)
    return np.where(~visible, 0, np.where(~in_window, 2, np.where(capped, 3, 1)))


def render(T, lam):
    codes = mask_codes(T, lam)
    lines = [LEGEND, f"G={lam.n_global} L={lam.n_local} d_max={lam.d_max}; m(i) = keys row i sees"]
    for i, row in enumerate(codes):
        lines.append(f"{i:>4} " + " ".join(".#G+"[c] for c in row) + f"   m={int((row > 0).sum())}")
    return "\n".join(lines)


def draw(T, lam, path):
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 6))
    ax = fig.subplots()
    colours = ListedColormap(["#f4f4f4", "#3b75af", "#d1492e", "#8fb4d9"])  # as mask_codes
    ax.imshow(mask_codes(T, lam), cmap=colours, vmin=0, vmax=3)
    title = f"Λ mask: G={lam.n_global} starting tokens (red), window L={lam.n_local} (blue)"
    ax.set(xlabel="key position j", ylabel="query position i", title=title)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))  # positions are whole numbers
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # the name as given


def main(length, n_global, n_local, d_max, png):
    if not 1 <= length <= 200:
        raise UserError(f"--length is {length}; pick 1..200 so the picture stays readable")
    lam = LambdaConfig(n_global, n_local, n_local if d_max is None else d_max)
    if png:
        from .cli import writable

        writable(png)
    print(render(length, lam))
    if png:
        draw(length, lam, png)
        print(f"wrote {png}")


if __name__ == "__main__":
    from . import cli  # only the command line needs torch and the CLI plumbing

    parser = cli.parser(__doc__)
    parser.add_argument("--length", type=int, default=24, help="sequence length T")
    cli.add_flags(parser, *cli.LAMBDA, png=dict(help="also draw the mask into this PNG file"))
    parser.set_defaults(n_global=3, n_local=6)
    cli.run(lambda: main(**cli.parse(parser)))()
