"""Fuzzed configs and safetensors headers give only the project's own errors; no pickle; no network
at run time."""

import json
import re
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import weights
from conftest import ROOT, tiny_config
from lminf_min.config import LlamaConfig, UserError

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = sorted(tiny_config()) + [
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "hidden_act",
    "head_dim",
]


@settings(max_examples=300, deadline=None)
@given(
    changes=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=4),
    drop=st.sets(st.sampled_from(sorted(tiny_config())), max_size=2),
)
def test_fuzzed_config_gives_a_config_or_a_clear_error(changes, drop):
    """A valid config with random fields replaced or dropped: a LlamaConfig whose shapes can be
    listed, or a UserError."""
    d = {k: v for k, v in (tiny_config() | changes).items() if k not in drop}
    try:
        cfg = LlamaConfig.from_dict(json.loads(json.dumps(d)))  # as it would come out of a file
    except UserError:
        return
    assert all(n > 0 for shape in weights.expected_shapes(cfg).values() for n in shape)


def test_configs_as_transformers_writes_them_now():
    """transformers >= 5 nests rope_theta (and rope_type, "type" in older files) in rope_parameters:
    read as transformers writes it, RoPE scaling there refused like rope_scaling."""
    import transformers

    written = transformers.LlamaConfig(**tiny_config(rope_theta=12345.0)).to_dict()
    assert LlamaConfig.from_dict(written).rope_theta == 12345.0
    for scaling in ({"rope_type": "yarn", "factor": 2.0}, {"type": "linear", "factor": 2.0}):
        with pytest.raises(UserError, match="rope_parameters=.* is not supported"):
            LlamaConfig.from_dict(written | {"rope_parameters": scaling})
    for not_an_object in ([], 0, "", False, [1]):
        with pytest.raises(UserError, match="is not supported"):
            LlamaConfig.from_dict(written | {"rope_parameters": not_an_object})


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=64))
def test_fuzzed_config_file_bytes(data, tmp_path):
    (tmp_path / "config.json").write_bytes(data)
    try:
        weights.read_config(tmp_path)
    except UserError:
        pass


HEADER_ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I32", "F64", "U8", "XX"])
        | st.text(max_size=4),
        "shape": st.lists(st.integers(-3, 2**40), max_size=3) | JSON,
        "data_offsets": st.lists(st.integers(-3, 2**40), max_size=3) | JSON,
    }
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    names=st.lists(
        st.sampled_from(sorted(weights.expected_shapes(LlamaConfig.from_dict(tiny_config()))))
        | st.text(max_size=10),
        max_size=3,
    ),
    entries=st.lists(HEADER_ENTRY, min_size=3, max_size=3),
    announced=st.none() | st.integers(0, 2**64 - 1),
    tail=st.binary(max_size=256),
    raw=st.none() | JSON,
)
def test_fuzzed_safetensors_header_gives_a_clear_error(
    names, entries, announced, tail, raw, tmp_path
):
    """A checkpoint whose only weights file has a made-up header (entries, raw JSON, announced
    length): a UserError, never a crash."""
    header = json.dumps(dict(zip(names, entries)) if raw is None else raw).encode()
    size = len(header) if announced is None else announced
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", size) + header + tail)
    try:
        weights.load_checkpoint(tmp_path)
    except UserError as e:
        assert "\n" not in str(e)
    else:
        raise AssertionError("a checkpoint without its tensors loaded")


def test_no_pickle_anywhere():
    """Weights are read only through safetensors: no torch.load, pickle or numpy pickles in the
    project's code."""
    files = [ROOT / "generate.py", ROOT / "weights.py", *sorted((ROOT / "lminf_min").glob("*.py"))]
    banned = re.compile(r"torch\.load|import pickle|pickle\.|allow_pickle|cloudpickle|dill|joblib")
    assert len(files) > 5
    for f in files:
        assert not banned.search(f.read_text(encoding="utf-8")), f"{f.name} uses pickle"


GUARD = """
import os, socket, sys, runpy
def refuse(*args, **kwargs):
    print("network access during generation", file=sys.stderr)
    os._exit(3)  # not an exception a library could catch and carry on from
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
sys.argv = ["generate.py", *sys.argv[1:]]
runpy.run_path("generate.py", run_name="__main__")
"""


def test_generation_needs_no_network(default_ckpt, tmp_path):
    """Once the default model is converted, generating (and loading it by default) opens no
    connection."""
    prompt = tmp_path / "p.txt"
    prompt.write_text("The capital of France is")
    r = subprocess.run(
        [sys.executable, "-c", GUARD, "--prompt", str(prompt), "--max-new-tokens", "4"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0 and "network access" not in r.stderr, r.stderr
    assert len(r.stdout.strip()) > 0
