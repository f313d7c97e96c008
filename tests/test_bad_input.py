"""Bad input: one line naming the problem and the fix, exit code 2, no traceback, nothing of the user's changed."""
import json
import subprocess
import sys

import pytest
from safetensors.numpy import save_file

from conftest import ROOT, random_weights, tiny_config


def break_truncated(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])


def break_corrupt_header(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)


def rewrite_tensors(change):
    def breaker(ckpt):
        tensors = random_weights(tiny_config())
        change(tensors)
        save_file(tensors, str(ckpt / "model.safetensors"))
    return breaker


def rewrite_config(**fields):
    def breaker(ckpt):
        (ckpt / "config.json").write_text(json.dumps(tiny_config() | fields))
    return breaker


CASES = {  # name -> (how to break the tiny checkpoint, words the message must contain)
    "missing directory": (lambda ckpt: None, "does not exist"),
    "file instead of directory": (lambda ckpt: None, "is a file"),
    "missing config.json": (lambda ckpt: (ckpt / "config.json").unlink(), "config.json not found"),
    "config.json not JSON": (lambda ckpt: (ckpt / "config.json").write_text("{oops"), "not valid JSON"),
    "unsupported rope_scaling": (rewrite_config(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    "unsupported model_type": (rewrite_config(model_type="mistral"), "model_type"),
    "attention bias": (rewrite_config(attention_bias=True), "attention_bias"),
    "missing field": (lambda ckpt: (ckpt / "config.json").write_text(json.dumps({k: v for k, v in tiny_config().items() if k != "hidden_size"})), "hidden_size"),
    "no safetensors": (lambda ckpt: (ckpt / "model.safetensors").unlink(), "no *.safetensors"),
    "truncated safetensors": (break_truncated, "not a readable safetensors"),
    "corrupt safetensors header": (break_corrupt_header, "not a readable safetensors"),
    "missing tensor": (rewrite_tensors(lambda t: t.pop("model.layers.1.mlp.up_proj.weight")), "lacks tensor 'model.layers.1.mlp.up_proj.weight'"),
    "unexpected tensor": (rewrite_tensors(lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": t["model.norm.weight"]})), "unexpected tensor"),
    "shape mismatch": (rewrite_tensors(lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:-1]})), "shape (31,)"),
    "no tokenizer": (lambda ckpt: None, "no tokenizer.json or tokenizer.model"),
}


def run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def assert_clean_error(r, words):
    assert r.returncode == 2, f"exit {r.returncode}: {r.stderr}"
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr


def snapshot(path):
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} if path.is_dir() else None


@pytest.mark.parametrize("case", CASES)
def test_bad_checkpoint(case, tiny_ckpt, tmp_path):
    breaker, words = CASES[case]
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello")
    ckpt = tiny_ckpt
    if case == "missing directory":
        ckpt = tmp_path / "nowhere"
    elif case == "file instead of directory":
        ckpt = prompt
    else:
        breaker(ckpt)
    before = snapshot(ckpt)
    assert_clean_error(run("generate.py", "--ckpt", ckpt, "--prompt", prompt), words)
    assert snapshot(ckpt) == before


@pytest.mark.parametrize("content, words", [(None, "not found"), (b"", "is empty"), (b"  \n", "is empty"),
                                            (b"caf\xe9 latin-1", "not UTF-8"), (b"\x00\x01\x02", "binary")])
def test_bad_prompt(content, words, tiny_ckpt, tmp_path):
    prompt = tmp_path / "prompt.txt"
    if content is not None:
        prompt.write_bytes(content)
    assert_clean_error(run("generate.py", "--ckpt", tiny_ckpt, "--prompt", prompt), words)
    assert content is None or prompt.read_bytes() == content


@pytest.mark.parametrize("flags, words", [(["--max-new-tokens", "-1"], "--max-new-tokens"), (["--temperature", "-0.5"], "--temperature")])
def test_bad_option(flags, words, tiny_ckpt, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello")
    assert_clean_error(run("generate.py", "--ckpt", tiny_ckpt, "--prompt", prompt, *flags), words)


def test_conversion_never_overwrites_without_force(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert_clean_error(run("weights.py", "smollm2", "--out", out), "already exists")
    assert_clean_error(run("weights.py", "convert-gguf", tmp_path / "x.gguf", "--out", out), "not found")
    assert (out / "notes.txt").read_text() == "precious"


def test_bad_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 100)
    assert_clean_error(run("weights.py", "convert-gguf", bad, "--out", tmp_path / "out"), "not a readable GGUF")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]
