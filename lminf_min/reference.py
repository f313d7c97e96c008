"""The Llama forward pass in plain NumPy (float64): the definition the torch model is tested
against.

Shapes: T queries, S keys, C hidden size, H query heads, H_kv key/value heads, hd head dim, V vocab.
Weights are a dict keyed by the checkpoint's own tensor names. Written to be read, not to be fast.
"""

import numpy as np

from .config import LlamaConfig
from .mask import effective_distance, lambda_mask


def rms_norm(x, weight, eps):
    """x / rms(x) * weight over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope_angles(positions, head_dim, theta):
    """Angle of each frequency pair at each position: positions[:, None] * theta^(-2f/hd). (T,
    hd/2)"""
    inv_freq = theta ** (-np.arange(0, head_dim, 2) / head_dim)  # (hd/2,)
    return np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]


def rope(x, angles):
    """Rotate each pair (x[f], x[f + hd/2]) by its angle: the half-split layout of Hugging Face
    checkpoints.

    x: (..., T, hd), angles: (T, hd/2). Meta's original checkpoints pair adjacent dims (2f, 2f+1)
    instead; HF's conversion permutes the rows of q_proj/k_proj so that this layout gives the same
    logits.
    """
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    cos, sin = np.cos(angles), np.sin(angles)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def repeat_kv(x, n_rep):
    """(H_kv, S, hd) -> (H, S, hd): each key/value head serves n_rep consecutive query heads
    (GQA)."""
    return np.repeat(x, n_rep, axis=0)


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # subtract the row max: exp never overflows
    return e / e.sum(axis=-1, keepdims=True)


def attention_weights(
    q, k, theta, lam=None, top_k_rows=(), mask=lambda_mask, distance=effective_distance
):
    """Λ attention probabilities (DESIGN.md §1), (H, T, T), of T queries over the same T positions.

    q, k: (H, T, hd), NOT rotated. Every visible pair is scored at its effective distance: s(i, j) =
    <rot(q_i, δ(i, j)), k_j> / sqrt(hd). With δ = i - j this is ordinary RoPE, which depends only on
    the difference of positions. One softmax over each row's visible keys, starting and local
    together.
    top_k_rows: rows that also see, per head, the lam.top_k middle keys with the largest logits at
    lam.top_k_distance. mask, distance: functions of (i, j, lam) in place of lambda_mask and
    effective_distance (the exercises' answers).
    """
    H, T, hd = q.shape
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]  # query and key positions
    delta = distance(i, j, lam)  # (T, T)
    angles = rope_angles(delta.reshape(-1), hd, theta).reshape(T, T, hd // 2)
    q_at = rope(q[:, :, None, :], angles)  # (H, T, T, hd): q_i rotated by δ(i, j)
    scores = np.einsum("hijd,hjd->hij", q_at, k) / np.sqrt(hd)  # (H, T, T)
    visible = np.broadcast_to(mask(i, j, lam), (H, T, T)).copy()
    # paper §4: middle keys (G <= j, i - j >= L), per head, by logit at one distance
    if len(top_k_rows) and lam.top_k:
        middle = (j >= lam.n_global) & (i - j >= lam.n_local)  # (T, T)
        # (H, T, hd): q_i rotated by the distance
        q_mid = rope(q, rope_angles(np.full(T, lam.top_k_distance), hd, theta))
        # (H, T, T)
        mid_scores = np.where(middle, q_mid @ k.transpose(0, 2, 1) / np.sqrt(hd), -np.inf)
        for h in range(H):
            for r in top_k_rows:
                top = np.argsort(-mid_scores[h, r], kind="stable")  # largest first, ties by j
                chosen = top[: min(lam.top_k, middle[r].sum())]
                visible[h, r, chosen], scores[h, r, chosen] = True, mid_scores[h, r, chosen]
    return softmax(np.where(visible, scores, -np.inf))


def attention(
    q, k, v, theta, lam=None, top_k_rows=(), mask=lambda_mask, distance=effective_distance
):
    """(H, T, hd): each query's probability-weighted sum of values. q, k, v: (H, T, hd), q and k not
    rotated (each pair is rotated by its own distance): model.attention's first five arguments."""
    return attention_weights(q, k, theta, lam, top_k_rows, mask, distance) @ v


def silu(x):
    return x / (1.0 + np.exp(-x))


def forward(
    weights,
    cfg: LlamaConfig,
    tokens,
    lam=None,
    decoding_from=None,
    mask=lambda_mask,
    distance=effective_distance,
    probe=None,
):
    """Logits (T, V) for a sequence of token ids (T,), with Λ attention if lam (a LambdaConfig) is
    given.

    decoding_from: tokens from this position on are generated ones, which see top-k middle keys if
    lam asks. mask, distance: as in attention_weights. probe: called as probe(layer, q, k, a) with
    the layer's queries and keys (H, T, hd, not rotated) and its attention output (T, H*hd).
    """
    w = {name: np.asarray(t, dtype=np.float64) for name, t in weights.items()}
    H, H_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    T = len(tokens)
    heads = lambda y: y.reshape(T, -1, hd).transpose(1, 0, 2)  # (T, heads * hd) -> (heads, T, hd)
    x = w["model.embed_tokens.weight"][np.asarray(tokens)]  # (T, C)
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = heads(h @ w[p + "self_attn.q_proj.weight"].T)  # (H, T, hd)
        k = heads(h @ w[p + "self_attn.k_proj.weight"].T)  # (H_kv, T, hd)
        v = heads(h @ w[p + "self_attn.v_proj.weight"].T)  # (H_kv, T, hd)
        k, v = repeat_kv(k, H // H_kv), repeat_kv(v, H // H_kv)  # (H, T, hd)
        rows = ()  # paper §4: generated tokens see top-k middle keys in the layers asking for them
        if decoding_from is not None and lam.top_k and layer >= lam.top_k_from_layer:
            rows = range(decoding_from, T)
        a = attention(q, k, v, cfg.rope_theta, lam, rows, mask, distance)  # (H, T, hd)
        a = a.transpose(1, 0, 2).reshape(T, H * hd)  # (T, H*hd)
        if probe:
            probe(layer, q, k, a)
        x = x + a @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T  # (T, F)
        x = x + (silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T  # SwiGLU
    x = rms_norm(x, w["model.norm.weight"], cfg.rms_norm_eps)
    head = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
    return x @ head.T  # (T, V)
