"""Generation split as gpt-fast splits it: `prefill` reads the prompt in chunks into the cache,
`decode_one_token` adds one token, `sample` picks it (temperature 0 is argmax)."""

import sys

import torch
from tqdm import tqdm

from . import model

# prompt tokens per forward call: bounds activations and, off CPU, the (chunk, keys) attention mask
PREFILL_CHUNK = 1024


def sample(logits, temperature, generator):
    """Next token id from (V,) logits: argmax at temperature 0, else a draw from softmax(logits /
    T)."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def prefill(weights, cfg, tokens, cache, lam=None, backend=None):
    """Run the prompt through the model chunk by chunk, filling the cache; logits (V,) of its last
    token.
    backend: how Λ attention is computed (model.pick_backend(device)); None: the block loop,
    model.lambda_attention."""
    chunks = tokens.split(PREFILL_CHUNK)
    for chunk in tqdm(
        chunks, desc="prefill", unit="chunk", disable=len(chunks) < 4, file=sys.stderr
    ):
        logits = model.forward(weights, cfg, chunk, lam, cache, last_only=True, backend=backend)
    return logits[-1]


def decode_one_token(weights, cfg, token, cache, lam=None, backend=None):
    """Logits (V,) after one more token."""
    return model.forward(
        weights, cfg, token.view(1), lam, cache, last_only=True, decoding=True, backend=backend
    )[-1]
