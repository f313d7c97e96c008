"""The converted default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers' own GGUF
loader."""

import json

import pytest
import torch

import weights
from lminf_min import caches, generation, model
from lminf_min.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_gguf(default_ckpt):
    """transformers' tokenizer and model read straight from the GGUF: an independent dequantizer and
    tokenizer builder."""
    gguf = weights.fetch_default_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    return tok, hf.eval()


@pytest.fixture(scope="module")
def ours(default_ckpt):
    config, w = weights.load_checkpoint(default_ckpt)
    return Tokenizer(default_ckpt), config, w


def test_config_is_smollm2(ours):
    _, c, _ = ours
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        30,
        9,
        3,
        64,
    )
    assert (c.rope_theta, c.max_position_embeddings, c.vocab_size, c.tie_word_embeddings) == (
        1e5,
        8192,
        49152,
        True,
    )


def test_token_ids_match_transformers(ours, hf_gguf, botchan):
    text = botchan[:20000]
    ids = ours[0].encode(text)
    assert ids == hf_gguf[0](text)["input_ids"]
    assert ours[0].decode(ids) == text
    # special tokens stay whole
    assert ours[0].encode("<|im_start|>user") == hf_gguf[0]("<|im_start|>user")["input_ids"]


def test_logits_match_transformers(ours, hf_gguf, botchan):
    tok, config, w = ours
    ids = torch.tensor(tok.encode(botchan[:5000])[:256])
    with torch.no_grad():
        expected = hf_gguf[1](ids[None]).logits[0]
    diff = (model.forward(w, config, ids) - expected).abs()
    assert diff.max() <= 1e-3, f"max abs diff {diff.max():.3g}, mean {diff.mean():.3g}"


def test_greedy_continuation_matches_transformers(ours, hf_gguf, botchan):
    tok, config, w = ours
    ids = tok.encode(botchan[3000:4000])[:200]
    with torch.no_grad():
        expected = (
            hf_gguf[1]
            .generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids) :]
            .tolist()
        )
        cache = caches.KVCache(config.num_hidden_layers)
        logits, got = generation.prefill(w, config, torch.tensor(ids), cache), []
        for _ in range(32):
            got.append(generation.sample(logits, 0.0, None))
            logits = generation.decode_one_token(w, config, torch.tensor(got[-1]), cache)
    assert got == expected, f"ours: {tok.decode(got)!r}\ntransformers: {tok.decode(expected)!r}"


ADD_BOS = "tokenizer.ggml.add_bos_token"


def test_a_llama3_gguf_splits_text_as_transformers_does(default_ckpt):
    """A Llama-3 GGUF's tokenizer metadata ('llama-bpe') over the default vocabulary: text splits
    into the pieces the Llama 3 regex gives (by hand, and by transformers' own GGUF loader), and
    every encoding starts with BOS unless add_bos_token says False."""
    import gguf
    from tokenizers import Regex, pre_tokenizers

    reader = gguf.GGUFReader(str(weights.fetch_default_gguf()))
    meta = {name: f.contents() for name, f in reader.fields.items() if name.startswith("tokenizer")}
    # no add_bos_token key: llama.cpp adds BOS for these vocabularies unless the GGUF says not to
    meta = {k: v for k, v in meta.items() if k != ADD_BOS}
    tok = weights.gguf_tokenizer(meta | {"tokenizer.ggml.pre": "llama-bpe"})
    text = "Year 2024:  12345 tokens\n\n  it's DONE!!\r\nok  ééé 3.14159 I'LL"
    pieces = lambda pre: [piece for piece, _ in pre.pre_tokenize_str(text)]
    # as worked out by hand from the Llama 3 regex (Ġ a space, Ċ a newline, č a return)
    assert pieces(tok.pre_tokenizer) == (
        ["Year", "Ġ", "202", "4", ":", "Ġ", "Ġ", "123", "45", "Ġtokens", "ĊĊ", "Ġ", "Ġit", "'s"]
        + ["ĠDONE", "!!čĊ", "ok", "Ġ", "ĠÃ©Ã©Ã©", "Ġ", "3", ".", "141", "59", "ĠI", "'LL"]
    )
    try:  # and as transformers' own GGUF loader splits it, where this transformers has the table
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        GGUF_PRE_TOKENIZER_SPLITS = None
    if GGUF_PRE_TOKENIZER_SPLITS:
        split = Regex(GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"])
        theirs = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(split, "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        assert pieces(tok.pre_tokenizer) == pieces(theirs)
    bos = meta["tokenizer.ggml.bos_token_id"]
    assert tok.encode(text).ids[0] == bos and tok.encode(text).ids.count(bos) == 1
    # llama.cpp also takes a whole word that is a token as it is, without its merges
    assert json.loads(tok.to_str())["model"]["ignore_merges"] is True
    no_bos = weights.gguf_tokenizer(meta | {"tokenizer.ggml.pre": "llama-bpe", ADD_BOS: False})
    assert no_bos.encode(text).ids == tok.encode(text).ids[1:]
