"""Append-only JSONL results: one row per line, written whole, flushed (and optionally fsynced) as
it is made.

A process killed mid-write (or a full disk) leaves at most one torn last line, cut anywhere, even
inside a UTF-8 character. Readers skip it, and any line that is not a JSON object; `Appender` cuts
it off before appending, but keeps a whole last row that only lacks its newline (another tool wrote
it so). While open, an Appender holds a lock (FILE.lock, removed at the end), so a second run
writing the same file stops at once instead of doubling its rows. Neither the lock nor a rewrite's
temporary file follows a planted symlink. Beside them, the other files read from outside: a JSON
object (read_json), and a file name a model's index gives (safe_name: never outside its folder).
"""

import errno
import json
import os
import sys
import tempfile


class Busy(Exception):
    """Another process is writing this file."""


def _parse(line: bytes):
    try:
        row = json.loads(line.decode("utf-8"))
    # not UTF-8 (a ValueError too), not JSON, or [[[[... too deep
    except (ValueError, RecursionError):
        return None
    return row if isinstance(row, dict) else None


def iter_rows(path: str, must_exist: bool = False):
    """Every whole row of a JSONL file, one at a time (nothing if there is no file, unless
    must_exist)."""
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
    # a lone surrogate: a file name that is not UTF-8, as Python holds it
    except UnicodeEncodeError:
        # \udcff escapes: valid UTF-8, read back to the same name
        return (json.dumps(row) + "\n").encode()


def _mend_last_line(f):
    """Cut an unfinished last line, reading backwards from the end (files can hold millions of
    rows); a last line that is a whole row gets its newline instead."""
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


def hold(lock_path: str, waiting: str = None) -> int:
    """An exclusive lock on the file lock_path (made if need be; a symlink planted there is refused,
    never followed), held as long as the returned descriptor is open. Held by another process: Busy,
    or with `waiting`, that line said once and the lock waited for. A lock file its holder removed
    meanwhile (_unlock) is taken again on the new one."""
    import fcntl
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise ValueError(
                f"{lock_path} is a symbolic link: remove it (a lock is never followed)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is None:
                other = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise Busy(
                    f"{lock_path[:-5]} is being written by another run (pid {other}): wait for it "
                    f"to end, or use another output"
                ) from None
            print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _lock(path: str) -> int:
    """The lock of a JSONL file: FILE.lock, holding the writer's pid."""
    fd = hold(path + ".lock")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _unlock(path: str, fd: int):
    os.unlink(path + ".lock")   # while still held: whoever opens the old file next sees it is gone
    os.close(fd)


def cache_dir() -> str:
    """The folder for what is kept between runs (downloads, file hashes, measured choices):
    $PLLAVA_CACHE, else $XDG_CACHE_HOME/pllava, else ~/.cache/pllava."""
    return os.environ.get("PLLAVA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pllava")


def replace_atomic(path: str, write):
    """write(f) into a new temporary file beside `path` (a name of its own, created exclusively:
    nothing planted there is followed or overwritten), fsynced, then renamed over `path`: a kill
    leaves the old file whole."""
    fd, tmp = tempfile.mkstemp(
        dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Appender:
    """Rows appended to a JSONL file under its lock. The file itself is made at the first row, so a
    run that stops before it has anything to write leaves nothing behind."""

    def __init__(self, path: str, fsync: bool = False, truncate: bool = False):
        path = os.path.realpath(path)   # a symlink's target: one lock, and a rewrite keeps the link
        if os.path.exists(path) and not os.path.isfile(path):
            raise ValueError(f"{path}: not a regular file (a folder or a device cannot take rows)")
        self.path, self.fsync, self.truncate, self.f = path, fsync, truncate, None
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.lock = _lock(path)
        try:
            if os.path.exists(path) and not truncate:
                with open(path, "rb+") as f:
                    _mend_last_line(f)
        except BaseException:
            _unlock(path, self.lock)
            raise

    def write(self, row: dict):
        if self.f is None:   # one write() per row (no buffer): never half a row from a buffer
            self.f = open(self.path, "wb" if self.truncate else "ab", buffering=0)
            self.truncate = False
        rest = memoryview(_line(row))
        # a short write (the disk filled up) is finished, or raises: never silently half a row
        while rest:
            rest = rest[self.f.write(rest):]
        if self.fsync:
            os.fsync(self.f.fileno())

    def rewrite(self, rows):
        """Replace the file's rows with `rows` (atomically: a kill leaves the old file whole), and
        go on appending to the new one."""
        replace_atomic(self.path, lambda f: f.writelines(map(_line, rows)))
        if self.f is not None:
            self.f.close()
            self.f = None
        self.truncate = False

    def resume(self, key, done, look=None, keep=None) -> set:
        """Where a rerun starts: the keys of the rows that are done. The file is read once;
        look(row) sees every row on the way (and may raise: nothing is changed then). Rows that are
        not done (failures worth another try), rows without a key, and repeats of a key already done
        are then dropped from the file (a second read, only when there are such rows), except for a
        key with no done row the last row that keep(row) holds (the count of its tries, say), named
        in self.kept: until this run writes that key's next row, and compact() drops it. With
        truncate (--overwrite) nothing is read."""
        self.kept = set()
        if self.truncate:
            return set()
        keys, last, total = set(), {}, 0
        for i, row in enumerate(iter_rows(self.path)):
            total += 1
            if look:
                look(row)
            k = key(row)
            if k is not None and done(row):
                keys.add(k)
            elif k is not None and keep and keep(row):
                last[k] = i
        last = {k: i for k, i in last.items() if k not in keys}
        self.kept = set(last)
        if len(keys) + len(last) < total:
            self.rewrite(self._kept(key, done, set(last.values())))
        return keys

    def _kept(self, key, done, also=()):
        seen = set()
        for i, row in enumerate(iter_rows(self.path)):
            k = key(row)
            if k is not None and ((k not in seen and done(row)) or i in also):
                seen.add(k)
                yield row

    def compact(self, key, done):
        """One row a key: its first done row, else its last; rows without a key go."""
        rows, last = {}, {}
        for i, row in enumerate(iter_rows(self.path)):
            k = key(row)
            if k is not None:
                last[k] = i
                if done(row) and k not in rows:
                    rows[k] = i
        chosen = set(rows.values()) | {i for k, i in last.items() if k not in rows}
        self.rewrite(row for i, row in enumerate(iter_rows(self.path)) if i in chosen)

    def close(self):
        if self.lock is None:   # closed already
            return
        if self.f is not None:
            self.f.close()
        _unlock(self.path, self.lock)
        self.lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_json(path) -> dict:
    """A JSON object from a file; {} when there is no file; ValueError when it is not a JSON
    object."""
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        value = json.load(f)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object")
    return value


class ModelFolderError(ValueError):
    pass


def safe_name(name) -> str:
    """A file name from an index (model.safetensors.index.json) as it is, or ModelFolderError when
    it would land outside its folder, or on a file of our own there (.complete, .lock,
    *.partial)."""
    parts = name.split("/") if isinstance(name, str) else [""]
    if any(p in ("", ".", "..") or "\\" in p or "\0" in p or ":" in p for p in parts):
        raise ModelFolderError(f"the index names a file {name!r} outside the model folder: "
                               f"refused")
    if parts[-1].startswith(".") or parts[-1].endswith((".partial", ".partial.json", ".again")):
        raise ModelFolderError(f"the index names a file {name!r} that only this cache may write: "
                               f"refused")
    return name
