"""Clean teacher captions before training on them (`python label.py clean labels.jsonl --out
clean.jsonl`).

The report found that the teacher's captions themselves hallucinate and are sometimes unusable.
Rules, in order, each counted: error rows and empty captions, a video (or shot) already seen (its
first row is kept: one label a video, or a shot), refusals, captions cut at the token limit,
degenerate ones (a phrase repeated in a loop), boilerplate openings stripped ("The video shows
..."), then exact and near duplicates (MinHash over word 3-grams, Jaccard >= --near) dropped,
unless --keep-duplicates (a templated data set, where many videos rightly share a caption).

A habit of the teacher's that `label.py audit` confirmed (its report: the teacher says A where a
second source says B) is fixed first, with --fix A=B: the labels that say A left out (--how drop),
or, from an audit of those labels (`label.py audit --saying A --sample 1`), replaced by the second
source's label (--how replace) or rewritten A -> B where the second source's label says B (--how
rewrite).
"""

import argparse
import collections
import os
import re
import sys
import zlib

import numpy as np

from labelling.checks import phrase
from plumbing import cli
from plumbing.jsonl import Appender, read_rows
from shots import row_key

REFUSAL = re.compile(
    r"^\s*(i'?m sorry|i am sorry|sorry,|i apologi[sz]e|i (cannot|can't|can not|am unable|'m unable)"
    r"|as an ai|unfortunately, i|抱歉|对不起|我无法|无法(识别|描述|提供))",
    re.IGNORECASE,
)
BOILERPLATE = re.compile(
    r"^\s*((in )?(this|the) (video|clip|footage|animation|scene|sequence)( clip)?(,\s*| "
    r"(shows|depicts|features|presents|captures|displays|showcases|is showing)\s+(that\s+)?))",
    re.IGNORECASE,
)
PRIME = (1 << 61) - 1


def degenerate(text: str, n: int = 4) -> bool:
    """A loop: one n-word phrase said 4 or more times, or fewer than half of the n-grams
    distinct."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return False
    most = collections.Counter(grams).most_common(1)[0][1]
    return most >= 4 or (len(grams) >= 20 and len(set(grams)) < 0.5 * len(grams))


def unusable(row):
    """Why one label is not worth training on ("refused", "truncated", "degenerate loop"), or None:
    the rules that need no other row (label.py recheck applies them to each new label too)."""
    caption = row.get("caption", "")
    if REFUSAL.search(caption):
        return "refused"
    if row.get("finish_reason") == "length":
        return "truncated"
    return "degenerate loop" if degenerate(caption) else None


def strip_boilerplate(text: str) -> str:
    rest = BOILERPLATE.sub("", text, count=1)
    return rest[:1].upper() + rest[1:] if rest != text and rest else text


class NearDuplicates:
    """MinHash with locality-sensitive hashing: a caption is a near duplicate when it agrees with
    one kept before on the estimated Jaccard similarity of word 3-grams. Memory is a signature per
    kept caption."""

    def __init__(self, threshold=0.8, hashes=64, bands=16, seed=0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, PRIME, hashes, dtype=np.uint64)
        self.b = rng.integers(0, PRIME, hashes, dtype=np.uint64)
        self.threshold, self.rows = threshold, hashes // bands
        self.buckets, self.signatures = collections.defaultdict(list), []

    def signature(self, text):
        words = re.findall(r"\w+", text.lower())
        grams = {" ".join(words[i:i + 3]) for i in range(max(1, len(words) - 2))}
        h = np.array([zlib.crc32(g.encode()) for g in grams], dtype=np.uint64)
        # (a*h + b) mod p for every hash function at once; uint64 wraps, which keeps it a fine hash
        # family
        return ((h[:, None] * self.a + self.b) % np.uint64(PRIME)).min(axis=0)

    def seen(self, text) -> bool:
        """True if a kept caption is this similar; otherwise keep this one and return False."""
        sig = self.signature(text)
        keys = [
            (i, sig[i * self.rows : (i + 1) * self.rows].tobytes())
            for i in range(len(sig) // self.rows)
        ]
        for key in keys:
            for j in self.buckets.get(key, ()):
                if (self.signatures[j] == sig).mean() >= self.threshold:
                    return True
        for key in keys:
            self.buckets[key].append(len(self.signatures))
        self.signatures.append(sig)
        return False


def clean_rows(rows, counts: collections.Counter, near=0.8, drop_duplicates=True):
    """Yield the rows worth training on (caption cleaned), counting in `counts` what each rule did;
    drop_duplicates=False keeps captions that other videos have too (a templated data set:
    toy.py's)."""
    exact, dupes, videos = set(), NearDuplicates(near), set()
    for row in rows:
        caption, video = row.get("caption"), row.get("video")
        caption = caption.strip() if isinstance(caption, str) else ""
        if "error" in row or not caption or not isinstance(video, str):
            counts["error or empty"] += 1
        elif row_key(row) in videos:
            counts["video already seen"] += 1
        elif unusable(row):
            counts[unusable(row)] += 1
        else:
            stripped = strip_boilerplate(caption)
            counts["boilerplate stripped (kept)"] += stripped != caption
            key = " ".join(re.findall(r"\w+", stripped.lower()))
            if drop_duplicates and key in exact:
                counts["exact duplicate"] += 1
            elif drop_duplicates and near < 1.0 and dupes.seen(stripped):
                counts["near duplicate"] += 1
            else:
                exact.add(key)
                videos.add(row_key(row))
                counts["kept"] += 1
                yield {**row, "caption": stripped}


def fix_confusion(rows, confusion, how, audit, counts):
    """The rows, those whose label says confusion[0] fixed as `how` says (the module's docstring);
    audit: {row key: the audit's row, the second source's reading of that very label}. A label the
    audit did not ask (or asked of another caption: another file's) is kept, counted; so is one
    whose reading is no label (refused, cut, a loop)."""
    said, meant = confusion
    says, means = phrase(said), phrase(meant)
    for row in rows:
        caption, second = row.get("caption"), audit.get(row_key(row))
        if not isinstance(caption, str) or not says.search(caption):
            yield row
        elif how == "drop":
            counts[f"says {said!r}: left out"] += 1
        elif second is None or second.get("teacher") != caption:
            counts[f"says {said!r}: not asked of the second source, kept as it was"] += 1
            yield row
        elif unusable(second):
            counts[f"says {said!r}: the second source's reading {unusable(second)}, kept"] += 1
            yield row
        elif how == "replace":
            counts[f"says {said!r}: the second source's label instead"] += 1
            yield {**row, "caption": second["caption"], "caption_teacher": caption,
                   "model": second.get("model"), "finish_reason": second.get("finish_reason")}
        elif means.search(second["caption"]) and not says.search(second["caption"]):
            counts[f"says {said!r}: rewritten to {meant!r}"] += 1
            yield {**row, "caption": says.sub(meant, caption), "caption_teacher": caption}
        else:
            counts[f"says {said!r}: the second source does not say {meant!r}, kept"] += 1
            yield row


def confusion(text):
    """--fix "A=B" -> ("A", "B")."""
    said, _, meant = text.partition("=")
    if not said.strip() or not meant.strip() or "=" in meant or said.strip() == meant.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected WORDS=WORDS, as the audit's report "
                                         f"names them")
    return said.strip(), meant.strip()


def clean_file(argv):
    p = cli.Parser(prog="label.py clean", description=__doc__.split("\n\n")[0])
    p.add_argument("labels", help="label.py's JSONL output")
    p.add_argument("--out", required=True, help="the cleaned rows")
    p.add_argument("--near", type=float, default=0.8,
                   help="Jaccard similarity that counts as a near duplicate")
    p.add_argument(
        "--keep-duplicates",
        action="store_true",
        help="keep captions that other videos have too (a templated data set, as toy.py's)",
    )
    p.add_argument("--fix", type=confusion,
                   help="A=B: a confusion label.py audit confirmed (see above)")
    p.add_argument("--how", choices=["drop", "replace", "rewrite"], default="drop",
                   help="--fix: leave those labels out, or replace / rewrite them from --audit")
    p.add_argument("--audit", help="--fix: label.py audit's rows of the labels that say A")
    args = p.parse_args(argv)
    if not 0 < args.near <= 1:
        p.error("--near must be above 0 and at most 1")
    if not args.fix and (args.audit or args.how != "drop"):
        p.error("--how and --audit go with --fix A=B (a confusion label.py audit's report names)")
    if args.fix and args.how != "drop" and not args.audit:
        p.error(f"--how {args.how} needs --audit FILE (label.py audit --saying "
                f"{args.fix[0]!r} --sample 1)")
    if (
        os.path.exists(args.out)
        and os.path.exists(args.labels)
        and os.path.samefile(args.out, args.labels)
    ):
        raise ValueError(
            f"--out {args.out} is the labels file: the error rows that mark videos done would go"
        )
    rows, counts = read_rows(args.labels, must_exist=True), collections.Counter()
    if not rows:
        raise ValueError(
            f"{args.labels}: no JSONL rows in it (is it the labels file?); {args.out} left as it "
            f"was"
        )
    n_in = len(rows)
    if args.fix:
        asked = read_rows(args.audit, must_exist=True) if args.audit else []
        audit = {row_key(r): r for r in asked
                 if isinstance(r.get("caption"), str) and isinstance(r.get("teacher"), str)}
        if args.audit and not audit:
            raise ValueError(f"{args.audit}: no audit rows in it (label.py audit writes them, each "
                             f"with the teacher's caption under \"teacher\")")
        rows = fix_confusion(rows, args.fix, args.how, audit, counts)
    # written whole, then put in place: a failure leaves the old file
    with Appender(args.out) as out:
        out.rewrite(clean_rows(rows, counts, args.near, not args.keep_duplicates))
    print(f"{n_in} rows in, {counts['kept']} kept", file=sys.stderr)
    for rule, n in counts.items():
        if rule != "kept":
            print(f"  {rule}: {n}", file=sys.stderr)
    return counts
