"""label.py and judge.py against a server that fails: failures that repeat for every item stop
the run early, one item's is its row, Ctrl-C and SIGTERM keep what was paid for, and a key never
reaches a report."""

import json
import os
import signal
import time

import pytest

from plumbing.jsonl import read_rows
from plumbing.redact import Redactor

from chaos_api import KEY, ChaosAPI
from tools import free_port, run_tool

ANSWER = "A red kite circles over a green hill."


def run_api_tool(tool, args):
    return run_tool(tool, args, env={"DASHSCOPE_API_KEY": KEY, "OPENAI_API_KEY": KEY})


@pytest.fixture
def clips(tmp_path):
    from videos import write_video
    folder = tmp_path / "v"
    folder.mkdir()
    return [write_video(str(folder / f"c{i:02d}.mp4"), n_frames=4,
                        size=(32, 24)) for i in range(12)], folder


@pytest.mark.slow
@pytest.mark.parametrize("fault, says", [("401", "refused the key in $DASHSCOPE_API_KEY"),
                                         ("quota", "no quota left")])
def test_a_refused_key_or_no_quota_stops_the_run_and_marks_nothing_done(tmp_path, clips, fault,
                                                                         says):
    videos, folder = clips
    counter = iter(range(10**6))
    api = ChaosAPI(lambda body, item: ANSWER, identify=lambda body: next(counter),
                   # the key stops working
                   script={i: ["ok"] if i < 3 else [fault] for i in range(10**3)})
    out = str(tmp_path / "labels.jsonl")
    try:
        r = run_api_tool("label.py",
                         [str(folder), "--out", out, "--api-base", api.url, "--concurrency", "1",
                          "--workers", "1"])
        sent = len(api.log)
    finally:
        api.close()
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1].startswith("error: ") and says in lines[-1]
    assert "Traceback" not in r.stderr
    # stopped after the first failure, not 12
    assert sent <= 6
    rows = read_rows(out)
    assert sum("caption" in row for row in rows) == 3
    api = ChaosAPI(lambda body, item: ANSWER, identify=lambda body: "ok",
                   script={"ok": ["ok"] * 100})
    try:
        again = run_api_tool("label.py", [str(folder), "--out", out, "--api-base", api.url])
    finally:
        api.close()
    assert again.returncode == 0 and len(api.log) == 9               # the failed ones were not done
    assert sorted(row["video"] for row in read_rows(out)) == sorted(videos)
    assert KEY not in open(out).read() + r.stderr + again.stderr


def test_an_unreachable_server_stops_the_run_after_a_few_items(tmp_path, clips):
    _, folder = clips
    out = str(tmp_path / "labels.jsonl")
    t0 = time.monotonic()
    r = run_api_tool("label.py",
                     [str(folder), "--out", out, "--api-base",
                      f"http://127.0.0.1:{free_port()}/v1", "--concurrency", "2", "--retries", "1",
                      "--backoff", "0.01", "--max-failures-in-a-row", "3"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "up and reachable" in lines[-1] and lines[-1].startswith("error: ")
    # 3 in a row, plus up to 2 x 2 in flight
    assert len(read_rows(out)) <= 7 and time.monotonic() - t0 < 60
    assert not any("caption" in row for row in read_rows(out))


def test_judge_stops_on_a_refused_key_and_keeps_what_was_paid_for(tmp_path):
    gt, pred = tmp_path / "gt.jsonl", tmp_path / "pred.jsonl"
    gt.write_text("".join(json.dumps({"video": f"v{i}",
                                      "caption": f"gt {i}"}) + "\n" for i in range(8)))
    pred.write_text("".join(json.dumps({"video": f"v{i}",
                                        "caption": f"pred {i}"}) + "\n" for i in range(8)))
    counter = iter(range(10**6))
    api = ChaosAPI(lambda body, item: json.dumps({"score": 3, "correct": True, "reason": "r"}),
                   identify=lambda body: next(counter),
                   script={i: ["ok"] if i < 4 else ["401"] for i in range(100)})
    try:
        r = run_api_tool("judge.py",
                         ["--gt", str(gt), "--pred", str(pred), "--out", str(tmp_path / "rep"),
                          "--api-base", api.url, "--concurrency", "1"])
    finally:
        api.close()
    assert r.returncode == 1 and "refused the key in $OPENAI_API_KEY" in r.stderr.splitlines()[-1]
    cache = read_rows(str(tmp_path / "rep" / "judgments.jsonl"))
    assert sum("score" in row for row in cache) == 4
    assert not (tmp_path / "rep" / "summary.json").exists()
    assert KEY not in (tmp_path / "rep" / "judgments.jsonl").read_text() + r.stderr


def test_an_unexpected_exception_is_that_items_row(tmp_path):
    """Whatever a job's work raises, anywhere in it, is that job's row (not done); the others go
    on."""
    import label
    from labelling.run import identify, is_done
    from plumbing.jsonl import Appender, read_rows
    from plumbing.runner import run_items

    class Broken:
        scrub, stop = Redactor(""), __import__("threading").Event()

        def chat(self, *a, **kw):
            raise KeyError("a bug in a reply handler")

    class Args:
        max_new_tokens, temperature, frames_as = 10, None, "video"
    from plumbing.sources import Video
    jobs = [((Video("v.mp4", "v.mp4"), None, None), ["data:image/jpeg;base64,AA=="]),
            ((Video("w.mp4", "w.mp4"), (1, 3, 2.0, 4.0), None), ["x"])]
    with Appender(str(tmp_path / "out.jsonl")) as out:
        work = lambda job: label.label_one(Broken(), Args, "prompt", {}, "s", job)   # noqa: E731
        run_items(Broken(), jobs, work, 2, out, 10, identify)
    rows = sorted(read_rows(str(tmp_path / "out.jsonl")), key=lambda r: r["video"])
    assert rows[0]["code"] == "internal_error" and "KeyError" in rows[0]["error"]
    assert not is_done(rows[0])
    assert rows[1]["code"] == "internal_error" and rows[1]["shot"] == 1 and rows[1]["start"] == 2.0


def test_rows_finished_together_come_in_the_order_their_jobs_were_taken():
    """A caller that looks late finds several jobs finished at once; they come in the order they
    were taken, so one thread's rows are its jobs' order (the Breaker's "refusals before any answer"
    rule reads that order: a refusal seen after the answer that followed it would not count)."""
    import threading
    import time

    from plumbing.runner import run_concurrently
    ended = [threading.Event() for _ in range(60)]

    def work(job):   # each ends after the one taken before it: they finish in the order taken
        if job:
            ended[job - 1].wait()
        ended[job].set()
        return job
    got = []
    for row in run_concurrently(range(60), work, 3):   # 3 threads, 6 jobs taken
        got.append(row)
        time.sleep(0.005)   # all 6 are done before the next look
    assert got == list(range(60)), got


def slow_api():
    """A teacher that answers every request a second after it comes."""
    return ChaosAPI(lambda body, item: ANSWER, identify=lambda body: "x",
                    script={"x": [("slow_ok", 1.0)] * 100})


def three_in_flight(folder, out, api):
    """label.py started, once three of its requests are in flight."""
    proc = run_tool("label.py", [folder, "--out", out, "--api-base", api.url, "--concurrency", "3",
                                 "--timeout", "60"], env={"DASHSCOPE_API_KEY": KEY}, wait=False)
    while len(api.log) < 3:
        time.sleep(0.01)
    return proc


@pytest.mark.slow
def test_ctrl_c_writes_the_answers_in_flight_and_a_second_abandons_them(tmp_path, clips):
    _, folder = clips
    out = str(tmp_path / "labels.jsonl")
    api = slow_api()
    try:
        proc = three_in_flight(folder, out, api)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        asked = len(api.log)
        slow = run_tool("label.py",
                        [folder, "--out", out, "--api-base", api.url, "--concurrency", "3",
                         "--timeout", "60"], env={"DASHSCOPE_API_KEY": KEY}, wait=False)
        while len(api.log) < asked + 3:
            time.sleep(0.01)
        slow.send_signal(signal.SIGINT)
        time.sleep(0.2)
        slow.send_signal(signal.SIGINT)   # the second: do not wait for them
        t1 = time.monotonic()
        _, err2 = slow.communicate(timeout=60)
    finally:
        api.close()
    assert time.monotonic() - t0 < 30 and t1 - t0 > 0 and "Traceback" not in err + err2, err + err2
    assert proc.returncode != 0 and err.strip().splitlines()[-1] == "interrupted"
    # no new request; the paid answers kept
    assert asked == 3 and len(read_rows(out)) >= 3
    assert slow.returncode != 0 and time.monotonic() - t1 < 5


def test_judge_writes_no_key_in_any_report_file(tmp_path):
    gt, pred = tmp_path / "gt.jsonl", tmp_path / "pred.jsonl"
    gt.write_text(json.dumps({"video": "v", "caption": "gt"}) + "\n")
    pred.write_text(json.dumps({"video": "v", "caption": "pred"}) + "\n")
    api = ChaosAPI(lambda body, item: json.dumps({"score": 3, "correct": True,
                                                  "reason": f"signed {KEY}"}),
                   identify=lambda body: "x", script={"x": ["ok"] * 9})
    try:
        r = run_api_tool("judge.py", ["--gt", gt, "--pred", pred, "--out", tmp_path / "rep",
                                      "--api-base", api.url])
    finally:
        api.close()
    assert r.returncode == 0, r.stderr
    for name in os.listdir(tmp_path / "rep"):
        assert KEY[:10] not in (tmp_path / "rep" / name).read_text(), name


@pytest.mark.slow
def test_refusals_before_any_answer_stop_the_run_but_are_never_paid_for_twice(tmp_path):
    from videos import solid_videos
    order, _ = solid_videos(str(tmp_path / "v"), 12, n_frames=4, size=(32, 24))
    out = str(tmp_path / "labels.jsonl")
    # a video is known by its frames (one colour each): the first 4 asked are refused
    first_seen = {}
    def video_of(body):
        return first_seen.setdefault(json.dumps(body["messages"][0]["content"][0]), len(first_seen))
    api = ChaosAPI(lambda body, item: ANSWER, identify=video_of,
                   script={i: ["moderated" if i < 4 else "ok"] * 3 for i in range(12)})
    args = [str(tmp_path / "v"), "--out", out, "--api-base", api.url, "--max-failures-in-a-row",
            "4", "--concurrency", "1"]
    try:
        first = run_api_tool("label.py", args)
        calls, written = [(e["item"], e["action"]) for e in api.log], len(read_rows(out))
        second = run_api_tool("label.py", args)
    finally:
        api.close()
    said = first.stderr.strip().splitlines()[-1]
    assert first.returncode == 1 and "were all refused" in said, (calls, first.stderr)
    assert "--retry-errors" in said
    assert "--max-failures-in-a-row" in said
    # the refusals written (and an answer in flight)
    assert len(calls) in (4, 5) and written == len(calls), calls
    # each asked once
    assert second.returncode == 0 and len(api.log) == len(order), (api.log, second.stderr)
    rows = read_rows(out)
    assert sum("caption" in r for r in rows) == len(order) - 4
    assert len({r["name"] for r in rows}) == len(order)


@pytest.mark.slow
def test_sigterm_is_a_first_ctrl_c(tmp_path, clips):
    _, folder = clips
    out = str(tmp_path / "labels.jsonl")
    api = slow_api()
    try:
        proc = three_in_flight(folder, out, api)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        api.close()
    # paid for, written; no new request
    assert len(api.log) == 3 and len(read_rows(out)) == 3, err
    assert not os.path.exists(out + ".lock") and "labelled 3" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "interrupted"
