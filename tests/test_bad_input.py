"""Bad input: one line naming the problem and the fix, exit code 2, no traceback, nothing of the
user's changed.

Every message must also appear in docs/reliability.md (temporary paths shown as …), so the catalogue
there is what users get.
"""

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from unittest import mock

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from test_gguf import write_tiny_gguf

import generate
import weights
from conftest import ROOT, random_weights, run_module, tiny_config, write_checkpoint
from lminf_min import cli
from lminf_min.config import UserError

CATALOGUE = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
SOLUTIONS = ROOT / "docs" / "solutions.py"


def break_truncated(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])


def break_corrupt_header(ckpt):
    (ckpt / "model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64
    )


def rewrite_tensors(change):
    def breaker(ckpt):
        tensors = random_weights(tiny_config())
        change(tensors)
        save_file(tensors, str(ckpt / "model.safetensors"))

    return breaker


def huge_header(ckpt):
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 50) + b"{}")


def shard_index(text):
    def breaker(ckpt):
        (ckpt / "model.safetensors.index.json").write_text(text)

    return breaker


def named_pipe(name):
    def breaker(ckpt):
        (ckpt / name).unlink()
        os.mkfifo(ckpt / name)

    return breaker


def stale_copy(ckpt):
    shutil.copy(ckpt / "model.safetensors", ckpt / "old.safetensors")


def config_is_a_directory(ckpt):
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").mkdir()


def rewrite_config(**fields):
    def breaker(ckpt):
        (ckpt / "config.json").write_text(json.dumps(tiny_config() | fields))

    return breaker


CASES = {  # name -> (how to break the tiny checkpoint, words the message must contain)
    "missing directory": (lambda ckpt: None, "no checkpoint at"),
    "file instead of directory": (lambda ckpt: None, "no checkpoint at"),
    "empty directory": (lambda ckpt: [f.unlink() for f in ckpt.iterdir()], "no config.json"),
    "missing config.json": (lambda ckpt: (ckpt / "config.json").unlink(), "no config.json"),
    "config.json a directory": (config_is_a_directory, "no config.json file"),
    "config.json not an object": (
        lambda ckpt: (ckpt / "config.json").write_text("[1, 2]"),
        "expected a JSON object",
    ),
    "wrong type in config.json": (rewrite_config(hidden_size="32"), "expected a positive integer"),
    "inconsistent head counts": (rewrite_config(num_key_value_heads=3), "not a multiple"),
    "odd head_dim": (rewrite_config(head_dim=7, num_attention_heads=4), "must be even"),
    "config.json not JSON": (lambda ckpt: (ckpt / "config.json").write_text("{oops"), "as JSON"),
    "unsupported rope_scaling": (
        rewrite_config(rope_scaling={"type": "linear", "factor": 2.0}),
        "rope_scaling",
    ),
    "RoPE scaling in rope_parameters (transformers >= 5)": (
        rewrite_config(rope_parameters={"rope_type": "yarn", "factor": 2.0}),
        "rope_parameters",
    ),
    "unsupported model_type": (rewrite_config(model_type="mistral"), "model_type"),
    "attention bias": (rewrite_config(attention_bias=True), "attention_bias"),
    "missing field": (
        lambda ckpt: (ckpt / "config.json").write_text(
            json.dumps({k: v for k, v in tiny_config().items() if k != "hidden_size"})
        ),
        "hidden_size",
    ),
    "no safetensors": (lambda ckpt: (ckpt / "model.safetensors").unlink(), "no *.safetensors"),
    "truncated safetensors": (break_truncated, "not a readable safetensors"),
    "corrupt safetensors header": (break_corrupt_header, "not a readable safetensors"),
    "absurdly large safetensors header": (huge_header, "not a readable safetensors"),
    "integer tensor": (
        rewrite_tensors(
            lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(np.int32)})
        ),
        "expected F32, F16 or BF16",
    ),
    "shard index not JSON": (shard_index("{"), "not a shard index"),
    "shard index without weight_map": (shard_index('{"metadata": {}}'), "not a shard index"),
    "shard index naming a missing shard": (
        shard_index('{"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}'),
        "is not a regular file in",
    ),
    "missing tensor": (
        rewrite_tensors(lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        "lacks tensor 'model.layers.1.mlp.up_proj.weight'",
    ),
    "unexpected tensor": (
        rewrite_tensors(
            lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": t["model.norm.weight"]})
        ),
        "unexpected tensor",
    ),
    "shape mismatch": (
        rewrite_tensors(lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:-1]})),
        "shape (31,)",
    ),
    "no tokenizer": (lambda ckpt: None, "no tokenizer.json or tokenizer.model"),
    "infinite rope_theta": (rewrite_config(rope_theta=float("inf")), "positive finite number"),
    "config.json a named pipe": (named_pipe("config.json"), "no config.json file"),
    "model.safetensors a named pipe": (named_pipe("model.safetensors"), "not a regular file"),
    "shard index pointing outside": (
        shard_index('{"weight_map": {"model.norm.weight": "../other/model.safetensors"}}'),
        "is not a regular file in",
    ),
    "a stale second safetensors file": (stale_copy, "in another *.safetensors file"),
    "ten to the ninth layers": (rewrite_config(num_hidden_layers=10**9), "more than any Llama"),
    "NaN weights": (
        rewrite_tensors(lambda t: t["model.norm.weight"].__setitem__(0, np.nan)),
        "NaN or infinite",
    ),
}


def run(script, *args, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )


def assert_documented(message, tmp_path):
    """The message, with temporary paths as … and memory sizes as N, is listed in
    docs/reliability.md."""
    line = re.sub(r"[\d.]+ GiB", "N GiB", message.replace(str(tmp_path), "…"))
    assert line in CATALOGUE, f"docs/reliability.md lacks: {line}"


def assert_clean_error(r, words, tmp_path):
    assert r.returncode == 2, f"exit {r.returncode}: {r.stderr}"
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr
    assert_documented(lines[0], tmp_path)


def snapshot(path):
    return (
        {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
        if path.is_dir()
        else None
    )


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
    assert_clean_error(run("generate.py", "--ckpt", ckpt, "--prompt", prompt), words, tmp_path)
    assert snapshot(ckpt) == before


@pytest.mark.parametrize(
    "content, words",
    [
        (None, "not found"),
        (b"", "is empty"),
        (b"  \n", "is empty"),
        (b"caf\xe9 latin-1", "not UTF-8"),
        (b"\x00\x01\x02", "binary"),
        ("\ufeff \n".encode(), "is empty"),  # a byte-order mark is not text
    ],
)
def test_bad_prompt(content, words, tiny_ckpt, tmp_path):
    prompt = tmp_path / "prompt.txt"
    if content is not None:
        prompt.write_bytes(content)
    assert_clean_error(run("generate.py", "--ckpt", tiny_ckpt, "--prompt", prompt), words, tmp_path)
    assert content is None or prompt.read_bytes() == content


def wordlevel_tokenizer(path, n):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0")).save(str(path))


@pytest.mark.parametrize(
    "case, words",
    [
        ("corrupt tokenizer.json", "could not be loaded"),
        (
            "tokenizer larger than the embedding",
            "the tokenizer has 100 tokens but the model only 64",
        ),
    ],
)
def test_bad_tokenizer(case, words, tiny_ckpt, tmp_path):
    if case.startswith("corrupt"):
        (tiny_ckpt / "tokenizer.json").write_text('{"model": {"type": "nonsense"}}')
    else:
        wordlevel_tokenizer(tiny_ckpt / "tokenizer.json", 100)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("w1 w2 w3")
    assert_clean_error(run("generate.py", "--ckpt", tiny_ckpt, "--prompt", prompt), words, tmp_path)


@pytest.mark.skipif(cli.available_memory() is None, reason="no /proc/meminfo: free memory unknown")
def test_prompt_larger_than_memory(tiny_ckpt, tmp_path):
    prompt = tmp_path / "huge.txt"
    with open(prompt, "wb") as f:
        f.truncate(1 << 40)  # a sparse file of 1 TiB: its size is all that is read
    assert_clean_error(
        run("generate.py", "--ckpt", tiny_ckpt, "--prompt", prompt), "reading prompt file", tmp_path
    )


OPTIONS = [
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--temperature", "nan"], "it must be a finite number"),
    (["--temperature", "1e-50"], "at least 0.0001"),
    (["--seed", str(2**64)], "from 0 to 2^64 - 1"),
    (["--d-max", str(10**20)], "at most 10^15"),
    (["--n-local", str(10**12)], "a bounded cache of G + L = 1000000000010 positions"),
    (["--vanilla", "--top-k-middle", "3"], "drop --vanilla or --top-k-middle"),
    (["--top-k-middle", "2", "--top-k-from-layer", "100"], "the model has 2 layers"),
    (["--n-local", "0"], "n_local (--n-local) is 0"),
    (["--n-global", "-1"], "n_global (--n-global) is -1"),
    (["--n-local", "32", "--d-max", "10"], "d_max=10 < n_local - 1"),
    (["--top-k-middle", "-2"], "top_k (--top-k-middle) is -2"),
]
if not torch.cuda.is_available():
    OPTIONS.append((["--device", "cuda"], "no CUDA GPU"))


@pytest.mark.parametrize("flags, words", OPTIONS)
def test_bad_option(flags, words, sp_ckpt, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello")
    assert_clean_error(
        run("generate.py", "--ckpt", sp_ckpt, "--prompt", prompt, *flags), words, tmp_path
    )


def test_bfloat16_on_a_cpu_without_it(tiny_ckpt, tmp_path):
    with (
        mock.patch.object(torch.cpu, "_is_avx512_bf16_supported", return_value=False),
        mock.patch.object(torch.cpu, "_is_amx_tile_supported", return_value=False),
        pytest.raises(UserError) as e,
    ):
        cli.load_model(tiny_ckpt, "cpu", "bfloat16")
    assert "lacks bfloat16 instructions" in str(e.value)
    assert_documented("error: " + str(e.value), tmp_path)


def test_float16_on_a_cpu_without_it_warns_and_loads(tiny_ckpt, capsys):
    """float16 without the CPU's float16 arithmetic still loads (torch emulates it), with one
    warning line; with it, no warning."""
    for has_fp16, warned in ((False, True), (True, False)):
        with mock.patch.object(torch.cpu, "_is_amx_fp16_supported", return_value=has_fp16):
            weights = cli.load_model(tiny_ckpt, "cpu", "float16")[2]
        assert weights["model.norm.weight"].dtype == torch.float16
        err = capsys.readouterr().err
        assert err.startswith("warning: this CPU has no float16 arithmetic") == warned
        assert len(err.splitlines()) == int(warned)


def test_float16_overflowing_weights(tiny_ckpt, tmp_path):
    """A weight past float16's range (65504) with --dtype float16 is refused, not read as inf."""
    cfg = tiny_config()
    tensors = random_weights(cfg)
    tensors["model.norm.weight"][3] = 1e5
    write_checkpoint(tiny_ckpt, cfg, tensors)
    with pytest.raises(UserError) as e:
        cli.load_model(tiny_ckpt, "cpu", "float16")
    assert str(e.value).endswith("'model.norm.weight' overflows torch.float16; use float32")
    assert_documented("error: " + str(e.value), tmp_path)
    assert cli.load_model(tiny_ckpt, "cpu", "float32")[2]["model.norm.weight"][3] == 1e5


def test_full_cache_larger_than_memory(sp_ckpt, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the cat sat on the mat " * 50)
    kwargs = dict(
        ckpt=sp_ckpt,
        prompt=prompt,
        max_new_tokens=4,
        temperature=0.0,
        seed=0,
        device="cpu",
        dtype="float32",
        n_global=2,
        n_local=None,
        d_max=None,
        top_k_middle=0,
        top_k_from_layer=0,
        top_k_distance=None,
    )
    with mock.patch.object(cli, "available_memory", return_value=10**5):
        # LM-Infinite's cache is bounded: no question of memory
        generate.main(**kwargs, vanilla=False)
        with pytest.raises(UserError) as e:
            generate.main(**kwargs, vanilla=True)
    assert "a full KV cache for 351 prompt tokens and 4 new ones needs" in str(e.value)
    assert_documented("error: " + re.sub(r"[\d.]+ GiB", "N GiB", str(e.value)), tmp_path)


@pytest.mark.parametrize(
    "args, words",
    [
        (["ppl", "--text", "PROMPT", "--max-tokens", "1"], "--max-tokens must be at least 2"),
        (["passkey", "--lengths", "4k"], "--lengths: '4k'"),
        (["passkey", "--lengths", "64"], "too short for the prompt"),
        (["plot", "PROMPT", "--out", "OUT"], "cannot read"),
        (["ppl", "--text", "PROMPT", "--max-tokens", "4", "--json", "PROMPT"], "file of this run"),
        (["ppl", "--text", "PROMPT", "--max-tokens", "4", "--json", "TMP"], "file of this run"),
        (["ppl", "--text", "PROMPT", "--max-tokens", "4", "--json", "CONFIG"], "file of this run"),
        (
            ["ppl", "--text", "PROMPT", "--max-tokens", "4", "--json", "OUT", "--plot", "OUT"],
            "file",
        ),
        (["ppl", "--text", "PROMPT", "--max-tokens", "4", "--json", "UNDER"], "is a file"),
        (["ppl", "--text", "PROMPT", "--max-tokens", "4", "--json", "/dev/full"], "a device"),
        (["ppl", "--text", "PROMPT", "--max-tokens", "4", "--json", "CKPT/x.json"], "checkpoint"),
        (["passkey", "--lengths", "300", "--json", "CONFIG"], "a file of this run"),
        (["plot", "TMP", "--out", "OUT"], "is not a file"),
        (["plot", "BADTYPES", "--out", "OUT"], "is not a result of `eval ppl --json`"),
        (["plot", "CONFIG", "--out", "OUT"], "is not a result of `eval ppl --json`"),
        (["passkey", "--lengths", str(10**14)], "three full caches of 100000000000000"),
        (["stream", "--text", "PROMPT", "--tokens", str(10**20)], "at most 10^15"),
    ],
)
def test_bad_eval_input(args, words, sp_ckpt, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello there")
    names = {"PROMPT": prompt, "OUT": tmp_path / "x.png", "TMP": tmp_path}
    names |= {"CONFIG": sp_ckpt / "config.json", "UNDER": prompt / "x.json"}
    names |= {"CKPT/x.json": sp_ckpt / "x.json", "BADTYPES": tmp_path / "bad.json"}
    (tmp_path / "bad.json").write_text('{"attention": "a", "ppl": 2, "buckets": [{"start": "a"}]}')
    args = [names.get(a, a) for a in args] + (["--ckpt", sp_ckpt] if args[0] != "plot" else [])
    r = run_module("lminf_min.eval", *args)
    assert_clean_error(r, words, tmp_path)
    assert prompt.read_text() == "hello there"


@pytest.mark.parametrize(
    "module, args, words",
    [
        ("lminf_min.bench", ["attention", "--heads", "9,4,64"], "query heads a multiple"),
        ("lminf_min.diagnose", ["logits", "--text", "PROMPT", "--tokens", "0"], "--tokens is 0"),
        ("lminf_min.diagnose", ["pca", "--text", "PROMPT", "--n-global", "0"], "1 <= G <= L - 3"),
        ("lminf_min.diagnose", ["entropy", "--text", "PROMPT", "--queries", "10000"], "--queries"),
        ("lminf_min.bench", ["decode", "--tokens", "0"], "--tokens is 0"),
        ("lminf_min.exercises", ["run", "window_mask", "--answers", "README"], "no such .py file"),
        ("lminf_min.exercises", ["run", "window_mask", "--answers", "BUGGY"], "(AttributeError:"),
        (
            "lminf_min.exercises",
            ["run", "streaming_distance", "--answers", "SHAPE", "--tokens", "40", "--n-local", "4"],
            "distances have shape (4, 4)",
        ),
        (
            "lminf_min.exercises",
            ["run", "window_mask", "--answers", "MASK4", "--tokens", "40"],
            "failed on a 40-token grid (IndexError:",
        ),
        ("lminf_min.mask", ["--png", "NODIR"], "does not exist"),
        ("lminf_min.mask", ["--length", "500"], "--length is 500"),
        ("lminf_min.exercises", ["run", "window_mask", "--tokens", str(10**12)], "NumPy pass"),
        pytest.param(
            "lminf_min.bench",
            ["attention", "--device", "cuda", "--lengths", "64"],
            "no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_bad_instrument_input(module, args, words, sp_ckpt, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the cat sat on the mat " * 10**4)
    names = {
        "PROMPT": prompt,
        "README": tmp_path / "answers.md",
        "NODIR": tmp_path / "no" / "m.png",
    }
    names["README"].write_text("def window_mask(i, j, n_local): ...")
    names["BUGGY"] = tmp_path / "buggy.py"  # an answer with a typo: it raises when called
    names["BUGGY"].write_text(
        "import numpy as np\ndef window_mask(i, j, n_local):\n    np.aray(i)\n"
    )
    names["SHAPE"] = tmp_path / "shape.py"  # distances for 4 tokens, whatever T is
    names["SHAPE"].write_text(
        "import numpy as np\ndef streaming_distance(T, n_global, n_local):\n"
        "    return np.zeros((4, 4), dtype=int)\n"
    )
    names["MASK4"] = tmp_path / "mask4.py"  # right on the 4-token grid, out of range past it
    names["MASK4"].write_text(
        "import numpy as np\ndef window_mask(i, j, n_local):\n"
        "    return np.tril(np.ones((4, 4), bool))[i, j] & (i - j < n_local)\n"
    )
    args = [names.get(a, a) for a in args]
    if module in ("lminf_min.diagnose", "lminf_min.exercises") or args[0] == "stream":
        args += ["--ckpt", sp_ckpt]
    if module == "lminf_min.exercises":
        args += ["--text", prompt] + ([] if "--answers" in args else ["--answers", SOLUTIONS])
    assert_clean_error(run_module(module, *args), words, tmp_path)


def test_tokens_the_model_has_no_row_for_or_none_at_all(tiny_ckpt, tmp_path):
    from tokenizers import Tokenizer, models

    prompt = tmp_path / "prompt.txt"
    for model, text, words in (
        (models.WordLevel({"w0": 0, "w1": 100}, "w0"), "w1", "gives token id 100, but the model"),
        (models.BPE({"a": 0, "b": 1}, []), "zzz", "the text encodes to no tokens"),
    ):
        Tokenizer(model).save(str(tiny_ckpt / "tokenizer.json"))
        prompt.write_text(text)
        r = run("generate.py", "--ckpt", tiny_ckpt, "--prompt", prompt)
        assert_clean_error(r, words, tmp_path)


def test_a_full_disk_on_stdout_is_one_line(sp_ckpt, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the cat sat on the mat")
    with open("/dev/full", "w") as full:
        r = subprocess.run(
            [sys.executable, ROOT / "generate.py", "--ckpt", sp_ckpt, "--prompt", prompt],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert_clean_error(r, "No space left on device", tmp_path)


@pytest.mark.parametrize("after", [0.3, 2.0])
def test_ctrl_c_is_one_line_even_during_imports(after, tmp_path):
    """SIGINT while the modules load (the first second) or while a conversion runs."""
    gguf = next(weights.CACHE.glob("*.gguf"), None)
    if gguf is None:
        pytest.skip("the default GGUF is not downloaded")
    p = subprocess.Popen(
        [sys.executable, ROOT / "weights.py", "convert-gguf", gguf, "--out", tmp_path / "out"],
        stderr=subprocess.PIPE,
        text=True,
        # as typed in a terminal, even when this test runs in the background (Ctrl-C ignored)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(after)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.rstrip().split("\n")[-1] == "interrupted", err
    assert "Traceback" not in err and sorted(os.listdir(tmp_path)) == []


def test_a_broken_default_model_folder_is_named_not_replaced(tmp_path):
    """A default model's folder without config.json (an interrupted copy, an old version): both
    commands say to delete it, nothing is fetched, and its files stay."""
    folder = tmp_path / "xdg" / "lminf_min" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text("old")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello")
    env = os.environ | {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    for command in (["weights.py", "smollm2"], ["generate.py", "--prompt", prompt]):
        r = run(*command, env=env)
        assert_clean_error(r, "already exists; delete it to convert again", tmp_path)
    assert os.listdir(folder) == ["model.safetensors"]


def test_conversion_never_overwrites(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert_clean_error(
        run("weights.py", "convert-gguf", tmp_path / "x.gguf", "--out", out), "not found", tmp_path
    )
    # an existing --out is never replaced: a folder of the user's, nor the GGUF's own folder
    (out / "model.gguf").write_bytes(b"GGUF")
    for args in (["smollm2"], ["convert-gguf", out / "model.gguf"]):
        assert_clean_error(run("weights.py", *args, "--out", out), "already exists", tmp_path)
    r = run("weights.py", "convert-gguf", out / "model.gguf", "--out", out / "notes.txt" / "x")
    assert_clean_error(r, "is a file, not a folder", tmp_path)
    assert sorted(os.listdir(out)) == ["model.gguf", "notes.txt"]
    assert (out / "notes.txt").read_text() == "precious"


def test_bad_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 100)
    assert_clean_error(
        run("weights.py", "convert-gguf", bad, "--out", tmp_path / "out"),
        "not a readable GGUF",
        tmp_path,
    )
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]


@pytest.mark.parametrize("key", ["head_count", "token_list", "embedding_length"])
def test_a_gguf_lacking_a_required_key(key, tmp_path):
    path, _ = write_tiny_gguf(tmp_path / "tiny.gguf", without=(key,))
    r = run("weights.py", "convert-gguf", path, "--out", tmp_path / "out")
    assert_clean_error(r, "(KeyError: ", tmp_path)
    assert not (tmp_path / "out").exists()


def test_outputs_never_touch_an_input_or_a_neighbour(sp_ckpt, tmp_path):
    """The JSON goes through a temporary file of its own (a `.partial` beside it is someone's),
    and a plot path without .png is written as given (not as path + .png, maybe an input)."""
    text = tmp_path / "notes.png"  # a text that happens to be named like a picture
    text.write_text("the cat sat on the mat " * 20)
    partial = tmp_path / "r.json.partial"
    partial.write_text("mine")
    args = ["ppl", "--ckpt", sp_ckpt, "--text", text, "--max-tokens", 20]
    r = run_module(
        "lminf_min.eval", *args, "--json", tmp_path / "r.json", "--plot", tmp_path / "notes"
    )
    assert r.returncode == 0, r.stderr
    assert partial.read_text() == "mine" and text.read_text().startswith("the cat")
    assert (tmp_path / "notes").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "r.json").is_file()


def test_logits_that_overflow_end_in_one_line(tiny_ckpt, tmp_path):
    tensors = random_weights(tiny_config())
    for name in tensors:
        if "gate_proj" in name or "up_proj" in name:
            tensors[name] = tensors[name] * 3000  # finite in float16, its products are not
    save_file(tensors, str(tiny_ckpt / "model.safetensors"))
    wordlevel_tokenizer(tiny_ckpt / "tokenizer.json", 64)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("w1 w2 w3 w4")
    r = run("generate.py", "--ckpt", tiny_ckpt, "--prompt", prompt, "--dtype", "float16")
    # (this CPU may add a warning that it emulates float16: then two lines)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert (
        r.stderr.splitlines()[-1] == "error: inf or NaN logits after 0 tokens; try --dtype float32"
    )
    assert_documented(r.stderr.splitlines()[-1], tmp_path)


def test_deeply_nested_json_is_one_line(tiny_ckpt, tmp_path):
    (tiny_ckpt / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello")
    r = run("generate.py", "--ckpt", tiny_ckpt, "--prompt", prompt)
    assert_clean_error(r, "as JSON", tmp_path)


@pytest.mark.parametrize(
    "changed, words",
    [
        (dict(head_count=0), "its metadata does not describe a Llama model"),
        (dict(head_count=2), "has shape (32, 32), its metadata implies (16, 32)"),
        (dict(token_list=["a"] * 64), "its metadata does not describe a Llama model"),
        (dict(tokenizer_pre="deepseek-llm"), "GGUF pre-tokenizer 'deepseek-llm' is not one"),
        (dict(tokenizer_pre="default"), "GGUF pre-tokenizer 'default' is not one"),
        (dict(rope_scaling_type=gguf.RopeScalingType.LINEAR), "RoPE scaling 'linear'"),
        (dict(arch="mistral"), "GGUF architecture 'mistral' is not supported"),
    ],
)
def test_a_gguf_with_inconsistent_metadata(changed, words, tmp_path):
    path, _ = write_tiny_gguf(tmp_path / "tiny.gguf", **changed)
    r = run("weights.py", "convert-gguf", path, "--out", tmp_path / "out")
    assert_clean_error(r, words, tmp_path)
    assert not (tmp_path / "out").exists()


def test_a_bad_command_line_is_one_line(tmp_path):
    for r in (run("generate.py"), run_module("lminf_min.bench", "attention", "--lengths", "4k")):
        assert_clean_error(r, "see ", tmp_path)


def test_a_reader_that_stops_early_is_no_traceback(sp_ckpt, tmp_path):
    """`generate.py ... | head -c 1`: the reader goes away early; the run stops quietly (exit 0,
    nothing on stderr), as Unix tools do."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the cat sat on the mat")
    args = ["--ckpt", sp_ckpt, "--prompt", prompt, "--max-new-tokens", 400, "--temperature", 1]
    child = subprocess.Popen(
        [sys.executable, str(ROOT / "generate.py"), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    child.stdout.close()  # the reader stops before the first token: its write meets a broken pipe
    err = child.stderr.read().decode()
    assert child.wait() == 0 and err == "", err


def test_a_closed_stdout_is_no_traceback(sp_ckpt, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the cat sat on the mat")
    command = f"{sys.executable} {ROOT / 'generate.py'} --ckpt {sp_ckpt} --prompt {prompt} >&-"
    r = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    assert r.returncode == 0 and "Traceback" not in r.stderr and "generated" in r.stderr, r.stderr
