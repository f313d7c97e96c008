"""Speed, measured side by side in one run (these machines are shared and noisy: only ratios mean
much).

    python -m lminf_min.bench attention --lengths 4096,16384
    python -m lminf_min.bench prefill --text FILE --lengths 8192,32768
    python -m lminf_min.bench decode --contexts 4096,32768

attention: Λ attention (both backends) vs SDPA causal on random inputs; prefill: prompt tokens/s vs
transformers; decode: ms/token after a long context vs transformers. Tokens/s and memory over a
long stream of documents: `python -m lminf_min.eval stream`. A command's docstring begins with its
--help line.
"""

import platform
import time
from datetime import date

import torch

from lminf_min import caches, cli, generation, model
from lminf_min.config import LambdaConfig, UserError


def ms(fn):
    """The milliseconds one call of fn() takes, until the GPU (if any) has finished its work."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return 1000 * (time.perf_counter() - t0)


def best_ms(fn, repeat=3):
    """The fastest of `repeat` calls of fn(), in ms, after one warm-up call."""
    fn()
    return min(ms(fn) for _ in range(repeat))


def report(title, rows, json_out, device, dtype):
    """Print rows (dicts) as a markdown table under a title naming device, dtype, threads, date and
    CPU; write those and the rows as JSON."""
    meta = {"device": device, "dtype": dtype, "threads": torch.get_num_threads()}
    meta |= {"date": str(date.today()), "cpu": platform.processor() or platform.machine()}
    print(f"{title} ({', '.join(f'{k} {v}' for k, v in meta.items())})")
    print("| " + " | ".join(rows[0]) + " |\n" + "|---" * len(rows[0]) + "|")
    for row in rows:
        cells = (f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values())
        print("| " + " | ".join(cells) + " |")
    if json_out:
        cli.write_json(json_out, meta | {"rows": rows})


def hf_model(ckpt, device, dtype):
    """transformers' LlamaForCausalLM on the same checkpoint, with SDPA attention."""
    from transformers import LlamaForCausalLM  # here: the other sub-commands do not need it

    kind = getattr(torch, dtype)
    hf = LlamaForCausalLM.from_pretrained(str(ckpt), dtype=kind, attn_implementation="sdpa")
    return hf.to(device).eval()


def attention(lengths, heads, n_global, n_local, json_out, device, dtype, profile):
    """one layer: both Λ backends vs SDPA, random

    One layer's attention on random inputs: the block loop and compiled FlexAttention against SDPA
    with a causal mask. Flex's first call at each length compiles it (not timed)."""
    cli.writable(json_out)
    device = cli.resolve_device(device)
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
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for T in lengths:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (
            torch.randn(h, T, hd, generator=g, device=device, dtype=getattr(torch, dtype))
            for h in (H, H_kv, H_kv)
        )
        pos = torch.arange(T, device=device)
        causal = best_ms(lambda: sdpa(q[None], k[None], v[None], is_causal=True, enable_gqa=True))
        row = {"tokens": T, "SDPA causal ms": causal}
        for name, backend in (("blocks", None), ("flex", flex)):  # as forward() calls them
            call = lambda: model.attention(q, k, v, 1e4, lam, pos, pos, backend=backend)
            row[f"{name} ms"] = best_ms(call)
        ratios = {f"{name} / causal": row[f"{name} ms"] / causal for name in ("blocks", "flex")}
        rows.append(row | ratios | {"FLOPs Λ / causal": pairs(T, lam) / pairs(T, None)})
    title = f"attention, heads {H}/{H_kv} x {hd}, G={n_global} L={n_local}"
    report(title, rows, json_out, device, dtype)
    if profile:  # where one Λ call of the block loop at the last length spends its time
        with torch.profiler.profile() as prof:
            model.attention(q, k, v, 1e4, lam, pos, pos)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


def prefill(ckpt, text, lengths, json_out, device, dtype):
    """prompt tokens/s: our prefill vs transformers

    generate.py's prefill (LM-Infinite, bounded cache) against one transformers forward pass."""
    cli.writable(json_out, text, ckpt)
    ckpt, cfg, w, device, _, ids = cli.load_text(ckpt, device, dtype, text, max(lengths))
    if len(ids) < max(lengths):
        raise UserError(
            f"{text} holds only {len(ids)} tokens; pass a longer text or lower --lengths"
        )
    ids = torch.tensor(ids, device=device)
    hf = hf_model(ckpt, device, dtype)
    lam = LambdaConfig.for_model(cfg)
    backend = model.pick_backend(device)
    ours = lambda T: generation.prefill(w, cfg, ids[:T], caches.new_cache(cfg, lam), lam, backend)
    theirs = lambda T: hf(ids[None, :T], logits_to_keep=1)
    ours(2048), theirs(2048)  # warm-up: first calls pay for allocations and kernel choice
    rows = []
    for T in lengths:
        a, b = (ms(lambda: f(T)) for f in (ours, theirs))
        speeds = {"ours tokens/s": 1000 * T / a, "transformers tokens/s": 1000 * T / b}
        flops = prefill_flops(cfg, T, None) / prefill_flops(cfg, T, lam)
        rows.append({"tokens": T} | speeds | {"speedup": b / a, "FLOPs theirs / ours": flops})
    report(f"prefill, {ckpt.name}", rows, json_out, device, dtype)


def pairs(T, lam):
    """(query, key) pairs a T-token sequence attends: causal attention, or the Λ mask (DESIGN.md
    §1)."""
    i = torch.arange(T, dtype=torch.float64)
    seen = i + 1  # causal: every key up to the query's own
    if lam is not None:  # Λ: the last L of them, and the first G of those before the window
        seen = seen.clamp(max=lam.n_local) + (i - lam.n_local + 1).clamp(0, lam.n_global)
    return float(seen.sum())


def prefill_flops(cfg, T, lam):
    """Multiply-add FLOPs of a T-token prompt: 2 per weight of the layers per token, and 4·H·hd per
    layer for each (query, key) pair attended (scores and values). Their ratio bounds the speedup of
    kernels equally fast."""
    H, hd = cfg.num_attention_heads, cfg.head_dim
    # per layer: q and o (C·H·hd each), k and v (C·H_kv·hd each), the MLP's three (C·F each)
    attention_weights = 2 * cfg.hidden_size * hd * (H + cfg.num_key_value_heads)
    layer_weights = attention_weights + 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_hidden_layers * (2 * T * layer_weights + 4 * H * hd * pairs(T, lam))


def filled_caches(cfg, lam, hf, context, device, dtype):
    """Our cache and transformers' full one after the same `context` tokens of random keys and
    values (what they hold does not change the cost); ours filled through its own begin, update
    and advance, as forward() fills it."""
    from transformers import DynamicCache

    cache, full = caches.new_cache(cfg, lam), DynamicCache(config=hf.config)
    shape = (cfg.num_key_value_heads, context, cfg.head_dim)
    cache.begin(context, lam, device)
    for layer in range(cfg.num_hidden_layers):
        k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in "kv")
        cache.update(layer, k, v)
        full.update(k[None], v[None], layer)
    cache.advance(context)
    return cache, full


def decode(ckpt, contexts, tokens, n_local, json_out, device, dtype):
    """ms/token after a long context vs transformers

    One token after `context` tokens: ours reads LM-Infinite's bounded cache, transformers its full
    cache."""
    cli.writable(json_out, ckpt)
    ckpt, cfg, w, device = cli.load_model(ckpt, device, dtype)
    hf = hf_model(ckpt, device, dtype)
    lam = LambdaConfig.for_model(cfg, n_local=n_local)
    token = torch.tensor([42], device=device)
    backend, rows = model.pick_backend(device), []
    kind = getattr(torch, dtype)
    for context in contexts:
        cache, full = filled_caches(cfg, lam, hf, context, device, kind)
        ours = lambda: generation.decode_one_token(w, cfg, token, cache, lam, backend)
        theirs = lambda: hf(token[None], past_key_values=full, use_cache=True, logits_to_keep=1)
        a, b = (best_ms(f, repeat=tokens) for f in (ours, theirs))
        times = {"ours ms/token": a, "transformers ms/token": b, "ours / transformers": a / b}
        full_mib = context * caches.kv_bytes_per_token(cfg, kind.itemsize) / 2**20
        sizes = {"ours KV MiB": cache.nbytes() / 2**20, "full KV MiB": full_mib}
        rows.append({"context": context} | times | sizes)
    title = f"decode, batch 1, G={lam.n_global} L={lam.n_local}, the fastest of --tokens steps"
    report(title, rows, json_out, device, dtype)


def checked(args):
    """The sub-command's arguments, every count and length at least 1 (one line if not)."""
    for name in ("lengths", "contexts", "tokens"):
        values = args.get(name, [1])
        if min(values if isinstance(values, list) else [values]) < 1:
            raise UserError(f"--{name.replace('_', '-')} is {values}; give numbers of at least 1")
    return args


@torch.inference_mode()  # nothing here trains
def main(argv=None):
    parser = cli.parser(__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    own = {  # each sub-command's flags beside --device, --dtype and --json, which all take
        attention: dict(
            n_global={},
            n_local=dict(default=8192),  # no model here: L, and d_max = L
            lengths=dict(default="4096,16384", help="sequence lengths"),
            heads=dict(
                type=cli.numbers,
                default="9,3,64",
                help="query heads, key/value heads, head dim (Llama-2-7B: 32,32,128)",
            ),
            profile=dict(
                action="store_true", help="then print torch.profiler's table for one call"
            ),
        ),
        prefill: dict(
            ckpt={},
            text=dict(required=True, help="UTF-8 text whose first tokens are the prompts"),
            lengths=dict(default="8192,32768", help="prompt lengths"),
        ),
        decode: dict(
            ckpt={},
            n_local={},
            contexts=dict(type=cli.numbers, default="4096,32768", help="context lengths"),
            tokens=dict(default=8, help="decode steps timed per context (the fastest counts)"),
        ),
    }
    # each named after its function, its docstring's first paragraph as help
    for run, flags in own.items():
        subparser = cli.subcommand(sub, run.__name__, run.__doc__.split("\n\n")[0])
        cli.add_flags(subparser, "--device", "--dtype", "--json", **flags)
    args = checked(cli.parse(parser, argv))
    {run.__name__: run for run in own}[args.pop("command")](**args)


if __name__ == "__main__":
    cli.run(main)()
