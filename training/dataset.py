"""Training data: JSONL rows -> (frames, token ids, labels), and the order they are seen in.

Three row shapes are understood, detected file by file:
  {"video": ..., "caption": ...}
      what label.py writes (rows with "error" are skipped)
  {"video": ..., "QA": [{"i": ..., "q": ..., "a": ...}]}
      PLLaVA / VideoChat2 instruction data
  {"video"|"image": ..., "conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}
      LLaVA
An "image" is one frame repeated to the clip length, as the model repeats short clips.

The order is a pure function of (seed, step): step s of epoch e takes the s-th block of a
permutation seeded by (seed, e), and rank r takes its slice of each micro-batch. Resuming needs
only the step, and one process with batch 4 sees the same global batches as two with batch 2.
"""

import json
import math
import os
import sys
import threading

import numpy as np
import torch

from data import VideoError, read_sample
from plumbing.workers import imap_unordered
from tokenizer import training_ids


def _text(value, what):
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} is not a text")
    try:
        value.encode("utf-8")
    # a lone surrogate ("\\ud800" in the JSON): no tokenizer can take it
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode") from None
    return value


def _turns(row, kind, prompt):
    """([(question, answer), ...], system or None) of one row; ValueError naming what is wrong with
    it."""
    if kind == "caption":
        return [(prompt, _text(row["caption"], "caption"))], None
    if kind == "qa":
        qa = row["QA"]
        if not isinstance(qa, list) or not qa or not all(isinstance(t, dict) for t in qa):
            raise ValueError("QA is not a list of {q, a} objects")
        system = qa[0].get("i")
        return [(_text(t.get("q"), "a QA q"), _text(t.get("a"), "a QA a")) for t in qa], \
            (system if isinstance(system, str) and system else None)
    messages = row["conversations"]
    if not isinstance(messages, list) or len(messages) < 2 or len(messages) % 2 or \
            not all(isinstance(m, dict) for m in messages):
        raise ValueError("conversations is not a list of human / gpt turns")
    questions = [
        _text(m.get("value"), "a conversation value").replace("<image>", "").strip()
        for m in messages[0::2]
    ]
    return list(zip(questions,
                    [_text(m.get("value"), "a conversation value") for m in messages[1::2]])), None


SHAPES = (("caption", "caption"), ("QA", "qa"), ("conversations", "llava"))   # (field, row shape)


def _span(row):
    """A shot's (start, end) in seconds when the row carries them (caption.py --shots, label.py
    --shots)."""
    if "start" not in row and "end" not in row:
        return None
    start, end = row.get("start"), row.get("end")
    try:
        ok = all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(float(x))
                 for x in (start, end)) and 0 <= start < end
    except OverflowError:   # 10**400: an int no float holds
        ok = False
    if not ok:
        raise ValueError("start / end are not a span of seconds")
    return float(start), float(end)


def read_samples(paths, video_root=None, prompt=None):
    """[(media path, is_image, [(question, answer), ...], system or None, span or None)] from JSONL
    files (a plain caption's question is `prompt`, None: the run's, told later); how many rows were
    left out on purpose (error rows of label.py, empty captions, rows of another shape); and the
    rows that are broken (not JSON, not UTF-8, a field of the wrong type) as "file:line: why"."""
    samples, dropped, bad = [], 0, []
    for path in paths:
        shape = None   # decided by the file's first row that has one of the fields
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.decode("utf-8"))
                    if not isinstance(row, dict):
                        raise ValueError("not a JSON object")
                    shape = shape or next((s for field, s in SHAPES if field in row), None)
                    field = next((f for f, s in SHAPES if s == shape), None)
                    media = row.get("video") or row.get("image")
                    if "error" in row or not media or not field or not row.get(field):
                        dropped += 1
                        continue
                    media = _text(media, "video / image")
                    turns, system = _turns(row, shape, prompt)
                    span = _span(row)
                # not UTF-8, not JSON (or nested past reading), wrong types
                except (ValueError, RecursionError) as e:
                    bad.append(f"{path}:{n}: {str(e)[:100] or type(e).__name__}")
                    continue
                # a row's name (label.py, caption.py) is inside the folder it was made from
                if video_root:
                    name = (row.get("name") if isinstance(row.get("name"),
                                                          str) and row["name"] else media)
                    media = media if os.path.isabs(name) else os.path.join(video_root, name)
                samples.append((media, "video" not in row, turns, system, span))
    return samples, dropped, bad


class TrainSet:
    """Samples by key (epoch, index). job(key) is what a decode worker reads (data.read_sample);
    sample(key, frames) -> dict(frames (T, S, S, 3) uint8, ids, labels, skipped). A sample whose
    frames could not be read (a VideoError: a broken file, a decoder's time or memory limit, its
    crash) is a stand-in with no loss (black frames, labels all -100), so every rank still runs the
    same forward passes (FSDP's collectives need that), with its reason in `skipped`."""

    def __init__(self, samples, tok, prompt, frames, size, seed=0, mode="random", max_tokens=1024):
        """prompt: {"question", "system", "template"}, the question paired with plain captions, the
        system line of rows that bring none."""
        self.samples, self.tok, self.prompt = samples, tok, prompt
        self.frames, self.size, self.seed, self.mode, self.max_tokens = (
            frames,
            size,
            seed,
            mode,
            max_tokens,
        )

    def __len__(self):
        return len(self.samples)

    def job(self, key):
        """(key, path, is_image, frames, size, mode, seed, span): the same frames whichever rank
        reads them; a path of None for padding (an uneven evaluation split), which is never
        read."""
        epoch, index = key
        if index is None:
            return (key, None, False, 0, 0, "", None, None)
        media, is_image, _, _, span = self.samples[index]
        return (
            key,
            media,
            is_image,
            self.frames,
            self.size,
            self.mode,
            [self.seed, epoch, index],
            span,
        )

    def sample(self, key, frames):
        epoch, index = key
        if index is None:
            return self._stand_in(None)
        media, _, turns, system, _ = self.samples[index]
        # a plain caption: the question asked
        turns = [(q or self.prompt["question"], a) for q, a in turns]
        ids, labels = training_ids(
            self.tok, turns, self.prompt["template"], system or self.prompt["system"]
        )
        ids, labels = ids[:self.max_tokens], labels[:self.max_tokens]
        if isinstance(frames, VideoError) or frames is None:
            return self._stand_in(str(frames) if frames is not None else f"{media}: not read", ids)
        return dict(frames=frames, ids=ids, labels=labels, skipped=None)

    def _stand_in(self, reason, ids=None):
        ids = ids or [self.tok.bos_id, self.tok.image_id]
        return dict(frames=np.zeros((self.frames, self.size, self.size, 3), np.uint8), ids=ids,
                    labels=[-100] * len(ids), skipped=reason)


class Batches:
    """The sampler's micro-batches, collated, in order, their media decoded in worker processes
    while the model trains, `ahead` micro-batches in advance: as caption.py decodes
    (plumbing/workers.py), each sample under a time and a memory limit, so a file that hangs or
    crashes FFmpeg is that sample's stand-in, reported with its path, and no rank waits on it."""

    def __init__(
        self, trainset, batch_sampler, pad_id, workers=2, timeout=300.0, memory_gb=8.0, ahead=2
    ):
        self.trainset, self.batch_sampler, self.pad_id = trainset, batch_sampler, pad_id
        self.workers, self.timeout, self.memory_gb, self.ahead = (
            max(1, workers),
            timeout,
            memory_gb,
            ahead,
        )

    def __iter__(self):
        room = threading.Semaphore(self.ahead)

        def jobs():
            for keys in self.batch_sampler:
                room.acquire()   # released as the loop below hands a micro-batch on
                yield from (job for job in map(self.trainset.job, keys) if job[1] is not None)
        stream = imap_unordered(read_sample, jobs(), workers=self.workers, timeout=self.timeout,
                                memory_gb=self.memory_gb, buffer=2 * self.workers)
        got = {}
        try:
            # the same order again: the sampler is a function of the step
            for keys in self.batch_sampler:
                while any(k not in got for k in keys if k[1] is not None):
                    job, frames = next(stream)
                    got[job[0]] = frames
                room.release()
                yield collate(
                    [self.trainset.sample(k, got.pop(k, None)) for k in keys], self.pad_id
                )
        finally:
            stream.close()


def collate(items, pad_id):
    """Right-padded ids and labels (B, L), frames (B, T, S, S, 3) uint8, and the skipped videos'
    reasons. Right padding needs no attention mask: causal attention never looks ahead at the
    padding."""
    L = max(len(x["ids"]) for x in items)
    ids = torch.full((len(items), L), pad_id, dtype=torch.long)
    labels = torch.full((len(items), L), -100, dtype=torch.long)
    for b, x in enumerate(items):
        ids[b, :len(x["ids"])] = torch.tensor(x["ids"])
        labels[b, :len(x["labels"])] = torch.tensor(x["labels"])
    # a batch of stills stays one frame long; mixed, stills repeat
    T = max(len(x["frames"]) for x in items)
    frames = torch.from_numpy(
        np.stack(
            [
                np.repeat(x["frames"], T // len(x["frames"]), 0)
                if len(x["frames"]) < T
                else x["frames"]
                for x in items
            ]
        )
    )
    return dict(ids=ids, labels=labels, frames=frames,
                skipped=[x["skipped"] for x in items if x["skipped"]])


class StepSampler(torch.utils.data.Sampler):
    """This rank's micro-batches of keys (epoch, index), step after step, from `start` to
    `steps`."""

    def __init__(self, n, batch, accum, rank, world, seed, start, steps):
        self.n, self.batch, self.accum, self.rank, self.world = n, batch, accum, rank, world
        self.seed, self.start, self.steps = seed, start, steps
        self.per_step = batch * world * accum
        self.steps_per_epoch = n // self.per_step
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} samples are fewer than one global batch ({self.per_step})")

    def __len__(self):
        return (self.steps - self.start) * self.accum

    def __iter__(self):
        for step in range(self.start, self.steps):
            epoch, k = divmod(step, self.steps_per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            block = order[k * self.per_step:(k + 1) * self.per_step]
            for m in range(self.accum):
                micro = block[m * self.batch * self.world:(m + 1) * self.batch * self.world]
                yield [
                    (epoch, int(i))
                    for i in micro[self.rank * self.batch : (self.rank + 1) * self.batch]
                ]


def eval_keys(n, rank, world):
    """This rank's share of n evaluation samples, padded with None to one length on every rank."""
    per = -(-n // world)
    mine = list(range(rank * per, min(n, (rank + 1) * per)))
    return [(0, i) for i in mine] + [(0, None)] * (per - len(mine))


def load_data(files, video_root=None, rank=0):
    """Samples of comma-separated JSONL files, and how many rows were left out; broken rows and
    rows that name no file are reported (file:line) and left out; none left is an error."""
    samples, dropped, bad = read_samples(files.split(","), video_root)
    missing = [s[0] for s in samples if not os.path.isfile(s[0])]
    samples = [s for s in samples if os.path.isfile(s[0])] if missing else samples
    if not samples:
        raise ValueError(
            f"{files}: no rows to train on ({dropped} left out, {len(bad)} broken"
            f"{', the first: ' + bad[0] if bad else ''}, {len(missing)} naming no file"
            f"{', the first: ' + missing[0] + ' (is --video-root right?)' if missing else ''})"
        )
    if bad and rank == 0:
        print(f"warning: {len(bad)} broken rows left out, the first: " + "; ".join(bad[:3]),
              file=sys.stderr, flush=True)
    if missing and rank == 0:
        print(
            f"warning: {len(missing)} rows name no file and are left out, the first: {missing[0]} "
            f"(is --video-root right?)",
            file=sys.stderr,
            flush=True,
        )
    return samples, dropped + len(bad) + len(missing)
