"""label.py against a misbehaving local chat-completions server; label.py clean on known
captions."""

import collections
import json
import os
import signal
import time

import pytest

from plumbing.client import RateLimit
from plumbing.jsonl import read_rows

from chaos_api import ChaosAPI
from fake_api import KEY, colour_of, label_server
from tools import run_tool, stop_a_decode_worker
from videos import solid_videos, write_video


def make_videos(folder, n):
    return solid_videos(folder, n)


def run_label(args, wait=True, **kw):
    return run_tool("label.py", args, env={"DASHSCOPE_API_KEY": KEY}, wait=wait, **kw)


FAULTS = {   # video index: the server's answers to its successive attempts
    1: [("status", 429, "rate_limit_exceeded", {"Retry-After": "1"})],
    2: [("status", 500, "server_error", {}), ("status", 503, "overloaded", {})],
    3: [("hang", 3.0)],
    4: [("drop",)],
    5: [("malformed",)],
    6: [("status", 400, "data_inspection_failed", {})],
    7: [("status", 400, "invalid_parameter", {})],
    8: [("status", 413, "request_too_large", {})],
    # asked again twice, then a row
    9: [("content", "")] * 3,
    10: [("content", "A caption cut short because", "length")],
    11: [("status", 502, "bad_gateway", {}), ("status", 504, "gateway_timeout", {}),
         ("status", 408, "timeout", {}), ("status", 409, "conflict", {})],
}


@pytest.mark.slow
def test_fault_mix_every_video_one_row(tmp_path):
    videos, colours = make_videos(str(tmp_path / "v"), 13)
    open(tmp_path / "v" / "broken.mp4", "w").write("not a video")
    api = label_server(colours)
    api.script = {k: list(v) for k, v in FAULTS.items()}
    out = str(tmp_path / "labels.jsonl")
    try:
        r = run_label([str(tmp_path / "v"), "--out", out, "--api-base", api.url, "--concurrency",
                       "4", "--timeout", "1", "--backoff", "0.05", "--model", "qwen-vl-max"])
    finally:
        api.close()
    assert r.returncode == 0, r.stderr
    rows = read_rows(out)
    by_video = {row["video"]: row for row in rows}
    assert len(rows) == 14 and len(by_video) == 14
    for i in (0, 1, 2, 3, 4, 5, 11, 12):
        row = by_video[videos[i]]
        assert row["caption"].startswith(f"Video {i}:") and row["finish_reason"] == "stop", row
        assert row["usage"]["prompt_tokens"] == 100 and row["model"] == "fake-vl"
    expect = {6: (400, "data_inspection_failed"), 7: (400, "invalid_parameter"),
              8: (413, "request_too_large"), 9: (200, "empty_reply")}
    for i, (status, code) in expect.items():
        row = by_video[videos[i]]
        assert "caption" not in row and (row["status"], row["code"]) == (status, code), row
        assert "***" in row["error"] or i == 9
    assert by_video[videos[10]]["finish_reason"] == "length"
    assert by_video[str(tmp_path / "v" / "broken.mp4")]["code"] == "unreadable_video"
    # no retry for the final errors, a retry for each retryable fault
    attempts = collections.Counter(e["item"] for e in api.log)
    assert [attempts[i] for i in (6, 7, 8, 9)] == [1, 1, 1,
                                                   3] and attempts[2] == 3 and attempts[11] == 5
    t429 = [e["t"] for e in api.log if e["item"] == 1]
    assert t429[1] - t429[0] >= 0.95                                   # Retry-After: 1 honoured
    # what the provider receives: the key in the header, 4 frames as one video part of decodable
    # JPEGs
    for e in api.log:
        assert e["auth"] == f"Bearer {KEY}" and e["body"]["model"] == "qwen-vl-max"
        parts = e["body"]["messages"][0]["content"]
        assert parts[0]["type"] == "video" and len(parts[0]["video"]) == 4
        assert parts[-1]["type"] == "text"
        assert all(u.startswith("data:image/jpeg;base64,") for u in parts[0]["video"])
        assert colour_of(parts[0]["video"][3])[1] == (64, 96, 3)
    # the key is nowhere: not in the rows (the 401 message echoed it), not in anything printed
    for text in (open(out).read(), r.stdout, r.stderr):
        assert KEY not in text
    assert "failed 5" in r.stderr and "400 data_inspection_failed" in r.stderr
    assert "estimated cost" in r.stderr
    # a rerun tries again what is not done (7, 8, 9: they may be this item's bad luck); a final
    # answer (moderation) and an unreadable file are done. Then every video still has exactly one
    # row.
    api = label_server(colours)
    try:
        again = run_label([str(tmp_path / "v"), "--out", out, "--api-base", api.url,
                           "--backoff", "0.05"])
    finally:
        api.close()
    assert again.returncode == 0 and sorted(e["item"] for e in api.log) == [7, 8, 9], again.stderr
    rows = read_rows(out)
    assert len(rows) == 14 and len({row["video"] for row in rows}) == 14
    assert all("caption" in row for row in rows if row["video"] in {videos[i] for i in (7, 8, 9)})


def test_frames_as_images_max_side_and_prompt(tmp_path):
    videos, colours = make_videos(str(tmp_path), 2)
    (tmp_path / "prompt.txt").write_text("Describe these {n} frames.")
    api = label_server(colours)
    try:
        r = run_label([str(tmp_path), "--out", str(tmp_path / "o.jsonl"), "--api-base", api.url,
                       "--frames-as", "images", "--max-side", "48", "--prompt-file",
                       str(tmp_path / "prompt.txt")])
    finally:
        api.close()
    assert r.returncode == 0, r.stderr
    body = api.log[0]["body"]
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url"] * 4 + ["text"]
    assert parts[-1]["text"] == "Describe these 4 frames."
    assert colour_of(parts[0]["image_url"]["url"])[1] == (32, 48, 3)


@pytest.mark.slow
def test_sigkill_then_rerun_every_video_exactly_once(tmp_path):
    videos, colours = make_videos(str(tmp_path / "v"), 24)
    api = label_server(colours)
    # slow answers, so the kill lands mid-run
    api.script = {i: [("hang", 0.3)] for i in range(24)}
    out = tmp_path / "labels.jsonl"
    args = [str(tmp_path / "v"), "--out", str(out), "--api-base", api.url, "--concurrency", "3",
            "--backoff", "0.05"]
    try:
        proc = run_label(args, wait=False)
        deadline = time.time() + 120
        while time.time() < deadline and len(read_rows(str(out))) < 5:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        before = open(out).read()
        first = read_rows(str(out))
        assert 5 <= len(first) < 24
        r = run_label(args)
    finally:
        api.close()
    assert r.returncode == 0, r.stderr
    # no written row lost or changed
    assert open(out).read().startswith(before.rsplit("\n", 1)[0])
    rows = read_rows(str(out))
    assert collections.Counter(row["video"] for row in rows) == collections.Counter(videos)
    assert all(json.loads(line) for line in open(out))                 # no torn line


@pytest.mark.slow
def test_rate_cap_and_concurrency(tmp_path):
    videos, colours = make_videos(str(tmp_path), 12)
    api = label_server(colours)
    try:
        # --rpm 240: one request every 0.25 s at most
        r = run_label([str(tmp_path), "--out", str(tmp_path / "a.jsonl"), "--api-base", api.url,
                       "--concurrency", "6", "--rpm", "240"])
        times = sorted(e["t"] for e in api.log)
        api.script = {i: [("hang", 1.0)] for i in range(12)}
        api.log.clear()
        r2 = run_label([str(tmp_path), "--out", str(tmp_path / "b.jsonl"), "--api-base", api.url,
                        "--concurrency", "4"])
    finally:
        api.close()
    assert r.returncode == 0 and r2.returncode == 0
    # 11 gaps of 0.25 s between the starts; the server sees arrivals, and the first one (a new
    # connection on a loaded machine) may come late by up to a gap or two (uncapped, all 12 arrive
    # within about 0.1 s)
    assert len(times) == 12 and times[-1] - times[0] >= 9 * 0.25
    # any 1 s window: 4 by the cap, +2 for arrival jitter on a loaded machine (uncapped: all 12)
    for t in times:
        assert sum(1 for u in times if t <= u < t + 1.0) <= 6
    assert api.max_inflight == 4


def test_rate_limit_window_with_a_fake_clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    monkeypatch.setattr(time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    limit, sent = RateLimit(10), []
    for _ in range(35):
        limit.wait()
        sent.append(now[0])
    assert all(sum(1 for u in sent if t <= u < t + 60) <= 10 for t in sent)
    assert sent[-1] == pytest.approx(34 * 6.0)


def test_clean_rules(tmp_path):
    long = ("A red fox runs through deep snow at the edge of a pine forest, stops beside a fallen "
            "log, sniffs the ground, looks back over its shoulder toward the camera, and then "
            "trots away between the trees while light snow keeps falling and the sky slowly "
            "darkens into evening.")
    rows = [
        {"video": "a", "caption": "The video shows " + long[0].lower() + long[1:]},
        {"video": "b", "error": "HTTP 400", "status": 400},
        {"video": "c", "caption": "   "},
        {"video": "d", "caption": "I'm sorry, but I can't help with describing this video."},
        {"video": "e", "caption": "A man walks into a room and sits", "finish_reason": "length"},
        {"video": "f", "caption": "The cat jumps. " + "The cat jumps on the table. " * 6},
        {"video": "g", "caption": long.upper()},
        # Jaccard of 3-grams ~0.88
        {"video": "h", "caption": long.replace("fallen log", "fallen tree")},
        {"video": "i", "caption": "In this video, two girls in school uniforms talk under a cherry "
                                  "tree at sunset."},
        {"video": "a", "caption": "another caption for a video already labelled"},
        {"video": "j",
         "caption": "A spaceship lands on a green planet while two robots wave from a hill."},
    ]
    src = tmp_path / "labels.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = run_label(["clean", str(src), "--out", str(tmp_path / "clean.jsonl")])
    assert r.returncode == 0, r.stderr
    kept = {row["video"]: row["caption"] for row in read_rows(str(tmp_path / "clean.jsonl"))}
    assert kept == {"a": long,
                    "i": "Two girls in school uniforms talk under a cherry tree at sunset.",
                    "j": rows[-1]["caption"]}
    for line in ("error or empty: 2", "refused: 1", "truncated: 1", "degenerate loop: 1",
                 "exact duplicate: 1", "near duplicate: 1", "boilerplate stripped (kept): 2",
                 "video already seen: 1"):
        assert line in r.stderr, line
    # --keep-duplicates: the same, but a caption another video has too stays (a templated data set)
    r = run_label(["clean", str(src), "--out", str(tmp_path / "all.jsonl"), "--keep-duplicates"])
    said = r.stderr.replace("--keep-duplicates", "")
    assert r.returncode == 0 and "duplicate" not in said, r.stderr
    assert set(kept) < {row["video"] for row in read_rows(str(tmp_path / "all.jsonl"))}


def gone(pid):
    """Has the process ended (no such process, or a zombie nobody has reaped yet)?"""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("signals, flags", [((signal.SIGTERM,), []), ((signal.SIGTERM,) * 2, []),
                                            ((signal.SIGINT,) * 2, ["--shots"])])
def test_sigterm_or_ctrl_c_ends_a_run_whose_decode_is_stalled(tmp_path, signals, flags):
    """With a decode stalled for good (its worker stopped) and --decode-timeout far off, a SIGTERM
    (Slurm's preemption: SIGKILL follows after its grace time), or two, or two Ctrl-C while shots
    are found, end the run at once: one line, the lock gone, the stalled worker killed."""
    videos, colours = solid_videos(str(tmp_path / "v"), 4)
    api = label_server(colours)
    out = str(tmp_path / "labels.jsonl")
    try:
        proc = run_label([tmp_path / "v", "--out", out, "--api-base", api.url, "--workers", "1",
                          "--decode-timeout", "600", *flags], wait=False)
        worker = stop_a_decode_worker(proc)
        time.sleep(0.5)
        for sig in signals:
            proc.send_signal(sig)
            time.sleep(0.2)
        try:
            _, err = proc.communicate(timeout=30)    # the decode's own limit is 600 s away
        except Exception:
            proc.kill()
            raise AssertionError("the run did not end after "
                                 + " and ".join(s.name for s in signals))
    finally:
        api.close()
    assert proc.returncode != 0 and err.strip().splitlines()[-1] == "interrupted"
    assert "Traceback" not in err
    assert not os.path.exists(out + ".lock") and gone(worker)


@pytest.mark.slow
def test_a_decode_worker_stopped_while_idle_dies_with_its_killed_client(tmp_path):
    videos, colours = solid_videos(str(tmp_path / "v"), 4)
    api = label_server(colours)
    # the client waits on the server; its workers idle
    api.script = {i: [("hang", 30)] for i in range(4)}
    try:
        proc = run_label([tmp_path / "v", "--out", tmp_path / "l.jsonl", "--api-base", api.url,
                          "--workers", "2"], wait=False)
        while len(api.log) < 1:
            time.sleep(0.01)
        worker = stop_a_decode_worker(proc)
        # the client alone, as the OOM killer would
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        end = time.time() + 20
        while time.time() < end and not gone(worker):
            time.sleep(0.05)
    finally:
        api.close()
    assert gone(worker)


@pytest.mark.slow
def test_two_folders_whose_videos_share_names_never_share_an_out_or_a_list(tmp_path):
    """season1/ep00.mp4 and season2/ep00.mp4 are both "ep00.mp4" when each folder is the source: a
    second folder into the first one's --out, or a list whose rows name two files alike, is refused
    at start, nothing asked and nothing rewritten (before: "4 already done", season 2 never
    labelled)."""
    import json
    _, colours = solid_videos(str(tmp_path / "s" / "season1"), 8)
    os.makedirs(tmp_path / "s" / "season2")
    for i in range(4):   # season 2: other files, the same names
        os.rename(tmp_path / "s" / "season1" / f"v{i + 4:02d}.mp4",
                  tmp_path / "s" / "season2" / f"v{i:02d}.mp4")
    api = label_server(colours)
    out = tmp_path / "labels.jsonl"
    try:
        first = run_label([tmp_path / "s" / "season1", "--out", out, "--api-base", api.url])
        before, calls = out.read_text(), len(api.log)
        second = run_label([tmp_path / "s" / "season2", "--out", out, "--api-base", api.url])
        listed = tmp_path / "both.jsonl"
        listed.write_text("".join(json.dumps({"video": str(tmp_path / "s" / s / f"v{i:02d}.mp4"),
                                              "name": f"v{i:02d}.mp4"})
                                  + "\n" for s in ("season1", "season2") for i in range(4)))
        both = run_label([listed, "--out", tmp_path / "b.jsonl", "--api-base", api.url])
    finally:
        api.close()
    assert first.returncode == 0 and out.read_text() == before and len(api.log) == calls == 4
    for r in (second, both):
        said = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and said.startswith("error:"), r.stderr
        assert "are both named 'v0" in said, r.stderr
        assert "season1/v0" in said and "season2/v0" in said
    assert not os.path.exists(tmp_path / "b.jsonl")


@pytest.mark.slow
def test_label_refuses_an_out_made_with_other_settings(tmp_path):
    folder = tmp_path / "v"
    folder.mkdir()
    write_video(str(folder / "a.mp4"), n_frames=8, size=(32, 24))
    out = tmp_path / "labels.jsonl"
    api = ChaosAPI(lambda body, item: "A red kite circles over a green hill.",
                   identify=lambda body: "x", script={}, key=None)
    try:
        first = run_tool("label.py", [folder, "--out", out, "--api-base", api.url],
                         env={"DASHSCOPE_API_KEY": KEY})
        other = run_tool("label.py", [folder, "--out", out, "--api-base", api.url, "--frames", "8"],
                         env={"DASHSCOPE_API_KEY": KEY})
        again = run_tool("label.py",
                         [folder, "--out", out, "--api-base", api.url, "--frames", "8",
                          "--overwrite"], env={"DASHSCOPE_API_KEY": KEY})
    finally:
        api.close()
    assert first.returncode == 0 and other.returncode == 1, other.stderr
    assert "other settings" in other.stderr, other.stderr
    rows = read_rows(str(out))
    assert again.returncode == 0 and len(rows) == 1 and rows[0]["frames"] == 8
