"""Append-only JSONL results: one row per line, written whole, flushed (and optionally fsynced) as it is made.

A process killed mid-write leaves at most one torn last line. Readers skip it, and `Appender` cuts it off
before appending, so a rerun neither loses a finished row nor writes one twice.
"""

import json
import os


def read_rows(path: str) -> list:
    """Every complete row of a JSONL file ([] if there is none); torn or garbled lines are skipped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break   # torn by a kill mid-write
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _cut_torn_line(path: str):
    """Drop an unfinished last line, reading backwards from the end (files can hold millions of rows)."""
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(max(end - 1, 0))
        if end == 0 or f.read(1) == b"\n":
            return
        pos = end
        while pos > 0:
            step = min(pos, 1 << 16)
            pos -= step
            f.seek(pos)
            i = f.read(step).rfind(b"\n")
            if i >= 0:
                f.truncate(pos + i + 1)
                return
        f.truncate(0)


class Appender:
    def __init__(self, path: str, fsync: bool = False, truncate: bool = False):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if not truncate and os.path.exists(path):
            _cut_torn_line(path)
        self.f = open(path, "w" if truncate else "a", encoding="utf-8")
        self.fsync = fsync

    def write(self, row: dict):
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()
        if self.fsync:
            os.fsync(self.f.fileno())

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
