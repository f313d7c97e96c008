"""Look inside the model: attention entropy and the largest attention logits, vanilla vs LM-Infinite
(paper §3's diagnosis).

    python -m lminf_min.diagnose entropy --text FILE --tokens 12288 --png entropy.png
    python -m lminf_min.diagnose logits --text FILE --tokens 12288 --png logits.png

entropy: attention entropy per layer against position; logits: the largest logit against distance.
"""

import math
import sys

import numpy as np
import torch
from tqdm import tqdm

from lminf_min import cli, model
from lminf_min.config import LambdaConfig, UserError
from lminf_min.tokenizer import Tokenizer

ROWS = 48  # query positions sampled, evenly spread


def row_logits(q, k, i, theta, lam):
    """Logits (H, i+1) of the query at position i over keys 0..i as the attention scores them, -inf
    where masked.

    q: (H, D) rotated at i; k: (H_kv, i+1, D) rotated at their positions; lam None = vanilla, else
    d_max >= L - 1. Starting tokens beyond d_max are scored at d_max by rotating the query back by
    the excess (reference.py's way, not model.py's).
    """
    H, D = q.shape
    k = k.float().repeat_interleave(H // k.shape[0], dim=0)  # (H, i+1, D)
    s = torch.einsum("hd,hjd->hj", q.float(), k) / math.sqrt(D)
    if lam is None:
        return s
    j = torch.arange(i + 1, device=q.device)
    far = j[(j < lam.n_global) & (i - j > lam.d_max)]
    if len(far):
        # (H, g, D)
        q_at = model.rope(
            q.float()[:, None, :], model.rope_angles(-(i - far - lam.d_max), D, theta)
        )
        s[:, far] = torch.einsum("hgd,hgd->hg", q_at, k[:, far]) / math.sqrt(D)
    return s.masked_fill(~((i - j < lam.n_local) | (j < lam.n_global)), -math.inf)


def entropy(logits):
    """Shannon entropy (nats) of softmax(logits) per row; masked (-inf) keys count as probability
    0."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)


@torch.inference_mode()
def probe_runs(ckpt, text, tokens, n_global, n_local, d_max, device, dtype, take):
    """For vanilla and LM-Infinite: one forward pass over the text's first `tokens` tokens, calling
    take(run, lam, layer, i, logits) for each layer and each of ROWS sampled query positions i (lam
    None: vanilla)."""
    ckpt, cfg, w, device = cli.load_model(ckpt, device, dtype)
    ids = Tokenizer(ckpt).encode(cli.read_prompt(text))[:tokens]
    if len(ids) < ROWS:
        raise UserError(f"{text} holds only {len(ids)} tokens; the diagnosis needs at least {ROWS}")
    lam = LambdaConfig.for_model(cfg, n_global, n_local, d_max)
    rows = np.linspace(len(ids) / ROWS, len(ids) - 1, ROWS).astype(int).tolist()
    for run, run_lam in (
        ("vanilla", None),
        (f"LM-Infinite G={lam.n_global} L={lam.n_local} D={lam.d_max}", lam),
    ):
        bar = tqdm(
            total=cfg.num_hidden_layers, desc=run.split(" ")[0], unit="layer", file=sys.stderr
        )

        def probe(layer, q, k):
            for i in rows:
                rl = row_logits(q[:, i], k[:, : i + 1], i, cfg.rope_theta, run_lam)
                take(run, run_lam, layer, i, rl)
            bar.update()

        model.forward(
            w, cfg, torch.tensor(ids, device=device), lam=run_lam, hidden_only=True, probe=probe
        )
        bar.close()
    return rows, lam, cfg


def entropy_cmd(ckpt, text, tokens, n_global, n_local, d_max, device, dtype, png, json_out):
    cli.writable(json_out, text, ckpt)
    cli.writable(png, text, ckpt, json_out)
    found = {}  # run -> (layers, rows) mean entropy over heads
    take = lambda run, lam, layer, i, logits: (
        found.setdefault(run, {}).setdefault(layer, []).append(float(entropy(logits).mean()))
    )
    rows, lam, cfg = probe_runs(ckpt, text, tokens, n_global, n_local, d_max, device, dtype, take)
    bound = math.log(lam.n_global + lam.n_local)
    result = {
        "positions": rows,
        "bound_ln_G_plus_L": bound,
        "window": lam.n_local,
        "entropy": {run: [layers[n] for n in sorted(layers)] for run, layers in found.items()},
    }
    for run, per_layer in result["entropy"].items():
        print(
            f"{run}: mean entropy over layers at positions {rows[0]}, {rows[ROWS // 2]}, "
            f"{rows[-1]}: "
            + ", ".join(f"{np.mean([e[r] for e in per_layer]):.2f}" for r in (0, ROWS // 2, -1))
            + f" nats (ln(G+L) = {bound:.2f})"
        )
    save(result, json_out, png, lambda ax: plot_entropy(ax, result))


def plot_entropy(ax, result):
    for (run, per_layer), color in zip(result["entropy"].items(), ("#d1492e", "#3b75af")):
        e = np.array(per_layer)  # (layers, rows)
        ax.plot(result["positions"], e.mean(0), color=color, lw=2, label=f"{run}: mean over layers")
        ax.fill_between(
            result["positions"],
            e.min(0),
            e.max(0),
            color=color,
            alpha=0.15,
            label=f"{run.split(' ')[0]}: range over layers",
        )
    ax.axhline(
        result["bound_ln_G_plus_L"],
        color="k",
        ls="--",
        lw=1,
        label="ln(G + L): the most a Λ row can reach",
    )
    ax.axvline(result["window"], color="gray", ls=":", lw=1, label="L (training length)")
    ax.set(
        xlabel="query position",
        ylabel="attention entropy (nats, mean over heads)",
        title="Attention entropy by position",
    )


def logits_cmd(ckpt, text, tokens, n_global, n_local, d_max, device, dtype, png, json_out):
    cli.writable(json_out, text, ckpt)
    cli.writable(png, text, ckpt, json_out)
    # distance buckets [edges[b], edges[b + 1])
    edges = np.unique(np.geomspace(1, tokens, 40).astype(int))
    found = {}  # run -> largest logit per distance bucket

    def take(run, lam, layer, i, logits):
        best = found.setdefault(run, np.full(len(edges), -np.inf))
        top = logits.max(0).values.cpu().numpy()  # (i + 1,): largest over heads, per key j
        distance = i - np.arange(i + 1)
        # the distance RoPE sees
        distance = distance if lam is None else np.minimum(distance, lam.d_max)
        for b in range(len(edges) - 1):
            part = top[(distance >= edges[b]) & (distance < edges[b + 1])]
            if len(part):
                best[b] = max(best[b], part.max())

    rows, lam, cfg = probe_runs(ckpt, text, tokens, n_global, n_local, d_max, device, dtype, take)
    result = {
        "distance_from": edges[:-1].tolist(),
        "distance_to": edges[1:].tolist(),
        "window": lam.n_local,
        "largest_logit": {
            run: [None if math.isinf(x) else float(x) for x in best[:-1]]
            for run, best in found.items()
        },
    }
    for run, best in result["largest_logit"].items():
        inside = [
            x for x, d in zip(best, result["distance_from"]) if x is not None and d < lam.n_local
        ]
        beyond = [
            x for x, d in zip(best, result["distance_from"]) if x is not None and d >= lam.n_local
        ]
        print(
            f"{run}: largest logit within the window {max(inside):.1f}"
            + (f", beyond it {max(beyond):.1f}" if beyond else ", none beyond it")
        )
    save(result, json_out, png, lambda ax: plot_logits(ax, result))


def plot_logits(ax, result):
    centre = [(a * b) ** 0.5 for a, b in zip(result["distance_from"], result["distance_to"])]
    for (run, best), color in zip(result["largest_logit"].items(), ("#d1492e", "#3b75af")):
        pts = [(c, x) for c, x in zip(centre, best) if x is not None]
        ax.plot(*zip(*pts), marker="o", ms=3, color=color, label=run)
    ax.axvline(result["window"], color="gray", ls=":", lw=1, label="L (training length)")
    ax.set(
        xscale="log",
        xlabel="relative distance i - j (log scale)",
        ylabel="largest attention logit (any layer, head, sampled query)",
        title="Attention logits against distance",
    )


def save(result, json_out, png, draw):
    if json_out:
        cli.write_json(json_out, result)
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw(ax)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        print(f"wrote {png}")


def main(argv=None):
    parser = cli.parser(__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, what in (
        ("entropy", "attention entropy per layer against position, with the ln(G+L) bound"),
        ("logits", "largest attention logit against relative distance (the logit explosion)"),
    ):
        cli.add_flags(
            cli.subcommand(sub, name, what),
            *cli.MODEL,
            *cli.LAMBDA,
            "--json",
            text=dict(required=True, help="UTF-8 text to read"),
            tokens=dict(type=int, default=12288, help="read the first N tokens (one pass each)"),
            png=dict(help="draw the plot into this PNG"),
        )
    args = vars(parser.parse_args(argv))
    {"entropy": entropy_cmd, "logits": logits_cmd}[args.pop("command")](**args)


if __name__ == "__main__":
    cli.run(main)()
