"""Continue a text file with a Llama checkpoint, with LM-Infinite's Λ attention and bounded cache.

python generate.py --prompt long.txt                  # the default model, SmolLM2-135M-Instruct
python generate.py --ckpt DIR --prompt long.txt --max-new-tokens 200 --temperature 0.8
python generate.py --prompt long.txt --vanilla        # full attention, for comparison
"""

import lminf_min  # noqa: F401  first: a Ctrl-C during the slow imports below ends in one line

# isort: split
import sys
import time

import torch

from lminf_min import caches, cli, model
from lminf_min.config import LambdaConfig, UserError
from lminf_min.generation import decode_one_token, prefill, sample


@torch.inference_mode()
def main(ckpt, prompt, max_new_tokens, temperature, seed, device, dtype, vanilla, **knobs):
    """knobs: the flags of LambdaConfig.for_model (G, L, D and the top-k middle tokens)."""
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens is {max_new_tokens}; it must be 0 or more")
    if temperature != 0 and not temperature >= 1e-4:
        raise UserError(
            f"--temperature is {temperature}; it must be 0 (greedy) or at least 0.0001 (below "
            "that, sampling is greedy anyway)"
        )
    top_k = knobs.pop("top_k_middle")
    if vanilla and top_k:
        raise UserError("--top-k-middle is part of LM-Infinite; drop --vanilla or --top-k-middle")
    ckpt, cfg, weights, device, tok, ids = cli.load_text(ckpt, device, dtype, prompt)
    lam = None if vanilla else LambdaConfig.for_model(cfg, top_k=top_k, **knobs)
    if lam is None and len(ids) > cfg.max_position_embeddings:
        trained = f"the {cfg.max_position_embeddings} this model was trained on"
        print(
            f"warning: the prompt has {len(ids)} tokens, more than {trained}; full attention "
            "degrades past that length (drop --vanilla for LM-Infinite)",
            file=sys.stderr,
        )
    cache = caches.new_cache(cfg, lam)
    per_token = caches.kv_bytes_per_token(cfg, weights["model.norm.weight"].element_size())
    grown = 2 * (len(ids) + max_new_tokens) * per_token  # the buffers double when full
    if isinstance(cache, caches.KVCache):
        what = f"a full KV cache for {len(ids)} prompt tokens and {max_new_tokens} new ones"
        fix = "drop --vanilla and --top-k-middle (LM-Infinite's cache is bounded) or ask for less"
        cli.fits(grown, device, what, fix)
    generator = torch.Generator().manual_seed(seed)
    # Λ attention: FlexAttention on CUDA, the block loop on CPU
    backend = model.pick_backend(device)
    t0 = time.perf_counter()
    logits = prefill(weights, cfg, torch.tensor(ids, device=device), cache, lam, backend)
    t1 = time.perf_counter()
    out, printed = [], ""
    for _ in range(max_new_tokens):
        if not torch.isfinite(logits).all():
            raise UserError(f"inf or NaN logits after {len(out)} tokens; try --dtype float32")
        # padding rows past the vocabulary never win
        next_id = sample(logits[: tok.vocab_size], temperature, generator)
        if next_id == cfg.eos_token_id:
            break
        out.append(next_id)
        text_so_far = tok.decode(out)
        # hold back a partial UTF-8 character until it is complete
        if not text_so_far.endswith("\ufffd"):
            print(text_so_far[len(printed) :], end="", flush=True)
            printed = text_so_far
        logits = decode_one_token(
            weights, cfg, torch.tensor(next_id, device=device), cache, lam, backend
        )
    t2 = time.perf_counter()
    print()
    bounded = isinstance(cache, caches.LambdaCache)
    kind = f"bounded: G+L = {lam.n_global}+{lam.n_local} positions" if bounded else "full"
    print(
        f"prompt {len(ids)} tokens, prefill {len(ids) / (t1 - t0):.0f} tokens/s; generated "
        f"{len(out)} tokens, {len(out) / max(t2 - t1, 1e-9):.1f} tokens/s; KV cache "
        f"{cache.nbytes() / 2**20:.0f} MiB ({kind}); "
        f"peak memory {cli.peak_memory_mb(device):.0f} MiB ({device}, {dtype})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    parser = cli.parser(__doc__)
    cli.add_flags(
        parser,
        *cli.MODEL,
        *cli.LAMBDA,
        *cli.TOP_K,
        prompt=dict(required=True, help="text file whose contents the model continues"),
        max_new_tokens=dict(
            type=int, default=128, help="tokens to generate (stops at end-of-text)"
        ),
        temperature=dict(type=float, default=0.0, help="sampling temperature; 0 = greedy (argmax)"),
        seed=dict(help="random seed for sampling"),
        vanilla=dict(help="full attention and a growing cache instead"),
    )
    cli.run(lambda: main(**cli.parse(parser)))()
