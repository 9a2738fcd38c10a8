"""toy.py's world: videos and stills of a coloured shape, the generator's truth, a teacher that sees
4 frames of each video, and the scoring of captions against either.

A video: a shape of one colour on a dark background rests at a cell of a 3 x 3 grid, moves across
the grid (one direction, or two in turn), and rests again; how long it rests before and after is
drawn per video, so the move happens at a different time in each. Its truth caption names colour,
shape, start and moves; a still's names its background too ("a red circle at the top left, on a navy
background."): the image data is richer than the video labels, as in the report's setting.

The teacher labels a video the way the report's Qwen-VL-Max did: from 4 frames (the middles of 4
equal segments of its 16). It reads the object in each and snaps it to the grid; what happens
between its frames it cannot see: when the object went right and down between two of them, it cannot
tell the order and guesses; when it had already left its cell by the first, it names the wrong
start. One label in ten invents a size ("a large red circle"; sizes never change in this world), and
a few are what real teachers also return: a refusal, "The video shows ..." boilerplate, a loop, a
label cut at its token limit (what `label.py clean` is for). Other teachers are described by their
habits (`Habits`, `TEACHERS`): slips made independently on each call, objects that are not there,
and a confusion made on every call, which only a second source can reveal (`label.py audit`).
"""

import json
import os
import re
from dataclasses import dataclass

import numpy as np

from lab.synthetic import write_image, write_video

SIZE = 48
COLOURS = {"red": (220, 45, 45), "green": (40, 170, 60), "blue": (50, 90, 235),
           "yellow": (235, 205, 35)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"navy": (18, 24, 70), "maroon": (70, 18, 26), "forest": (16, 58, 28),
               "grey": (52, 52, 52)}
CENTRES = (8, 24, 40)    # pixel centres of the 3 x 3 grid of positions: one 16-pixel ViT patch each
NAMES = {(0, 0): "top left", (1, 0): "top", (2, 0): "top right", (0, 1): "left", (1, 1): "center",
         (2, 1): "right", (0, 2): "bottom left", (1, 2): "bottom", (2, 2): "bottom right"}
DIRS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# a move crosses the whole grid (two cells); a two-step move turns once, so it starts in a corner
MOTIONS = [(d,) for d in DIRS] + [
    (a, b)
    for a in DIRS
    for b in DIRS
    if DIRS[a][0] * DIRS[b][0] + DIRS[a][1] * DIRS[b][1] == 0 and DIRS[a] != DIRS[b]
]
FRAMES = 16
TEACHER_FRAMES = [int((i + 0.5) * FRAMES / 4) for i in range(4)]   # 2, 6, 10, 14
# 1, 3, ..., 15: label.py --frames 8
EIGHT_FRAMES = [int((i + 0.5) * FRAMES / 8) for i in range(8)]
SIZE_WORDS = ("large", "small", "tiny", "big")
REFUSAL = "I'm sorry, but I cannot describe this video."


def starts(motion):
    """The grid cells a motion can start from without leaving the grid."""
    cells = []
    for cell in NAMES:
        x, y = cell
        for d in motion:
            x, y = x + 2 * DIRS[d][0], y + 2 * DIRS[d][1]
            if not (0 <= x <= 2 and 0 <= y <= 2):
                break
        else:
            cells.append(cell)
    return cells


def video_caption(colour, shape, cell, motion, size=""):
    return (f"a {size + ' ' if size else ''}{colour} {shape} starts at the {NAMES[cell]} and moves "
            f"{', then '.join(motion)}.")


def still_caption(colour, shape, cell, bg, motion=None):
    where = (
        f"starts at the {NAMES[cell]} and moves {', then '.join(motion)}"
        if motion
        else f"at the {NAMES[cell]}"
    )
    return f"a {colour} {shape} {where}, on a {bg} background."


def background(rng, name):
    """A dark named colour with a gradient and a little noise."""
    base = np.array(BACKGROUNDS[name]) + rng.integers(-6, 7, 3)
    ramp = np.linspace(-10, 10, SIZE)[:, None, None] * rng.choice([-1, 1])
    img = base[None, None, :] + (ramp if rng.random() < 0.5 else ramp.transpose(1, 0, 2))
    return np.clip(img + rng.normal(0, 3, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def draw(img, shape, colour, cx, cy, r, alpha=1.0):
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    # smaller than the square: at 48 px they differ in their corners alone otherwise
    if shape == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= (0.8 * r) ** 2
    elif shape == "square":
        mask = (abs(x - cx) <= r * 0.95) & (abs(y - cy) <= r * 0.95)
    else:   # triangle, point up
        mask = (y >= cy - r) & (y <= cy + r * 0.8) & (abs(x - cx) <= (y - (cy - r)) * 0.6)
    img[mask] = (alpha * np.array(COLOURS[colour]) + (1 - alpha) * img[mask]).astype(np.uint8)
    return img


def path(cell, motion, frames, before, after):
    """Pixel centres frame by frame: at rest `before` frames, then a straight move, or two legs of
    equal length one after the other, then at rest `after` frames."""
    corners = [(CENTRES[cell[0]], CENTRES[cell[1]])]
    for d in motion:
        corners.append((corners[-1][0] + 32 * DIRS[d][0], corners[-1][1] + 32 * DIRS[d][1]))
    t = np.clip((np.arange(frames) - before) / max(1, frames - 1 - before - after), 0,
                1) * len(motion)
    leg = np.minimum(t.astype(int), len(motion) - 1)
    frac = (t - leg)[:, None]
    a, b = np.array(corners[:-1])[leg], np.array(corners[1:])[leg]
    return a + (b - a) * frac


def looks(rng):
    """An object's colour and shape, and the background it is on."""
    return rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))


def make_world(folder, n_train, n_test, n_stills, n_test_stills, seed):
    """Videos and stills on disk, with JSONL files of their captions; the generator's truth kept
    beside, with what the teacher's 4 frames show of each video."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    files = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(n):
            colour, shape, bg = looks(rng)
            motion = MOTIONS[rng.integers(len(MOTIONS))]
            cell = starts(motion)[rng.integers(len(starts(motion)))]
            before, after = (int(x) for x in rng.integers(0, 8, 2))
            centres = path(cell, motion, FRAMES, before, after)
            img, r = background(rng, bg), rng.uniform(7, 7.5)
            clip = [draw(img.copy(), shape, colour, x, y, r) for x,
                    y in centres + rng.normal(0, 0.5, centres.shape)]
            name = os.path.join(folder, f"{split}_video_{i:05d}.mp4")
            write_video(name, clip, fps=8, options={"crf": "12", "preset": "ultrafast"})
            rows.append(
                {
                    "video": name,
                    "caption": video_caption(colour, shape, cell, motion),
                    "truth": {
                        "colour": colour,
                        "shape": shape,
                        "position": NAMES[cell],
                        "motion": list(motion),
                        "background": bg,
                        "size": None,
                    },
                    # what each frame shows: the object's centre (a teacher reads the frames it
                    # gets)
                    "centres": [[round(float(x), 2), round(float(y), 2)] for x, y in centres],
                }
            )
        files[f"{split}_videos"] = rows
    for split, n in (("train", n_stills), ("test", n_test_stills)):
        rows = []
        for i in range(n):
            colour, shape, bg = looks(rng)
            name = os.path.join(folder, f"{split}_still_{i:05d}.png")
            img, r, motion = background(rng, bg), rng.uniform(7, 7.5), None
            if split == "train" and i % 2:   # a long-exposure photo: the motion as a fading trail
                motion = MOTIONS[rng.integers(len(MOTIONS))]
                cell = starts(motion)[rng.integers(len(starts(motion)))]
                for k, (x, y) in enumerate(
                    path(cell, motion, 8, 0, 0) + rng.normal(0, 0.5, (8, 2))
                ):
                    img = draw(img, shape, colour, x, y, r, alpha=0.2 + 0.8 * k / 7)
            else:
                cell = list(NAMES)[rng.integers(9)]
                img = draw(img, shape, colour, CENTRES[cell[0]] + rng.normal(0, 0.5),
                           CENTRES[cell[1]] + rng.normal(0, 0.5), r)
            write_image(name, img)
            rows.append({"image": name, "caption": still_caption(colour, shape, cell, bg, motion),
                         "truth": {"colour": colour, "shape": shape, "position": NAMES[cell],
                                   "background": bg, "size": None,
                                   **({"motion": list(motion)} if motion else {})}})
        files[f"{split}_stills"] = rows
    for name, rows in files.items():
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    return files


@dataclass(frozen=True)
class Habits:
    """How a toy teacher errs beyond what its frames cannot show (every teacher reads only the
    frames it is shown: the order of two moves between two of them is a guess)."""
    sizes: float = 0.1       # a size invented ("a large red circle")
    oddities: bool = True    # refusals, boilerplate, loops, cut labels: what label.py clean is for
    slips: float = 0.0       # colour, shape and motion each misread, independently on each call
    objects: float = 0.0     # an object that is not there ("..., beside a small star.")
    confusion: tuple = ()    # (truth, said): one colour always named as another, on every call


TEACHERS = {   # the kinds of teacher `toy.py --audit` compares (FRAME_BOUND is toy.py's own)
    "frame-bound teacher, green seen as yellow": Habits(confusion=("green", "yellow")),
    "careless teacher, red seen as blue": Habits(sizes=0.0, slips=0.15, objects=0.1,
                                                 confusion=("red", "blue")),
}
FRAME_BOUND = Habits()
SECOND = Habits(sizes=0.0, oddities=False, slips=0.05)   # an audit's second source: its own habits
# what an API bills: tokens, and frames are most of them (a 448 px frame is 256 of Qwen-VL's
# tokens; the prompt and a label about 160)
FRAME_TOKENS, TEXT_TOKENS = 256, 160


def price(frames, ratio=1.0):
    """A call with `frames` frames, in teacher calls of 4 frames; `ratio`: the model's price per
    token against the teacher's."""
    return ratio * (frames * FRAME_TOKENS + TEXT_TOKENS) / (4 * FRAME_TOKENS + TEXT_TOKENS)


def teacher(rows, seed, frames=TEACHER_FRAMES, habits=FRAME_BOUND):
    """label.py-shaped rows: each video labelled from what the frames it is shown show (the
    docstring), erring as its habits say; shown more frames (label.py recheck --frames 16), it
    behaves the same, seeing more."""
    rng = np.random.default_rng([seed, len(frames)])
    slip = np.random.default_rng([seed, len(frames), 1])   # toy.py's teacher draws the same as ever
    out = []
    for row in rows:
        t = dict(row["truth"])
        if habits.confusion and t["colour"] == habits.confusion[0]:
            t["colour"] = habits.confusion[1]
        if habits.slips and slip.random() < habits.slips:
            t["colour"] = str(slip.choice([c for c in COLOURS if c != t["colour"]]))
        if habits.slips and slip.random() < habits.slips:
            t["shape"] = str(slip.choice([s for s in SHAPES if s != t["shape"]]))
        seen = [row["centres"][k] for k in frames]
        cells = [tuple(int(np.abs(np.array(CENTRES) - v).argmin()) for v in xy) for xy in seen]
        moves = []
        for (x0, y0), (x1, y1) in zip(cells, cells[1:]):
            step = [
                d
                for d, (dx, dy) in DIRS.items()
                if (dx and np.sign(x1 - x0) == dx) or (dy and np.sign(y1 - y0) == dy)
            ]
            # both ways between two frames: which came first is a guess
            if len(step) == 2 and rng.random() < 0.5:
                step.reverse()
            moves += [d for d in step if not moves or moves[-1] != d]
        if habits.slips and slip.random() < habits.slips:
            moves = list(MOTIONS[slip.integers(len(MOTIONS))])
        size = "large" if rng.random() < habits.sizes else ""
        caption = video_caption(t["colour"], t["shape"], cells[0], moves or ["nowhere"], size)
        if habits.objects and slip.random() < habits.objects:
            caption = caption[:-1] + ", beside a small star."
        label = {"video": row["video"], "caption": caption, "model": "toy-teacher",
                 "frames": len(frames), "finish_reason": "stop"}
        u = rng.random() if habits.oddities else 1.0
        if u < 0.02:
            label["caption"] = REFUSAL
        elif u < 0.05:
            label["caption"] = "The video shows " + caption
        elif u < 0.06:
            label["caption"] = " ".join([caption[:-1]] * 5) + "."
        elif u < 0.07:
            label["caption"], label["finish_reason"] = caption[:len(caption) // 2], "length"
        out.append(label)
    return out


def parse(text):
    """Attributes named in a caption: what the scoring compares with a reference."""
    low = text.lower()
    words = re.findall(r"[a-z]+", low)
    where = re.search(r"at the ((?:top|bottom)(?: left| right)?|left|right|center)\b", low)
    moves = re.search(r"moves ([a-z, ]+)", low)
    bg = re.search(r"on an? ([a-z]+) background", low)
    return {"colour": next((w for w in words if w in COLOURS), None),
            "shape": next((w for w in words if w in SHAPES), None),
            "position": where.group(1) if where else None,
            "motion": [w for w in re.findall(r"[a-z]+",
                                             moves.group(1)) if w in DIRS] if moves else [],
            "background": bg.group(1) if bg else None,
            "size": next((w for w in words if w in SIZE_WORDS), None)}


def score(rows, captions, motion=True, reference=None):
    """Accuracy (%) per attribute against each row's truth (or reference[media]'s attributes);
    motion compares the directions regardless of order, `order` the sequence of the two-step moves
    only. Beside the accuracies: `invented` (% of captions naming an attribute that is not so: a
    size, a move in a still), `words` (mean caption length) and, on stills, `background` (the detail
    videos never teach)."""
    hits = {k: [] for k in ("shape", "colour", "position", "motion", "order", "exact",
                            "background", "invented")}
    words = []
    for row in rows:
        media = row.get("video") or row.get("image")
        text = captions.get(media, "")
        got, truth = parse(text), (reference[media] if reference else row["truth"])
        for k in ("shape", "colour", "position"):
            hits[k].append(got[k] == truth[k])
        if motion:
            hits["motion"].append(sorted(got["motion"]) == sorted(truth["motion"]))
            if len(truth["motion"]) == 2:
                hits["order"].append(got["motion"] == truth["motion"])
        else:
            hits["background"].append(got["background"] == truth["background"])
        hits["invented"].append(got["size"] is not None or (not motion and bool(got["motion"])))
        hits["exact"].append(text.strip() == row["caption"] if not reference else got == truth)
        words.append(len(text.split()))
    out = {k: round(100.0 * sum(v) / len(v), 1) for k, v in hits.items() if v}
    return {**out, "words": round(float(np.mean(words)), 1)}


def judge(ref, pred):
    """judge.py's two figures, by rule: a 0-5 similarity (the share of the reference's attributes
    the caption gets right) and a verdict, correct when it contradicts nothing in the reference and
    adds nothing the reference does not say (a size, a background, a move)."""
    r, p = parse(ref), parse(pred)
    keys = [k for k in ("colour", "shape", "position", "motion", "background", "size") if r[k]]
    right = sum(p[k] == r[k] for k in keys)
    added = any(p[k] and not r[k] for k in ("background", "size", "motion"))
    return round(5 * right / max(len(keys), 1)), right == len(keys) and not added


def judged(rows, captions, references):
    """Mean judge score (0-5) and accuracy (% correct) of `captions` against `references` ({media:
    text})."""
    marks = [judge(references[r["video"]],
                   captions.get(r["video"], "")) for r in rows if r["video"] in references]
    return {"judge score": round(float(np.mean([s for s, _ in marks])), 2),
            "judge accuracy": round(100.0 * float(np.mean([c for _, c in marks])), 1)}
