"""Measure the method on a real checkpoint.

python -m lminf_min.eval ppl --text FILE --max-tokens 16384               # LM-Infinite
python -m lminf_min.eval ppl --text FILE --max-tokens 16384 --vanilla     # full attention
python -m lminf_min.eval ppl --text FILE --max-tokens 16384 --n-global 0  # window only
python -m lminf_min.eval stream --text A.txt B.txt --tokens 200000        # bounded memory
python -m lminf_min.eval passkey --lengths 4096,16384 --samples 20        # a hidden number
"""

import copy
import dataclasses
import itertools
import json
import math
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lminf_min import caches, cli, model
from lminf_min.config import LambdaConfig, UserError
from lminf_min.generation import decode_one_token, prefill
from lminf_min.tokenizer import Tokenizer

# tokens per forward call: bounds the (chunk, vocab) logits; keys before it come from the cache
CHUNK = 2048


def stream_nll(weights, cfg, chunks, lam, backend=None):
    """For a stream given as token chunks, yield per chunk the NLL of its tokens (the very first has
    none).

    One pass through the cache (bounded for LM-Infinite): memory does not grow with the stream.
    Every logit is checked to be finite.
    """
    # last: log-probs after the previous chunk, for this chunk's first token
    cache, last, seen = (caches.new_cache(cfg, lam), None, 0)
    for chunk in chunks:
        # (T, C)
        hidden = model.forward(
            weights, cfg, chunk, cache=cache, lam=lam, hidden_only=True, backend=backend
        )
        logp = torch.log_softmax(model.lm_head(weights, cfg, hidden), dim=-1)  # (T, V) float32
        # finite log-probabilities <=> finite logits: a finished run had no inf/NaN
        if not torch.isfinite(logp).all():
            raise UserError(
                f"inf or NaN logits in the chunk of {len(chunk)} tokens after token {seen}; try "
                "--dtype float32"
            )
        seen += len(chunk)
        nll = -logp[:-1].gather(1, chunk[1:, None])[:, 0]
        yield (nll if last is None else torch.cat([-last[chunk[:1]], nll])).double().cpu()
        last = logp[-1]


def token_nll(weights, cfg, tokens, lam, progress=True, backend=None):
    """NLL (N-1,) of each token given all before it, in chunks of CHUNK tokens."""
    chunks = tqdm(
        tokens.split(CHUNK), desc="perplexity", unit="chunk", disable=not progress, file=sys.stderr
    )
    return torch.cat(list(stream_nll(weights, cfg, chunks, lam, backend)))


def bucketed(nll, bucket):
    """Perplexity of the predicted tokens at positions [start, end), position = index in the
    text."""
    rows = []
    for start in range(0, len(nll) + 1, bucket):
        # nll[t] scores the token at position t + 1
        part = nll[max(start - 1, 0) : start - 1 + bucket]
        if len(part):
            rows.append(
                {
                    "start": start,
                    "end": min(start + bucket, len(nll) + 1),
                    "ppl": math.exp(part.mean()),
                }
            )
    return rows


def plot_ppl(results, title, path):
    """Perplexity against position, one line per result (the JSON that `ppl --json` writes), log
    scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        rows = r["buckets"]
        ax.plot(
            [(b["start"] + b["end"]) / 2 for b in rows],
            [b["ppl"] for b in rows],
            marker="o",
            label=f"{r['attention']}: {r['ppl']:.2f}",
        )
    ax.set(
        xlabel="token position (bucket centre)",
        ylabel="perplexity (log scale)",
        yscale="log",
        title=title,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # the name as given


def plot(results, out, title):
    runs = []
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
    for path in results:
        if not Path(path).is_file():
            raise UserError(f"{path} is not a file; pass JSON files written by `eval ppl --json`")
        try:
            runs.append(json.loads(Path(path).read_text(encoding="utf-8")))
            buckets, name = runs[-1]["buckets"], runs[-1]["attention"]
            values = [v for b in buckets for v in (b["start"], b["end"], b["ppl"])]
            if not (buckets and isinstance(name, str) and all(map(number, values))):
                raise TypeError
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
            raise UserError(
                f"cannot read {path} ({e}); pass JSON files written by `eval ppl --json`"
            ) from None
        except (KeyError, TypeError, IndexError):
            raise UserError(
                f"{path} is not a result of `eval ppl --json` (no perplexity buckets); pass one"
            ) from None
    cli.writable(out, *results)
    plot_ppl(runs, title, out)
    print(f"wrote {out}")


def sampled_stream(docs, n_tokens, seed):
    """Chunks of CHUNK tokens (n_tokens in all): whole documents drawn with replacement, one after
    another."""
    rng, buffer, done = torch.Generator().manual_seed(seed), [], 0
    while done < n_tokens:
        buffer += docs[int(torch.randint(len(docs), (1,), generator=rng))]
        while len(buffer) >= CHUNK or (buffer and done + len(buffer) >= n_tokens):
            chunk, buffer = buffer[: min(CHUNK, n_tokens - done)], buffer[CHUNK:]
            done += len(chunk)
            yield torch.tensor(chunk)
            if done >= n_tokens:
                return


@torch.inference_mode()
def stream(ckpt, text, tokens, segment, n_global, n_local, d_max, seed, json_out, device, dtype):
    if tokens < 2 or segment < 1:
        raise UserError("--tokens must be at least 2 and --segment at least 1")
    cli.writable(json_out, *text, ckpt)
    ckpt, cfg, w, device = cli.load_model(ckpt, device, dtype)
    lam, tok = (
        LambdaConfig.for_model(cfg, n_global, n_local, d_max),
        Tokenizer(ckpt, cfg.vocab_size),
    )
    docs = [tok.encode(cli.read_prompt(t)) for t in text]
    nlls = stream_nll(
        w,
        cfg,
        (c.to(device) for c in sampled_stream(docs, tokens, seed)),
        lam,
        model.pick_backend(device),
    )
    rows, pending, total = [], torch.zeros(0, dtype=torch.float64), 0.0
    bar = tqdm(total=tokens - 1, desc="stream", unit="tok", file=sys.stderr)
    # None marks the end: report the last, partial segment
    for nll in itertools.chain(nlls, [None]):
        if nll is not None:
            bar.update(len(nll))
            pending, total = torch.cat([pending, nll]), total + float(nll.sum())
        while len(pending) >= segment or (nll is None and len(pending)):
            part, pending = pending[:segment], pending[segment:]
            start = rows[-1]["end"] if rows else 1  # the first token has no prediction
            rows.append(
                {
                    "start": start,
                    "end": start + len(part),
                    "ppl": math.exp(part.mean()),
                    "peak_memory_mib": round(cli.peak_memory_mb(device)),
                }
            )
            bar.write(
                f"  tokens {start:>10}-{start + len(part):<10} perplexity {rows[-1]['ppl']:8.2f}   "
                f"peak memory {rows[-1]['peak_memory_mib']} MiB"
            )
    bar.close()
    result = {
        "tokens": tokens,
        "ppl": math.exp(total / (tokens - 1)),
        "segments": rows,
        "texts": [Path(t).name for t in text],
        "attention": f"LM-Infinite G={lam.n_global} L={lam.n_local} D={lam.d_max}",
        "device": device,
        "dtype": dtype,
    }
    print(
        f"{result['attention']}: a stream of {tokens} tokens from {len(docs)} document(s), "
        f"perplexity {result['ppl']:.2f}"
    )
    if json_out:
        cli.write_json(json_out, result)


@torch.inference_mode()
def ppl(
    ckpt, text, max_tokens, vanilla, n_global, n_local, d_max, bucket, json_out, plot, device, dtype
):
    if max_tokens < 2 or bucket < 1:
        raise UserError("--max-tokens must be at least 2 and --bucket at least 1")
    cli.writable(json_out, text, ckpt)
    cli.writable(plot, text, ckpt, json_out)
    ckpt, cfg, w, device = cli.load_model(ckpt, device, dtype)
    lam = None if vanilla else LambdaConfig.for_model(cfg, n_global, n_local, d_max)
    ids = Tokenizer(ckpt, cfg.vocab_size).encode(cli.read_prompt(text))[:max_tokens]
    if len(ids) < 2:
        raise UserError(f"{text} holds fewer than 2 tokens; perplexity needs a longer text")
    if len(ids) < max_tokens:
        print(f"note: {text} holds only {len(ids)} tokens", file=sys.stderr)
    if lam is None:  # full attention keeps every key: its cache grows to the text's length
        need = 2 * len(ids) * caches.kv_bytes_per_token(cfg, w["model.norm.weight"].element_size())
        cli.fits(need, device, f"a full KV cache for {len(ids)} tokens", "drop --vanilla")
    t0 = time.perf_counter()
    nll = token_nll(
        w, cfg, torch.tensor(ids, device=device), lam, backend=model.pick_backend(device)
    )
    seconds = time.perf_counter() - t0
    name = (
        "vanilla" if lam is None else f"LM-Infinite G={lam.n_global} L={lam.n_local} D={lam.d_max}"
    )
    result = {
        "tokens": len(ids),
        "ppl": math.exp(nll.mean()),
        "buckets": bucketed(nll, bucket),
        "attention": name,
        "text": Path(text).name,
        "checkpoint": str(ckpt),
        "device": device,
        "dtype": dtype,
        "seconds": round(seconds, 1),
    }
    print(
        f"{name}: {len(ids)} tokens of {Path(text).name}, perplexity {result['ppl']:.2f} "
        f"({seconds:.0f} s, {len(ids) / seconds:.0f} tokens/s)"
    )
    for r in result["buckets"]:
        print(f"  positions {r['start']:>7}-{r['end']:<7} ppl {r['ppl']:10.2f}")
    if json_out:
        cli.write_json(json_out, result)
    if plot:
        plot_ppl([result], f"{Path(text).name}, {len(ids)} tokens", plot)


PASSKEY_TASK = (
    "A secret number is hidden somewhere in the long text below. "
    "Find it and remember it: you will be asked for it at the end.\n"
)
PASSKEY_FILLER = (
    " The river runs past the old mill. A cart rolls along the road to the market."
    " Snow lies on the far hills."
)
PASSKEY_KEY = " Here is the secret number: {key}. Remember {key}."
PASSKEY_QUESTION = "\nWhat is the secret number hidden in the text above? The secret number is"
ANSWER_TOKENS = 8


def passkey_prompt(tok, length, depth, key):
    """Token ids (exactly `length`) of the task, filler with the key sentence at `depth` (0 = first,
    1 = last filler sentence), and the question; and the index of the key sentence's first token.

    The pieces are tokenized apart and joined, so the length is exact and the key's tokens are the
    same at every depth."""
    task, unit, key_ids, question = (
        tok.encode(t)
        for t in (PASSKEY_TASK, PASSKEY_FILLER, PASSKEY_KEY.format(key=key), PASSKEY_QUESTION)
    )
    n_fill = length - len(task) - len(key_ids) - len(question)
    if n_fill < len(unit):
        raise UserError(
            f"passkey length {length} is too short for the prompt; use lengths of at least "
            f"{length - n_fill + len(unit)} tokens"
        )
    filler = (unit * (n_fill // len(unit) + 1))[:n_fill]
    at = round(depth * (n_fill // len(unit))) * len(unit)  # between two filler units
    return task + filler[:at] + key_ids + filler[at:] + question, len(task) + at


def greedy_answer(weights, cfg, cache, tail, lam, vocab, backend):
    """Feed `tail` one token at a time as in decoding (so top-k middle tokens see it), then
    ANSWER_TOKENS greedy tokens (of the tokenizer's `vocab`: padding rows of the embedding never
    win)."""
    for t in tail:
        logits = decode_one_token(weights, cfg, t, cache, lam, backend)
    out = [int(logits[:vocab].argmax())]
    while len(out) < ANSWER_TOKENS:
        logits = decode_one_token(
            weights, cfg, torch.tensor(out[-1:], device=tail.device), cache, lam, backend
        )
        out.append(int(logits[:vocab].argmax()))
    return out


@torch.inference_mode()
def passkey(
    ckpt,
    lengths,
    samples,
    depths,
    top_k_middle,
    top_k_from_layer,
    top_k_distance,
    seed,
    json_out,
    device,
    dtype,
    n_global,
    n_local,
    d_max,
):
    try:
        lengths = list(dict.fromkeys(int(n) for n in lengths.split(",")))
    except ValueError:
        raise UserError(
            f"--lengths {lengths!r}: give token counts separated by commas, e.g. 4096,8192"
        ) from None
    if samples < 1 or depths < 1 or top_k_middle < 1:
        raise UserError("--samples, --depths and --top-k-middle must be at least 1")
    cli.writable(json_out, ckpt)
    ckpt, cfg, w, device = cli.load_model(ckpt, device, dtype)
    # three full caches at once (vanilla's, LM-Infinite's, top-k's), each up to twice its length
    need = 6 * max(lengths) * caches.kv_bytes_per_token(cfg, w["model.norm.weight"].element_size())
    cli.fits(
        need, device, f"--lengths: holding three full caches of {max(lengths)} tokens", "use less"
    )
    tok = Tokenizer(ckpt, cfg.vocab_size)
    rng = torch.Generator().manual_seed(seed)
    backend = model.pick_backend(device)
    vocab, n_question = tok.vocab_size, len(tok.encode(PASSKEY_QUESTION))
    lam = LambdaConfig.for_model(cfg, n_global, n_local, d_max)
    top_k_name = f"LM-Infinite + top-{top_k_middle}"
    methods = {
        "vanilla": None,
        "LM-Infinite": lam,
        top_k_name: LambdaConfig.for_model(
            cfg, n_global, n_local, d_max, top_k_middle, top_k_from_layer, top_k_distance
        ),
    }
    for length in lengths:
        # a clear error for a length too short, before any work
        passkey_prompt(tok, length, 0.5, "10000")
    rows = []
    bar = tqdm(total=len(lengths) * samples, desc="passkey", unit="prompt", file=sys.stderr)
    for length, s in itertools.product(lengths, range(samples)):
        depth = (s % depths + 0.5) / depths
        key = str(int(torch.randint(10000, 100000, (1,), generator=rng)))
        ids, key_at = passkey_prompt(tok, length, depth, key)
        ids = torch.tensor(ids, device=device)
        haystack, question = ids[:-n_question], ids[-n_question:]
        # a full cache, so that top-k can reuse LM-Infinite's haystack
        cache = caches.KVCache(cfg.num_hidden_layers)
        # inside the first window Λ attention is causal attention: shared
        prefill(w, cfg, haystack[: lam.n_local], cache)
        # every query inside the window: the three are one computation (T <= L)
        if length + ANSWER_TOKENS <= lam.n_local:
            answers = dict.fromkeys(
                methods, greedy_answer(w, cfg, cache, question, None, vocab, backend)
            )
        else:
            full = copy.deepcopy(cache)  # vanilla's, from here on
            if len(haystack) > lam.n_local:
                prefill(w, cfg, haystack[lam.n_local :], cache, lam, backend)
                prefill(w, cfg, haystack[lam.n_local :], full)
            shared = copy.deepcopy(cache)
            answers = {
                "LM-Infinite": greedy_answer(w, cfg, cache, question, lam, vocab, backend),
                top_k_name: greedy_answer(
                    w, cfg, shared, question, methods[top_k_name], vocab, backend
                ),
                "vanilla": greedy_answer(w, cfg, full, question, None, vocab, backend),
            }
        for name, out in answers.items():
            text = tok.decode(out)
            rows.append(
                {
                    "length": length,
                    "depth": depth,
                    "key_position": key_at,
                    "key": key,
                    "method": name,
                    "answer": text,
                    "correct": (re.findall(r"\d+", text) or [""])[0] == key,
                }
            )
        bar.update()
    bar.close()
    summary = passkey_table(rows, lengths, sorted({r["depth"] for r in rows}), methods)
    print(summary)
    if json_out:
        cli.write_json(
            json_out,
            {
                "rows": rows,
                "table": summary,
                "checkpoint": str(ckpt),
                "device": device,
                "dtype": dtype,
                "settings": dataclasses.asdict(methods[top_k_name]),
                "samples": samples,
                "seed": seed,
            },
        )


def passkey_table(rows, lengths, depths, methods):
    """Markdown: per length and method, exact-match accuracy overall and at each depth."""
    lines = [
        "| length | method | accuracy | " + " | ".join(f"depth {d:.2f}" for d in depths) + " |",
        "|---" * (3 + len(depths)) + "|",
    ]
    for length, name in itertools.product(lengths, methods):
        cell = [r for r in rows if r["length"] == length and r["method"] == name]
        at = [[r["correct"] for r in cell if r["depth"] == d] for d in depths]
        lines.append(
            f"| {length} | {name} | {sum(r['correct'] for r in cell)}/{len(cell)} | "
            + " | ".join(f"{sum(a)}/{len(a)}" for a in at)
            + " |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = cli.parser(__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = (*cli.MODEL, *cli.LAMBDA, "--json")  # what ppl, stream and passkey share
    cli.add_flags(
        cli.subcommand(sub, "ppl", "perplexity by position over one long text"),
        *common,
        text=dict(required=True, help="UTF-8 text file"),
        max_tokens=dict(type=int, required=True, help="evaluate the first N tokens of the text"),
        vanilla=dict(action="store_true", help="full causal attention instead of LM-Infinite"),
        bucket=dict(type=int, default=4096, help="positions per perplexity bucket"),
        plot=dict(help="draw perplexity against position into this PNG"),
    )
    cli.add_flags(
        cli.subcommand(
            sub, "stream", "perplexity of an endless stream of documents, bounded cache"
        ),
        *common,
        text=dict(nargs="+", required=True, help="UTF-8 documents, drawn with replacement"),
        tokens=dict(type=int, required=True, help="length of the stream"),
        segment=dict(type=int, default=20000, help="tokens per reported perplexity"),
        seed=dict(type=int, default=0, help="seed of the document draws"),
    )
    cli.add_flags(
        cli.subcommand(
            sub, "passkey", "find a number hidden in filler: vanilla, LM-Infinite, + top-k"
        ),
        *common,
        lengths=dict(default="4096,8192,16384,32768", help="prompt lengths, comma-separated"),
        samples=dict(type=int, default=20, help="prompts per length, keys spread over depths"),
        depths=dict(type=int, default=5, help="number of evenly spread key depths"),
        top_k_middle=dict(type=int, default=5, help="K middle keys per head for the top-k method"),
        top_k_from_layer=dict(type=int, default=0, help="first layer that sees them"),
        top_k_distance=dict(type=int, help="distance they are scored at (default: L // 2)"),
        seed=dict(type=int, default=0, help="seed of the keys"),
    )
    cli.add_flags(
        cli.subcommand(
            sub, "plot", "draw several `ppl --json` results on one perplexity-by-position plot"
        ),
        out=dict(required=True, help="PNG file to write"),
        title=dict(default="perplexity by position", help="plot title"),
    ).add_argument("results", nargs="+", help="JSON files written by `ppl --json`")
    args = cli.parse(parser, argv)
    {"ppl": ppl, "stream": stream, "passkey": passkey, "plot": plot}[args.pop("command")](**args)


if __name__ == "__main__":
    cli.run(main)()
