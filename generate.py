"""Continue a text file with a Llama checkpoint, with LM-Infinite's Λ attention and bounded cache.

python generate.py --prompt long.txt                  # the default model, SmolLM2-135M-Instruct
python generate.py --ckpt DIR --prompt long.txt --max-new-tokens 200 --temperature 0.8
python generate.py --prompt long.txt --vanilla        # full attention, for comparison
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import weights as ckpts
from lminf_min import caches, model
from lminf_min.config import HelpFormatter, LambdaConfig, UserError, cli
from lminf_min.tokenizer import Tokenizer

# prompt tokens per forward call: bounds activations and, off CPU, the (chunk, keys) attention mask
PREFILL_CHUNK = 1024


def read_prompt(path):
    """The prompt file's text; a clear error if it is missing, empty, binary or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file {path} not found; pass --prompt with the path of a text file")
    # its text and token ids take several times the file's size
    free, need = (
        available_memory(),
        4 * path.stat().st_size,
    )
    if free is not None and need > free:
        raise UserError(
            f"prompt file {path} needs about {need / 2**30:.1f} GiB of memory to read and "
            f"tokenize, more than the {free / 2**30:.1f} GiB available; split it into smaller files"
        )
    data = path.read_bytes()
    if b"\0" in data:
        raise UserError(
            f"prompt file {path} looks binary (it contains NUL bytes); pass a text file"
        )
    try:
        # line endings as Python's text mode reads them
        text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        raise UserError(
            f"prompt file {path} is not UTF-8 (byte {e.start}); convert it, e.g. with iconv -t "
            "utf-8"
        ) from None
    if not text.strip():
        raise UserError(f"prompt file {path} is empty; write some text in it")
    return text


def available_memory():
    """Bytes this process can still get: MemAvailable, or less under a container's (cgroup v2)
    limit; None if unknown."""
    try:
        free = int(Path("/proc/meminfo").read_text().split("MemAvailable:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        return None
    try:
        limit, used = (
            Path("/sys/fs/cgroup", f).read_text().strip() for f in ("memory.max", "memory.current")
        )
        return free if limit == "max" else min(free, int(limit) - int(used))
    except (OSError, ValueError):
        return free


def load_model(ckpt, device, dtype):
    """(checkpoint dir, config, weights, device) for the --ckpt, --device and --dtype flags, with
    clear errors."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA GPU; use --device cpu")
    # private to torch: assume yes if gone
    has = lambda feature: getattr(torch.cpu, f"_is_{feature}_supported", lambda: True)()
    if device == "cpu" and dtype == "float16" and not has("amx_fp16"):
        print(
            "warning: this CPU has no float16 arithmetic, torch emulates it (several times slower "
            "than float32)",
            file=sys.stderr,
        )
    if device == "cpu" and dtype == "bfloat16" and not (has("avx512_bf16") or has("amx_tile")):
        raise UserError(
            "--dtype bfloat16: this CPU lacks bfloat16 instructions (AVX512-BF16 or AMX), so torch "
            "would emulate them slowly; use --dtype float32"
        )
    ckpt = Path(ckpt) if ckpt else ckpts.default_checkpoint()
    cfg, weights = ckpts.load_checkpoint(ckpt, device=device, dtype=getattr(torch, dtype))
    return ckpt, cfg, weights, device


def sample(logits, temperature, generator):
    """Next token id from (V,) logits: argmax at temperature 0, else a draw from softmax(logits /
    T)."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def prefill(weights, cfg, tokens, cache, lam=None, backend=None):
    """Run the prompt through the model chunk by chunk, filling the cache; logits (V,) of its last
    token.
    backend: how Λ attention is computed (model.pick_backend(device)); None: the block loop."""
    chunks = tokens.split(PREFILL_CHUNK)
    for chunk in tqdm(
        chunks, desc="prefill", unit="chunk", disable=len(chunks) < 4, file=sys.stderr
    ):
        logits = model.forward(weights, cfg, chunk, cache, lam, last_only=True, backend=backend)
    return logits[-1]


def decode_one_token(weights, cfg, token, cache, lam=None, backend=None):
    """Logits (V,) after one more token."""
    return model.forward(
        weights, cfg, token.view(1), cache, lam, last_only=True, decoding=True, backend=backend
    )[-1]


def peak_memory_mb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    # Linux reports KiB: the process's peak RSS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.inference_mode()
def main(
    ckpt,
    prompt,
    max_new_tokens,
    temperature,
    seed,
    device,
    dtype,
    vanilla,
    n_global,
    n_local,
    d_max,
    top_k_middle,
    top_k_from_layer,
    top_k_distance,
):
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens is {max_new_tokens}; it must be 0 or more")
    if temperature < 0:
        raise UserError(f"--temperature is {temperature}; it must be 0 (greedy) or more")
    text = read_prompt(prompt)
    ckpt, cfg, weights, device = load_model(ckpt, device, dtype)
    tok = Tokenizer(ckpt)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(
            f"the tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}; use "
            f"the tokenizer that came with {ckpt}"
        )
    ids = tok.encode(text)
    lam = (
        None
        if vanilla
        else LambdaConfig.for_model(
            cfg, n_global, n_local, d_max, top_k_middle, top_k_from_layer, top_k_distance
        )
    )
    if lam is None and len(ids) > cfg.max_position_embeddings:
        print(
            f"warning: the prompt has {len(ids)} tokens, more than the "
            f"{cfg.max_position_embeddings} this model was "
            "trained on; full attention degrades past that length (drop --vanilla for LM-Infinite)",
            file=sys.stderr,
        )
    cache = caches.new_cache(cfg, lam)
    # keys, values
    per_token = (
        2
        * cfg.num_hidden_layers
        * cfg.num_key_value_heads
        * cfg.head_dim
        * weights["model.norm.weight"].element_size()
    )
    grown = 2 * (len(ids) + max_new_tokens) * per_token  # the buffers double when full
    free = available_memory() if device == "cpu" else torch.cuda.mem_get_info()[0]
    if isinstance(cache, caches.KVCache) and free is not None and grown > free:
        raise UserError(
            f"the prompt has {len(ids)} tokens: a full KV cache for them needs {grown / 2**30:.1f} "
            f"GiB, more than the {free / 2**30:.1f} GiB available; drop --vanilla and "
            "--top-k-middle (LM-Infinite's cache is bounded) or shorten the prompt"
        )
    generator = torch.Generator().manual_seed(seed)
    # Λ attention: FlexAttention on CUDA, the block loop on CPU
    backend = model.pick_backend(device)
    cache_is_bounded = isinstance(cache, caches.LambdaCache)
    t0 = time.perf_counter()
    logits = prefill(weights, cfg, torch.tensor(ids, device=device), cache, lam, backend)
    t1 = time.perf_counter()
    out, printed = [], ""
    for _ in range(max_new_tokens):
        # padding rows past the vocabulary never win
        next_id = sample(logits[: tok.vocab_size], temperature, generator)
        if next_id == cfg.eos_token_id:
            break
        out.append(next_id)
        text_so_far = tok.decode(out)
        # hold back a partial UTF-8 character until it is complete
        if not text_so_far.endswith("\ufffd"):
            sys.stdout.write(text_so_far[len(printed) :])
            sys.stdout.flush()
            printed = text_so_far
        logits = decode_one_token(
            weights, cfg, torch.tensor(next_id, device=device), cache, lam, backend
        )
    t2 = time.perf_counter()
    print(file=sys.stdout)
    kind = f"bounded: G+L = {lam.n_global}+{lam.n_local} positions" if cache_is_bounded else "full"
    print(
        f"prompt {len(ids)} tokens, prefill {len(ids) / (t1 - t0):.0f} tokens/s; generated "
        f"{len(out)} tokens, {len(out) / max(t2 - t1, 1e-9):.1f} tokens/s; KV cache "
        f"{cache.nbytes() / 2**20:.0f} MiB ({kind}); peak memory {peak_memory_mb(device):.0f} MiB "
        f"({device}, {dtype})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--ckpt",
        help="checkpoint directory (config.json, *.safetensors, tokenizer); "
        "default: SmolLM2-135M-Instruct, fetched and converted on first use",
    )
    parser.add_argument(
        "--prompt", required=True, help="text file whose contents the model continues"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=128,
        help="tokens to generate (stops early at end-of-text)",
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (argmax)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weights and activations",
    )
    parser.add_argument(
        "--vanilla",
        action="store_true",
        help="full attention and a growing cache instead of LM-Infinite",
    )
    parser.add_argument(
        "--n-global", type=int, default=10, help="G: starting tokens every token sees"
    )
    parser.add_argument(
        "--n-local",
        type=int,
        help="L: window of recent tokens (default: the model's training length)",
    )
    parser.add_argument(
        "--d-max", type=int, help="D: largest distance ever scored, >= L - 1 (default: L)"
    )
    parser.add_argument(
        "--top-k-middle",
        type=int,
        default=0,
        help="paper §4: each generated token also attends, per head, "
        "to the K middle tokens with the largest logits (for retrieval). Keeps the whole cache (no "
        "eviction)",
    )
    parser.add_argument(
        "--top-k-from-layer",
        type=int,
        default=0,
        help="first layer that uses the top-k middle tokens",
    )
    parser.add_argument(
        "--top-k-distance",
        type=int,
        help="distance the middle tokens are scored at (default: L // 2)",
    )
    cli(main)(**vars(parser.parse_args()))
