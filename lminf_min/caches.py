"""The KV caches generation reads: the full one (grows with the text) and LM-Infinite's bounded one.

Both hold keys already rotated by RoPE; forward() asks begin() for the positions of a chunk,
update() per layer for the keys to attend over, and advance() once the chunk has gone through every
layer.
"""

import torch

from .cli import fits
from .config import LambdaConfig, LlamaConfig
from .mask import lambda_mask


class KVCache:
    """Rotated keys and values of every position seen so far, per layer (full attention: grows
    without bound).

    Stored in buffers that double when full, so appending one token does not copy the whole cache.
    """

    def __init__(self, n_layers):
        self.k, self.v = [None] * n_layers, [None] * n_layers  # (H_kv, capacity, hd) each
        # tokens seen: the position of the next one; forward() advances it after the last layer
        self.length = 0

    def update(self, layer, k, v):
        """Append this chunk's (H_kv, T, hd) keys/values; return all keys, values (H_kv, S, hd) and
        their positions (S,)."""
        start, end = self.length, self.length + k.shape[1]
        for buffers, new in ((self.k, k), (self.v, v)):
            old = buffers[layer]
            if old is None or end > old.shape[1]:
                # doubled: appending a token rarely copies the cache
                buffers[layer] = new.new_empty(new.shape[0], max(2 * end, 256), new.shape[2])
                if old is not None:
                    buffers[layer][:, :start] = old[:, :start]
            buffers[layer][:, start:end] = new
        return self.k[layer][:, :end], self.v[layer][:, :end], torch.arange(end, device=k.device)

    def begin(self, T, lam, device):
        """Before a chunk of T tokens: their positions (T,)."""
        return torch.arange(self.length, self.length + T, device=device)

    def advance(self, T):
        self.length += T

    def nbytes(self):
        """Bytes of the keys and values stored (not of the spare capacity)."""
        return sum(
            t[:, : self.length].numel() * t.element_size() for t in self.k + self.v if t is not None
        )


class LambdaCache:
    """LM-Infinite's bounded cache: keys and values of the first G positions and of the last L
    positions, never more than G + L entries, so memory stays constant however long the stream.

    That is all Λ attention ever reads: a token sees only the starting tokens and its L most recent
    predecessors, so nothing else is needed again. Per layer: G slots for positions 0..G-1, never
    evicted, then a ring of L slots, where position p >= G lives in slot G + (p - G) % L. Keys are
    stored rotated at their absolute positions, once: RoPE's angles are float64 (rope_angles in
    model.py), exact enough that 10^11 tokens into a stream score like 10^4.
    """

    EMPTY = 1 << 62  # the position of an unfilled slot: after every query, so always masked

    def __init__(self, n_layers, lam: LambdaConfig):
        self.lam = lam
        self.k, self.v = [None] * n_layers, [None] * n_layers  # (H_kv, G + L, hd) each
        # absolute position held by each slot
        self.pos = torch.full((lam.n_global + lam.n_local,), self.EMPTY)
        # tokens seen: the position of the next one; forward() advances it after the last layer
        self.length = 0

    def begin(self, T, lam, device):
        """Before a chunk of T tokens: their positions (T,). Decided here, once for all layers:
        which of them stay after the chunk (the ones its last query sees under the Λ mask: the
        starting ones and the last L; every later query sees no others), their slots, and the
        positions the slots hold then."""
        if lam != self.lam:
            raise ValueError(f"this LambdaCache was made for {self.lam}, not for lam={lam}")
        G, L = lam.n_global, lam.n_local
        self.positions = torch.arange(self.length, self.length + T, device=device)
        self.keep = lambda_mask(self.positions[-1], self.positions, lam)
        kept = self.positions[self.keep]
        self.slots = torch.where(kept < G, kept, G + (kept - G) % L)
        self.pos = self.pos.to(device)
        self.next_pos = self.pos.clone()
        self.next_pos[self.slots] = kept
        return self.positions

    def update(self, layer, k, v):
        """Store this chunk's (H_kv, T, hd) keys/values; return the keys, values and positions to
        attend over.

        A single token is stored first: it overwrites position p - L at most, which it no longer
        sees. A longer chunk would overwrite keys its own first tokens still see, so it is attended
        over together with the cache (one copy), then stored.
        """
        T, n = k.shape[1], self.pos.shape[0]
        # slots fill in order (slot = position) until the ring first wraps
        filled = min(self.length, n)
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(k.shape[0], n, k.shape[2])
            self.v[layer] = v.new_zeros(v.shape[0], n, v.shape[2])
        if T == 1:
            self.k[layer][:, self.slots], self.v[layer][:, self.slots] = k, v
            n = min(filled + 1, n)
            return self.k[layer][:, :n], self.v[layer][:, :n], self.next_pos[:n]
        keys = torch.cat([self.k[layer][:, :filled], k], dim=1)
        values = torch.cat([self.v[layer][:, :filled], v], dim=1)
        self.k[layer][:, self.slots] = k[:, self.keep]
        self.v[layer][:, self.slots] = v[:, self.keep]
        return keys, values, torch.cat([self.pos[:filled], self.positions])

    def advance(self, T):
        self.pos = self.next_pos
        self.length += T

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


def new_cache(cfg: LlamaConfig, lam: LambdaConfig | None = None):
    """The cache generation needs: bounded for LM-Infinite, growing for full attention and for top-k
    middle tokens (which may pick any key, so none can be evicted)."""
    if lam is None or lam.top_k:
        return KVCache(cfg.num_hidden_layers)
    slots = lam.n_global + lam.n_local
    need = slots * kv_bytes_per_token(cfg, 4)  # float32 at most
    fits(need, "cpu", f"a bounded cache of G + L = {slots} positions", "use a smaller L or G")
    return LambdaCache(cfg.num_hidden_layers, lam)


def kv_bytes_per_token(cfg: LlamaConfig, itemsize):
    """Bytes a cache holds per position: a key and a value per layer and key/value head."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize
