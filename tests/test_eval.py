"""Perplexity, streams and passkey retrieval, against the NumPy definition and plain arithmetic."""

import json
import math
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import weights
from conftest import random_weights, run_module, tiny_config, write_checkpoint
from lminf_min import eval as lm_eval
from lminf_min import reference
from lminf_min.config import LambdaConfig, LlamaConfig
from lminf_min.tokenizer import Tokenizer


def reference_nll(w, config, tokens, lam):
    logits = reference.forward(w, config, tokens, lam)[:-1]  # (T-1, V): predicts tokens 1..T-1
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    return -logp[np.arange(len(tokens) - 1), tokens[1:]]


@settings(max_examples=12, deadline=None)
@given(
    G=st.integers(0, 4),
    L=st.integers(1, 12),
    T=st.integers(2, 60),
    chunk=st.integers(1, 25),
    vanilla=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_nll_matches_one_pass_definition(G, L, T, chunk, vanilla, seed):
    """Chunks through the cache (queries = the last T of S keys) give the NumPy one-pass NLL."""
    cfg = tiny_config()
    w, config = random_weights(cfg, seed), LlamaConfig.from_dict(cfg)
    lam = None if vanilla else LambdaConfig(G, L, L)
    tokens = np.random.default_rng(seed).integers(0, cfg["vocab_size"], T)
    tensors = {n: torch.from_numpy(t) for n, t in w.items()}
    chunks = torch.from_numpy(tokens).split(chunk)
    got = torch.cat(list(lm_eval.stream_nll(tensors, config, chunks, lam)))
    np.testing.assert_allclose(got.numpy(), reference_nll(w, config, tokens, lam), atol=1e-4)


def test_buckets_are_position_ranges():
    # scores tokens at positions 1..9
    nll = torch.tensor([math.log(2.0)] * 5 + [math.log(8.0)] * 4, dtype=torch.float64)
    rows = lm_eval.bucketed(nll, 5)
    assert [(r["start"], r["end"]) for r in rows] == [(0, 5), (5, 10)]
    assert rows[0]["ppl"] == pytest.approx(2.0)  # positions 1-4
    # positions 5-9
    assert rows[1]["ppl"] == pytest.approx(math.exp((math.log(2) + 4 * math.log(8)) / 5))


def test_eval_ppl_cli(sp_ckpt, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the cat sat on a mat and ran to see the dog"] * 20))
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    args = [
        "--ckpt",
        sp_ckpt,
        "--text",
        text,
        "--max-tokens",
        100,
        "--n-global",
        2,
        "--n-local",
        16,
        "--bucket",
        40,
        "--json",
        out,
        "--plot",
        png,
    ]
    r = run_module("lminf_min.eval", "ppl", *args)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["tokens"] == 100 and [(b["start"], b["end"]) for b in result["buckets"]] == [
        (0, 40),
        (40, 80),
        (80, 100),
    ]
    assert png.stat().st_size > 1000 and "perplexity" in r.stdout
    # each bucket's perplexity, from the NumPy reference's log-probabilities
    config = LlamaConfig.from_dict(json.loads((sp_ckpt / "config.json").read_text()))
    w = weights.load_checkpoint(sp_ckpt)[1]
    ids = np.array(Tokenizer(sp_ckpt).encode(text.read_text())[:100])
    nll = reference_nll({n: t.numpy() for n, t in w.items()}, config, ids, LambdaConfig(2, 16, 16))
    for bucket in result["buckets"]:  # nll[t] scores the token at position t + 1
        part = nll[max(bucket["start"] - 1, 0) : bucket["end"] - 1]
        assert bucket["ppl"] == pytest.approx(math.exp(part.mean()), rel=1e-4)
    both = tmp_path / "both.png"
    r = run_module("lminf_min.eval", "plot", str(out), str(out), "--out", str(both))
    assert r.returncode == 0 and both.stat().st_size > 1000, r.stderr


def test_sampled_stream_draws_whole_documents():
    docs = [[1, 2, 3], [7, 8]]
    with mock.patch.object(lm_eval, "CHUNK", 4):
        chunks = list(lm_eval.sampled_stream(docs, 23, seed=0))
    flat = torch.cat(chunks).tolist()
    assert len(flat) == 23 and all(len(c) == 4 for c in chunks[:-1])
    i = 0
    while i + 3 <= len(flat):  # the stream is a sequence of whole documents (the last may be cut)
        size = 3 if flat[i] == 1 else 2
        assert flat[i : i + size] == docs[0 if size == 3 else 1]
        i += size


def test_eval_stream_cli(sp_ckpt, tmp_path):
    a, b, out = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "s.json"
    a.write_text("the cat sat on the mat and ran to see the dog")
    b.write_text("a big red fish by the sea")
    args = [
        "--ckpt",
        sp_ckpt,
        "--text",
        a,
        b,
        "--tokens",
        300,
        "--segment",
        100,
        "--n-global",
        2,
        "--n-local",
        16,
        "--json",
        out,
    ]
    r = run_module("lminf_min.eval", "stream", *args)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert [(s["start"], s["end"]) for s in result["segments"]] == [
        (1, 101),
        (101, 201),
        (201, 300),
    ]
    assert all(math.isfinite(s["ppl"]) and s["ppl"] > 1 for s in result["segments"])
    # each segment's speed, printed and recorded: its tokens over their share of the chunks' time
    assert all(s["tokens_per_s"] > 0 for s in result["segments"])
    assert r.stdout.count(" tokens/s   peak memory ") == 3


def test_stream_speed_shares_each_chunks_time_among_its_tokens(sp_ckpt, tmp_path, monkeypatch):
    """With a clock on which every chunk takes exactly one second, a segment's tokens/s is its
    token count over the sum of 1 / (tokens its chunk scored), token by token: segments that end
    mid-chunk get their part of it, the first chunk (no prediction for token 0) one token less."""
    text, out = tmp_path / "a.txt", tmp_path / "s.json"
    text.write_text("the cat sat on the mat and ran to see the dog")
    clock = iter(range(1000))
    monkeypatch.setattr(lm_eval, "time", type("Clock", (), {"perf_counter": lambda: next(clock)}))
    monkeypatch.setattr(lm_eval, "CHUNK", 50)
    knobs = dict(n_global=2, n_local=16, d_max=None)
    lm_eval.stream(sp_ckpt, [text], 300, 120, 0, out, "cpu", "float32", **knobs)
    # positions 1..299 are predicted; chunk c holds positions 50c..50c+49, chunk 0 predicts 49
    per_token = {p: 1 / (49 if p < 50 else 50) for p in range(1, 300)}
    segments = json.loads(out.read_text())["segments"]
    assert [(s["start"], s["end"]) for s in segments] == [(1, 121), (121, 241), (241, 300)]
    for s in segments:
        seconds = sum(per_token[p] for p in range(s["start"], s["end"]))
        assert s["tokens_per_s"] == pytest.approx((s["end"] - s["start"]) / seconds, rel=1e-12)


def test_passkey_prompt_has_exact_length_and_key_at_depth(sp_ckpt):
    tok = Tokenizer(sp_ckpt)
    key_ids = tok.encode(lm_eval.PASSKEY_KEY.format(key="12345"))
    question = tok.encode(lm_eval.PASSKEY_QUESTION)
    unit = len(tok.encode(lm_eval.PASSKEY_FILLER))
    ats = []
    for depth in (0.0, 0.3, 0.5, 1.0):
        ids, at = lm_eval.passkey_prompt(tok, 400, depth, "12345")
        assert (
            len(ids) == 400
            and ids[at : at + len(key_ids)] == key_ids
            and ids[-len(question) :] == question
        )
        ats.append(at)
    task = len(tok.encode(lm_eval.PASSKEY_TASK))
    n_units = (400 - task - len(key_ids) - len(question)) // unit
    # first, ..., after the last whole unit
    assert ats[0] == task and ats == sorted(ats) and ats[-1] == task + n_units * unit
    assert abs(ats[2] - (task + n_units * unit / 2)) <= unit
    with pytest.raises(lm_eval.UserError, match="too short"):
        lm_eval.passkey_prompt(tok, len(key_ids) + len(question), 0.5, "12345")


def numpy_greedy(w, config, ids, lam, decoding_from, n, vocab):
    """n greedy tokens (of the first `vocab`) after ids under the NumPy definition (top-k for
    positions >= decoding_from)."""
    ids = list(ids)
    for _ in range(n):
        ids.append(
            int(
                reference.forward(w, config, np.array(ids), lam, decoding_from=decoding_from)[
                    -1, :vocab
                ].argmax()
            )
        )
    return ids[-n:]


def test_eval_passkey_cli_answers_as_the_numpy_definition(sp_ckpt, tmp_path):
    """Each method's answer is the NumPy definition's greedy continuation of the same prompt, inside
    and past the window."""
    cfg = tiny_config()
    # sharper attention: the methods disagree
    ckpt = write_checkpoint(tmp_path / "sharp", cfg, random_weights(cfg, scale=0.6))
    (ckpt / "tokenizer.model").write_bytes((sp_ckpt / "tokenizer.model").read_bytes())
    out = tmp_path / "p.json"
    args = [
        "passkey",
        "--ckpt",
        ckpt,
        "--lengths",
        "300,305,600",
        "--samples",
        2,
        "--depths",
        2,
        "--n-global",
        2,
        "--n-local",
        310,
        "--top-k-middle",
        2,
        "--top-k-from-layer",
        1,
        "--top-k-distance",
        20,
        "--json",
        out,
    ]
    r = run_module("lminf_min.eval", *args)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 * 2 * 3 and "| 600 | LM-Infinite + top-2 | 0/2 | 0/1 | 0/1 |" in r.stdout
    # past the window the three methods answer differently ...
    assert len({row["answer"] for row in rows[-3:]}) == 3
    tok, (config, tensors) = Tokenizer(ckpt), weights.load_checkpoint(ckpt)
    w = {n: t.numpy().astype(np.float64) for n, t in tensors.items()}
    n_question = len(tok.encode(lm_eval.PASSKEY_QUESTION))
    methods = {
        "vanilla": None,
        "LM-Infinite": LambdaConfig(2, 310, 310),
        "LM-Infinite + top-2": LambdaConfig(2, 310, 310, 2, 1, 20),
    }
    # ... and each as its definition says: past the window, with only the answer
    for row in rows[-3:] + rows[6:9] + rows[:1]:
        # past it (305 + 8 > 310), and inside it (where all three are causal attention)
        ids, _ = lm_eval.passkey_prompt(tok, row["length"], row["depth"], row["key"])
        lam = methods[row["method"]]
        want = numpy_greedy(
            w,
            config,
            ids,
            lam,
            len(ids) - n_question if lam and lam.top_k else None,
            8,
            tok.vocab_size,
        )
        assert row["answer"] == tok.decode(want), row


def test_non_finite_logits_stop_the_evaluation(tiny_ckpt):
    """A checkpoint whose weights overflow gives a one-line error, not a perplexity of nan."""
    config, w = weights.load_checkpoint(tiny_ckpt)
    w["model.norm.weight"] = torch.full_like(w["model.norm.weight"], float("inf"))
    with pytest.raises(lm_eval.UserError, match="inf or NaN logits"):
        list(lm_eval.stream_nll(w, config, [torch.arange(20) % config.vocab_size], None))
