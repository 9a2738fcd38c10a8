"""What to read: a folder, a video file or a list of them, as canonical paths, the key every tool's
rows are stored and resumed under."""

import os

from data import TS_EXTENSIONS

VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov", ".gif", ".mpg", ".mpeg", ".flv", ".wmv",
                    ".3gp", ".ogv"} | TS_EXTENSIONS


def canonical(path: str) -> str:
    """The one spelling of a path that results are keyed on: `vids/a.mp4`, `./vids//a.mp4` and
    `/home/me/vids/a.mp4` (run from /home/me) are one video, with one row."""
    return os.path.normpath(os.path.abspath(path))


def find_videos(source: str) -> list:
    """A folder (searched recursively for video files), one video file, or a list file: one path a line,
    or JSONL with a "video" field (relative paths are relative to the list file), in UTF-8 (a BOM is
    fine) or UTF-16. Paths come canonical (absolute, normalized), each once; file names that are not
    UTF-8 as Python holds them (os.fsdecode's escapes), so they reopen. No video at all: ValueError."""
    import json
    if os.path.isdir(source):
        found = sorted(canonical(os.path.join(root, f)) for root, files in _walk(source) for f in files
                       if os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS)
        if not found:
            raise ValueError(f"{source}: no videos found (the extensions looked for: "
                             f"{' '.join(sorted(VIDEO_EXTENSIONS))})")
        return found
    if not os.path.exists(source):
        raise FileNotFoundError(f"{source}: no such file or folder")
    if os.path.splitext(source)[1].lower() not in (".txt", ".jsonl", ".list"):
        return [canonical(source)]
    base = video_base(source)
    with open(source, "rb") as f:
        data = f.read()
    text = data.decode("utf-16") if data[:2] in (b"\xff\xfe", b"\xfe\xff") else \
        data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")   # names as the file system holds them
    videos, seen, lines = [], set(), text.split("\n")   # not splitlines(): a row may hold U+2028
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                row = json.loads(line)
                line = row.get("video") or row["image"]
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                if i == len(lines) and not text.endswith("\n"):   # cut off by a run that was killed: not a row
                    break
                line = None
            if not isinstance(line, str) or not line:
                raise ValueError(f"{source}:{i}: a JSONL row needs a \"video\" field holding a path")
        path = canonical(os.path.join(base, line))   # an absolute line stays as it is
        if path not in seen:   # listed twice, perhaps spelled two ways: one video
            seen.add(path)
            videos.append(path)
    if not videos:
        raise ValueError(f"{source}: the list names no videos")
    return videos


def _walk(folder):
    """(folder, files) of every folder under `folder`, symlinked ones followed, each real folder once (a
    link to a folder above is a loop, walked no further)."""
    seen = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        yield root, files


def video_base(source: str) -> str:
    """The folder that a source's videos are named from: the folder itself, or a list's or file's own. A
    path relative to it is the same on every machine, whatever the mount (label.py shards by it)."""
    return canonical(source) if os.path.isdir(source) else os.path.dirname(canonical(source))
