"""Many items through one API client (label.py, judge.py): jobs on threads, every row written as it
comes, and the run stopped when its failures say the run itself is broken, not an item.

One item's failure is that item's row; a failure that would repeat for every item (a refused key, no
quota, a server that stays down) stops the run after the first few with one line that says what to
fix.
"""

import itertools
import signal
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from plumbing.cli import Stop
from plumbing.client import KEY_CODES, QUOTA_CODES, APIError, failure_kind


class Breaker:
    """Watches every item's row and says when the failures mean the run itself is broken: a systemic
    failure; `limit` items in a row that failed with nothing done between them; or `limit` final
    refusals (content moderation) before any item got an answer, which says the requests are wrong,
    not the items. `neutral` codes (a video that cannot be read) say nothing of the API either
    way."""

    def __init__(self, client, limit, neutral=()):
        self.client, self.limit, self.neutral = client, limit, set(neutral)
        self.streak, self.answered = [], False

    def see(self, row):
        """Record one item's row; the reason the run must stop, or None."""
        status, code = row.get("status"), row.get("code")
        if "error" not in row:
            self.answered, self.streak = True, []
            return None
        kind = failure_kind(status, code)
        if code in self.neutral or code == "stopped" or (kind == "final" and self.answered):
            self.streak = [] if kind == "final" else self.streak
            return None
        self.streak.append(f"{status or '-'} {code}")
        if kind == "systemic":
            return self._systemic(status, code)
        if len(self.streak) < self.limit:
            return None
        worst = max(set(self.streak), key=self.streak.count)
        if kind == "final":
            return (
                f"the first {len(self.streak)} items were all refused ({worst}) and none answered: "
                f"is the request right (--model, the frames)? Their refusals are written: if the "
                f"request was wrong, fix it and run again with --retry-errors; if these items are "
                f"simply refused, run again (they are skipped) or raise --max-failures-in-a-row"
            )
        return (
            f"the last {len(self.streak)} items all failed ({worst} x {self.streak.count(worst)}): "
            f"is {self.client.url} up and reachable? They are not marked done: run again to try "
            f"them again (--max-failures-in-a-row sets how many in a row stop a run)"
        )

    def _systemic(self, status, code):
        if code in QUOTA_CODES:
            why = f"the account has no quota left (HTTP {status} {code}): top it up, then run again"
        elif status in (401, 403) or code in KEY_CODES:
            why = (f"the API refused the key in ${self.client.key_env} (HTTP {status} {code}): "
                   f"set a valid key")
        else:
            why = (f"{self.client.url} answered HTTP {status or '-'} {code}: "
                   f"check --api-base and --model")
        return why + "; items that failed are not marked done"


def guarded(work, identify):
    """work(job), or the job's error row when it raises: an APIError as the client classed it (None
    when the run was stopping and it was never asked), anything else as an internal_error, which is
    not done (a rerun tries it again). identify(job) gives the fields that say which item a row is
    for."""
    def run(job):
        try:
            return work(job)
        except APIError as e:
            return (None if e.code == "stopped" else {**identify(job), "error": str(e),
                                                      "status": e.status, "code": e.code})
        except Exception as e:  # a fault nobody foresaw: this item's row, never the run's end
            return {**identify(job), "error": f"{type(e).__name__}: {e}", "status": None,
                    "code": "internal_error"}
    return run


def run_items(client, jobs, work, concurrency, out, limit, identify, neutral=(), seen=None):
    """work(job) -> row for every job, on `concurrency` threads (guarded: an exception is that job's
    row); each row scrubbed of the key, written to `out` (an Appender) and shown to `seen` as it
    comes. Ends with Stop when the Breaker says the run is broken. Ctrl-C (or SIGTERM) starts no new
    request and writes the answers in flight as they come (they are paid for); a second one abandons
    them. Final refusals that come before any answer are held back while the run may still go on;
    they are written when the run stops for them too (they are paid for, and a rerun must not ask
    them again: it goes on past them, and --retry-errors asks them again if the request itself was
    wrong)."""
    breaker, reason, interrupts, held = Breaker(client, limit, neutral), None, [], []

    def interrupt(*_):
        interrupts.append(1)
        client.stop.set()
        if len(interrupts) == 1:
            print(
                "\nstopping: no new requests; those in flight are written as they end "
                "(Ctrl-C again to abandon them)",
                file=sys.stderr,
                flush=True,
            )
        else:
            client.abort()

    # SIGTERM (Slurm, Kubernetes, `timeout`) is a Ctrl-C: the answers in flight are paid for,
    # written
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for row in run_concurrently(jobs, guarded(work, identify), concurrency, client.stop):
            if row is None:   # not asked: the run was stopping
                continue
            row = client.scrub.row(row)
            if failure_kind(row.get("status"), row.get("code")) == "final" and not breaker.answered:
                held.append(row)
            else:
                for r in held + [row]:
                    out.write(r)
                    if seen:
                        seen(r)
                held = []
            why = breaker.see(row)
            if why and reason is None:
                reason = why
                client.stop.set()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for row in held:   # refusals no answer came after: they are answers too
        out.write(row)
        if seen:
            seen(row)
    if interrupts:
        raise KeyboardInterrupt
    if reason:
        raise Stop(reason)


def run_concurrently(jobs, work, workers: int, stop: threading.Event = None):
    """Yield work(job) for every job, computed on `workers` threads, in the order they finish (those
    found finished together, in the order they were taken: one thread is one job after another,
    however late the caller looks). Jobs are pulled as threads free up (at most 2 x workers
    waiting), so a million-item iterator is never listed. Once `stop` is set no new job is pulled;
    those already taken still finish (their answers are paid for)."""
    taken = itertools.count()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending, order = set(), {}

        def finished():
            nonlocal pending
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in sorted(done, key=order.pop):
                yield f.result()
        for job in jobs:
            while len(pending) >= 2 * workers:
                yield from finished()
            if stop is not None and stop.is_set():
                break
            future = pool.submit(work, job)
            pending.add(future)
            order[future] = next(taken)
        while pending:
            yield from finished()
