"""Tokenizers (tokenizer.json and a sentencepiece model trained here) and generate.py end to end on
a tiny checkpoint."""

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import weights
from conftest import ROOT
from lminf_min import model
from lminf_min.tokenizer import Tokenizer


def test_sentencepiece_tokenizer(sp_ckpt):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_ckpt / "tokenizer.model"))
    tok = Tokenizer(sp_ckpt)
    text = "the red dog sat by the sea"
    assert tok.encode(text) == [1] + sp.encode(text)  # Llama convention: BOS first
    assert tok.decode(tok.encode(text)[1:]) == text
    assert tok.vocab_size == 60


def test_tokenizer_json_wins_over_sentencepiece(sp_ckpt, default_ckpt):
    (sp_ckpt / "tokenizer.json").write_bytes((default_ckpt / "tokenizer.json").read_bytes())
    assert Tokenizer(sp_ckpt).vocab_size == 49152


def run_generate(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def test_generate_end_to_end_is_greedy_argmax(sp_ckpt, tmp_path):
    """generate.py at temperature 0 prints exactly the tokens of an independent greedy loop over
    full forwards."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the cat sat on the mat and")
    r = run_generate(
        "--ckpt", sp_ckpt, "--prompt", prompt, "--max-new-tokens", 12, "--temperature", 0
    )
    assert r.returncode == 0, r.stderr
    config, w = weights.load_checkpoint(sp_ckpt)
    tok, ids, new = Tokenizer(sp_ckpt), Tokenizer(sp_ckpt).encode(prompt.read_text()), []
    for _ in range(12):  # no cache: the whole sequence every step
        nxt = int(model.forward(w, config, torch.tensor(ids + new))[-1, : tok.vocab_size].argmax())
        if nxt == config.eos_token_id:
            break
        new.append(nxt)
    assert r.stdout.rstrip("\n") == tok.decode(new)
    assert "prompt 9 tokens" in r.stderr and "tokens/s" in r.stderr and "peak memory" in r.stderr


def test_generate_sampling_is_seeded(sp_ckpt, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the dog")
    runs = [
        run_generate(
            "--ckpt",
            sp_ckpt,
            "--prompt",
            prompt,
            "--max-new-tokens",
            20,
            "--temperature",
            1.0,
            "--seed",
            s,
        )
        for s in (1, 1, 2)
    ]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout != runs[2].stdout


def test_help_explains_every_flag():
    out = run_generate("--help").stdout
    for flag in (
        "--ckpt",
        "--prompt",
        "--max-new-tokens",
        "--temperature",
        "--seed",
        "--device",
        "--dtype",
        "--vanilla",
        "--n-global",
        "--n-local",
        "--d-max",
        "--top-k-middle",
        "--top-k-from-layer",
        "--top-k-distance",
    ):
        assert flag in out


COMMANDS = ["generate", "weights", *(f"lminf_min.{m}" for m in ("eval", "bench", "diagnose"))]
COMMANDS += ["lminf_min.exercises", "lminf_min.mask"]


# runpy warns that the command's module was imported before (by another command): harmless here
@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import:RuntimeWarning")
def test_each_flag_is_declared_in_one_place(monkeypatch):
    """Every command line is built (`--help`), and each flag's declaration is found: the line
    outside cli.py that added it. A flag declared on two lines must be one of cli.FLAGS, and those
    are only ever added through cli.add_flags."""
    import argparse
    import runpy
    import traceback

    from lminf_min import cli

    sites, direct, add = {}, set(), argparse.ArgumentParser.add_argument

    def recorded(parser, *names, **keywords):
        stack = traceback.extract_stack()[:-1]
        outside = [f for f in stack if not f.filename.endswith("cli.py")]
        where = f"{Path(outside[-1].filename).name}:{outside[-1].lineno}"
        for name in names:
            sites.setdefault(name, set()).add(where)
            if stack[-1].filename != cli.__file__:  # not through cli.add_flags
                direct.add(name)
        return add(parser, *names, **keywords)

    monkeypatch.setattr(argparse.ArgumentParser, "add_argument", recorded)
    for command in COMMANDS:
        path = ROOT / (command.replace(".", "/") + ".py")
        monkeypatch.setattr(sys, "argv", [str(path), "--help"])
        with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_module(command, run_name="__main__")
    assert {"--text", "--tokens", "--ckpt", "--n-local", "--out"} <= set(sites)  # all were seen
    twice = {flag: where for flag, where in sites.items() if len(where) > 1}
    assert set(twice) <= set(cli.FLAGS), {f: w for f, w in twice.items() if f not in cli.FLAGS}
    assert not direct & set(cli.FLAGS), direct & set(cli.FLAGS)


def test_generate_lambda_past_the_window_is_greedy_under_the_definition(sp_ckpt, tmp_path):
    """Past a small window (G=2, L=8) generate.py prints the greedy tokens of the NumPy Λ
    forward."""
    import numpy as np

    from lminf_min import reference
    from lminf_min.config import LambdaConfig

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the cat sat on the mat and the dog ran to see a big red fish by the sea")
    r = run_generate(
        "--ckpt",
        sp_ckpt,
        "--prompt",
        prompt,
        "--max-new-tokens",
        10,
        "--n-global",
        2,
        "--n-local",
        8,
    )
    assert r.returncode == 0, r.stderr
    config, w = weights.load_checkpoint(sp_ckpt)
    w = {n: t.numpy() for n, t in w.items()}
    tok, lam = Tokenizer(sp_ckpt), LambdaConfig(2, 8, 8)
    ids, new = tok.encode(prompt.read_text()), []
    assert len(ids) > 16
    for _ in range(10):
        nxt = int(
            np.argmax(reference.forward(w, config, np.array(ids + new), lam)[-1, : tok.vocab_size])
        )
        if nxt == config.eos_token_id:
            break
        new.append(nxt)
    assert r.stdout.rstrip("\n") == tok.decode(new)
    assert "bounded: G+L = 2+8" in r.stderr


def test_generate_top_k_middle_is_greedy_under_the_definition(sp_ckpt, tmp_path):
    """--top-k-middle: generated tokens follow the NumPy definition with top-k rows from the
    prompt's end."""
    import numpy as np

    from lminf_min import reference
    from lminf_min.config import LambdaConfig

    prompt = tmp_path / "prompt.txt"
    prompt.write_text(
        "the cat sat on the mat and the dog ran to see a big red fish by the sea and the cat ate it"
    )
    r = run_generate(
        "--ckpt",
        sp_ckpt,
        "--prompt",
        prompt,
        "--max-new-tokens",
        8,
        "--n-global",
        2,
        "--n-local",
        6,
        "--top-k-middle",
        3,
        "--top-k-from-layer",
        1,
        "--top-k-distance",
        4,
    )
    assert r.returncode == 0, r.stderr
    config, w = weights.load_checkpoint(sp_ckpt)
    w = {n: t.numpy() for n, t in w.items()}
    tok, lam = (
        Tokenizer(sp_ckpt),
        LambdaConfig(2, 6, 6, top_k=3, top_k_from_layer=1, top_k_distance=4),
    )
    ids, new = tok.encode(prompt.read_text()), []
    for _ in range(8):  # row len(ids) - 1 is prefill (no top-k); rows after it are decoded tokens
        nxt = int(
            np.argmax(
                reference.forward(w, config, np.array(ids + new), lam, decoding_from=len(ids))[
                    -1, : tok.vocab_size
                ]
            )
        )
        if nxt == config.eos_token_id:
            break
        new.append(nxt)
    assert r.stdout.rstrip("\n") == tok.decode(new)
    assert "(full)" in r.stderr


def test_vanilla_past_the_training_length_warns(sp_ckpt, tmp_path):
    """--vanilla on a prompt longer than max_position_embeddings (64 here) still runs, with one
    warning line naming both lengths; LM-Infinite on the same prompt, and --vanilla on a short
    one, give none."""
    long, short = tmp_path / "long.txt", tmp_path / "short.txt"
    long.write_text(" ".join(["the cat sat on the mat and ran to see the dog"] * 12))
    short.write_text("the cat sat on the mat")
    runs = {
        (path, vanilla): run_generate(
            "--ckpt", sp_ckpt, "--prompt", path, "--max-new-tokens", 2, *vanilla
        )
        for path in (long, short)
        for vanilla in ((), ("--vanilla",))
    }
    for (path, vanilla), r in runs.items():
        assert r.returncode == 0, r.stderr
        warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
        if path == long and vanilla:
            n = int(r.stderr.split("prompt ")[-1].split(" tokens")[0])
            assert n > 64
            assert warnings == [
                f"warning: the prompt has {n} tokens, more than the 64 this model was trained on; "
                "full attention degrades past that length (drop --vanilla for LM-Infinite)"
            ]
        else:
            assert warnings == []
