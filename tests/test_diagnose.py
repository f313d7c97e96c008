"""diagnose.py's attention rows against the NumPy definition, and its commands end to end on a tiny
checkpoint."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from conftest import run_module
from lminf_min import diagnose, mask, model, reference
from lminf_min.config import LambdaConfig, LlamaConfig
from lminf_min.tokenizer import Tokenizer

THETA = 1e4


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(1, 50),
    G=st.integers(0, 6),
    L=st.integers(1, 12),
    extra=st.integers(0, 10),
    vanilla=st.booleans(),
    rep=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_row_probabilities_are_the_definitions(T, G, L, extra, vanilla, rep, seed):
    """softmax(row_logits) of any set of queries equals their rows of reference.attention_weights
    (vanilla or Λ, any d_max >= L - 1), and so does their entropy."""
    rng = np.random.default_rng(seed)
    H_kv, D = 2, 8
    q, k = rng.standard_normal((H_kv * rep, T, D)), rng.standard_normal((H_kv, T, D))
    lam = None if vanilla else LambdaConfig(G, L, L - 1 + extra)
    want = reference.attention_weights(q, reference.repeat_kv(k, rep), THETA, lam)  # (H, T, T)
    angles = model.rope_angles(torch.arange(T), D, THETA)
    qr, kr = model.rope(torch.tensor(q), angles), model.rope(torch.tensor(k), angles)
    rows = torch.tensor(sorted(set(rng.integers(0, T, 5).tolist())))
    logits = diagnose.row_logits(qr[:, rows], kr[:, : int(rows[-1]) + 1], rows, THETA, lam)
    p = want[:, rows.numpy()][..., : int(rows[-1]) + 1]
    np.testing.assert_allclose(torch.softmax(logits, dim=-1).numpy(), p, atol=1e-6)
    ent = -(p * np.log(np.where(p > 0, p, 1))).sum(-1)
    np.testing.assert_allclose(diagnose.entropy(logits).numpy(), ent, atol=1e-5)


def run(*args):
    return run_module("lminf_min.diagnose", *args)


def reference_layers(ckpt, ids, lam):
    """Per layer, the NumPy reference's attention probabilities (H, T, T) and outputs (T, H*D)."""
    cfg = LlamaConfig.from_dict(json.loads((ckpt / "config.json").read_text()))
    weights = load_file(str(ckpt / "model.safetensors"))
    found = []

    def probe(layer, q, k, a):
        found.append((reference.attention_weights(q, k, cfg.rope_theta, lam), a))

    reference.forward(weights, cfg, ids, lam, probe=probe)
    return found


@pytest.fixture
def words(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the cat sat on a mat and ran to see the dog"] * 30))
    return text


def test_entropy_command_equals_the_reference_probabilities(sp_ckpt, words, tmp_path):
    """`diagnose entropy`: each layer's mean entropy per bucket is the mean, over the bucket's
    queries and the heads, of the entropy of the NumPy reference's attention rows."""
    common = ["--ckpt", sp_ckpt, "--text", words, "--tokens", 200, "--n-global", 2, "--n-local", 48]
    out = tmp_path / "e.json"
    r = run(
        "entropy",
        *common,
        "--bucket",
        40,
        "--queries",
        16,
        "--png",
        tmp_path / "e.png",
        "--json",
        out,
    )
    assert r.returncode == 0, r.stderr
    e = json.loads(out.read_text())
    assert e["buckets"][0] == [0, 40] and len(e["buckets"]) == 5 and e["in_window_bucket"] == 0
    assert all(len(rows) == 16 for rows in e["queries"])
    ids = np.array(Tokenizer(sp_ckpt).encode(words.read_text())[:200])
    for run_name, lam in (
        ("vanilla", None),
        ("LM-Infinite G=2 L=48 D=48", LambdaConfig(2, 48, 48)),
    ):
        for layer, (p, _) in enumerate(reference_layers(sp_ckpt, ids, lam)):
            ent = -(p * np.log(np.where(p > 0, p, 1))).sum(-1)  # (H, T)
            expected = [ent[:, rows].mean() for rows in e["queries"]]
            np.testing.assert_allclose(e["entropy"][run_name][layer], expected, atol=1e-4)
    # a Λ row sees at most G + L keys
    assert (np.array(e["entropy"]["LM-Infinite G=2 L=48 D=48"]) <= math.log(2 + 48) + 1e-5).all()
    assert "against" in r.stdout and (tmp_path / "e.png").stat().st_size > 10_000


def test_pca_command_equals_a_pca_of_the_reference_outputs(sp_ckpt, words, tmp_path):
    """`diagnose pca`: the projected points are the layer's attention outputs from the NumPy
    reference, projected on the top two eigenvectors of their covariance in the window (computed
    here with eigh, not the command's SVD), up to each component's sign."""
    G, L, layer = 2, 40, 1
    out = tmp_path / "p.json"
    r = run(
        "pca",
        "--ckpt",
        sp_ckpt,
        "--text",
        words,
        "--tokens",
        120,
        "--n-global",
        G,
        "--n-local",
        L,
        "--layer",
        layer,
        "--points",
        30,
        "--png",
        tmp_path / "p.png",
        "--json",
        out,
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    ids = np.array(Tokenizer(sp_ckpt).encode(words.read_text())[:120])
    runs = {
        "vanilla": None,
        "window only (G=0)": LambdaConfig(0, L, L),
        "LM-Infinite": LambdaConfig(G, L, L),
    }
    outputs = {name: reference_layers(sp_ckpt, ids, lam)[layer][1] for name, lam in runs.items()}
    fit = outputs["vanilla"][G:L]
    centre = fit.mean(0)
    top = np.linalg.eigh(np.cov((fit - centre).T))[1][:, ::-1][:, :2]  # (C, 2), largest first
    assert len(result["groups"]) == 5
    for name, g in result["groups"].items():
        run_name = next((n for n in runs if name.endswith(n)), "vanilla")
        expected = (outputs[run_name][g["positions"]] - centre) @ top
        got = np.array(g["xy"])
        got *= np.sign((got * expected).sum(0))  # a component's sign is arbitrary
        np.testing.assert_allclose(got, expected, atol=2e-4 * np.abs(expected).max())
        away = np.linalg.norm(outputs[run_name][g["positions"]] - centre, axis=1).mean()
        usual = np.linalg.norm(fit - centre, axis=1).mean()
        np.testing.assert_allclose(g["distance"], away / usual, rtol=1e-4)
    assert result["groups"]["starting tokens (0..1)"]["positions"] == [0, 1]
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_logits_command(sp_ckpt, words, tmp_path):
    common = ["--ckpt", sp_ckpt, "--text", words, "--tokens", 200, "--n-global", 2, "--n-local", 24]
    r = run("logits", *common, "--png", tmp_path / "l.png", "--json", tmp_path / "l.json")
    assert r.returncode == 0, r.stderr
    lg = json.loads((tmp_path / "l.json").read_text())
    far = [
        x
        for x, d in zip(lg["largest_logit"]["LM-Infinite G=2 L=24 D=24"], lg["distance_from"])
        if d > 24
    ]
    # Λ: no distance beyond D
    assert (
        any(x is not None for x in lg["largest_logit"]["vanilla"][-3:])
        and far
        and all(x is None for x in far)
    )
    # each bucket's largest logit, from the NumPy reference's unrotated q and k: every visible
    # pair (i, j) of the 48 sampled queries scored at its effective distance, as the definition has
    ids = np.array(Tokenizer(sp_ckpt).encode(words.read_text())[:200])
    rows = np.linspace(len(ids) / diagnose.ROWS, len(ids) - 1, diagnose.ROWS).astype(int)
    cfg = LlamaConfig.from_dict(json.loads((sp_ckpt / "config.json").read_text()))
    edges = np.array(lg["distance_from"] + lg["distance_to"][-1:])
    for name, lam in (("vanilla", None), ("LM-Infinite G=2 L=24 D=24", LambdaConfig(2, 24, 24))):
        best = np.full(len(edges) - 1, -np.inf)

        def probe(layer, q, k, a):
            hd = q.shape[-1]
            for i in rows:
                j = np.arange(i + 1)
                delta = mask.effective_distance(i, j, lam)
                q_at = reference.rope(
                    q[:, i, None, :], reference.rope_angles(delta, hd, cfg.rope_theta)
                )
                s = (q_at * k[:, : i + 1]).sum(-1).max(0) / math.sqrt(hd)  # (i+1,) over heads
                seen = mask.lambda_mask(i, j, lam)
                b = np.searchsorted(edges, delta[seen], side="right") - 1  # -1: distance 0
                ok = (b >= 0) & (b < len(best))
                np.maximum.at(best, b[ok], s[seen][ok])

        reference.forward(load_file(str(sp_ckpt / "model.safetensors")), cfg, ids, lam, probe=probe)
        expected = [None if math.isinf(x) else x for x in best]
        got = lg["largest_logit"][name]
        assert [x is None for x in got] == [x is None for x in expected], name
        np.testing.assert_allclose(
            [x for x in got if x is not None], [x for x in expected if x is not None], atol=1e-3
        )
