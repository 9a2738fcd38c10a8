"""The teacher's labels checked against frames (label.py verify, label.py recheck): the pure parts.

verify shows the teacher a label's own frames again with its sentences numbered and keeps those the
frames support: it catches what those frames contradict (an invented size), never a wrong guess
about what happens between them. recheck brings evidence the label did not have, at a stated cost:
the student (a model trained on the labels, which sees 16 frames) captions the same videos, and the
share of labels it agrees with least is asked again of the teacher from more frames (--frames 16): a
new label replaces the old. Calls per video: 1 + the share (docs/toy.md compares it with other
cleanings). Here too: the labels file read, each label's video found on this machine, and the
student's captions matched to the labels.
"""

import collections
import difflib
import hashlib
import json
import math
import os
import re

import shots
from plumbing.jsonl import iter_rows
from plumbing.sources import NameCollision, Video, canonical, collision, paired, video_base

VERIFY = (
    "These are {frames} frames sampled evenly from one video, in order. Below are {n} numbered "
    "sentences that describe it. For each sentence, say whether the frames support it (true) or "
    "not (false: it describes something not visible, or different from what is "
    "visible).\n\n{sentences}\n\nAnswer with a JSON object {{\"supported\": [true | false, ...]}}, "
    "one value per sentence, in order."
)


def sentences(text):
    return [s.strip() for s in re.split(r"(?<=[.!?。！？])\s*", text) if s.strip()]


def parse_marks(text, n):
    try:
        marks = json.loads(text).get("supported")
    except (ValueError, AttributeError, RecursionError):
        return None
    return (
        marks
        if isinstance(marks, list) and len(marks) == n and all(isinstance(m, bool) for m in marks)
        else None
    )


def read_labels(path, frames=None):
    """{(video, shot): row} of the labelled rows of a file; with `frames`, labels made from other
    frames are refused (verify is fair only on the frames a label was made from)."""
    labels = {shots.row_key(r): r for r in iter_rows(path, must_exist=True)
              if isinstance(r.get("video"), str) and isinstance(r.get("caption"), str)
              and r["caption"].strip() and ("shot" not in r or shots.shot_of(r))}
    made = {r["frames"] for r in labels.values() if isinstance(r.get("frames"), int)} - {frames}
    if frames and made:
        raise ValueError(f"{path}: labels made from {sorted(made)[0]} frames: verify them with "
                         f"--frames {sorted(made)[0]} (and the --max-side they were made with)")
    return labels


# scripts written without spaces (Chinese, Japanese, Korean): each character is a word of its own
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
WORD = re.compile(rf"[{CJK}]|[^\W{CJK}]+")


def words(text: str) -> list:
    """A caption's words, lower case, punctuation aside (a character of CJK a word)."""
    return WORD.findall(text.lower())


def agreement(a: str, b: str) -> float:
    """How far two captions say the same: the F1 of their word pairs, case and punctuation aside.
    Word pairs, not words: "moves right, then down" and "moves down, then right" hold the same
    words."""
    def pairs(text):
        said = words(text)
        return collections.Counter(zip(said, said[1:]))
    pa, pb = pairs(a), pairs(b)
    return 2 * sum((pa & pb).values()) / max(sum(pa.values()) + sum(pb.values()), 1)


def to_recheck(labels: dict, student: dict, share: float) -> dict:
    """{key: agreement} of the labels to ask again: the `share` of all labels whose student caption
    agrees with them least (ties by key, so the choice is the same on every run and every shard); a
    label with no student caption is not among them."""
    scored = sorted((agreement(labels[k]["caption"], student[k]), str(k),
                     k) for k in labels if k in student)
    return {k: a for a, _, k in scored[:int(round(share * len(labels)))]}


def says(caption: str, text: str = None) -> bool:
    """Whether a caption says `text` (as whole words, any case); anything, when text is None."""
    return text is None or phrase(text).search(caption) is not None


def phrase(text: str):
    """`text` as a pattern of whole words, any case: never inside a longer word, whatever stands
    around it ("(purple)", "c++"); in a script without spaces, wherever it stands ("紫色" in
    "一个穿紫色衣服的人")."""
    edge = re.compile(rf"[^\W{CJK}]")
    left = r"(?<!\w)" if edge.match(text[:1]) else ""
    right = r"(?!\w)" if edge.match(text[-1:]) else ""
    return re.compile(left + re.escape(text) + right, re.IGNORECASE)


def audit_sample(labels: dict, size: float, saying: str = None) -> list:
    """The keys of the labels an audit asks a second source about: `size` of those that say `saying`
    (a share up to 1, else a count), chosen by a hash of each key: the same on every run and shard,
    spread over the whole file. ValueError for a choice of none."""
    if saying is not None and not saying.strip():
        raise ValueError("--saying is empty: name the words of a confusion the report found")
    if size > 1 and size != int(size):
        raise ValueError(f"--sample {size:g}: a share is 1 or less (1: all), a count a whole "
                         f"number")
    pool = [k for k, r in labels.items() if says(r.get("caption", ""), saying)]
    if not pool:
        raise ValueError(f"no label says {saying!r} (as whole words, any case): nothing to ask")
    n = round(size * len(pool)) if size <= 1 else min(int(size), len(pool))
    if not n:
        raise ValueError(f"--sample {size:g} of {len(pool)} labels chooses none: ask for more")
    return sorted(pool, key=lambda k: hashlib.sha256(repr(k).encode()).hexdigest())[:n]


def same_teacher(a, b) -> bool:
    """Whether two model names are one teacher (qwen-vl-max, QWEN-VL-MAX-2025): no second source."""
    a, b = str(a).strip().lower(), str(b).strip().lower()
    return a == b or a.startswith(b + "-") or b.startswith(a + "-")


def confusions(pairs, least=2) -> list:
    """What the teacher says where a second source says something else, over (teacher, second
    source) caption pairs: the runs of one or two words the alignment of the two replaces (difflib),
    counted once a video, each with how many sampled videos the teacher's label says it in; those
    seen in at least `least` videos, most first, with up to 3 examples (indices into pairs)."""
    said, swapped = collections.Counter(), collections.defaultdict(list)
    for i, (teacher, second) in enumerate(pairs):
        a, b = words(teacher), words(second)
        said.update({" ".join(a[j:j + n]) for n in (1, 2) for j in range(len(a) - n + 1)})
        ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
        for pair in {(" ".join(a[i1:i2]), " ".join(b[j1:j2])) for op, i1, i2, j1, j2 in ops
                     if op == "replace" and i2 - i1 <= 2 and j2 - j1 <= 2}:
            swapped[pair].append(i)
    ranked = sorted(
        (pair for pair, seen in swapped.items() if len(seen) >= least),
        key=lambda pair: (-len(swapped[pair]), -len(swapped[pair]) / said[pair[0]], pair),
    )
    return [{"teacher": a, "second": b, "videos": len(swapped[(a, b)]), "of": said[a],
             "examples": swapped[(a, b)][:3]} for a, b in ranked]


def audit_report(rows, second: str, least=2, top=20) -> str:
    """What a person reads before paying for training on the labels: how far the teacher and the
    second source agree (word pairs, checks.agreement; the mean with its 95% interval over the
    sampled videos), and the teacher's consistent differences from it, ranked."""
    def read(r):   # both readings, neither of them an error row
        return r.get("code") is None and all(isinstance(r.get(k), str)
                                             for k in ("caption", "teacher"))
    rows = list(rows)
    without = collections.Counter(r.get("code") or "no reading" for r in rows if not read(r))
    rows = [r for r in rows if read(r)]
    missing = (f"; {sum(without.values())} sampled labels without a usable reading ("
               + ", ".join(f"{code} {n}" for code, n in without.most_common()) + ")"
               if without else "")
    if not rows:
        return "audit: no sampled label has both readings yet" + missing
    scores = [agreement(r["teacher"], r["caption"]) for r in rows]
    mean = sum(scores) / len(scores)
    spread = 1.96 * math.sqrt(sum((s - mean) ** 2 for s in scores) / max(len(scores) - 1,
                                                                         1) / len(scores))
    lines = [
        f"audit of {len(rows)} sampled labels against {second}: agreement (word pairs, F1) "
        f"{mean:.3f} +- {spread:.3f} (95%){missing}",
        "the teacher's consistent differences (in N of the M sampled videos whose label says it):",
    ]
    for c in confusions([(r["teacher"], r["caption"]) for r in rows], least)[:top]:
        names = ", ".join(str(rows[i].get("name", rows[i].get("video"))) for i in c["examples"])
        lines.append(
            f"  teacher \"{c['teacher']}\" where {second} says \"{c['second']}\": {c['videos']} of "
            f"{c['of']} ({c['videos'] / c['of']:.0%}), e.g. {names}"
        )
    return "\n".join(lines if len(lines) > 2 else lines + ["  none seen twice"])


def labelled_videos(args):
    """{(name, shot): label row} of the labels file args.source (verify, recheck), each row holding
    under "_video" the Video to open on this machine: under --video-root by its name when that is
    given, else by its path as the row writes it (relative to the labels file's folder)."""
    labels = read_labels(args.source, args.frames if args.mode == "verify" else None)
    base = video_base(args.source)
    for (name, _), row in labels.items():
        path = (
            os.path.join(args.video_root, name)
            if args.video_root and not os.path.isabs(name)
            else os.path.join(base, row["video"])
        )
        row["_video"] = Video(canonical(path), name)
    clash = collision(
        (shots.row_key(r)[0], canonical(os.path.join(base, r["video"])))
        for r in iter_rows(args.source)
        if shots.row_key(r) in labels and "caption" in r
    )
    if clash:
        raise NameCollision(*clash, args.source)
    return labels


def label_row(label):
    """A label row as it is written: its video's path here and its name, nothing of ours beside."""
    video = label["_video"]
    return {**{k: v for k, v in label.items() if k != "_video"}, "video": str(video),
            "name": video.name}


def student_captions(path, labels):
    """{label key: the student's caption} of the student's captions (caption.py's rows), for
    recheck, matched by the video's file on this machine, else by its name (and shot); a file that
    names none of the labelled videos is refused (every label would be copied, unchecked)."""
    if not path:
        raise ValueError(
            "recheck needs --student CAPTIONS: the student's captions of the same videos"
        )
    captions, paths = {}, {}
    for r in iter_rows(path, must_exist=True):
        k = shots.row_key(r)
        if k is not None and isinstance(r.get("caption"), str) and k not in captions:
            captions[k], paths[k] = r["caption"], r["video"]
    # by file, else by name
    pairs = paired({k: str(r["_video"]) for k, r in labels.items()}, paths)
    student = {k: captions[theirs] for k, theirs in pairs.items()}
    if labels and not student:
        raise ValueError(
            f"{path}: no caption of a labelled video ({len(captions)} captions, {len(labels)} "
            f"labels): caption the videos the labels name, as the labels spell them (and per shot "
            f"if they are)"
        )
    return student
