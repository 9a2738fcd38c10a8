"""Where a tool's rows go (caption.py, label.py): --out locked and read once at the start, the id of
the settings that made each row, and under torchrun the rank files.

One rule for rank files: they belong to the run that makes them. At the start rank 0 (or the only
process) folds any that an earlier run left (a killed torchrun run, say) into --out, their done rows
only, or drops them with --overwrite; then each rank appends to its own, and rank 0 merges them into
--out at the end.
"""

import glob
import hashlib
import json
import os
import re

from plumbing.jsonl import Appender, Busy, cache_dir, hold, iter_rows, replace_atomic
from plumbing.sources import NameCollision, collision
from plumbing.workers import tries_of


def weights_id(folder: str) -> str:
    """What the weights of a model folder are: every file's name and the hash of its whole content.
    A 15 GB folder is read once (about 10 s); the hash is remembered per file (file_hash) for as
    long as its size, mtime, ctime and inode say it cannot have changed. New weights written into
    the same folder, even over the same files at the same size, get a new id; a copy of the folder
    keeps it."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        # the prompt: apart
        if not os.path.isfile(path) or name.startswith(".") or name == "prompt.json":
            continue
        h.update(f"{name}\0{file_hash(path)}\0".encode())
    return h.hexdigest()[:16]


def file_hash(path: str) -> str:
    """The sha256 of a file's content, remembered in file-hashes.json in the cache folder
    (jsonl.cache_dir) under its real path with its size, mtime, ctime and inode (a write changes the
    ctime, which nobody can set)."""
    st = os.stat(path)
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    real = os.path.realpath(path)
    cache = os.path.join(cache_dir(), "file-hashes.json")
    known = _remembered(cache)
    if isinstance(known.get(real), dict) and known[real].get("stamp") == stamp:
        return known[real]["sha256"]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    try:   # remembered if it can be: a read-only home only costs the next run the same read
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with os.fdopen(hold(cache + ".lock", waiting=None), "r"):
            fresh = {**_remembered(cache), real: {"stamp": stamp, "sha256": digest}}
            replace_atomic(cache, lambda f: f.write(json.dumps(fresh).encode()))
    except (OSError, ValueError, Busy):
        pass
    return digest


def _remembered(cache):
    try:
        with open(cache, "rb") as f:
            known = json.loads(f.read())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def settings_id(args, folder: str, prompt: dict, names) -> str:
    """What makes a row what it is, as a short hash every row carries: the weights (weights_id, or
    the model's name for a remote one), the prompt, and the flags in `names` (caption.SETTINGS,
    label.py's). How it runs (device, dtype, batch size, workers) is not in it."""
    model = weights_id(folder) if folder and os.path.isdir(folder) else args.model
    what = {"model": model, **prompt, **{k: getattr(args, k) for k in names}}
    if getattr(args, "temperature", 0) and "seed" in vars(args):
        what["seed"] = args.seed
    if getattr(args, "shots", None) or getattr(args, "window", None):
        what["max_shots"] = args.max_shots
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def rank_files(out):
    return sorted(
        p for p in glob.glob(glob.escape(out) + ".rank*") if re.fullmatch(r".*\.rank\d+", p)
    )


class Outputs:
    def __init__(self, out: str, rank: int = 0, world: int = 1, overwrite: bool = False):
        self.out, self.rank, self.world, self.overwrite = out, rank, world, overwrite
        self.main = Appender(out, fsync=world > 1, truncate=overwrite) if rank == 0 else None
        self.mine = Appender(f"{out}.rank{rank}", truncate=True) if world > 1 else self.main
        self.shot_counts, self.key, self.done, self.retried, self.stale = (
            {},
            None,
            None,
            set(),
            False,
        )

    def resume(self, key, done, settings=None, tries=None, videos=None) -> set:
        """The keys of the rows done, after one read of --out (and of any rank files an earlier run
        left, first folded into it). A row made with other settings stops the run (unless
        --overwrite); the runs that met a failure worth another try are counted in `tries` (and
        their rows stay in --out until the video's next row: a run killed before it keeps the
        count), the shots of each video in self.shot_counts. A row whose video has the name of
        another file of this run's `videos` ({name: path}), both here, stops the run: two folders'
        rows in one file (NameCollision)."""
        self.key, self.done = key, done
        def look(row):
            if settings and "caption" in row and row.get("settings") != settings:
                raise ValueError(
                    f"{self.out} holds rows made with other settings (model weights, prompt, "
                    f"frames, pooling, LoRA alpha, quantization, sampling or --shots / --window; "
                    f"for label.py verify / recheck / audit also the labels file and its flags): "
                    f"write to another --out, or pass --overwrite to do everything again"
                )
            k = key(row)
            mine = videos.get(k[0]) if videos and k is not None else None
            if (mine is not None and row.get("video") != mine and collision([(k[0], row["video"]),
                                                                             (k[0], mine)])):
                raise NameCollision(k[0], row["video"], mine, self.out)
            if tries is not None and k is not None and tries_of(row):
                tries[k] = max(tries.get(k, 0), tries_of(row))
            if isinstance(row.get("of"), int) and isinstance(row.get("video"), str):
                self.shot_counts[k[0]] = row["of"]
        keys = set()
        if self.rank == 0:
            self._fold_rank_files(key, done, look)
            keys = self.main.resume(key, done, look, keep=tries_of)
            self.retried = self.main.kept
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()   # rank 0 has folded and cleaned --out: every rank reads it now
            if self.rank and not self.overwrite:
                for row in iter_rows(os.path.realpath(self.out)):
                    look(row)
                    if key(row) is not None and done(row):
                        keys.add(key(row))
        return keys

    def _fold_rank_files(self, key, done, look):
        for part in rank_files(os.path.realpath(self.out)):
            if not self.overwrite:
                for row in iter_rows(part):
                    if key(row) is not None and (done(row) or tries_of(row)):
                        look(row)
                        self.main.write(row)
            os.remove(part)
            # its killed run's; no rank of ours
            if self.world == 1 and os.path.lexists(part + ".lock"):
                os.remove(part + ".lock")

    def write(self, row):
        self.mine.write(row)
        self._seen(row)

    def _seen(self, row):
        # the "try again" row kept for it is stale now
        if self.retried and self.key(row) in self.retried:
            self.stale = True

    def finish(self, counts):
        """Every rank's counts summed (a barrier too: every rank has written its rows); rank 0 then
        merges the rank files into --out, keeping the first row of each key, and removes them."""
        if self.world == 1:
            self._compact()
            return counts
        import torch
        import torch.distributed as dist
        total = torch.tensor(counts)
        dist.all_reduce(total)
        if self.rank == 0:
            self.mine.close()
            seen = set()
            for part in rank_files(self.main.path):
                for row in iter_rows(part):
                    if self.key(row) is not None and self.key(row) not in seen:
                        seen.add(self.key(row))
                        self.main.write(row)
                        self._seen(row)
                os.remove(part)
            self.mine = self.main
            self._compact()
        dist.barrier()
        return total.tolist()

    def _compact(self):
        """One row a video (or shot) again, when a kept "try again" row has a newer row now."""
        if self.stale and self.main is not None:
            self.main.compact(self.key, self.done)
            self.stale = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.world == 1:
            self._compact()
        for appender in (self.mine, self.main):
            if appender is not None:
                appender.close()
