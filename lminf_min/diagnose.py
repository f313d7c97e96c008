"""Look inside the model, the paper's diagnosis (§3): attention entropy, the largest attention
logits, and where the attention outputs lie, vanilla against LM-Infinite.

    python -m lminf_min.diagnose entropy --text FILE --tokens 32768 --png entropy.png
    python -m lminf_min.diagnose logits --text FILE --tokens 12288 --png logits.png
    python -m lminf_min.diagnose pca --text FILE --tokens 12288 --layer 15 --png pca.png

entropy: attention entropy per layer, averaged over many queries per position bucket (Factor 2);
logits: the largest logit against distance (Factor 1); pca: one layer's attention outputs projected
to 2-D, in the window and past it (Factor 3).
"""

import dataclasses
import math

import numpy as np
import torch
from tqdm import tqdm

from lminf_min import cli, model
from lminf_min.config import LambdaConfig, UserError
from lminf_min.mask import effective_distance, lambda_mask

ROWS = 48  # query positions the logits command samples, evenly spread
COLOURS = ("#d1492e", "#3b75af")  # vanilla, LM-Infinite


def row_logits(q, k, rows, theta, lam):
    """Logits (H, n, S) of the queries at ascending positions rows (n,) over keys 0..S-1, S =
    rows[-1] + 1, as the attention scores them, -inf where masked.

    q: (H, n, hd) rotated at rows; k: (H_kv, >= S, hd) rotated at their positions; lam None =
    vanilla, else d_max >= L - 1. Starting tokens beyond d_max are scored at d_max by rotating the
    query back by the excess (reference.py's way, not model.py's).
    """
    (H, _, hd), S = q.shape, int(rows[-1]) + 1  # the keys up to the last query
    k = k[:, :S].float().repeat_interleave(H // k.shape[0], dim=0)  # (H, S, hd)
    s = q.float() @ k.transpose(1, 2) / math.sqrt(hd)
    i, j = rows[:, None], torch.arange(S, device=q.device)[None, :]
    for g in range(min(lam.n_global, S) if lam else 0):
        far = rows - g > lam.d_max  # (n,)
        back = model.rope_angles(lam.d_max + g - rows[far], hd, theta)  # by the excess
        q_at = model.rope(q[:, far].float(), back)
        s[:, far, g] = (q_at * k[:, g, None]).sum(-1) / math.sqrt(hd)
    return s.masked_fill(~lambda_mask(i, j, lam), -math.inf)


def entropy(logits):
    """Shannon entropy (nats) of softmax(logits) per row; masked (-inf) keys count as probability
    0."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)


def read(ckpt, text, tokens, device, dtype, n_global, n_local, d_max, least):
    """(config, weights, token ids (T,) on the device, LambdaConfig) from the model, text and Λ
    flags: the first `tokens` tokens of the text, which must hold at least `least`."""
    if tokens < least:
        raise UserError(f"--tokens is {tokens}; this diagnosis needs at least {least}")
    _, cfg, w, device, _, ids = cli.load_text(ckpt, device, dtype, text, tokens)
    if len(ids) < least:
        raise UserError(f"{text} holds {len(ids)} tokens; this diagnosis needs at least {least}")
    lam = LambdaConfig.for_model(cfg, n_global, n_local, d_max)
    return cfg, w, torch.tensor(ids, device=device), lam


def spread(a, b, n):
    """At most n positions spread evenly over a..b - 1, both ends included."""
    return np.unique(np.linspace(a, b - 1, min(n, b - a)).round().astype(int))


def probe_runs(cfg, w, ids, lam, groups, measure):
    """For vanilla and LM-Infinite, one forward pass over ids each: {run: [[measure(logits, rows,
    lam) for each group of query positions] for each layer]} (lam None: vanilla)."""
    groups = [torch.tensor(rows, device=ids.device) for rows in groups]
    found = {"vanilla": [], f"LM-Infinite G={lam.n_global} L={lam.n_local} D={lam.d_max}": []}
    for run, run_lam in zip(found, (None, lam)):
        with tqdm(total=cfg.num_hidden_layers, desc=run.split()[0], unit="layer") as bar:

            def probe(layer, q, k, a):
                # each group's queries over the keys up to the last of them
                logits_of = lambda rows: row_logits(q[:, rows], k, rows, cfg.rope_theta, run_lam)
                found[run].append([measure(logits_of(rows), rows, run_lam) for rows in groups])
                bar.update()

            model.forward(w, cfg, ids, lam=run_lam, hidden_only=True, probe=probe)
    return found


def entropy_cmd(bucket, queries, png, json_out, **flags):
    """attention entropy per layer by position bucket, vanilla vs LM-Infinite

    flags: read's model, text and Λ flags.
    """
    if not 1 <= queries <= bucket:
        raise UserError(f"--queries is {queries}; it must be from 1 to --bucket ({bucket})")
    cfg, w, ids, lam = read(**flags, least=bucket)
    # `queries` positions evenly spread over each whole bucket [start, start + bucket)
    starts = range(0, len(ids) - bucket + 1, bucket)
    groups = [spread(a, a + bucket, queries).tolist() for a in starts]
    # run -> layer -> bucket -> mean entropy over the heads and the bucket's queries
    found = probe_runs(cfg, w, ids, lam, groups, lambda logits, *_: float(entropy(logits).mean()))
    inside = min(max(lam.n_local // bucket - 1, 0), len(starts) - 1)  # the last bucket inside L
    result = {
        "buckets": [[a, a + bucket] for a in starts],
        "queries": groups,
        "in_window_bucket": inside,
        "bound_ln_G_plus_L": math.log(lam.n_global + lam.n_local),
        "window": lam.n_local,
        "entropy": found,
    }
    (a, b), (c, d) = result["buckets"][inside], result["buckets"][-1]
    for run, per_layer in result["entropy"].items():
        mean = np.mean(per_layer, axis=0)  # over layers, per bucket
        print(
            f"{run}: mean entropy {mean[-1]:.2f} nats at positions {c}-{d - 1} against "
            f"{mean[inside]:.2f} at {a}-{b - 1}, inside the window: {mean[-1] - mean[inside]:+.2f} "
            f"({len(groups[-1])} queries per bucket, mean over {cfg.num_hidden_layers} layers and "
            f"{cfg.num_attention_heads} heads; ln(G+L) = {result['bound_ln_G_plus_L']:.2f})"
        )
    save(result, json_out, png, plot_entropy, panels=2)


def plot_entropy(axes, result):
    centre = [(a + b) / 2 for a, b in result["buckets"]]
    inside = result["in_window_bucket"]
    (a, b), (c, d) = result["buckets"][inside], result["buckets"][-1]
    dots = dict(lw=2, marker="o", ms=3)
    for (run, per_layer), colour in zip(result["entropy"].items(), COLOURS):
        e = np.array(per_layer)  # (layers, buckets)
        change, mean = e - e[:, [inside]], e.mean(0)
        gain = mean[-1] - mean[inside]
        label = f"{run}: {mean[-1]:.2f} at {c}-{d - 1} vs {mean[inside]:.2f} ({gain:+.2f})"
        axes[0].plot(centre, mean, color=colour, **dots, label=label)
        axes[1].plot(centre, change.T, color=colour, lw=0.5, alpha=0.3)
        axes[1].plot(centre, change.mean(0), color=colour, **dots, label=f"{run}: mean")
    bound = "ln(G + L): most a Λ row can reach"
    axes[0].axhline(result["bound_ln_G_plus_L"], color="k", ls="--", lw=1, label=bound)
    axes[1].axhline(0, color="k", lw=0.5)
    queries = len(result["queries"][-1])
    axes[0].set_title(f"Attention entropy, mean of layers, heads, {queries} queries a bucket")
    axes[1].set_title(f"Change from each layer's level at {a}-{b - 1} (thin: layers)")
    for ax in axes:
        ax.axvline(result["window"], color="gray", ls=":", lw=1, label=f"L = {result['window']}")
        ax.set(xlabel="query position (bucket centre)", ylabel="nats")


def logits_cmd(png, json_out, **flags):
    """largest attention logit against relative distance (the logit explosion)

    flags: read's model, text and Λ flags.
    """
    cfg, w, ids, lam = read(**flags, least=ROWS)
    rows = np.linspace(len(ids) / ROWS, len(ids) - 1, ROWS).astype(int).tolist()
    # distance buckets [edges[b], edges[b + 1])
    edges = np.unique(np.geomspace(1, len(ids), 40).astype(int))

    def largest(logits, rows, run_lam):  # per distance bucket, -inf where no pair
        top = logits.amax(0).cpu().numpy()  # (n, S): largest over heads
        # the distance RoPE sees, and its bucket
        distance = effective_distance(rows.cpu().numpy()[:, None], np.arange(top.shape[1]), run_lam)
        bucket = np.digitize(distance, edges) - 1  # edges[b] <= distance < edges[b + 1]
        return [top[bucket == b].max(initial=-np.inf) for b in range(len(edges) - 1)]

    runs = probe_runs(cfg, w, ids, lam, [rows], largest)  # run -> layer -> [rows] -> bucket
    found = {run: np.max(m, axis=(0, 1)) for run, m in runs.items()}  # over layers
    logit = lambda x: None if math.isinf(x) else float(x)  # None: no pair that far
    result = {
        "distance_from": edges[:-1].tolist(),
        "distance_to": edges[1:].tolist(),
        "window": lam.n_local,
        "largest_logit": {run: [logit(x) for x in best] for run, best in found.items()},
    }
    near = edges[:-1] < lam.n_local
    for run, best in found.items():
        within, beyond = (logit(best[part].max(initial=-np.inf)) for part in (near, ~near))
        print(f"{run}: largest logit within the window {within}, beyond it {beyond}")
    save(result, json_out, png, plot_logits)


def plot_logits(ax, result):
    centre = [(a * b) ** 0.5 for a, b in zip(result["distance_from"], result["distance_to"])]
    for (run, best), color in zip(result["largest_logit"].items(), COLOURS):
        pts = [(c, x) for c, x in zip(centre, best) if x is not None]
        ax.plot(*zip(*pts), marker="o", ms=3, color=color, label=run)
    ax.axvline(result["window"], color="gray", ls=":", lw=1, label=f"L = {result['window']}")
    ax.set(xscale="log", title="Attention logits against distance")
    ax.set_xlabel("relative distance i - j (log scale)")
    ax.set_ylabel("largest attention logit (any layer, head, sampled query)")


def pca_cmd(layer, points, png, json_out, **flags):
    """one layer's attention outputs in 2-D: in the window, past it (3 runs)

    flags: read's model, text and Λ flags.
    """
    cfg, w, ids, lam = read(**flags, least=1)
    G, L, T = lam.n_global, lam.n_local, len(ids)
    layer = cfg.num_hidden_layers // 2 if layer is None else layer
    if not (0 <= layer < cfg.num_hidden_layers and 1 <= G <= L - 3 and points >= 1 and T > L):
        raise UserError(
            f"pca needs --layer in 0..{cfg.num_hidden_layers - 1}, 1 <= G <= L - 3, --points >= 1 "
            f"and a text longer than L = {L} tokens (it has {T}); change those"
        )
    window_only = dataclasses.replace(lam, n_global=0)
    runs = {"vanilla": None, "LM-Infinite": lam, "window only (G=0)": window_only}
    outputs = {}  # run -> (T, H*hd) attention outputs of the layer
    # no need to run the layers after it
    upto = dataclasses.replace(cfg, num_hidden_layers=layer + 1)
    for run, run_lam in tqdm(runs.items(), desc=f"layer {layer}", unit="run"):

        def keep(n, q, k, a):
            if n == layer:
                outputs[run] = a.double().cpu().numpy()

        model.forward(w, upto, ids, lam=run_lam, hidden_only=True, probe=keep)
    # fitted on the positions inside the window past the starting tokens, where all three agree
    centre = outputs["vanilla"][G:L].mean(0)
    centred = outputs["vanilla"][G:L] - centre
    axes = np.linalg.svd(centred, full_matrices=False)[2][:2]  # (2, H*hd): the top components
    usual = np.linalg.norm(centred, axis=1).mean()  # the window's own distance from it
    groups = {
        f"in the window ({G}..{L - 1})": ("vanilla", spread(G, L, points)),
        **{f"past L ({L}..{T - 1}): {run}": (run, spread(L, T, points)) for run in runs},
        f"starting tokens (0..{G - 1})": ("vanilla", np.arange(G)),
    }
    explained = (centred @ axes.T).var(0).sum() / (centred**2).sum(1).mean()
    result = {"layer": layer, "window": L, "explained": float(explained), "groups": {}}
    for name, (run, at) in groups.items():
        moved = outputs[run][at] - centre  # (n, H*hd)
        away = float(np.linalg.norm(moved, axis=1).mean() / usual)
        xy = (moved @ axes.T).tolist()  # (n, 2)
        result["groups"][name] = {"positions": at.tolist(), "xy": xy, "distance": away}
        print(
            f"{name}: {len(at)} tokens, mean distance from the window's centre {away:.2f} "
            "(1 = the window's own, all dimensions)"
        )
    save(result, json_out, png, plot_pca)


def plot_pca(ax, result):
    styles = ["#bbbbbb", *COLOURS, "#e8a33d", "k"]  # window, the 3 runs past L, starting tokens
    for (name, g), colour in zip(result["groups"].items(), styles):
        star = dict(s=40, marker="*") if name.startswith("starting") else dict(s=4, marker="o")
        ax.scatter(*np.array(g["xy"]).T, c=colour, label=f"{name}: {g['distance']:.2f}", **star)
    ax.set_xlabel("first principal component (fitted on the window)")
    ax.set_ylabel("second principal component")
    ax.set_title(f"Layer {result['layer']} attention outputs in 2-D (PCA fitted on the window)")
    ax.legend(title="mean distance from the window's centre (window = 1)", fontsize=7)


def save(result, json_out, png, draw, panels=1):
    if json_out:
        cli.write_json(json_out, result)
    if png:
        from matplotlib.figure import Figure  # not pyplot: no window, no global state

        fig = Figure(figsize=(7 * panels, 4.5))
        axes = fig.subplots(1, panels, squeeze=False)[0]
        draw(axes if panels > 1 else axes[0], result)
        for ax in axes:
            ax.grid(True, alpha=0.3)
            if ax.get_legend() is None:  # unless draw() made its own
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(png, dpi=120, format="png")  # the name as given
        print(f"wrote {png}")


@torch.inference_mode()  # nothing here trains
def main(argv=None):
    parser = cli.parser(__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = (*cli.MODEL, *cli.LAMBDA, "--json")
    tokens = lambda n, what: dict(default=n, help=f"read the first N tokens ({what})")
    own = {  # each command's own flags
        "entropy": dict(
            tokens=tokens(32768, "one pass each"),
            bucket=dict(default=2048),
            queries=dict(type=int, default=256, help="queries averaged per bucket, evenly"),
        ),
        "logits": dict(tokens=tokens(12288, "one pass each")),
        "pca": dict(
            tokens=tokens(12288, "more than L"),
            layer=dict(type=int, help="the layer whose outputs are drawn (default: middle)"),
            points=dict(type=int, default=1000, help="tokens drawn per group, evenly spread"),
        ),
    }
    commands = {"entropy": entropy_cmd, "logits": logits_cmd, "pca": pca_cmd}
    for name, command in commands.items():
        # its docstring's first paragraph: what it shows
        p = cli.subcommand(sub, name, command.__doc__.split("\n\n")[0])
        text = dict(required=True, help="UTF-8 text to read")
        cli.add_flags(p, *common, text=text, **own[name], png={})
    args = cli.parse(parser, argv)
    # the outputs checked now, not after the model has run
    cli.writable(args["json_out"], args["text"], args["ckpt"])
    cli.writable(args["png"], args["text"], args["ckpt"], args["json_out"])
    commands[args.pop("command")](**args)


if __name__ == "__main__":
    cli.run(main)()
