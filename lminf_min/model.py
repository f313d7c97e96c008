"""The Llama forward pass in torch: the same functions as reference.py, on CPU or CUDA, float32 or
bfloat16.

Shapes: T queries, S keys, C hidden size, H query heads, H_kv key/value heads, hd head dim, V vocab.
Weights are a dict keyed by the checkpoint's own tensor names (see weights.load_checkpoint).
"""

import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from .config import LambdaConfig, LlamaConfig, UserError
from .mask import lambda_mask

# most queries per step of the block loop: it reads (H, BLOCK, <= G + L + BLOCK) scores, never (H,
# T, T)
BLOCK = 512


def rms_norm(x, weight, eps):
    """x / rms(x) * weight over the last axis, computed in float32: bf16 squares lose too much."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope_angles(positions, head_dim, theta):
    """Angle of each frequency pair at each position, in float64. (T, hd/2)"""
    f2 = torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device)  # 2f
    return positions.double()[:, None] * theta ** (-f2 / head_dim)


def rope(x, angles):
    """Rotate each pair (x[f], x[f + hd/2]) by its angle (HF half-split layout), in float32.
    x: (..., T, hd)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = angles.cos().float(), angles.sin().float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def attention(q, k, v, theta, lam: LambdaConfig | None, q_pos, k_pos, middle=False, backend=None):
    """Attention of T queries over S keys: reference.attention's first five arguments, but q and k
    come rotated at their positions and k, v with H_kv heads. q: (H, T, hd), k, v: (H_kv, S, hd);
    q_pos (T,) and k_pos (S,) are those positions (absolute, int64).

    Without lam: causal attention through SDPA over keys that must be positions 0..S-1 in order (as
    every cache here returns them while no query is past the first window), whose enable_gqa shares
    each key/value head among H/H_kv query heads without copying (the batch axis of 1 matters: with
    4-D inputs torch picks its fused flash kernel on CPU, 3x faster). With lam: Λ attention through
    `backend` (pick_backend chooses it once per device: Flex on CUDA, the block loop
    lambda_attention on CPU); keys may come in any order (LambdaCache's ring).
    middle: one decoding query that also sees the lam.top_k middle keys with the largest logits
    (paper §4), always through lambda_attention, which merges them into the same softmax.
    """
    if lam is None:
        return causal_attention(q, k, v)
    if lam.d_max < lam.n_local - 1:
        raise UserError(
            f"d_max={lam.d_max} < n_local - 1 = {lam.n_local - 1} would cap distances inside the "
            "window; the fast path does not do that: use lminf_min.reference.attention, or d_max "
            ">= n_local - 1"
        )
    if middle or backend is None:
        return lambda_attention(q, k, v, theta, lam, q_pos, k_pos, middle)
    return backend(q, k, v, theta, lam, q_pos, k_pos)


def causal_attention(q, k, v, cpu_kernel=True):
    """Causal attention of the last T of S positions over keys 0..S-1 in order. q: (H, T, hd), k, v:
    (H_kv, S, hd). cpu_kernel=False takes the path devices other than the CPU take."""
    H, T, S = q.shape[0], q.shape[1], k.shape[1]
    # the whole sequence, one new token, or not on CPU
    if T == S or T == 1 or not (cpu_kernel and q.device.type == "cpu"):
        i = torch.arange(S - T, S, device=q.device)[:, None]  # the queries' positions
        mask = None if T in (1, S) else torch.arange(S, device=q.device) <= i
        out = F.scaled_dot_product_attention(
            q[None], k[None], v[None], attn_mask=mask, is_causal=T == S, enable_gqa=True
        )
        return out[0]
    # On CPU, a chunk after P = S - T cached keys is cheaper as two calls without a mask: every
    # query sees all cached keys, and its own chunk's keys causally; merged() joins the two
    # softmaxes into one.
    P = S - T  # cached keys before the chunk
    n = H // k.shape[0]  # query heads per key/value head
    own = cpu_flash_attention(
        q, k[:, P:].repeat_interleave(n, 0), v[:, P:].repeat_interleave(n, 0), causal=True
    )
    return merged([attend(q, k[:, :P], v[:, :P]), own]).to(q.dtype)


def pick_backend(device):
    """The Λ attention backend for a device, chosen once: one FlexAttention call on CUDA, the block
    loop elsewhere (on this project's 2-core CPU the block loop is faster than compiled flex:
    docs/results.md)."""
    return Flex(dynamic=None) if torch.device(device).type == "cuda" else lambda_attention


class Flex:
    """Λ attention as one FlexAttention call: the GPU backend, and on CPU the way to run any mask a
    class writes.

    mask_mod is `mask` (lminf_min.mask.lambda_mask, or an exercise's function of (i, j, lam)) on
    absolute positions, looked up through q_pos and k_pos so that the ring cache's slot order works.
    score_mod is the distance limit, the paper's way: a starting key j < G farther than d_max is
    scored from a small (H, T, g) table, the query rotated to d_max against the key rotated back to
    0. Every other visible key is scored at its true distance, so a mask must not show one farther
    than d_max (the Λ mask never does: d_max >= L - 1). Grouped-query heads share keys through
    enable_gqa, no copy.
    compiled: torch.compile the call and the block mask (needed for long inputs: compiled,
    create_block_mask never materialises the (T, S) mask).
    dynamic: passed to torch.compile. None on CUDA (prefill chunks meet a growing number of keys);
    False by default because torch 2.13's CPU flex kernel fails to build for dynamic shapes (a C++
    compile error), so on CPU each new shape compiles once.
    """

    def __init__(self, mask=lambda_mask, compiled=True, dynamic=False):
        self.mask = mask
        self.flex, self.block_mask = flex_attention, create_block_mask
        if compiled:
            self.flex = torch.compile(flex_attention, dynamic=dynamic)
            self.block_mask = torch.compile(create_block_mask, dynamic=dynamic)

    def __call__(self, q, k, v, theta, lam: LambdaConfig, q_pos, k_pos):
        (H, T, hd), S, n = q.shape, k.shape[1], q.shape[0] // k.shape[0]
        mask_mod = lambda b, h, qi, ki: self.mask(q_pos[qi], k_pos[ki], lam)
        block_mask = self.block_mask(mask_mod, None, None, T, S, device=q.device)
        is_start = k_pos < lam.n_global
        score_mod = None
        if is_start.any():
            rank = is_start.cumsum(0) - 1  # the row of each starting key in the table
            # rotated to d_max
            q_far = rope(q, rope_angles(lam.d_max - q_pos, hd, theta)).view(-1, n, T, hd)
            # rotated back to 0
            k_start = rope(k[:, is_start], rope_angles(-k_pos[is_start], hd, theta))
            logits = q_far.float() @ k_start.float()[:, None].transpose(-1, -2)  # (H_kv, n, T, g)
            table = logits.view(H, T, -1) / math.sqrt(hd)  # (H, T, g)

            def score_mod(score, b, h, qi, ki):
                far = (k_pos[ki] < lam.n_global) & (q_pos[qi] - k_pos[ki] > lam.d_max)
                return torch.where(far, table[h, qi, rank[ki].clamp(min=0)], score)

        out = self.flex(
            q[None], k[None], v[None], score_mod=score_mod, block_mask=block_mask, enable_gqa=True
        )
        return out[0]


def lambda_attention(
    q, k, v, theta, lam: LambdaConfig, q_pos, k_pos, middle=False, most=BLOCK, cpu_kernel=True
):
    """Λ attention, equal to reference.attention, in O(T·(G+L)) time and memory: the block-loop
    backend. The queries still inside the first window take one causal call (Λ attention is
    exactly causal attention there), the others go a block of queries at a time.

    A query's logits fall into groups that share one softmax: the local band (its L most recent
    keys, at their true distance i - j <= L - 1 <= d_max, i.e. plain RoPE), the starting tokens j <
    G that have left the window (i - j >= L), scored at δ = min(i - j, d_max), and with middle (one
    decoding query) per head the lam.top_k middle keys with the largest logits at lam.top_k_distance
    (paper §4). The band keys that every query of the block sees go through a fused kernel with no
    mask, which also returns each row's log-sum-exp; the few other logits (band edges, starting
    tokens, top-k) are computed here, and merged() joins the partial softmaxes by their
    log-sum-exps: exactly one softmax over all groups. Keys may come in any order (LambdaCache keeps
    a ring buffer); queries come in ascending order.
    most: the largest block of queries; cpu_kernel=False takes the written-out path that devices
    other than the CPU take (tests run both on the CPU).
    """
    G, L, d_max = lam.n_global, lam.n_local, lam.d_max
    (H, T, hd), H_kv = q.shape, k.shape[0]
    n = H // H_kv  # query heads per key/value head
    out = torch.empty_like(q)
    # queries per block; the edges grow with it, so keep it well below L
    block = min(most, max(64, L // 32))
    inside = int((q_pos < L).sum())  # queries still inside the first window
    if inside:
        # There it is plain causal attention over positions 0..S-1: no cache has wrapped yet, so
        # these keys come first and in order.
        S = int(q_pos[inside - 1]) + 1
        if not torch.equal(k_pos[:S], torch.arange(S, device=k_pos.device)):
            raise ValueError("queries inside the first window need keys 0..S-1 first and in order")
        out[:, :inside] = causal_attention(q[:, :inside], k[:, :S], v[:, :S], cpu_kernel)
    if inside == T:  # nothing past the window (a prompt shorter than L, and its decoding)
        return out
    is_start = k_pos < G
    # (H_kv, g, hd), (1, g)
    k_start, v_start, jg = (k[:, is_start], v[:, is_start], k_pos[is_start][None, :])
    # q_i and k_j are rotated by i and j, so their product is the logit at i - j. Past d_max, the
    # paper's trick: the query rotated to d_max (q_far, below) and the key rotated back to 0 give
    # the logit at exactly d_max.
    k_start0 = rope(k_start, rope_angles(-jg[0], hd, theta))
    # logits (H_kv, n, B, K) of grouped queries (H_kv, n, B, hd) over keys (H_kv, K, hd)
    scores = lambda queries, keys: torch.einsum("knbd,kgd->knbg", queries, keys).float()
    for a in range(inside, T, block):
        B = min(block, T - a)
        i = q_pos[a : a + B][:, None]  # (B, 1)
        # heads grouped by their key/value head
        grouped = lambda x: x.reshape(H_kv, n, B, hd) / math.sqrt(hd)
        qb = grouped(q[:, a : a + B])
        dg = i - jg  # distances to the starting tokens (B, g)
        # the block's queries rotated to d_max, for the starting tokens farther than that
        q_far = grouped(rope(q[:, a : a + B], rope_angles(d_max - i[:, 0], hd, theta)))
        full = (k_pos > i[-1] - L) & (k_pos <= i[0])  # band keys every query of the block sees
        # band keys only some see: at most 2·BLOCK - 2
        edge = (k_pos > i[0] - L) & (k_pos <= i[-1]) & ~full
        de = i - k_pos[edge]
        edges = scores(qb, k[:, edge]).masked_fill_((de < 0) | (de >= L), -math.inf)
        # (H_kv, n, B, g)
        start = torch.where(dg > d_max, scores(q_far, k_start0), scores(qb, k_start))
        start.masked_fill_(dg < L, -math.inf)  # inside the window they are band keys
        # (logits (H_kv, n, B, *), values)
        groups = [(edges, v[:, edge][:, None]), (start, v_start[:, None])]
        groups += [top_k_middle(qb, k, v, theta, lam, int(i), k_pos)] if middle else []
        band = []
        if full.any():
            o, lse = attend(q[:, a : a + B], keys_at(k, full), keys_at(v, full), cpu_kernel)
            band = [(o.view(H_kv, n, B, hd), lse.view(H_kv, n, B))]
        out[:, a : a + B] = merged(band, groups).reshape(H, B, hd)
    return out


def merged(parts, groups=()):
    """One softmax from partial ones: parts (outputs (..., hd), lse (...)), each a softmax over its
    own keys, and groups (logits (..., K), values (..., K, hd)) written out. Each part and each key
    counts with its share exp(lse - top) or exp(logit - top) of the joint denominator; dividing by
    the sum of the shares keeps the result a weighted mean of the values even where huge logits tie
    in float32. Output in float32."""
    groups = [(logits, values) for logits, values in groups if logits.shape[-1]]
    top = torch.stack([lse for _, lse in parts] + [logits.amax(-1) for logits, _ in groups]).amax(0)
    o, weight = 0, 0
    for part, lse in parts:
        w = (lse - top).exp()
        o, weight = o + part * w[..., None], weight + w
    for logits, values in groups:
        p = (logits - top[..., None]).exp().to(values.dtype)
        o, weight = o + p @ values, weight + p.sum(-1, dtype=torch.float32)
    return o / weight[..., None]


def keys_at(x, where):
    """x[:, where] for a boolean where over the keys: a view, not a copy, when the chosen keys are
    contiguous."""
    idx = where.nonzero()[:, 0]
    first, end = int(idx[0]), int(idx[-1]) + 1
    return x[:, first:end] if end - first == len(idx) else x[:, idx]


def attend(q, k, v, cpu_kernel=True):
    """Softmax attention of q (H, T, hd) over all of k, v (H_kv, S, hd), and the log-sum-exp of each
    row's logits: outputs (H, T, hd), lse (H, T) in float32.

    On CPU through cpu_flash_attention; elsewhere (or cpu_kernel=False) written out. The query heads
    that share a key/value head are stacked along the query axis, so no key is copied.
    """
    (H, T, hd), H_kv = q.shape, k.shape[0]
    q = q.reshape(H_kv, H // H_kv * T, hd)
    if cpu_kernel and q.device.type == "cpu":
        o, lse = cpu_flash_attention(q, k, v)
    else:
        s = (q @ k.transpose(1, 2)).float() / math.sqrt(hd)  # (H_kv, H/H_kv*T, S)
        lse = s.logsumexp(-1)
        o = (s - lse[..., None]).exp().to(v.dtype) @ v
    return o.reshape(H, T, hd), lse.reshape(H, T)


def cpu_flash_attention(q, k, v, causal=False):
    """Outputs (H, T, hd) and log-sum-exps (H, T) of softmax attention, H heads of q, k, v each, on
    CPU.

    A private torch op, on purpose: it is the only fused CPU attention kernel that also returns the
    log-sum-exp, which merged() needs to join partial softmaxes (SDPA does not return it, and
    compiled flex_attention refuses return_lse on CPU). tests/test_backends.py fails clearly if
    torch drops it.
    """
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q[None], k[None], v[None], is_causal=causal, scale=q.shape[-1] ** -0.5
    )[:2]
    return o[0], lse[0]


def top_k_middle(qb, k, v, theta, lam: LambdaConfig, i, k_pos):
    """Logits (H_kv, H/H_kv, 1, K) and values (H_kv, H/H_kv, K, hd) of the top-K middle keys of
    query i, per head.

    qb: (H_kv, H/H_kv, 1, hd), scaled and rotated at i; k rotated at k_pos. Rotating k_j forward by
    the excess (i - j) - top_k_distance makes their product the logit at top_k_distance.
    """
    middle = (k_pos >= lam.n_global) & (k_pos <= i - lam.n_local)
    k_mid, v_mid = k[:, middle], v[:, middle]  # (H_kv, M, hd)
    k_at = rope(k_mid, rope_angles(i - k_pos[middle] - lam.top_k_distance, k.shape[2], theta))
    logits = torch.einsum("knbd,kmd->knbm", qb, k_at).float()  # (H_kv, H/H_kv, 1, M)
    top, index = logits.topk(min(lam.top_k, k_mid.shape[1]), dim=-1)  # (H_kv, H/H_kv, 1, K)
    # (H_kv, H/H_kv, K, hd)
    values = torch.stack([v_mid[kv, index[kv, :, 0]] for kv in range(k.shape[0])])
    return top, values


def forward(
    weights,
    cfg: LlamaConfig,
    tokens,
    lam: LambdaConfig | None = None,
    cache=None,
    last_only=False,
    hidden_only=False,
    decoding=False,
    probe=None,
    backend=None,
):
    """Logits (T, V) for token ids (T,), which follow the cache's positions if a cache is given.
    The first four arguments are reference.forward's; the rest add what generation needs.

    lam: Λ attention (LM-Infinite) instead of full causal attention (a LambdaCache needs it).
    cache: a caches.KVCache or caches.LambdaCache, or None for a sequence on its own.
    last_only: logits of the last token only, (1, V), which is all generation needs (skips most of
    the LM head).
    hidden_only: the final normalised hidden states (T, C) instead; lm_head() turns any slice of
    them into logits.
    decoding: one generated token, which also sees the top-k middle keys if lam asks for them (paper
    §4).
    probe: called as probe(layer, q, k, a) with this chunk's rotated queries and keys and its
    attention output (T, H*hd) (how diagnose.py looks inside).
    backend: how Λ attention is computed (see attention; pick_backend(device) chooses it once);
    None: lambda_attention, the block loop.
    """
    w = weights
    H, hd = cfg.num_attention_heads, cfg.head_dim
    T = tokens.shape[0]
    if decoding and T != 1:
        raise ValueError(f"decoding=True takes one token, not {T}")
    if cache is None:
        q_pos = torch.arange(T, device=tokens.device)
    else:  # the chunk's positions follow the cache's
        q_pos = cache.begin(T, lam, tokens.device)
    # (T, hd/2), in float64: exact enough to about 10^11 tokens into a stream
    angles = rope_angles(q_pos, hd, cfg.rope_theta)
    heads = lambda y: y.view(T, -1, hd).transpose(0, 1)  # (T, heads * hd) -> (heads, T, hd)
    x = w["model.embed_tokens.weight"][tokens]  # (T, C)
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = heads(h @ w[p + "self_attn.q_proj.weight"].T)  # (H, T, hd)
        k = heads(h @ w[p + "self_attn.k_proj.weight"].T)  # (H_kv, T, hd)
        v = heads(h @ w[p + "self_attn.v_proj.weight"].T)  # (H_kv, T, hd)
        q, k = rope(q, angles), rope(k, angles)
        # (H_kv, S, hd), (S,)
        k_all, v, k_pos = cache.update(layer, k, v) if cache is not None else (k, v, q_pos)
        # paper §4: a decoding token also sees the top-k middle keys, in the layers asking for them
        middle = decoding and lam is not None and lam.top_k > 0 and layer >= lam.top_k_from_layer
        a = attention(q, k_all, v, cfg.rope_theta, lam, q_pos, k_pos, middle, backend)
        a = a.transpose(0, 1).reshape(T, H * hd)  # (T, H*hd)
        if probe:
            probe(layer, q, k, a)
        x = x + a @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = h @ w[p + "mlp.gate_proj.weight"].T  # (T, F)
        up = h @ w[p + "mlp.up_proj.weight"].T  # (T, F)
        x = x + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T  # SwiGLU
    if cache is not None:
        cache.advance(T)
    x = rms_norm(x[-1:] if last_only else x, w["model.norm.weight"], cfg.rms_norm_eps)
    return x if hidden_only else lm_head(w, cfg, x)


def lm_head(weights, cfg: LlamaConfig, x):
    """Logits (T, V), float32, from final hidden states (T, C)."""
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    return (x @ weights[head].T).float()
