"""Long runs on the real default model (minutes on 2 cores): `python -m pytest -m slow
tests/test_long.py`."""

import pytest
import torch

import weights
from lminf_min import caches, model
from lminf_min.cli import read_prompt
from lminf_min.config import LambdaConfig
from lminf_min.tokenizer import Tokenizer

pytestmark = pytest.mark.slow


@torch.inference_mode()
def test_20k_prompt_through_the_cache_equals_one_pass(default_ckpt, botchan):
    """20,000 tokens of Botchan, 1,000-token chunks through the bounded cache == one Λ pass without
    a cache."""
    from conftest import BOTCHAN

    config, w = weights.load_checkpoint(default_ckpt)
    lam = LambdaConfig.for_model(config)
    tokens = torch.tensor(Tokenizer(default_ckpt).encode(read_prompt(BOTCHAN))[:20000])
    assert len(tokens) == 20000
    # (T, C): logits are made per slice below
    one_pass = model.forward(w, config, tokens, lam=lam, hidden_only=True)
    cache, worst = caches.new_cache(config, lam), 0.0
    for a in range(0, len(tokens), 1000):
        chunk = model.forward(w, config, tokens[a : a + 1000], lam, cache)
        worst = max(
            worst, float((chunk - model.lm_head(w, config, one_pass[a : a + 1000])).abs().max())
        )
    assert (
        cache.nbytes()
        == config.num_hidden_layers
        * 2
        * (10 + 8192)
        * config.num_key_value_heads
        * config.head_dim
        * 4
    )
    assert worst <= 1e-3, f"max abs logit diff {worst:.3g}"
