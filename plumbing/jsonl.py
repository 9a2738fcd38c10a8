"""Append-only JSONL results: one row per line, written whole, flushed (and optionally fsynced) as it is made.

A process killed mid-write (or a full disk) leaves at most one torn last line, cut anywhere, even inside
a UTF-8 character. Readers skip it, and any line that is not a JSON object; `Appender` cuts it off before
appending, but keeps a whole last row that only lacks its newline (another tool wrote it so). While open,
an Appender holds a lock (FILE.lock, removed at the end), so a second run writing the same file stops at once
instead of doubling its rows.
"""

import json
import os


class Busy(Exception):
    """Another process is writing this file."""


def _parse(line: bytes):
    try:
        row = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):   # not UTF-8 (a ValueError too), not JSON, or [[[[... too deep
        return None
    return row if isinstance(row, dict) else None


def iter_rows(path: str, must_exist: bool = False):
    """Every whole row of a JSONL file, one at a time (nothing if there is no file, unless must_exist)."""
    if not os.path.exists(path):
        if must_exist:
            raise FileNotFoundError(f"{path}: no such file")
        return
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: a folder, not a JSONL file")
    with open(path, "rb") as f:
        for line in f:
            row = _parse(line)
            if row is not None:
                yield row


def read_rows(path: str, must_exist: bool = False) -> list:
    return list(iter_rows(path, must_exist))


def _line(row: dict) -> bytes:
    text = json.dumps(row, ensure_ascii=False)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:   # a lone surrogate: a file name that is not UTF-8, as Python holds it
        return (json.dumps(row) + "\n").encode()   # \udcff escapes: valid UTF-8, read back to the same name


def _mend_last_line(f):
    """Cut an unfinished last line, reading backwards from the end (files can hold millions of rows); a
    last line that is a whole row gets its newline instead."""
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
            pos += i + 1
            break
    f.seek(pos)
    if _parse(f.read()) is not None:
        f.write(b"\n")
    else:
        f.truncate(pos)


def _lock(path: str) -> int:
    """An exclusive lock on path + ".lock", held as long as the returned descriptor is open (_unlock
    removes the file; a lock taken on a file that was removed meanwhile is taken again on the new one)."""
    import fcntl
    while True:
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise Busy(f"{path} is being written by another run (pid {other}): wait for it to end, or use "
                       f"another output") from None
        try:
            if os.stat(path + ".lock").st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _unlock(path: str, fd: int):
    os.unlink(path + ".lock")   # while still held: whoever opens the old file next sees it is gone
    os.close(fd)


class Appender:
    def __init__(self, path: str, fsync: bool = False, truncate: bool = False):
        path = os.path.realpath(path)   # a symlink's target: one lock, and a rewrite keeps the link
        if os.path.exists(path) and not os.path.isfile(path):
            raise ValueError(f"{path}: not a regular file (a folder or a device cannot take rows)")
        self.path, self.fsync = path, fsync
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.lock = _lock(path)
        try:
            if truncate:
                open(path, "wb").close()
            elif os.path.exists(path):
                with open(path, "rb+") as f:
                    _mend_last_line(f)
            self.f = open(path, "ab", buffering=0)   # one write() per row: never half a row from a buffer
        except BaseException:
            _unlock(path, self.lock)
            raise

    def write(self, row: dict):
        rest = memoryview(_line(row))
        while rest:   # a short write (the disk filled up) is finished, or raises: never silently half a row
            rest = rest[self.f.write(rest):]
        if self.fsync:
            os.fsync(self.f.fileno())

    def rewrite(self, rows):
        """Replace the file's rows with `rows` (atomically: a kill leaves the old file whole), and go on
        appending to the new one."""
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            for row in rows:
                f.write(_line(row))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.f.close()
        self.f = open(self.path, "ab", buffering=0)

    def settle(self, key, done) -> set:
        """Where a rerun starts: the keys of the rows that are done. Rows that are not (failures worth
        another try), rows without a key, and repeats of a key already done are dropped from the file first,
        so that when the run ends every key has exactly one row."""
        def kept():
            seen = set()
            for row in iter_rows(self.path):
                k = key(row)
                if k is not None and k not in seen and done(row):
                    seen.add(k)
                    yield row
        keys = {key(row) for row in kept()}
        total = sum(1 for _ in iter_rows(self.path))
        if len(keys) < total:
            self.rewrite(kept())
        return keys

    def close(self):
        self.f.close()
        _unlock(self.path, self.lock)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
