"""bench: every sub-command on a tiny checkpoint (tables, JSON), and its FLOP count against an
independent one."""

import json

import numpy as np
import pytest

from conftest import random_weights, run_module, tiny_config
from lminf_min import mask
from lminf_min.config import LambdaConfig, LlamaConfig


@pytest.mark.parametrize(
    "T, lam",
    [(5, LambdaConfig(3, 8, 8)), (50, LambdaConfig(3, 8, 8)), (50, LambdaConfig(0, 50, 50))],
)
def test_prefill_flops_count_weights_and_the_pairs_the_mask_allows(T, lam):
    """bench's FLOP bound: 2 per layer weight per token, plus 4·H·D per (query, key) pair of
    mask.lambda_mask."""
    from lminf_min import bench

    cfg = tiny_config()
    config, w = LlamaConfig.from_dict(cfg), random_weights(cfg)
    layer_weights = sum(t.size for n, t in w.items() if ".layers." in n and t.ndim == 2)
    per_pair = 4 * config.num_attention_heads * config.head_dim * config.num_hidden_layers
    assert (
        bench.prefill_flops(config, T, lam)
        == 2 * T * layer_weights
        + per_pair * mask.lambda_mask(np.arange(T)[:, None], np.arange(T), lam).sum()
    )
    assert (
        bench.prefill_flops(config, T, None) == 2 * T * layer_weights + per_pair * T * (T + 1) // 2
    )


def test_bench_subcommands_print_tables_and_write_json(sp_ckpt, tmp_path):
    """attention, prefill and decode run on a tiny checkpoint: a table on stdout, rows in the JSON,
    and the bounded cache's size the same at every context past the window while the full one
    grows."""
    pytest.importorskip("transformers")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the cat sat on a mat and ran to see the dog"] * 30))
    runs = {
        "attention": ["--lengths", "64,160", "--heads", "4,2,8", "--n-local", "32", "--profile"],
        "prefill": ["--ckpt", sp_ckpt, "--text", text, "--lengths", "40,150"],
        "decode": ["--ckpt", sp_ckpt, "--contexts", "100,300", "--tokens", "2", "--n-local", "16"],
    }
    rows = {}
    for name, args in runs.items():
        r = run_module("lminf_min.bench", name, *args, "--json", tmp_path / f"{name}.json")
        assert r.returncode == 0, r.stderr
        rows[name] = json.loads((tmp_path / f"{name}.json").read_text())["rows"]
        # header + one line per row
        assert r.stdout.count("\n| ") == len(rows[name]) + 1 and "threads" in r.stdout
        assert ("Self CPU time total" in r.stdout) == (name == "attention")  # --profile's table
    assert [row["tokens"] for row in rows["prefill"]] == [40, 150]
    # L = 64
    assert (
        rows["prefill"][0]["FLOPs theirs / ours"] == 1.0 < rows["prefill"][1]["FLOPs theirs / ours"]
    )
    assert (
        rows["decode"][0]["ours KV MiB"]
        == rows["decode"][1]["ours KV MiB"]
        < rows["decode"][1]["full KV MiB"]
    )
    # k and v, layers, kv heads, dim, G + L, float32
    assert rows["decode"][0]["ours KV MiB"] * 2**20 == 2 * 2 * 2 * 8 * (10 + 16) * 4
    assert all(row["blocks ms"] > 0 and row["flex ms"] > 0 for row in rows["attention"])
    assert [
        row["FLOPs Λ / causal"] for row in rows["attention"]
    ] == [  # G=10, L=32: Λ mask cells / causal cells
        mask.lambda_mask(np.arange(T)[:, None], np.arange(T), LambdaConfig(10, 32, 32)).sum()
        / (T * (T + 1) / 2)
        for T in (64, 160)
    ]
