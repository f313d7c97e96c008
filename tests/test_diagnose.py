"""diagnose.py's attention rows against the NumPy definition, and its commands end to end on a tiny
checkpoint."""

import json
import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_module
from lminf_min import diagnose, model, reference
from lminf_min.config import LambdaConfig

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
    """softmax(row_logits) of each query equals the row of reference.attention_weights (vanilla or
    Λ, any d_max >= L - 1)."""
    rng = np.random.default_rng(seed)
    H_kv, D = 2, 8
    q, k = rng.standard_normal((H_kv * rep, T, D)), rng.standard_normal((H_kv, T, D))
    lam = None if vanilla else LambdaConfig(G, L, L - 1 + extra)
    want = reference.attention_weights(q, reference.repeat_kv(k, rep), THETA, lam)  # (H, T, T)
    angles = model.rope_angles(torch.arange(T), D, THETA)
    qr, kr = model.rope(torch.tensor(q), angles), model.rope(torch.tensor(k), angles)
    for i in range(T):
        got = torch.softmax(
            diagnose.row_logits(qr[:, i], kr[:, : i + 1], i, THETA, lam), dim=-1
        ).numpy()
        np.testing.assert_allclose(got, want[:, i, : i + 1], atol=1e-6)
        p = want[:, i, : i + 1]
        ent = -(p * np.log(np.where(p > 0, p, 1))).sum(-1)
        np.testing.assert_allclose(
            diagnose.entropy(diagnose.row_logits(qr[:, i], kr[:, : i + 1], i, THETA, lam)).numpy(),
            ent,
            atol=1e-5,
        )


def run(*args):
    return run_module("lminf_min.diagnose", *args)


def test_entropy_and_logits_commands(sp_ckpt, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the cat sat on a mat and ran to see the dog"] * 30))
    common = ["--ckpt", sp_ckpt, "--text", text, "--tokens", 200, "--n-global", 2, "--n-local", 24]
    r = run("entropy", *common, "--png", tmp_path / "e.png", "--json", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr
    e = json.loads((tmp_path / "e.json").read_text())
    assert len(e["positions"]) == diagnose.ROWS and set(e["entropy"]) == {
        "vanilla",
        "LM-Infinite G=2 L=24 D=24",
    }
    lam_rows = np.array(e["entropy"]["LM-Infinite G=2 L=24 D=24"])  # (layers, rows)
    # a Λ row sees <= G + L keys
    assert lam_rows.shape == (2, diagnose.ROWS) and (lam_rows <= math.log(2 + 24) + 1e-5).all()
    assert (tmp_path / "e.png").stat().st_size > 1000
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
