"""The Llama forward pass in plain NumPy (float64): the definition the torch model is tested against.

Shapes: T queries, S keys, C hidden size, H query heads, H_kv key/value heads, D head dim, V vocab.
Weights are a dict keyed by the checkpoint's own tensor names. Written to be read, not to be fast.
"""
import numpy as np

from .config import LlamaConfig


def rms_norm(x, weight, eps):
    """x / rms(x) * weight over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope_angles(positions, head_dim, theta):
    """Angle of each frequency pair at each position: positions[:, None] * theta^(-2f/D). (T, D/2)"""
    inv_freq = theta ** (-np.arange(0, head_dim, 2) / head_dim)  # (D/2,)
    return np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]


def rope(x, angles):
    """Rotate each pair (x[f], x[f + D/2]) by its angle: the half-split layout of Hugging Face checkpoints.

    x: (..., T, D), angles: (T, D/2). Meta's original checkpoints pair adjacent dims (2f, 2f+1)
    instead; HF's conversion permutes the rows of q_proj/k_proj so that this layout gives the same logits.
    """
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    cos, sin = np.cos(angles), np.sin(angles)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def repeat_kv(x, n_rep):
    """(H_kv, S, D) -> (H, S, D): each key/value head serves n_rep consecutive query heads (GQA)."""
    return np.repeat(x, n_rep, axis=0)


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # subtract the row max: exp never overflows
    return e / e.sum(axis=-1, keepdims=True)


def attention(q, k, v):
    """Causal attention of the T queries at positions 0..T-1 over keys 0..T-1. q, k, v: (H, T, D)."""
    T, D = q.shape[1], q.shape[2]
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(D)  # (H, T, T)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    scores = np.where(j <= i, scores, -np.inf)  # query i sees keys j <= i
    return softmax(scores) @ v  # (H, T, D)


def silu(x):
    return x / (1.0 + np.exp(-x))


def forward(weights, cfg: LlamaConfig, tokens):
    """Logits (T, V) for a sequence of token ids (T,)."""
    w = {name: np.asarray(t, dtype=np.float64) for name, t in weights.items()}
    H, H_kv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    T = len(tokens)
    angles = rope_angles(np.arange(T), D, cfg.rope_theta)  # (T, D/2)
    x = w["model.embed_tokens.weight"][np.asarray(tokens)]  # (T, C)
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, H, D).transpose(1, 0, 2)  # (H, T, D)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, H_kv, D).transpose(1, 0, 2)  # (H_kv, T, D)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, H_kv, D).transpose(1, 0, 2)  # (H_kv, T, D)
        q, k = rope(q, angles), rope(k, angles)
        k, v = repeat_kv(k, H // H_kv), repeat_kv(v, H // H_kv)  # (H, T, D)
        a = attention(q, k, v).transpose(1, 0, 2).reshape(T, H * D)  # (T, H*D)
        x = x + a @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T  # (T, F)
        x = x + (silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T  # SwiGLU
    x = rms_norm(x, w["model.norm.weight"], cfg.rms_norm_eps)
    head = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
    return x @ head.T  # (T, V)
