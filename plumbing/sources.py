"""What to read: a folder, a video file or a list of them, and the one name of each video that every
machine agrees on, the key every tool's rows are sharded, stored and resumed under.

A video has two spellings. Its path is where this machine opens it (absolute, normalized): another
node, or a requeue that mounts the share elsewhere, spells it otherwise. Its name is what every node
calls it, whatever the mount, the symlink or the folder a tool runs from:
  - in a folder given as the source: its path inside that folder (`season1/ep01.mkv`);
  - in a list file (or a labels file): the path as the list writes it, normalized (`./a//b.mp4` is
    `a/b.mp4`; an absolute line stays absolute), never where the list itself is kept;
  - a single video file given alone: its file name.
Rows carry both ("video": the path, "name": the name); shards (`--shard K/N`, torchrun's ranks) and
resume go by the name. A row from before names is known by its path as far as this machine can.
"""

import os
import zlib

TS_EXTENSIONS = {".ts", ".m2ts", ".mts", ".m2t"}   # MPEG-TS: so opened when the probe is unsure
VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov", ".gif", ".mpg", ".mpeg",
                    ".flv", ".wmv", ".3gp", ".ogv"} | TS_EXTENSIONS


UNREADABLE = "unreadable_video"


class VideoError(Exception):
    """A file that cannot give frames; the message says which file and why. `code` says whether
    another try could help: UNREADABLE (the file itself: no), or, from the decode workers
    (plumbing/workers.py), a failure of the process that decoded it (a time or memory limit, a
    crash), which may not happen again."""

    def __init__(self, message, code=UNREADABLE):
        super().__init__(message)
        self.code = code

    def __reduce__(self):
        return VideoError, (str(self), self.code)


class Video(str):
    """A video's path on this machine, with `name`: what every machine calls it (see above)."""

    def __new__(cls, path: str, name: str):
        video = super().__new__(cls, path)
        video.name = name
        return video

    def __reduce__(self):   # the decode workers get the name too
        return Video, (str(self), self.name)


def canonical(path: str) -> str:
    """This machine's one spelling of a path: `vids/a.mp4`, `./vids//a.mp4` and
    `/home/me/vids/a.mp4` (run from /home/me) are one file."""
    return os.path.normpath(os.path.abspath(path))


def written(path: str) -> str:
    """A path as a list writes it, normalized but never made absolute: the name of a listed
    video."""
    return os.path.normpath(path).replace(os.sep, "/")


def in_shard(name: str, shard) -> bool:
    """Is the video called `name` in shard (K, N)? By a hash of its name alone, so that every node
    agrees whatever its mount, its list order or what else it sees."""
    k, n = shard
    return zlib.crc32(os.fsencode(name)) % n == k


def row_name(row, names=None):
    """The name a row is for: its "name", or for a row that has none (written before names) the name
    `names` ({path: name}, this run's videos) gives its path, else its path as written. None for a
    row that names no video."""
    name, video = row.get("name"), row.get("video")
    if isinstance(name, str) and name:
        return name
    if not isinstance(video, str) or not video:
        return None
    return (names or {}).get(canonical(video)) or written(video)


def find_videos(source: str) -> list:
    """A folder (searched recursively for video files), one video file, or a list file: one path a
    line, or JSONL with a "video" field (relative paths are relative to the list file), in UTF-8 (a
    BOM is fine) or UTF-16. Videos (paths with their names), each once, sorted by name in a folder;
    file names that are not UTF-8 as Python holds them (os.fsdecode's escapes), so they reopen. No
    video at all: ValueError."""
    import json
    if os.path.isdir(source):
        paths = [os.path.join(root, f) for root, files in _walk(source) for f in files
                 if os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS]
        found = sorted((Video(canonical(p), written(os.path.relpath(p, source))) for p in paths),
                       key=lambda v: v.name)
        if not found:
            raise ValueError(f"{source}: no videos found (the extensions looked for: "
                             f"{' '.join(sorted(VIDEO_EXTENSIONS))})")
        return found
    if not os.path.exists(source):
        raise FileNotFoundError(f"{source}: no such file or folder")
    if os.path.splitext(source)[1].lower() not in (".txt", ".jsonl", ".list"):
        return [Video(canonical(source), os.path.basename(canonical(source)))]
    base = video_base(source)
    with open(source, "rb") as f:
        data = f.read()
    text = (
        data.decode("utf-16")
        if data[:2] in (b"\xff\xfe", b"\xfe\xff")
        else data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")
    )  # names as the file system holds them
    videos, seen, lines = [], set(), text.split("\n")   # not splitlines(): a row may hold U+2028
    for i, line in enumerate(lines, 1):
        line, name = line.strip(), None
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                row = json.loads(line)
                # a labels file: its names
                line, name = row.get("video") or row["image"], row.get("name")
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                # cut off by a run that was killed: not a row
                if i == len(lines) and not text.endswith("\n"):
                    break
                line = None
            if not isinstance(line, str) or not line:
                raise ValueError(
                    f"{source}:{i}: a JSONL row needs a \"video\" field holding a path"
                )
        path = canonical(os.path.join(base, line))   # an absolute line stays as it is
        # listed twice, spelled two ways, through links: one video
        if os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            videos.append(Video(path, name if isinstance(name, str) and name else written(line)))
    if not videos:
        raise ValueError(f"{source}: the list names no videos")
    clash = collision((v.name, str(v)) for v in videos)
    if clash:
        raise NameCollision(*clash, source)
    return videos


def _walk(folder):
    """(folder, files) of every folder under `folder`, symlinked ones followed, each real folder
    once (a link to a folder above is a loop, walked no further)."""
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
    """The folder that a list's (or a labels file's) relative paths are relative to: its own."""
    return canonical(source) if os.path.isdir(source) else os.path.dirname(canonical(source))


def names_of(videos) -> dict:
    """{path: name} of these videos (for rows written before names: row_name)."""
    return {str(v): v.name for v in videos}


def paired(ours: dict, theirs: dict) -> dict:
    """{our key: their key} of the videos two files share ({(name, shot): path} each, made from two
    sources): the same file on this machine (through any mount, link or hard link), else the same
    name and shot unless both files are here and differ (`a.mp4` of videos/ is not that of
    videos/test/)."""
    here = {(identity(path), k[1]): k for k, path in theirs.items() if identity(path)}
    out = {}
    for k, path in ours.items():
        found = here.get((identity(path), k[1])) if identity(path) else None
        if found is None and k in theirs and not (identity(path) and identity(theirs[k])):
            found = k
        if found is not None:
            out[k] = found
    return out


def identity(path: str):
    """(device, inode) of the file at `path` on this machine, through any link; None if none is
    there."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def collision(rows):
    """The first (name, path, other path) of two different files on this machine under one name
    ((name, path) pairs: a list or labels file made from two folders, say), or None. Paths that are
    not here (another node's mount) may be one video: they do not collide."""
    first = {}
    for name, path in rows:
        other = first.setdefault(name, path)
        if (
            other != path
            and identity(other)
            and identity(path)
            and identity(other) != identity(path)
        ):
            return name, other, path
    return None


class NameCollision(ValueError):
    def __init__(self, name, a, b, where):
        super().__init__(
            f"{where}: two different videos are both named {name!r} ({a} and {b}): a name is "
            f"the path inside the folder given, so label (or caption) them from their common "
            f"folder, or write each folder's rows to an --out of its own"
        )
