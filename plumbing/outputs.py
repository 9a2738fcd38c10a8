"""Where a tool's rows go (caption.py, label.py): --out locked and read once at the start, the id of the
settings that made each row, and under torchrun the rank files.

One rule for rank files: they belong to the run that makes them. At the start rank 0 (or the only process)
folds any that an earlier run left (a killed torchrun run, say) into --out, their done rows only, or drops
them with --overwrite; then each rank appends to its own, and rank 0 merges them into --out at the end.
"""

import glob
import hashlib
import json
import os
import re

from plumbing.jsonl import Appender, iter_rows
from plumbing.workers import tries_of


def weights_id(folder: str) -> str:
    """What the weights of a model folder are, without reading 15 GB: every file's name and size, the small
    files (config, tokenizer, adapter, index) whole, and of each large one its first MB and 16 blocks of
    64 KB spread through it. New weights written into the same folder get a new id; a copy of the folder
    keeps it."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or name.startswith(".") or name == "prompt.json":   # the prompt: apart
            continue
        size = os.path.getsize(path)
        h.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= 4 << 20:
                h.update(f.read())
                continue
            h.update(f.read(1 << 20))
            for i in range(16):
                f.seek((size - (64 << 10)) * i // 15)
                h.update(f.read(64 << 10))
    return h.hexdigest()[:16]


def settings_id(args, folder: str, prompt: dict, names=None) -> str:
    """What makes a row what it is, as a short hash every row carries: the weights (weights_id, or the
    model's name for a remote one), the prompt, and the flags in `names` (default: caption.py's). How it
    runs (device, dtype, batch size, workers) is not in it."""
    names = names or CAPTION_SETTINGS
    model = weights_id(folder) if folder and os.path.isdir(folder) else args.model
    what = {"model": model, **prompt, **{k: getattr(args, k) for k in names}}
    if getattr(args, "temperature", 0) and "seed" in vars(args):
        what["seed"] = args.seed
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


CAPTION_SETTINGS = ("frames", "pooling_shape", "lora_alpha", "quantize", "max_new_tokens", "temperature", "top_p",
                    "repetition_penalty", "stop", "keyframes_only", "shots", "window", "min_shot", "max_shot")


def rank_files(out):
    return sorted(p for p in glob.glob(glob.escape(out) + ".rank*") if re.fullmatch(r".*\.rank\d+", p))


class Outputs:
    def __init__(self, out: str, rank: int = 0, world: int = 1, overwrite: bool = False):
        self.out, self.rank, self.world, self.overwrite = out, rank, world, overwrite
        self.main = Appender(out, fsync=world > 1, truncate=overwrite) if rank == 0 else None
        self.mine = Appender(f"{out}.rank{rank}", truncate=True) if world > 1 else self.main
        self.shot_counts = {}

    def resume(self, key, done, settings=None, tries=None) -> set:
        """The keys of the rows done, after one read of --out (and of any rank files an earlier run left,
        first folded into it). A row made with other settings stops the run (unless --overwrite); the
        runs that met a failure worth another try are counted in `tries`, the shots of each video in
        self.shot_counts."""
        def look(row):
            if settings and "caption" in row and row.get("settings") != settings:
                raise ValueError(f"{self.out} holds rows made with other settings (model weights, prompt, "
                                 f"frames, pooling, LoRA alpha, quantization, sampling or --shots / --window): "
                                 f"write to another --out, or pass --overwrite to do everything again")
            k = key(row)
            if tries is not None and k is not None and tries_of(row):
                tries[k] = max(tries.get(k, 0), tries_of(row))
            if isinstance(row.get("of"), int) and isinstance(row.get("video"), str):
                self.shot_counts[k[0]] = row["of"]
        keys = set()
        if self.rank == 0:
            self._fold_rank_files(key, done, look)
            keys = self.main.resume(key, done, look)
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
                    if key(row) is not None and done(row):
                        look(row)
                        self.main.write(row)
            os.remove(part)

    def write(self, row):
        self.mine.write(row)

    def finish(self, counts):
        """Every rank's counts summed (a barrier too: every rank has written its rows); rank 0 then merges
        the rank files into --out, keeping the first row of each key, and removes them."""
        if self.world == 1:
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
                    if row.get("video") is not None and (row.get("video"), row.get("shot")) not in seen:
                        seen.add((row.get("video"), row.get("shot")))
                        self.main.write(row)
                os.remove(part)
            self.mine = self.main
        dist.barrier()
        return total.tolist()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for appender in (self.mine, self.main):
            if appender is not None:
                appender.close()
