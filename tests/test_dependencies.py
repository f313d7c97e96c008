"""Every third-party package the code imports is declared in pyproject.toml (a fresh install has
it).

The package and the two scripts may import only the runtime dependencies; the tests (and the worked
solutions they load) may also import the test extra. Module names are mapped to the distributions
that provide them with importlib.metadata, so `import yaml` would need `PyYAML` declared.
"""

import ast
import importlib.metadata
import re
import sys

import pytest

from conftest import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

LOCAL = {"lminf_min", "weights", "generate"} | {p.stem for p in (ROOT / "tests").glob("*.py")}


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = lambda reqs: {canonical(re.match(r"[A-Za-z0-9._-]+", r)[0]) for r in reqs}
    runtime = names(project["dependencies"])
    return runtime, runtime | names(project["optional-dependencies"]["test"])


def imported(files):
    """{top-level module: first file importing it} for the absolute, non-stdlib imports in files."""
    found = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                mods = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top not in sys.stdlib_module_names and top not in LOCAL:
                    found.setdefault(top, path.name)
    return found


def undeclared(files, allowed):
    providers = importlib.metadata.packages_distributions()
    missing = []
    for mod, path in sorted(imported(files).items()):
        dists = {canonical(d) for d in providers.get(mod, [])}
        if not dists & allowed:
            missing.append(f"{path} imports {mod} (from {sorted(dists) or 'no installed package'})")
    return missing


def test_runtime_imports_are_runtime_dependencies():
    runtime, _ = declared()
    files = sorted((ROOT / "lminf_min").rglob("*.py")) + [ROOT / "weights.py", ROOT / "generate.py"]
    missing = undeclared(files, runtime)
    assert not missing, "declare in [project] dependencies: " + "; ".join(missing)


def test_test_imports_are_declared():
    _, with_tests = declared()
    files = sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "docs").rglob("*.py"))
    missing = undeclared(files, with_tests)
    assert not missing, "declare in dependencies or the test extra: " + "; ".join(missing)


def test_the_scan_sees_an_undeclared_import(tmp_path):
    """The check can fail: pytest is installed here but is not a runtime dependency."""
    probe = tmp_path / "probe.py"
    probe.write_text("import numpy.linalg\nimport pytest\nfrom os import path\nfrom . import x\n")
    runtime, _ = declared()
    assert sorted(imported([probe])) == ["numpy", "pytest"]
    assert undeclared([probe], runtime) == ["probe.py imports pytest (from ['pytest'])"]
