"""docs/paper_map.md names real code: every `file.py:name`, `tests/…::test_name` and `python -m
lminf_min.X sub` exists.

Read with ast only (no imports), so this stays fast and needs no torch.
"""

import ast
import importlib
import re

import pytest

from conftest import ROOT

MAP = ROOT / "docs" / "paper_map.md"
# `lminf_min/caches.py:LambdaCache.update`
CODE_REF = re.compile(r"`([\w/.-]+\.py):([A-Za-z_][\w.]*)`")
# `tests/test_definition_maths.py::test_mask_row_counts`
TEST_REF = re.compile(r"`(tests/[\w/.-]+\.py)::([A-Za-z_]\w*)`")
# `python -m lminf_min.eval ppl --vanilla`
CLI_REF = re.compile(r"`python -m (lminf_min\.\w+)((?: [^`]*)?)`")


def text():
    return MAP.read_text(encoding="utf-8")


def parsed(path):
    return ast.parse((ROOT / path).read_text(encoding="utf-8"), filename=str(path))


def names_in(body):
    """Functions, classes and assigned names defined directly in a module or class body: name ->
    node."""
    found = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found[node.name] = node
        elif isinstance(node, ast.Assign):
            found.update((t.id, node) for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found[node.target.id] = node
    return found


def defines(path, dotted):
    """Whether the file defines `dotted` (a function, class or constant, or Class.member)."""
    body = parsed(path).body
    for part in dotted.split("."):
        node = names_in(body).get(part)
        if node is None:
            return False
        body = getattr(node, "body", [])
    return True


def test_map_has_enough_references():
    refs = CODE_REF.findall(text()) + TEST_REF.findall(text())
    assert len(refs) >= 15, f"only {len(refs)} references in {MAP.name}"


def test_code_references_exist():
    missing = []
    for path, name in sorted(set(CODE_REF.findall(text()))):
        if not (ROOT / path).is_file():
            missing.append(f"{path} (no such file)")
        elif not defines(path, name):
            missing.append(f"{path}:{name}")
    assert not missing, f"{MAP.name} names code that does not exist: {missing}"


def test_test_references_exist():
    missing = []
    for path, name in sorted(set(TEST_REF.findall(text()))):
        if not (ROOT / path).is_file():
            missing.append(f"{path} (no such file)")
            continue
        module = parsed(path)
        tests = {
            n.name for n in module.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        tests |= {
            m.name
            for c in module.body
            if isinstance(c, ast.ClassDef)
            for m in c.body
            if isinstance(m, ast.FunctionDef)
        }
        if name not in tests:
            missing.append(f"{path}::{name}")
    assert not missing, f"{MAP.name} names tests that do not exist: {missing}"


def test_cli_references_exist(capsys):
    """`python -m lminf_min.eval ppl`: the module exists, and if its main takes sub-commands, this
    one is among them (`main([sub, "--help"])` exits 0, not 2)."""
    refs = CLI_REF.findall(text())
    assert refs
    missing = []
    for module, rest in refs:
        if not (ROOT / (module.replace(".", "/") + ".py")).is_file():
            missing.append(module)
            continue
        words, main = rest.split(), getattr(importlib.import_module(module), "main", None)
        if words and not words[0].startswith("-") and main is not None:
            with pytest.raises(SystemExit) as e:
                main([words[0], "--help"])
            if e.value.code != 0:
                missing.append(f"{module} {words[0]}")
    capsys.readouterr()
    assert not missing, f"{MAP.name} names commands that do not exist: {missing}"
