"""Shared fixtures: random tiny checkpoints written in Hugging Face layout, and the real default
model."""

import io
import json
import os
import random
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]
THETA = 1e4  # the RoPE base of the random attention tests
BOTCHAN = ROOT.parent / "shared" / "data" / "botchan.txt"


def tiny_config(**overrides):
    cfg = dict(
        model_type="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return cfg | overrides


def random_weights(cfg: dict, seed=0, scale=0.2):
    """Random float32 tensors under the checkpoint names, norm weights near 1."""
    import weights
    from lminf_min.config import LlamaConfig

    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in weights.expected_shapes(LlamaConfig.from_dict(cfg)).items():
        base = 1.0 if name.endswith("norm.weight") else 0.0
        out[name] = (base + scale * rng.standard_normal(shape)).astype(np.float32)
    return out


def write_checkpoint(path: Path, cfg: dict, tensors: dict, shards=1):
    """config.json plus one model.safetensors, or `shards` files and a
    model.safetensors.index.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    names, weight_map = sorted(tensors), {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(path / file))
        weight_map |= {n: file for n in part}
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return path


@pytest.fixture
def tiny_ckpt(tmp_path):
    cfg = tiny_config()
    return write_checkpoint(tmp_path / "tiny", cfg, random_weights(cfg))


@pytest.fixture(scope="session")
def default_ckpt():
    """The converted SmolLM2-135M-Instruct (converted on first use; .ci/run fetches it first)."""
    import weights
    from lminf_min.config import UserError

    try:
        return weights.default_checkpoint()
    except UserError as e:
        pytest.skip(f"default model unavailable: {e}")


@pytest.fixture(scope="session")
def botchan():
    if not BOTCHAN.is_file():
        pytest.skip(f"{BOTCHAN} not found (../shared/data beside the checkout)")
    return BOTCHAN.read_text(encoding="utf-8")


WORDS = "the cat sat on a mat and ran to see dog who ate big red fish by sea".split()


@pytest.fixture
def sp_ckpt(tiny_ckpt):
    """The tiny random checkpoint plus a 60-piece sentencepiece BPE model trained on a toy corpus
    (no downloads)."""
    import sentencepiece as spm

    rng = random.Random(0)
    corpus = [" ".join(rng.choices(WORDS, k=12)) for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buf,
        vocab_size=60,
        model_type="bpe",
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        minloglevel=2,
    )
    (tiny_ckpt / "tokenizer.model").write_bytes(buf.getvalue())
    return tiny_ckpt


def pytest_addoption(parser):
    parser.addoption(
        "--attempted",
        action="store_true",
        help="unwritten exercises (NotImplementedError) fail instead of being skipped",
    )
    parser.addoption(
        "--answers",
        default=None,
        help="check the exercises in this file instead of lminf_min/exercises.py",
    )


def rand(shape, seed, scale=1.0):
    return scale * np.random.default_rng(seed).standard_normal(shape)


def backends():
    """Every Λ backend, run through the same property tests: the block loop with torch's fused CPU
    kernel, the same loop written out (what it does off the CPU), and FlexAttention eager (compiled:
    tests/test_backends.py)."""
    from lminf_min import model

    return {
        "blocks": model.lambda_attention,
        "blocks written out": partial(model.lambda_attention, cpu_kernel=False),
        "flex eager": model.Flex(compiled=False),
    }


BACKENDS = backends()


def pytest_collection_modifyitems(config, items):
    """The CUDA tier: tests marked cuda skip cleanly on a machine without a GPU."""
    import torch

    if not torch.cuda.is_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def run_module(module, *args, env=None):
    """`python -m module args` from the repository root, its output captured as text; env: variables
    to set for it."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env and os.environ | env,
    )
