"""GGUF conversion on a tiny Llama GGUF written here, laid out as llama.cpp's converter writes
it."""

import os

import gguf
import numpy as np
import pytest

import weights
from conftest import random_weights, tiny_config
from lminf_min.config import UserError
from lminf_min.tokenizer import Tokenizer

TOKENS = (
    [chr(c) for c in range(ord("a"), ord("z") + 1)]
    + ["Ġ", "ab", "abc"]
    + [f"<ctl{i}>" for i in range(35)]
)
GGUF_NAMES = {
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


def llama_cpp_permute(w, n_heads):
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj/k_proj rows (written from its
    description)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name(hf):
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in fixed:
        return fixed[hf]
    _, _, layer, *mid, last = hf.split(".")
    return f"blk.{layer}.{GGUF_NAMES['.'.join(mid)]}.{last}"


def write_tiny_gguf(path, without=(), arch="llama", **changed):
    """A tiny Llama GGUF as llama.cpp writes one (F32 tensors); `without`: metadata to leave out,
    `changed`: metadata to write with other values."""
    cfg = tiny_config(num_attention_heads=4, num_key_value_heads=2)
    hf = random_weights(cfg, seed=3)
    w = gguf.GGUFWriter(str(path), arch)
    metadata = {
        "block_count": cfg["num_hidden_layers"],
        "context_length": cfg["max_position_embeddings"],
        "embedding_length": cfg["hidden_size"],
        "feed_forward_length": cfg["intermediate_size"],
        "head_count": cfg["num_attention_heads"],
        "head_count_kv": cfg["num_key_value_heads"],
        "rope_dimension_count": cfg["head_dim"],
        "rope_freq_base": cfg["rope_theta"],
        "layer_norm_rms_eps": 1e-6,
        "tokenizer_model": "gpt2",
        "tokenizer_pre": "gpt-2",
        "token_list": TOKENS,
        "token_types": [1] * 29 + [3] * 35,
        "token_merges": ["a b", "ab c"],
        "bos_token_id": 29,
        "eos_token_id": 30,
    }
    for key, value in (metadata | changed).items():
        if key not in without:
            getattr(w, "add_" + key)(value)
    for name, t in hf.items():
        if name.endswith("q_proj.weight"):
            t = llama_cpp_permute(t, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            t = llama_cpp_permute(t, cfg["num_key_value_heads"])
        w.add_tensor(gguf_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, hf


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def test_convert_gguf_round_trip(tiny_gguf, tmp_path):
    path, hf = tiny_gguf
    out = weights.convert_gguf(path, tmp_path / "ckpt")
    config, w = weights.load_checkpoint(out)
    assert (config.num_attention_heads, config.num_key_value_heads, config.tie_word_embeddings) == (
        4,
        2,
        False,
    )
    for name, t in hf.items():
        # F32 in, F32 out: the Q/K rows are back in place
        np.testing.assert_array_equal(w[name].numpy(), t, err_msg=name)
    tok = Tokenizer(out)
    assert tok.encode("abcab<ctl1>") == [
        TOKENS.index("abc"),
        TOKENS.index("ab"),
        TOKENS.index("<ctl1>"),
    ]


def test_interrupted_conversion_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(weights, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        weights.convert_gguf(tiny_gguf[0], tmp_path / "ckpt")
    # no ckpt, no half-written leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_converting_again_is_refused_and_keeps_the_checkpoint(tiny_gguf, tmp_path):
    out = tmp_path / "ckpt"
    weights.convert_gguf(tiny_gguf[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match="already exists; delete it to convert again"):
        weights.convert_gguf(tiny_gguf[0], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tiny.gguf"]
    weights.load_checkpoint(out)


def test_a_folder_that_appears_at_out_meanwhile_is_not_replaced(tiny_gguf, tmp_path, monkeypatch):
    """--out was free when the conversion began; someone fills it while the weights are written:
    the check right before the rename refuses, and their file stays."""
    out, save = tmp_path / "ckpt", weights.save_file

    def meanwhile(*args, **kwargs):
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
        save(*args, **kwargs)

    monkeypatch.setattr(weights, "save_file", meanwhile)
    with pytest.raises(UserError, match="already exists"):
        weights.convert_gguf(tiny_gguf[0], out)
    assert os.listdir(out) == ["theirs.txt"] and sorted(os.listdir(tmp_path)) == [
        "ckpt",
        "tiny.gguf",
    ]


def test_a_full_disk_during_conversion_is_one_line_and_leaves_nothing(
    tiny_gguf, tmp_path, monkeypatch
):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weights, "save_file", full)
    with pytest.raises(UserError) as e:
        weights.convert_gguf(tiny_gguf[0], tmp_path / "ckpt")
    assert str(e.value) == (
        f"cannot write {tmp_path / 'ckpt'} (No space left on device); pick a writable --out"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_a_quantization_gguf_cannot_dequantize_is_one_line(tiny_gguf, tmp_path, monkeypatch):
    def unknown(data, kind):
        raise NotImplementedError

    monkeypatch.setattr(gguf.quants, "dequantize", unknown)
    with pytest.raises(UserError, match="the gguf package cannot dequantize F32 tensors; pick"):
        weights.convert_gguf(tiny_gguf[0], tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]
