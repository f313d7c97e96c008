"""The README's line counts are true: code lines only (no blanks, comments or docstrings), as DESIGN.md §3 counts."""
import io
import re
import tokenize

from conftest import ROOT

INSTRUMENTS = ("eval", "diagnose", "bench", "exercises")


def code_lines(path):
    lines, prev = set(), tokenize.INDENT
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        if tok.type == tokenize.STRING and prev in (tokenize.INDENT, tokenize.NEWLINE, tokenize.DEDENT):
            prev = tok.type
            continue  # a docstring
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            lines.update(range(tok.start[0], tok.end[0] + 1))
        if tok.type not in (tokenize.COMMENT, tokenize.NL):
            prev = tok.type
    return len(lines)


def counts():
    files = sorted((ROOT / "lminf_min").rglob("*.py")) + [ROOT / "weights.py", ROOT / "generate.py"]
    per_file = {str(f.relative_to(ROOT)): code_lines(f) for f in files}
    instrument = lambda name: name.startswith("lminf_min/") and name.split("/")[1].removesuffix(".py") in INSTRUMENTS
    method = sum(n for f, n in per_file.items() if not instrument(f))
    return method, sum(n for f, n in per_file.items() if instrument(f)), per_file


def test_readme_line_counts_are_current():
    method, instruments, per_file = counts()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    stated = re.search(r"the method: (\d+) code lines; the instruments: (\d+)", readme)
    assert stated, "README.md must state 'the method: N code lines; the instruments: M'"
    assert (int(stated[1]), int(stated[2])) == (method, instruments), f"actual: method {method}, instruments {instruments}; per file {per_file}"
    for name, n in per_file.items():
        base = name.rsplit("/", 1)[-1]  # the tree lists files under their folder
        assert n == 0 or re.search(rf"\b{re.escape(base)}\s.*\b{n} lines", readme), f"README.md file tree should say {name} has {n} lines"


def test_within_budget():
    method, instruments, _ = counts()
    assert method <= 1100 and instruments <= 900, (method, instruments)
