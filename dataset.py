"""Training data: JSONL rows -> (frames, token ids, labels), and the order they are seen in.

Three row shapes are understood, detected file by file:
  {"video": ..., "caption": ...}                          what label.py writes (rows with "error" are skipped)
  {"video": ..., "QA": [{"i": ..., "q": ..., "a": ...}]}  PLLaVA / VideoChat2 instruction data
  {"video"|"image": ..., "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}
                                                          LLaVA
An "image" is one frame repeated to the clip length, as the model repeats short clips.

The order is a pure function of (seed, step): step s of epoch e takes the s-th block of a permutation
seeded by (seed, e), and rank r takes its slice of each micro-batch. Resuming needs only the step, and one
process with batch 4 sees the same global batches as two with batch 2.
"""

import json
import os

import numpy as np
import torch

from data import VideoError, center_crop, read_clip_frames, read_image
from tokenizer import QUESTION, training_ids


def _text(value, what):
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} is not a text")
    return value


def _turns(row, kind, prompt):
    """([(question, answer), ...], system or None) of one row; ValueError naming what is wrong with it."""
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
    questions = [_text(m.get("value"), "a conversation value").replace("<image>", "").strip() for m in messages[0::2]]
    return list(zip(questions, [_text(m.get("value"), "a conversation value") for m in messages[1::2]])), None


SHAPES = (("caption", "caption"), ("QA", "qa"), ("conversations", "llava"))   # (field, row shape)


def _span(row):
    """A shot's (start, end) in seconds when the row carries them (caption.py --shots, label.py --shots)."""
    if "start" not in row and "end" not in row:
        return None
    start, end = row.get("start"), row.get("end")
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in (start, end)) or not 0 <= start < end:
        raise ValueError("start / end are not a span of seconds")
    return float(start), float(end)


def read_samples(paths, video_root=None, prompt=QUESTION):
    """[(media path, is_image, [(question, answer), ...], system or None, span or None)] from JSONL files; how many rows
    were left out on purpose (error rows of label.py, empty captions, rows of another shape); and the rows
    that are broken (not JSON, not UTF-8, a field of the wrong type) as "file:line: why"."""
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
                except (ValueError, RecursionError) as e:   # not UTF-8, not JSON (or nested past reading), wrong types
                    bad.append(f"{path}:{n}: {str(e)[:100] or type(e).__name__}")
                    continue
                if video_root and not os.path.isabs(media):
                    media = os.path.join(video_root, media)
                samples.append((media, "video" not in row, turns, system, span))
    return samples, dropped, bad


class TrainSet(torch.utils.data.Dataset):
    """Item (epoch, index) -> dict(frames (T, S, S, 3) uint8, ids, labels, skipped). A video that cannot
    be read gives a stand-in with no loss (black frames, labels all -100), so every rank still runs the
    same number of forward passes (FSDP's collectives need that), and is reported in `skipped`."""

    def __init__(self, samples, tok, template, system, frames, size, seed=0, mode="random", max_tokens=1024):
        self.samples, self.tok, self.template, self.system = samples, tok, template, system
        self.frames, self.size, self.seed, self.mode, self.max_tokens = frames, size, seed, mode, max_tokens

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        epoch, index = key
        if index is None:   # padding for an uneven evaluation split
            return self._stand_in(None)
        media, is_image, turns, system, span = self.samples[index]
        ids, labels = training_ids(self.tok, turns, self.template, system or self.system)
        ids, labels = ids[:self.max_tokens], labels[:self.max_tokens]
        rng = np.random.default_rng([self.seed, epoch, index])   # the same frames whichever rank reads it
        try:
            if is_image:   # one frame: collate or the model repeats it to the clip length
                frames = center_crop(read_image(media, short_side=self.size), self.size)
            else:
                frames = read_clip_frames(media, self.frames, self.size, self.mode, rng=rng, span=span)
        except VideoError as e:
            return self._stand_in(str(e), ids)
        return dict(frames=frames, ids=ids, labels=labels, skipped=None)

    def _stand_in(self, reason, ids=None):
        ids = ids or [self.tok.bos_id, self.tok.image_id]
        return dict(frames=np.zeros((self.frames, self.size, self.size, 3), np.uint8), ids=ids,
                    labels=[-100] * len(ids), skipped=reason)


def collate(items, pad_id):
    """Right-padded ids and labels (B, L), frames (B, T, S, S, 3) uint8, and the skipped videos' reasons.
    Right padding needs no attention mask: causal attention never looks ahead at the padding."""
    L = max(len(x["ids"]) for x in items)
    ids = torch.full((len(items), L), pad_id, dtype=torch.long)
    labels = torch.full((len(items), L), -100, dtype=torch.long)
    for b, x in enumerate(items):
        ids[b, :len(x["ids"])] = torch.tensor(x["ids"])
        labels[b, :len(x["labels"])] = torch.tensor(x["labels"])
    T = max(len(x["frames"]) for x in items)   # a batch of stills stays one frame long; mixed, stills repeat
    frames = torch.from_numpy(np.stack([np.repeat(x["frames"], T // len(x["frames"]), 0) if len(x["frames"]) < T
                                        else x["frames"] for x in items]))
    return dict(ids=ids, labels=labels, frames=frames, skipped=[x["skipped"] for x in items if x["skipped"]])


class StepSampler(torch.utils.data.Sampler):
    """This rank's micro-batches of keys (epoch, index), step after step, from `start` to `steps`."""

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
                yield [(epoch, int(i)) for i in micro[self.rank * self.batch:(self.rank + 1) * self.batch]]


def eval_keys(n, rank, world):
    """This rank's share of n evaluation samples, padded with None to one length on every rank."""
    per = -(-n // world)
    mine = list(range(rank * per, min(n, (rank + 1) * per)))
    return [(0, i) for i in mine] + [(0, None)] * (per - len(mine))
