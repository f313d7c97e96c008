"""Measure the method on a real checkpoint.

python -m lminf_min.eval ppl --text FILE --max-tokens 16384               # LM-Infinite
python -m lminf_min.eval ppl --text FILE --max-tokens 16384 --vanilla     # full attention
python -m lminf_min.eval ppl --text FILE --max-tokens 16384 --n-global 0  # window only
python -m lminf_min.eval stream --text A.txt B.txt --tokens 200000        # ppl, tokens/s, memory
python -m lminf_min.eval passkey --lengths 4096,16384 --samples 20        # a hidden number

The commands pass LM-Infinite's flags (--n-global, --n-local, --d-max; passkey's also
--top-k-from-layer, --top-k-distance) on to LambdaConfig.for_model as `knobs`, under the same names.
A command's docstring is its --help line.
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

from lminf_min import caches, cli, generation, model, tokenizer
from lminf_min.config import LambdaConfig, UserError

# tokens per forward call: bounds the (chunk, vocab) logits; keys before it come from the cache
CHUNK = 2048


def stream_nll(weights, cfg, chunks, lam, backend=None):
    """For a stream given as token chunks, yield per chunk the NLL of its tokens (the very first has
    none).

    One pass through the cache (bounded for LM-Infinite): memory does not grow with the stream.
    Every logit is checked to be finite.
    """
    # last: log-probs after the previous chunk, for this chunk's first token
    cache, last, seen = caches.new_cache(cfg, lam), None, 0
    for chunk in chunks:
        hidden = model.forward(weights, cfg, chunk, lam, cache, hidden_only=True, backend=backend)
        logp = torch.log_softmax(model.lm_head(weights, cfg, hidden), dim=-1)  # (T, V) float32
        # finite log-probabilities <=> finite logits: a finished run had no inf/NaN
        if not torch.isfinite(logp).all():
            where = f"in the chunk of {len(chunk)} tokens after token {seen}"
            raise UserError(f"inf or NaN logits {where}; try --dtype float32")
        seen += len(chunk)
        nll = -logp[:-1].gather(1, chunk[1:, None])[:, 0]
        yield (nll if last is None else torch.cat([-last[chunk[:1]], nll])).double().cpu()
        last = logp[-1]


def bucketed(nll, bucket):
    """Perplexity of the predicted tokens at positions [start, end), position = index in the
    text."""
    end = len(nll) + 1  # positions 0 .. end - 1; nll[t] scores the token at position t + 1
    parts = {start: nll[max(start - 1, 0) : start - 1 + bucket] for start in range(0, end, bucket)}
    return [
        {"start": start, "end": min(start + bucket, end), "ppl": math.exp(part.mean())}
        for start, part in parts.items()
        if len(part)  # not position 0 alone (bucket 1): it has no prediction
    ]


def attention_name(lam):
    return (
        "vanilla" if lam is None else f"LM-Infinite G={lam.n_global} L={lam.n_local} D={lam.d_max}"
    )


def plot_ppl(results, title, path):
    """Perplexity against position, one line per result (the JSON that `ppl --json` writes), log
    scale."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    ax = Figure(figsize=(7, 4)).subplots()
    for r in results:
        centres = [(b["start"] + b["end"]) / 2 for b in r["buckets"]]
        ppls = [b["ppl"] for b in r["buckets"]]
        ax.plot(centres, ppls, marker="o", label=f"{r['attention']}: {r['ppl']:.2f}")
    ax.set(xlabel="token position (bucket centre)", ylabel="perplexity (log scale)", title=title)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=120, format="png")  # the name as given


def read_result(path):
    """A result of `ppl --json`, checked enough to plot: a name, a perplexity and number buckets."""
    fix = "pass JSON files written by `eval ppl --json`"
    if not Path(path).is_file():  # a folder, a pipe or a device: reading would block or never end
        raise UserError(f"{path} is not a file; {fix}")
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, or not JSON
        raise UserError(f"cannot read {path} ({e}); {fix}") from None
    try:
        buckets = result["buckets"]
        values = [result["ppl"], *(b[k] for b in buckets for k in ("start", "end", "ppl"))]
        ok = buckets and isinstance(result["attention"], str)
    except (KeyError, TypeError, IndexError):
        ok = False
    # json gives exactly int or float for a number (bool is a subclass of int: excluded)
    if not ok or any(type(v) not in (int, float) for v in values):
        raise UserError(
            f"{path} is not a result of `eval ppl --json` (no perplexity buckets); pass one"
        )
    return result


def plot(results, out, title):
    """draw several `ppl --json` results on one perplexity-by-position plot"""
    runs = [read_result(path) for path in results]
    cli.writable(out, *results)
    plot_ppl(runs, title, out)
    print(f"wrote {out}")


def sampled_stream(docs, n_tokens, seed):
    """Chunks of CHUNK tokens (n_tokens in all): whole documents drawn with replacement, one after
    another."""
    rng = torch.Generator().manual_seed(seed)
    draws = (docs[int(torch.randint(len(docs), (1,), generator=rng))] for _ in itertools.count())
    tokens = itertools.islice(itertools.chain.from_iterable(draws), n_tokens)
    while chunk := list(itertools.islice(tokens, CHUNK)):
        yield torch.tensor(chunk)


def stream(ckpt, text, tokens, segment, seed, json_out, device, dtype, **knobs):
    """perplexity and speed of an endless stream of documents, bounded cache"""
    if tokens < 2 or segment < 1:
        raise UserError("--tokens must be at least 2 and --segment at least 1")
    cli.writable(json_out, *text, ckpt)
    texts = [cli.read_prompt(t) for t in text]  # before the model: a bad file fails at once
    ckpt, cfg, w, device = cli.load_model(ckpt, device, dtype)
    lam = LambdaConfig.for_model(cfg, **knobs)
    tok = tokenizer.Tokenizer(ckpt, cfg.vocab_size)
    docs = [tok.encode(t) for t in texts]
    chunks = (c.to(device) for c in sampled_stream(docs, tokens, seed))
    rows, total = [], 0.0
    # the segment being filled: the NLL of each token, and its share of its chunk's seconds
    pending, seconds = torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    start = 1  # the position of its first token (the first token has no prediction)
    bar = tqdm(total=tokens - 1, desc="stream", unit="tok", file=sys.stderr)
    t0 = time.perf_counter()  # the first segment's time includes the first calls' warm-up
    for nll in stream_nll(w, cfg, chunks, lam, model.pick_backend(device)):
        t1 = time.perf_counter()
        bar.update(len(nll))
        seconds = torch.cat([seconds, torch.full_like(nll, (t1 - t0) / len(nll))])
        # t0 = t1: the reporting below counts towards the next chunk, so no time goes uncounted
        pending, total, t0 = torch.cat([pending, nll]), total + float(nll.sum()), t1
        # each whole segment, and at the stream's end (position `tokens`) the last, partial one
        while len(pending) >= segment or (len(pending) and start + len(pending) == tokens):
            part, pending = pending[:segment], pending[segment:]
            spent, seconds = seconds[:segment], seconds[segment:]
            end = start + len(part)
            ppl, speed = math.exp(part.mean()), len(part) / float(spent.sum())
            memory = round(cli.peak_memory_mb(device))
            rows.append(
                dict(start=start, end=end, ppl=ppl, tokens_per_s=speed, peak_memory_mib=memory)
            )
            what = f"perplexity {ppl:8.2f}   {speed:7.0f} tokens/s   peak memory {memory} MiB"
            bar.write(f"  tokens {start:>10}-{end:<10} {what}")
            start = end
    bar.close()
    result = {
        "tokens": tokens,
        "ppl": math.exp(total / (tokens - 1)),
        "segments": rows,
        "texts": [Path(t).name for t in text],
        "attention": attention_name(lam),
        "device": device,
        "dtype": dtype,
    }
    stream_of = f"a stream of {tokens} tokens from {len(docs)} document(s)"
    print(f"{result['attention']}: {stream_of}, perplexity {result['ppl']:.2f}")
    if json_out:
        cli.write_json(json_out, result)


def ppl(ckpt, text, max_tokens, vanilla, bucket, json_out, plot, device, dtype, **knobs):
    """perplexity by position over one long text"""
    if max_tokens < 2 or bucket < 1:
        raise UserError("--max-tokens must be at least 2 and --bucket at least 1")
    cli.writable(json_out, text, ckpt)
    cli.writable(plot, text, ckpt, json_out)
    ckpt, cfg, w, device, _, ids = cli.load_text(ckpt, device, dtype, text, max_tokens)
    lam = None if vanilla else LambdaConfig.for_model(cfg, **knobs)  # refused before the slow part
    if len(ids) < 2:
        raise UserError(f"{text} holds fewer than 2 tokens; perplexity needs a longer text")
    if len(ids) < max_tokens:
        print(f"note: {text} holds only {len(ids)} tokens", file=sys.stderr)
    if lam is None:  # full attention keeps every key: its cache grows to the text's length
        need = 2 * len(ids) * caches.kv_bytes_per_token(cfg, w["model.norm.weight"].element_size())
        cli.fits(need, device, f"a full KV cache for {len(ids)} tokens", "drop --vanilla")
    t0 = time.perf_counter()
    tokens = torch.tensor(ids, device=device)
    chunks = tqdm(tokens.split(CHUNK), desc="perplexity", unit="chunk", file=sys.stderr)
    # (N-1,): each token's NLL given all before it, the text read as a stream of its chunks
    nll = torch.cat(list(stream_nll(w, cfg, chunks, lam, model.pick_backend(device))))
    seconds = time.perf_counter() - t0
    result = {
        "tokens": len(ids),
        "ppl": math.exp(nll.mean()),
        "buckets": bucketed(nll, bucket),
        "attention": attention_name(lam),
        "text": Path(text).name,
        "checkpoint": str(ckpt),
        "device": device,
        "dtype": dtype,
        "seconds": round(seconds, 1),
    }
    speed = f"{seconds:.0f} s, {len(ids) / seconds:.0f} tokens/s"
    what = f"{len(ids)} tokens of {Path(text).name}"
    print(f"{result['attention']}: {what}, perplexity {result['ppl']:.2f} ({speed})")
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
    pieces = (PASSKEY_TASK, PASSKEY_FILLER, PASSKEY_KEY.format(key=key), PASSKEY_QUESTION)
    task, unit, key_ids, question = map(tok.encode, pieces)
    n_fill = length - len(task) - len(key_ids) - len(question)
    if n_fill < len(unit):
        least = length - n_fill + len(unit)
        raise UserError(
            f"passkey length {length} is too short for the prompt; use lengths of at least {least} "
            "tokens"
        )
    filler = (unit * (n_fill // len(unit) + 1))[:n_fill]
    at = round(depth * (n_fill // len(unit))) * len(unit)  # between two filler units
    return task + filler[:at] + key_ids + filler[at:] + question, len(task) + at


def greedy_answer(weights, cfg, cache, tail, lam, vocab, backend):
    """Feed `tail` one token at a time as in decoding (so top-k middle tokens see it), then
    ANSWER_TOKENS greedy tokens (of the tokenizer's `vocab`: padding rows of the embedding never
    win)."""
    for t in tail:
        logits = generation.decode_one_token(weights, cfg, t, cache, lam, backend)
    out = [logits[:vocab].argmax()]
    while len(out) < ANSWER_TOKENS:
        logits = generation.decode_one_token(weights, cfg, out[-1], cache, lam, backend)
        out.append(logits[:vocab].argmax())
    return [int(t) for t in out]


def passkey(ckpt, lengths, samples, depths, top_k_middle, seed, json_out, device, dtype, **knobs):
    """find a number hidden in filler: vanilla, LM-Infinite, + top-k"""
    lengths = list(dict.fromkeys(lengths))  # each once
    if samples < 1 or depths < 1 or top_k_middle < 1:
        raise UserError("--samples, --depths and --top-k-middle must be at least 1")
    cli.writable(json_out, ckpt)
    ckpt, cfg, w, device = cli.load_model(ckpt, device, dtype)
    # three full caches at once (vanilla's, LM-Infinite's, top-k's), each up to twice its length
    need = 6 * max(lengths) * caches.kv_bytes_per_token(cfg, w["model.norm.weight"].element_size())
    what = f"--lengths: holding three full caches of {max(lengths)} tokens"
    cli.fits(need, device, what, "use less")
    tok = tokenizer.Tokenizer(ckpt, cfg.vocab_size)
    rng = torch.Generator().manual_seed(seed)
    backend = model.pick_backend(device)
    vocab, n_question = tok.vocab_size, len(tok.encode(PASSKEY_QUESTION))
    with_top_k = LambdaConfig.for_model(cfg, top_k=top_k_middle, **knobs)
    lam = dataclasses.replace(with_top_k, top_k=0)  # LM-Infinite: the same without middle tokens
    top_k_name = f"LM-Infinite + top-{top_k_middle}"
    methods = {"vanilla": None, "LM-Infinite": lam, top_k_name: with_top_k}  # name -> attention
    passkey_prompt(tok, min(lengths), 0.5, "10000")  # a clear error for a length too short, now
    rows, prompts = [], list(itertools.product(lengths, range(samples)))
    for length, s in tqdm(prompts, desc="passkey", unit="prompt", file=sys.stderr):
        depth = (s % depths + 0.5) / depths
        key = str(int(torch.randint(10000, 100000, (1,), generator=rng)))
        ids, key_at = passkey_prompt(tok, length, depth, key)
        ids = torch.tensor(ids, device=device)
        haystack, question = ids[:-n_question], ids[-n_question:]

        def answer(cache, attention):  # greedy answer to the question after this cache
            return greedy_answer(w, cfg, cache, question, attention, vocab, backend)

        # a full cache, so that top-k can reuse LM-Infinite's haystack
        cache = caches.KVCache(cfg.num_hidden_layers)
        # inside the first window Λ attention is causal attention: shared
        generation.prefill(w, cfg, haystack[: lam.n_local], cache)
        # every query inside the window: the three are one computation (T <= L)
        if length + ANSWER_TOKENS <= lam.n_local:
            answers = dict.fromkeys(methods, answer(cache, None))
        else:
            full = copy.deepcopy(cache)  # vanilla's, from here on
            if len(haystack) > lam.n_local:
                generation.prefill(w, cfg, haystack[lam.n_local :], cache, lam, backend)
                generation.prefill(w, cfg, haystack[lam.n_local :], full)
            # LM-Infinite's answer from a copy: top-k's decoding goes on in this cache itself
            runs = {"LM-Infinite": copy.deepcopy(cache), top_k_name: cache, "vanilla": full}
            answers = {name: answer(run, methods[name]) for name, run in runs.items()}
        prompt = dict(length=length, depth=depth, key_position=key_at, key=key)
        for name, out in answers.items():
            text = tok.decode(out)
            correct = re.findall(r"\d+", text)[:1] == [key]  # the first number in the answer
            rows.append(dict(prompt, method=name, answer=text, correct=correct))
    summary = passkey_table(rows, lengths, sorted({r["depth"] for r in rows}), methods)
    print(summary)
    result = {
        "rows": rows,
        "table": summary,
        "checkpoint": str(ckpt),
        "device": device,
        "dtype": dtype,
        "settings": dataclasses.asdict(with_top_k),
        "samples": samples,
        "seed": seed,
    }
    if json_out:
        cli.write_json(json_out, result)


def passkey_table(rows, lengths, depths, methods):
    """Markdown: per length and method, exact-match accuracy overall and at each depth."""
    score = lambda rows: f"{sum(r['correct'] for r in rows)}/{len(rows)}"
    lines = [
        "| length | method | accuracy | " + " | ".join(f"depth {d:.2f}" for d in depths) + " |",
        "|---" * (3 + len(depths)) + "|",
    ]
    for length, name in itertools.product(lengths, methods):
        cell = [r for r in rows if r["length"] == length and r["method"] == name]
        scores = [score(cell)] + [score([r for r in cell if r["depth"] == d]) for d in depths]
        lines.append(f"| {length} | {name} | " + " | ".join(scores) + " |")
    return "\n".join(lines)


@torch.inference_mode()  # nothing here trains
def main(argv=None):
    parser = cli.parser(__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = (*cli.MODEL, *cli.LAMBDA, "--json")  # what ppl, stream and passkey share
    own = {  # each command's own flags, after the common ones
        ppl: dict(
            text=dict(required=True),
            max_tokens=dict(type=int, required=True, help="evaluate the text's first N tokens"),
            vanilla={},
            bucket=dict(default=4096, help="positions per perplexity bucket"),
            plot=dict(help="draw perplexity against position into this PNG"),
        ),
        stream: dict(
            text=dict(nargs="+", required=True, help="UTF-8 documents, drawn with replacement"),
            tokens=dict(required=True, help="length of the stream"),
            segment=dict(type=int, default=20000, help="tokens per reported segment"),
            seed=dict(help="seed of the document draws"),
        ),
        passkey: dict(
            top_k_middle=dict(default=5),  # passkey compares with top-k, which needs some
            top_k_from_layer={},
            top_k_distance={},
            lengths=dict(default="4096,8192,16384,32768", help="prompt lengths, comma-separated"),
            samples=dict(type=int, default=20, help="prompts per length, keys spread over depths"),
            depths=dict(type=int, default=5, help="number of evenly spread key depths"),
            seed=dict(help="seed of the keys"),
        ),
    }
    for command, flags in own.items():
        cli.add_flags(cli.subcommand(sub, command.__name__, command.__doc__), *common, **flags)
    cli.add_flags(
        cli.subcommand(sub, "plot", plot.__doc__),
        out=dict(required=True, help="PNG file to write"),
        title=dict(default="perplexity by position", help="plot title"),
    ).add_argument("results", nargs="+", help="JSON files written by `ppl --json`")
    args = cli.parse(parser, argv)
    {"ppl": ppl, "stream": stream, "passkey": passkey, "plot": plot}[args.pop("command")](**args)


if __name__ == "__main__":
    cli.run(main)()
