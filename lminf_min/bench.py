"""Speed, measured side by side in one run (these machines are shared and noisy: only ratios mean
much).

    python -m lminf_min.bench generate --text FILE --prompt-tokens 16384 --new-tokens 64
    python -m lminf_min.bench attention --lengths 4096,16384
    python -m lminf_min.bench prefill --text FILE --lengths 8192,32768
    python -m lminf_min.bench decode --contexts 4096,32768
    python -m lminf_min.bench stream --tokens 100000

generate: generate.py vs transformers; attention: Λ attention (both backends) vs SDPA causal on
random inputs; prefill: prompt tokens/s vs transformers; decode: ms/token after a long context vs
transformers; stream: tokens/s and memory of a long stream through the bounded cache.
"""

import argparse
import platform
import time
from datetime import date
from pathlib import Path

import torch

from lminf_min import caches, cli, model
from lminf_min.config import LambdaConfig, UserError
from lminf_min.generation import decode_one_token, prefill
from lminf_min.tokenizer import Tokenizer


def clock():
    """perf_counter once the GPU has finished what it was given."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def best_ms(fn, repeat=3, warm_up=True):
    """The fastest of `repeat` runs of fn(), in ms, after one warm-up run unless warm_up is
    False."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeat):
        t0 = clock()
        fn()
        times.append(1000 * (clock() - t0))
    return min(times)


def report(title, rows, json_out, **meta):
    """Print rows (dicts) as a markdown table under a title naming device, dtype and date; write
    them as JSON."""
    meta |= {
        "threads": torch.get_num_threads(),
        "date": str(date.today()),
        "cpu": platform.processor() or platform.machine(),
    }
    print(f"{title} ({', '.join(f'{k} {v}' for k, v in meta.items())})")
    print("| " + " | ".join(rows[0]) + " |\n" + "|---" * len(rows[0]) + "|")
    for r in rows:
        print(
            "| "
            + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values())
            + " |"
        )
    if json_out:
        cli.write_json(json_out, meta | {"rows": rows})


def hf_model(ckpt, device, dtype):
    # imported here: the other sub-commands do not need it
    from transformers import LlamaForCausalLM

    return (
        LlamaForCausalLM.from_pretrained(
            str(ckpt), dtype=getattr(torch, dtype), attn_implementation="sdpa"
        )
        .to(device)
        .eval()
    )


def lengths_arg(text):
    """Whole numbers separated by commas (argparse type)."""
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give whole numbers separated by commas, e.g. 4096,16384"
        ) from None


@torch.inference_mode()
def attention(lengths, heads, n_global, n_local, json_out, device, dtype, profile):
    """One layer's attention on random inputs: both Λ backends (the block loop, compiled
    FlexAttention) against SDPA with a causal mask. Flex's first call at each length compiles it
    (not timed)."""
    cli.writable(json_out)
    device = (
        "cuda"
        if device == "auto" and torch.cuda.is_available()
        else "cpu"
        if device == "auto"
        else device
    )
    if len(heads) != 3 or min(heads) < 1 or heads[0] % heads[1] or heads[2] % 2:
        raise UserError(
            f"--heads {heads}: give three positive numbers, query heads a multiple of key/value "
            "heads, an even head dim (e.g. 9,3,64)"
        )
    H, H_kv, hd = heads
    # q, k, v and SDPA's output, float32 at most, with room for the backends' temporaries
    need = 8 * max(lengths) * (2 * H + 2 * H_kv) * hd * 4
    cli.fits(need, device, f"--lengths {max(lengths)}: one layer's inputs", "use shorter lengths")
    lam, rows, flex = LambdaConfig(n_global, n_local, n_local), [], model.Flex()
    for T in lengths:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (
            torch.randn(h, T, hd, generator=g, device=device, dtype=getattr(torch, dtype))
            for h in (H, H_kv, H_kv)
        )
        pos = torch.arange(T, device=device)
        causal = best_ms(
            lambda: torch.nn.functional.scaled_dot_product_attention(
                q[None], k[None], v[None], is_causal=True, enable_gqa=True
            )
        )
        # as forward() calls it
        blocks_ms = best_ms(lambda: model.attention(q, k, v, 1e4, lam, pos, pos))
        flex_ms = best_ms(lambda: model.attention(q, k, v, 1e4, lam, pos, pos, backend=flex))
        rows.append(
            {
                "tokens": T,
                "SDPA causal ms": causal,
                "blocks ms": blocks_ms,
                "flex ms": flex_ms,
                "blocks / causal": blocks_ms / causal,
                "flex / causal": flex_ms / causal,
                "FLOPs Λ / causal": pairs(T, lam) / pairs(T, None),
            }
        )
    report(
        f"attention, heads {H}/{H_kv} x {hd}, G={n_global} L={n_local}",
        rows,
        json_out,
        device=device,
        dtype=dtype,
    )
    if profile:  # where one Λ call of the block loop at the last length spends its time
        with torch.profiler.profile() as prof:
            model.attention(q, k, v, 1e4, lam, pos, pos)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


@torch.inference_mode()
def prefill_cmd(ckpt, text, lengths, json_out, device, dtype):
    """Prompt tokens/s: generate.py's prefill (LM-Infinite, bounded cache) against one transformers
    forward pass."""
    cli.writable(json_out, text, ckpt)
    ckpt, cfg, w, device = cli.load_model(ckpt, device, dtype)
    ids = Tokenizer(ckpt, cfg.vocab_size).encode(cli.read_prompt(text))
    if len(ids) < max(lengths):
        raise UserError(
            f"{text} holds only {len(ids)} tokens; pass a longer text or smaller --lengths"
        )
    ids = torch.tensor(ids, device=device)
    hf = hf_model(ckpt, device, dtype)
    lam = LambdaConfig.for_model(cfg)
    rows = []
    backend = model.pick_backend(device)
    ours = lambda T: prefill(w, cfg, ids[:T], caches.new_cache(cfg, lam), lam, backend)
    theirs = lambda T: hf(ids[None, :T], logits_to_keep=1)
    ours(2048), theirs(2048)  # warm-up: first calls pay for allocations and kernel choice
    for T in lengths:
        a, b = (best_ms(lambda: f(T), repeat=1, warm_up=False) for f in (ours, theirs))
        rows.append(
            {
                "tokens": T,
                "ours tokens/s": 1000 * T / a,
                "transformers tokens/s": 1000 * T / b,
                "speedup": b / a,
                "FLOPs theirs / ours": prefill_flops(cfg, T, None) / prefill_flops(cfg, T, lam),
            }
        )
    report(
        "prefill, the default model" if ckpt is None else f"prefill, {Path(ckpt).name}",
        rows,
        json_out,
        device=device,
        dtype=dtype,
    )


def pairs(T, lam):
    """(query, key) pairs a T-token sequence attends: causal attention, or the Λ mask (DESIGN.md
    §1)."""
    i = torch.arange(T, dtype=torch.float64)
    return float(
        (
            i + 1
            if lam is None
            else (i + 1).clamp(max=lam.n_local) + (i - lam.n_local + 1).clamp(0, lam.n_global)
        ).sum()
    )


def prefill_flops(cfg, T, lam):
    """Multiply-add FLOPs of a T-token prompt: 2 per weight of the layers per token, and 4·H·hd per
    layer for each (query, key) pair attended (scores and values). Their ratio bounds the speedup of
    kernels equally fast."""
    C = cfg.hidden_size
    H = cfg.num_attention_heads
    H_kv = cfg.num_key_value_heads
    hd = cfg.head_dim
    F = cfg.intermediate_size
    return cfg.num_hidden_layers * (
        2 * T * (2 * C * H * hd + 2 * C * H_kv * hd + 3 * C * F) + 4 * H * hd * pairs(T, lam)
    )


def filled_cache(cfg, lam, context, device, dtype):
    """Our cache after `context` tokens of random keys and values (what they hold does not change
    the cost), filled through its own begin / update / advance, as forward() fills it."""
    cache, shape = caches.new_cache(cfg, lam), (cfg.num_key_value_heads, context, cfg.head_dim)
    cache.begin(context, lam)
    for layer in range(cfg.num_hidden_layers):
        k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in "kv")
        cache.update(layer, k, v)
    cache.advance(context)
    return cache


@torch.inference_mode()
def decode(ckpt, contexts, tokens, n_local, json_out, device, dtype):
    """ms per generated token after `context` tokens: ours (LM-Infinite's bounded cache) against
    transformers (full cache)."""
    from transformers import DynamicCache

    cli.writable(json_out, ckpt)
    ckpt, cfg, w, device = cli.load_model(ckpt, device, dtype)
    hf = hf_model(ckpt, device, dtype)
    lam = LambdaConfig.for_model(cfg, n_local=n_local)
    rows = []
    dt = getattr(torch, dtype)
    token, backend = torch.tensor([42], device=device), model.pick_backend(device)
    for context in contexts:
        cache = filled_cache(cfg, lam, context, device, dtype=dt)
        ours_ms = best_ms(
            lambda: decode_one_token(w, cfg, token, cache, lam, backend), repeat=tokens
        )
        hf_cache = DynamicCache(config=hf.config)
        for layer in range(cfg.num_hidden_layers):
            hf_cache.update(
                *(
                    torch.randn(
                        1, cfg.num_key_value_heads, context, cfg.head_dim, device=device, dtype=dt
                    )
                    for _ in "kv"
                ),
                layer,
            )
        theirs_ms = best_ms(
            lambda: hf(token[None], past_key_values=hf_cache, use_cache=True, logits_to_keep=1),
            repeat=tokens,
        )
        full = (
            2
            * cfg.num_hidden_layers
            * cfg.num_key_value_heads
            * cfg.head_dim
            * context
            * dt.itemsize
        )
        rows.append(
            {
                "context": context,
                "ours ms/token": ours_ms,
                "transformers ms/token": theirs_ms,
                "ours / transformers": ours_ms / theirs_ms,
                "ours KV MiB": cache.nbytes() / 2**20,
                "full KV MiB": full / 2**20,
            }
        )
    report(
        f"decode, batch 1, G={lam.n_global} L={lam.n_local}, the fastest of --tokens steps",
        rows,
        json_out,
        device=device,
        dtype=dtype,
    )


@torch.inference_mode()
def stream(ckpt, tokens, chunk, json_out, device, dtype):
    """Random tokens through LM-Infinite's bounded cache in chunks: tokens/s and peak memory per
    tenth of the stream."""
    cli.writable(json_out, ckpt)
    ckpt, cfg, w, device = cli.load_model(ckpt, device, dtype)
    lam, rows, g = LambdaConfig.for_model(cfg), [], torch.Generator().manual_seed(0)
    cache = caches.new_cache(cfg, lam)
    step = max(tokens // 10, chunk)
    backend = model.pick_backend(device)
    for start in range(0, tokens, step):
        t0 = clock()
        for a in range(start, min(start + step, tokens), chunk):
            ids = torch.randint(0, cfg.vocab_size, (min(chunk, tokens - a),), generator=g).to(
                device
            )
            model.forward(w, cfg, ids, lam, cache, last_only=True, backend=backend)
        n = min(start + step, tokens) - start
        rows.append(
            {
                "tokens": f"{start}-{start + n}",
                "tokens/s": n / (clock() - t0),
                "peak MiB": round(cli.peak_memory_mb(device)),
            }
        )
    report(
        f"stream, G={lam.n_global} L={lam.n_local}, chunks of {chunk}",
        rows,
        json_out,
        device=device,
        dtype=dtype,
    )


def ours(weights, cfg, ids, new_tokens, lam):
    """Seconds for prefill and for new_tokens greedy decode steps (no stop at end-of-text), and the
    tokens."""
    cache, out, backend = caches.new_cache(cfg, lam), [], model.pick_backend(ids.device)
    t0 = clock()
    logits = prefill(weights, cfg, ids, cache, lam, backend)
    t1 = clock()
    for _ in range(new_tokens):
        out.append(int(logits.argmax()))
        logits = decode_one_token(
            weights, cfg, torch.tensor(out[-1:], device=ids.device), cache, lam, backend
        )
    return t1 - t0, clock() - t1, out


def transformers_generate(ckpt, ids, new_tokens, dtype):
    """Seconds for transformers' LlamaForCausalLM (SDPA attention, its own cache) to do the same,
    and its tokens."""
    hf = hf_model(ckpt, ids.device, dtype)
    hf.generate(ids[None, :64], max_new_tokens=2, do_sample=False)  # warm-up, as ours() had
    t0 = clock()
    out = hf.generate(
        ids[None],
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
    )
    return clock() - t0, out[0, len(ids) :].tolist()


@torch.inference_mode()
def generate(ckpt, text, prompt_tokens, new_tokens, json_out, device, dtype):
    if prompt_tokens < 1 or new_tokens < 1:
        raise UserError("--prompt-tokens and --new-tokens must be at least 1")
    cli.writable(json_out, text, ckpt)
    ckpt, cfg, w, device = cli.load_model(ckpt, device, dtype)
    ids = Tokenizer(ckpt, cfg.vocab_size).encode(cli.read_prompt(text))[:prompt_tokens]
    if len(ids) < prompt_tokens:
        raise UserError(
            f"{text} holds only {len(ids)} tokens; pass a longer text or a smaller --prompt-tokens"
        )
    ids = torch.tensor(ids, device=device)
    # warm-up: first calls pay for allocations and kernel choice
    ours(w, cfg, ids[:64], 2, LambdaConfig.for_model(cfg))
    rows = []
    for name, lam in (
        ("lminf_min, LM-Infinite", LambdaConfig.for_model(cfg)),
        ("lminf_min, vanilla", None),
    ):
        pre, dec, toks = ours(w, cfg, ids, new_tokens, lam)
        rows.append(
            {
                "run": name,
                "seconds": pre + dec,
                "prefill_s": pre,
                "decode_ms_per_token": 1000 * dec / new_tokens,
                "tokens": toks,
            }
        )
    seconds, toks = transformers_generate(ckpt, ids, new_tokens, dtype)
    rows.append(
        {
            "run": "transformers, SDPA",
            "seconds": seconds,
            "prefill_s": None,
            "decode_ms_per_token": None,
            "tokens": toks,
        }
    )
    base = rows[-1]["seconds"]
    print(
        f"{len(ids)}-token prompt + {new_tokens} greedy tokens, {device} "
        f"({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads), {dtype}, {date.today()}"
    )
    print(
        "| run | total s | prefill s | decode ms/token | time vs transformers "
        "|\n|---|---|---|---|---|"
    )
    for r in rows:
        pre = "" if r["prefill_s"] is None else f"{r['prefill_s']:.1f}"
        dec = "" if r["decode_ms_per_token"] is None else f"{r['decode_ms_per_token']:.0f}"
        print(f"| {r['run']} | {r['seconds']:.1f} | {pre} | {dec} | {r['seconds'] / base:.2f}x |")
    same = rows[1]["tokens"] == rows[2]["tokens"]
    print(f"vanilla and transformers chose the same {new_tokens} tokens: {same}")
    if json_out:
        cli.write_json(
            json_out,
            {
                "prompt_tokens": len(ids),
                "new_tokens": new_tokens,
                "device": device,
                "dtype": dtype,
                "threads": torch.get_num_threads(),
                "date": str(date.today()),
                "rows": rows,
                "vanilla_equals_transformers": same,
            },
        )


def checked(args):
    """The sub-command's arguments, every count and length at least 1 (one line if not)."""
    for name in ("lengths", "contexts", "tokens", "chunk", "prompt_tokens", "new_tokens"):
        values = args.get(name, [1])
        if min(values if isinstance(values, list) else [values]) < 1:
            raise UserError(f"--{name.replace('_', '-')} is {values}; give numbers of at least 1")
    return args


def main(argv=None):
    parser = cli.parser(__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    out = ("--device", "--dtype", "--json")
    cli.add_flags(
        cli.subcommand(sub, "generate", "prompt + greedy continuation: ours vs transformers"),
        "--ckpt",
        *out,
        text=dict(required=True, help="UTF-8 text whose first tokens are the prompt"),
        prompt_tokens=dict(type=int, default=16384, help="prompt length in tokens"),
        new_tokens=dict(type=int, default=64, help="greedy tokens generated after it"),
    )
    attention_cmd = cli.subcommand(sub, "attention", "one layer: both Λ backends vs SDPA, random")
    cli.add_flags(
        attention_cmd,
        *out,
        "--n-global",
        "--n-local",
        lengths=dict(type=lengths_arg, default=[4096, 16384], help="sequence lengths"),
        heads=dict(
            type=lengths_arg,
            default=[9, 3, 64],
            help="query heads, key/value heads, head dim (Llama-2-7B: 32,32,128)",
        ),
        profile=dict(action="store_true", help="then print torch.profiler's table for one call"),
    )
    attention_cmd.set_defaults(n_local=8192)  # no model here: L, and d_max = L
    cli.add_flags(
        cli.subcommand(sub, "prefill", "prompt tokens/s: our prefill vs transformers"),
        "--ckpt",
        *out,
        text=dict(required=True, help="UTF-8 text whose first tokens are the prompts"),
        lengths=dict(type=lengths_arg, default=[8192, 32768], help="prompt lengths"),
    )
    cli.add_flags(
        cli.subcommand(sub, "decode", "ms/token after a long context vs transformers"),
        "--ckpt",
        *out,
        "--n-local",
        contexts=dict(type=lengths_arg, default=[4096, 32768], help="context lengths"),
        tokens=dict(
            type=int, default=8, help="decode steps timed per context (the fastest counts)"
        ),
    )
    cli.add_flags(
        cli.subcommand(sub, "stream", "tokens/s and memory of a random stream, bounded cache"),
        "--ckpt",
        *out,
        tokens=dict(type=int, default=100000, help="stream length"),
        chunk=dict(type=int, default=1024, help="tokens per forward pass"),
    )
    args = checked(cli.parse(parser, argv))
    commands = {
        "generate": generate,
        "attention": attention,
        "prefill": prefill_cmd,
        "decode": decode,
        "stream": stream,
    }
    commands[args.pop("command")](**args)


if __name__ == "__main__":
    cli.run(main)()
