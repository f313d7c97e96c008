"""Speed, measured side by side in one run (these machines are shared and noisy: only ratios mean much).

    python -m lminf_min.bench generate --text FILE --prompt-tokens 16384 --new-tokens 64   # generate.py vs transformers
"""
import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from generate import decode_one_token, load_model, prefill, read_prompt
from lminf_min import model
from lminf_min.eval import writable
from lminf_min.config import HelpFormatter, LambdaConfig, UserError, cli
from lminf_min.tokenizer import Tokenizer


def clock():
    """perf_counter once the GPU has finished what it was given."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def ours(weights, cfg, ids, new_tokens, lam):
    """Seconds for prefill and for new_tokens greedy decode steps (no stop at end-of-text), and the tokens."""
    cache, out = model.new_cache(cfg, lam), []
    t0 = clock()
    logits = prefill(weights, cfg, ids, cache, lam)
    t1 = clock()
    for _ in range(new_tokens):
        out.append(int(logits.argmax()))
        logits = decode_one_token(weights, cfg, torch.tensor(out[-1:], device=ids.device), cache, lam)
    return t1 - t0, clock() - t1, out


def transformers_generate(ckpt, ids, new_tokens, dtype):
    """Seconds for transformers' LlamaForCausalLM (SDPA attention, its own cache) to do the same, and its tokens."""
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        raise UserError("the comparison needs transformers: pip install -e '.[test]'") from None
    hf = LlamaForCausalLM.from_pretrained(str(ckpt), dtype=dtype, attn_implementation="sdpa").to(ids.device).eval()
    hf.generate(ids[None, :64], max_new_tokens=2, do_sample=False)  # warm-up, as ours() had
    t0 = clock()
    out = hf.generate(ids[None], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1)
    return clock() - t0, out[0, len(ids):].tolist()


@torch.inference_mode()
def generate(ckpt, text, prompt_tokens, new_tokens, json_out, device, dtype):
    if prompt_tokens < 1 or new_tokens < 1:
        raise UserError("--prompt-tokens and --new-tokens must be at least 1")
    writable(json_out)
    ckpt, cfg, w, device = load_model(ckpt, device, dtype)
    ids = Tokenizer(ckpt).encode(read_prompt(text))[:prompt_tokens]
    if len(ids) < prompt_tokens:
        raise UserError(f"{text} holds only {len(ids)} tokens; pass a longer text or a smaller --prompt-tokens")
    ids = torch.tensor(ids, device=device)
    ours(w, cfg, ids[:64], 2, LambdaConfig.for_model(cfg))  # warm-up: first calls pay for allocations and kernel choice
    rows = []
    for name, lam in (("lminf_min, LM-Infinite", LambdaConfig.for_model(cfg)), ("lminf_min, vanilla", None)):
        pre, dec, toks = ours(w, cfg, ids, new_tokens, lam)
        rows.append({"run": name, "seconds": pre + dec, "prefill_s": pre, "decode_ms_per_token": 1000 * dec / new_tokens, "tokens": toks})
    seconds, toks = transformers_generate(ckpt, ids, new_tokens, getattr(torch, dtype))
    rows.append({"run": "transformers, SDPA", "seconds": seconds, "prefill_s": None, "decode_ms_per_token": None, "tokens": toks})
    base = rows[-1]["seconds"]
    print(f"{len(ids)}-token prompt + {new_tokens} greedy tokens, {device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), {dtype}, {date.today()}")
    print("| run | total s | prefill s | decode ms/token | time vs transformers |\n|---|---|---|---|---|")
    for r in rows:
        pre = "" if r["prefill_s"] is None else f"{r['prefill_s']:.1f}"
        dec = "" if r["decode_ms_per_token"] is None else f"{r['decode_ms_per_token']:.0f}"
        print(f"| {r['run']} | {r['seconds']:.1f} | {pre} | {dec} | {r['seconds'] / base:.2f}x |")
    same = rows[1]["tokens"] == rows[2]["tokens"]
    print(f"vanilla and transformers chose the same {new_tokens} tokens: {same}")
    if json_out:
        Path(json_out).write_text(json.dumps({"prompt_tokens": len(ids), "new_tokens": new_tokens, "device": device, "dtype": dtype,
                                              "threads": torch.get_num_threads(), "date": str(date.today()), "rows": rows,
                                              "vanilla_equals_transformers": same}, indent=1) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="prompt + greedy continuation: generate.py's path (LM-Infinite, vanilla) vs transformers",
                       formatter_class=HelpFormatter)
    p.add_argument("--ckpt", help="checkpoint directory; default: SmolLM2-135M-Instruct")
    p.add_argument("--text", required=True, help="UTF-8 text whose first tokens are the prompt")
    p.add_argument("--prompt-tokens", type=int, default=16384, help="prompt length in tokens")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated after it")
    p.add_argument("--json", dest="json_out", help="write the table as JSON here")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights and activations")
    args = vars(parser.parse_args(argv))
    {"generate": generate}[args.pop("command")](**args)


if __name__ == "__main__":
    cli(main)()
