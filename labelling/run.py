"""The runner every mode of label.py shares: the API client, the decoding processes, the --out file
resumed under the rows' settings id, the jobs run on threads (plumbing/runner.py), and the counts
the progress line and the summary say. What a row is, and when one is done, is decided here once.
"""

import collections
import contextlib
import functools
import sys
import time

import shots
from data import UNREADABLE
from plumbing.cli import Stop
from plumbing.client import FINAL_CODES, api_client
from plumbing.outputs import Outputs, settings_id
from plumbing.runner import run_items
from plumbing.workers import RETRIED, imap_unordered

VERBS = {"label": "labelled", "verify": "verified", "recheck": "labelled again", "audit": "audited"}
# an audit's reading that would be the same if asked again (labelling/clean.unusable)
UNUSABLE = {"refused", "truncated", "degenerate loop"}
FILE_CODES = {UNREADABLE, "missing_video", *RETRIED}   # a file's trouble: says nothing of the API
# a row with one of these is done: asking again would get the same answer
DONE_CODES = FINAL_CODES | UNUSABLE | {UNREADABLE}


def key_of(job):   # a job's (video name, shot or None): what its row is stored and resumed under
    (video, shot, _), _ = job
    return video.name, shot[0] if shot else None


def identify(job):
    """The fields of a job's row that say which video (and shot) it is for (runner.guarded)."""
    (video, shot, _), _ = job
    return shots.identity(video, shot)


def is_done(row, retry_errors=False):
    """A caption, or (unless retry_errors) a final answer: content moderation, an unreadable video
    (not a missing one: a wrong path is fixed, and the video labelled, by a rerun)."""
    return "caption" in row or (not retry_errors and row.get("code") in DONE_CODES)


class Run:
    """One run of a mode: `flags` are those that make its rows what they are (with `what` in
    outputs(), the rows' settings id)."""

    def __init__(self, args, mode, flags):
        self.args, self.mode, self.flags, self.client = args, mode, flags, api_client(args)
        self.decode = functools.partial(imap_unordered, workers=args.workers,
                                        timeout=args.decode_timeout, buffer=2 * args.concurrency,
                                        memory_gb=args.decode_memory, stop=self.client.stop)
        cut = shots.finder(args) and mode == "label"   # videos cut into shots, counted for the ETA
        self.stats = collections.Counter(cut=0) if cut else collections.Counter()
        self.failed, self.tries = collections.Counter(), {}

    @contextlib.contextmanager
    def outputs(self, what, names, here):
        """(the --out file, {key: row} of what it holds done), resumed under the settings id of
        `what` and the flags (self.settings); names: {path: name} of rows from before names; here:
        {name: path}."""
        self.settings = settings_id(self.args, None, what, names=self.flags)
        done = functools.partial(is_done, retry_errors=self.args.retry_errors)
        with Outputs(self.args.out, overwrite=self.args.overwrite) as out:
            key = functools.partial(shots.row_key, names=names)
            yield out, out.resume(key, done, self.settings, self.tries, here)
        retry = sum(n for kind, n in self.failed.items() if kind.split(" ", 1)[1] not in DONE_CODES)
        if retry and not self.stats["done"]:   # a run that did nothing did not work, whatever stops
            raise Stop(f"no video was {VERBS[self.mode]} and {retry} failed (see above); "
                       f"they are not marked done")

    def ask(self, out, asked, work, n_todo, already, said=None):
        """work(job) for every job of `asked`, its frames decoded first; every row written as it
        comes."""
        args, stats, failed = self.args, self.stats, self.failed
        jobs = self.decode(functools.partial(shots.shot_urls, n=args.frames,
                                             max_side=args.max_side, q=args.jpeg_q), asked)
        start = time.monotonic()

        def seen(row):
            if "error" in row:
                failed[f"{row['status'] or '-'} {row['code']}"] += 1
            elif "recheck_refused" in row:   # the first label kept: no new one, nothing paid
                stats["refused"] += 1
            else:
                stats["done"] += 1
                usage = row.get("usage") if isinstance(row.get("usage"), dict) else {}
                stats["in"] += usage.get("prompt_tokens", 0)
                stats["out"] += usage.get("completion_tokens", 0)
                stats["length"] += row.get("finish_reason") == "length"
            progress(stats, stats["done"] + stats["refused"] + sum(failed.values()), n_todo,
                     sum(failed.values()), start)
        try:
            run_items(self.client, jobs, work, args.concurrency, out, args.max_failures_in_a_row,
                      identify, neutral=FILE_CODES, seen=seen)
        finally:
            summary(args, stats, failed, already, start, self.mode)
            if said:
                print(said.format(refused=stats["refused"]), file=sys.stderr)


def progress(stats, finished, total, failed, start):
    """Items answered (labels, or shots) of `total`; per shot, the ETA goes by the videos cut so
    far."""
    elapsed = max(time.monotonic() - start, 1e-9)
    if "cut" in stats:
        done, what = stats["cut"], f"{finished} shots, {stats['cut']}/{total} videos cut"
    else:
        done, what = finished, f"{finished}/{total} labels"
    eta = (total - done) * elapsed / done if done else float("inf")
    print(f"\r{what}, {failed} failed, {finished / elapsed:.2f} a second, ETA {eta / 60:.1f} min ",
          end="", file=sys.stderr, flush=True)


def summary(args, stats, failed, already, start, mode="label"):
    elapsed = max(time.monotonic() - start, 1e-9)
    n_failed = sum(failed.values())
    cost = (stats["in"] * args.price_in + stats["out"] * args.price_out) / 1e6
    retry = sum(n for kind, n in failed.items() if kind.split(" ", 1)[1] in RETRIED)
    again = f" ({retry} to try again: a decoder time or memory limit, or its crash)" * bool(retry)
    kinds = " (" + ", ".join(f"{c} x {r}" for r, c in failed.most_common()) + ")" if failed else ""
    print(f"\n{VERBS[mode]} {stats['done']} ({stats['length']} cut at --max-new-tokens), "
          f"failed {n_failed}{again}{kinds}, {already} already done; tokens in {stats['in']}, "
          f"out {stats['out']}, estimated cost ${cost:.2f}; {elapsed:.1f} s, "
          f"{(stats['done'] + n_failed) / elapsed:.2f} "
          f"{'shots' if shots.finder(args) else 'videos'}/s", file=sys.stderr)
