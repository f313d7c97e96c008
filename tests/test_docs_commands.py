"""Every command in the README's and docs' ```bash blocks is listed in docs/commands.md with its
runtime, and the ones that take under a minute run as written here, in a fresh copy of the
repository (so nothing committed changes)."""

import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def documented():
    """(file, command) for each command line of each ```bash block (continuation lines joined)."""
    found = []
    for path in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if line.strip() and not line.strip().startswith("#"):
                    found.append((path.name, re.sub(r"\s+", " ", line.split("  #")[0].strip())))
    return found


def listed():
    """docs/commands.md's table: command -> (runtime, expected exit code or None if CI does not run
    it here)."""
    rows = {}
    for line in (ROOT / "docs" / "commands.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            command = re.sub(r"\s+", " ", cells[0].strip("`").replace("\\|", "|"))
            code = re.search(r"CI, exit (\d+)", cells[3])
            rows[command] = (cells[1], int(code[1]) if code else None)
    return rows


def test_every_documented_command_is_listed_with_its_runtime():
    missing = [f"{f}: {c}" for f, c in documented() if c not in listed()]
    assert not missing, "add these to docs/commands.md:\n" + "\n".join(missing)
    assert all(runtime for runtime, _ in listed().values())


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory):
    """The tracked files of the repository, with ../shared beside them, as a new user's clone has
    them."""
    base = tmp_path_factory.mktemp("clone")
    files = subprocess.run(
        ["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (base / "main" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, base / "main" / name)
    (base / "shared").symlink_to(ROOT.parent / "shared")
    return base / "main"


QUICK = [(c, code) for c, (runtime, code) in listed().items() if code is not None]


@pytest.mark.parametrize("command,code", QUICK, ids=[c[:60] for c, _ in QUICK])
def test_quick_commands_run_as_written(fresh_copy, command, code):
    env = dict(os.environ, PYTHONPATH=str(fresh_copy))
    r = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        cwd=fresh_copy,
        env=env,
        timeout=120,
    )
    assert r.returncode == code, (
        f"exit {r.returncode}, expected {code}\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}"
    )
    assert "Traceback" not in r.stderr, r.stderr[-1500:]
