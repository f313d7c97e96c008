"""The Llama forward pass in torch: the same functions as reference.py, on CPU or CUDA, float32 or bfloat16.

Shapes: T queries, S keys, C hidden size, H query heads, H_kv key/value heads, D head dim, V vocab.
Weights are a dict keyed by the checkpoint's own tensor names (see weights.load_checkpoint).
"""
import torch
import torch.nn.functional as F

from .config import LlamaConfig

def rms_norm(x, weight, eps):
    """x / rms(x) * weight over the last axis, computed in float32: bf16 squares lose too much."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight

def rope_angles(positions, head_dim, theta):
    """Angle of each frequency pair at each position, in float64 so large positions stay exact. (T, D/2)"""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    return positions.double()[:, None] * inv_freq[None, :]

def rope(x, angles):
    """Rotate each pair (x[f], x[f + D/2]) by its angle (HF half-split layout), in float32. x: (..., T, D)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = angles.cos().float(), angles.sin().float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

def attention(q, k, v):
    """Causal attention of the T queries that are the last T of S positions. q: (H, T, D), k, v: (H_kv, S, D).

    SDPA's enable_gqa shares each key/value head among H/H_kv query heads without copying them; the leading
    batch axis of 1 matters: with 4-D inputs torch picks its fused (flash) kernel on CPU, 3x faster.
    """
    T, S = q.shape[1], k.shape[1]
    mask = None if T == S else torch.arange(S, device=q.device)[None, :] <= torch.arange(T, device=q.device)[:, None] + (S - T)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=T == S, enable_gqa=True)[0]  # (H, T, D)

class KVCache:
    """Rotated keys and values of every position seen so far, per layer (full attention: grows without bound).

    Stored in buffers that double when full, so appending one token does not copy the whole cache.
    """

    def __init__(self, n_layers):
        self.k, self.v = [None] * n_layers, [None] * n_layers  # (H_kv, capacity, D) each
        self.length = 0  # positions stored; forward() advances it after the last layer

    def update(self, layer, k, v):
        """Append this chunk's (H_kv, T, D) keys/values; return all of them, (H_kv, S, D) views."""
        start, T = self.length, k.shape[1]
        if self.k[layer] is None or start + T > self.k[layer].shape[1]:
            capacity = max(2 * (start + T), 256)
            self.k[layer], self.v[layer] = _grown(self.k[layer], k, start, capacity), _grown(self.v[layer], v, start, capacity)
        self.k[layer][:, start:start + T], self.v[layer][:, start:start + T] = k, v
        return self.k[layer][:, :start + T], self.v[layer][:, :start + T]

    def nbytes(self):
        """Bytes of the keys and values stored (not of the spare capacity)."""
        return sum(t[:, :self.length].numel() * t.element_size() for t in self.k + self.v if t is not None)

def _grown(buffer, like, keep, capacity):
    """A (H_kv, capacity, D) buffer holding the first `keep` positions of `buffer`."""
    new = like.new_empty(like.shape[0], capacity, like.shape[2])
    if buffer is not None:
        new[:, :keep] = buffer[:, :keep]
    return new


def forward(weights, cfg: LlamaConfig, tokens, cache: KVCache | None = None, last_only=False):
    """Logits (T, V) for token ids (T,), which follow the cache's positions if a cache is given.

    last_only: logits of the last token only, (1, V), which is all generation needs (skips most of the LM head).
    """
    w = weights
    H, H_kv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    T = tokens.shape[0]
    start = cache.length if cache is not None else 0
    angles = rope_angles(torch.arange(start, start + T, device=tokens.device), D, cfg.rope_theta)  # (T, D/2)
    x = w["model.embed_tokens.weight"][tokens]  # (T, C)
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(T, H, D).transpose(0, 1)  # (H, T, D)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(T, H_kv, D).transpose(0, 1)  # (H_kv, T, D)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(T, H_kv, D).transpose(0, 1)  # (H_kv, T, D)
        q, k = rope(q, angles), rope(k, angles)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (H_kv, S, D)
        a = attention(q, k, v).transpose(0, 1).reshape(T, H * D)  # (T, H*D)
        x = x + a @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        x = x + (F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    if cache is not None:
        cache.length += T
    x = rms_norm(x[-1:] if last_only else x, w["model.norm.weight"], cfg.rms_norm_eps)
    head = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
    return (x @ head.T).float()  # (T, V)
