"""The tree as a reader meets it: the linter's rules hold (ruff.toml: pyflakes' errors, lines of
at most 100 characters), no file is excused from them, and no Python file runs past 400 lines."""

import os
import subprocess
import sys

from tools import ROOT


SKIP = ("__pycache__", "toy_out", "runs")   # and hidden folders: what a run leaves, not the code


def python_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIP]
        yield from (os.path.relpath(os.path.join(folder, f), ROOT)
                    for f in files if f.endswith(".py"))


def test_the_linter_passes_on_the_whole_tree():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]


def test_no_file_is_excused_none_runs_past_400_lines_or_100_bytes_a_line_or_two_blank_lines():
    """ruff counts characters and obeys `noqa`; here every line is held to 100 bytes, so neither
    a `noqa` nor non-ASCII text lets a long line through."""
    with open(os.path.join(ROOT, "ruff.toml")) as f:
        assert "per-file-ignores" not in f.read(), "ruff.toml excuses files from its rules"
    long, gaps, lengths = [], [], {}
    for name in python_files():
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            lines = f.read().split("\n")
        lengths[name] = len(lines) - (lines[-1] == "")
        long += [f"{name}:{i}" for i, line in enumerate(lines, 1) if len(line.encode()) > 100]
        gaps += [name] * ("\n\n\n\n" in "\n".join(lines))   # more than two blank lines
    assert not long, long
    assert not gaps, gaps
    assert max(lengths.values()) <= 400, {n: k for n, k in lengths.items() if k > 400}
