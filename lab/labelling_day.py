"""A labelling day, simulated: label.py over N videos against a local teacher that fails as real
ones do, while the client is killed, preempted and has a decoder stopped, and restarted each time
(as Slurm requeues a task, half the time through another mount of the same folder). Then: every
video has exactly one row (0 lost, 0 doubled), no row is final that should not be (0 wrongly final),
how many answers were paid for twice, and where the seconds went beside a fault-free run of the same
videos.

    python -m lab.labelling_day --videos 2000 --json results/labelling-day-2026-12-07.json

The server's faults, by a seeded draw per request: 1% of bodies cut, 0.5% stalled past the client's
--timeout, 2% answered 429 with Retry-After, every 50th video moderated (a final 400), and one
outage (every connection dropped) of --outage seconds. The client's: SIGKILL at 15%, 40% and 70% of
the rows, SIGTERM at 55%, a decode worker SIGSTOPped at 25% (its video is a "try again" row,
labelled by the next run).
"""

import argparse
import collections
import functools
import hashlib
import http.server
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from data import jpeg_data_urls
from lab.synthetic import write_video
from plumbing.jsonl import read_rows
from plumbing.workers import decode_workers, imap_unordered

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-labelling-day-0123456789"
EVENTS = ((0.15, "kill"), (0.25, "stop a decoder"), (0.40, "kill"), (0.55, "term"), (0.70, "kill"),
          (0.80, "outage"))
CLIENT = ["--concurrency", "16", "--workers", "2", "--timeout", "2", "--retries", "12",
          "--backoff", "0.2", "--max-retry-after", "2", "--decode-timeout", "5"]


def digest(urls):
    return hashlib.sha256("".join(urls).encode()).hexdigest()


class Quiet(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):   # a client killed mid-request: nothing to say
        pass


class Teacher:
    """An OpenAI-compatible endpoint on localhost that knows each video by its frames' digest."""

    def __init__(self, known, seed, faults=True, stall=3.0, retry_after=1):
        self.known, self.faults, self.stall, self.retry_after = known, faults, stall, retry_after
        self.rng, self.lock, self.log, self.down_until = (
            random.Random(seed),
            threading.Lock(),
            [],
            0.0,
        )
        teacher = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                teacher.answer(self, body)

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def answer(self, h, body):
        video = self.known.get(digest(body["messages"][0]["content"][0]["video"]))
        with self.lock:
            draw = self.rng.random() if self.faults else 1.0
            action = "down" if time.monotonic() < self.down_until else "cut" if draw < 0.01 else \
                "stall" if draw < 0.015 else "429" if draw < 0.035 else \
                "moderated" if moderated(video) else "ok"
            self.log.append({"t": time.monotonic(), "video": video, "action": action})
        if action == "down":
            h.close_connection = True
            return h.connection.close()
        if action == "stall":
            time.sleep(self.stall)
            h.close_connection = True
            return h.connection.close()
        if action == "429":
            return self.send(h, 429,
                             {"error": {"code": "rate_limit_exceeded", "message": "slow down"}},
                             {"Retry-After": str(self.retry_after)})
        if action == "moderated":
            return self.send(h, 400, {"error": {"code": "data_inspection_failed", "message": "no"}})
        reply = {
            "id": "x",
            "model": "teacher",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {
                        "role": "assistant",
                        "content": f"Video {video}: one flat colour fills the frame.",
                    },
                }
            ],
            "usage": {"prompt_tokens": 100, "completion_tokens": 12},
        }
        self.send(h, 200, reply, cut=action == "cut")

    @staticmethod
    def send(h, status, payload, headers=None, cut=False):
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data[:len(data) // 2] if cut else data)
        if cut:
            h.close_connection = True

    def close(self):
        self.httpd.shutdown()


def moderated(video):
    return video is not None and int(hashlib.sha256(video.encode()).hexdigest()[:8], 16) % 50 == 0


def make_videos(folder, n):
    """n tiny videos of one flat colour each; {frames' digest: name} as label.py will send them."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        path = os.path.join(folder, f"v{i:04d}.mp4")
        if not os.path.exists(path):
            colour = rng.integers(0, 256, 3).astype(np.uint8)
            write_video(path, (np.broadcast_to(colour, (24, 32, 3)).copy() for _ in range(4)))
        else:
            rng.integers(0, 256, 3)
    frames = functools.partial(jpeg_data_urls, n=4, max_side=768, q=4)   # what label.py sends
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".mp4"))
    return {digest(urls): os.path.basename(v) for v,
            urls in imap_unordered(frames, paths, workers=2)}


def run_day(work, n, seed=0, faults=True, outage=60.0, stall=3.0, retry_after=1):
    """The day (or with faults=False a fault-free run) over n videos in `work`; its figures."""
    known = make_videos(os.path.join(work, "videos"), n)
    if not os.path.lexists(os.path.join(work, "mnt")):   # the same folder, mounted elsewhere
        os.symlink(os.path.join(work, "videos"), os.path.join(work, "mnt"))
    out = os.path.join(work, f"labels-{'day' if faults else 'clean'}.jsonl")
    for stale in (out, out + ".lock"):
        if os.path.exists(stale):
            os.remove(stale)
    teacher = Teacher(known, seed, faults, stall, retry_after)
    env = {**os.environ, "DASHSCOPE_API_KEY": KEY}
    events, runs, began = list(EVENTS) if faults else [], [], time.monotonic()
    try:
        while len(runs) < 12:
            folder = os.path.join(work, "mnt" if len(runs) % 2 else "videos")
            start, asked = time.monotonic(), len(teacher.log)
            proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "label.py"), folder,
                                     "--out", out, "--api-base", teacher.url, *CLIENT], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
            err = threading.Thread(target=lambda p=proc: p.stderr.read(), daemon=True)
            err.start()
            happened, what = [], None
            while proc.poll() is None:
                time.sleep(0.02)
                if (
                    events
                    and len(read_rows(out)) >= events[0][0] * n
                    and what not in ("kill", "term")
                ):
                    what = events.pop(0)[1]   # one kill or term a run: it ends the run
                    happened.append(what)
                    if what == "kill":
                        os.killpg(proc.pid, signal.SIGKILL)
                    elif what == "term":
                        proc.send_signal(signal.SIGTERM)
                    elif what == "stop a decoder" and decode_workers(proc.pid):
                        os.kill(decode_workers(proc.pid)[0], signal.SIGSTOP)
                    elif what == "outage":
                        teacher.down_until = time.monotonic() + outage
            proc.wait()
            first = next((e["t"] for e in teacher.log[asked:]), None)
            runs.append({"folder": os.path.basename(folder), "events": happened,
                         "exit": proc.returncode, "seconds": round(time.monotonic() - start, 2),
                         "start_up_s": round(first - start, 2) if first else None})
            rows = read_rows(out)
            if (
                proc.returncode == 0
                and len(rows) == n
                and all("caption" in r or r.get("code") == "data_inspection_failed" for r in rows)
            ):
                break
            # stopped for the outage
            if proc.returncode == 1 and teacher.down_until > time.monotonic():
                time.sleep(teacher.down_until - time.monotonic())
    finally:
        teacher.close()
    return figures(read_rows(out), teacher.log, known, runs, time.monotonic() - began, n)


def figures(rows, log, known, runs, seconds, n):
    names = collections.Counter(r.get("name") for r in rows)
    final = [r for r in rows if "caption" not in r]
    answered = collections.Counter(e["video"] for e in log if e["action"] in ("ok", "moderated"))
    actions = collections.Counter(e["action"] for e in log)
    return {"videos": n, "rows": len(rows), "lost": n - len(names),
            "doubled": sum(c - 1 for c in names.values()),
            "wrongly_final": sum(not moderated(r.get("name")) for r in final),
            "moderated": len(final), "paid_twice": sum(c - 1 for c in answered.values()),
            "requests": len(log), "faults": dict(actions), "runs": runs,
            "seconds": round(seconds, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--videos", type=int, default=2000)
    p.add_argument("--outage", type=float, default=60.0, help="seconds the teacher is down")
    p.add_argument("--work", default=os.path.expanduser("~/.cache/pllava/labelling-day"))
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    clean = run_day(args.work, args.videos, faults=False)
    day = run_day(args.work, args.videos, outage=args.outage)
    result = {"fault_free": clean, "day": day,
              "extra_s": round(day["seconds"] - clean["seconds"], 1), "outage_s": args.outage,
              "start_ups_s": [r["start_up_s"] for r in day["runs"]]}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
