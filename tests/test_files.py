"""Files and paths as people have them: broadcast captures, absurd frame sizes, names that are not
UTF-8, JSONL cut anywhere, one video spelled three ways, two runs on one output, values that can
never work, inputs that are missing or are not what they say."""

import functools
import json
import os
import time

import numpy as np
import pytest

from data import VideoError, read_clip_frames, read_frames
from plumbing import sources
from plumbing.jsonl import Appender, Busy, read_rows
from plumbing.workers import imap_unordered

from fake_api import KEY, label_server
from tools import ROOT, run_main, run_tool
from videos import read_index, solid_videos, write_video


def write_ts(path, n, start_s, codec):
    """An MPEG-TS capture as a broadcast recorder leaves it: timestamps starting minutes (or a day)
    in."""
    return write_video(path, n_frames=n, codec=codec, start_s=start_s, container="mpegts")


@pytest.mark.parametrize("n, start, codec",
                         [(25, 600.0, "libx264"), (8, 95000.0, "libx264"), (3, 1.4, "mpeg2video"),
                          (3, 600.0, "libx264")])
def test_short_ts_captures_that_do_not_start_at_zero(tmp_path, n, start, codec):
    path = write_ts(tmp_path / "cap.m2ts", n, start, codec)
    frames = read_frames(path, 4)
    assert [read_index(f) for f in frames] == [int((i + 0.5) * n / 4) for i in range(4)]


def test_a_frame_too_thin_to_resize_is_an_error_not_gigabytes(tmp_path):
    # to 336 x 672,000 at 336
    path = write_video(tmp_path / "thin.mkv", n_frames=3, size=(2, 4000), codec="ffv1",
                       pix_fmt="yuv444p",
                       frame_fn=lambda i, w, h: np.full((h, w, 3), 40 * i, np.uint8))
    t0 = time.monotonic()
    results = dict(imap_unordered(functools.partial(read_clip_frames, n=4, size=336), [path],
                                  workers=1, memory_gb=1))
    said = str(results[path])
    assert isinstance(results[path], VideoError) and "pixels" in said and said.startswith(path)
    assert time.monotonic() - t0 < 30
    # what a teacher gets: within bounds
    assert read_frames(path, 2, max_side=768).shape == (2, 768, 1, 3)


def test_a_worker_that_needs_too_much_memory_gets_an_error_row_and_the_pool_goes_on():
    items = [3 * 2**30, 1000, 2 * 2**30, 10]
    results = dict(imap_unordered(functools.partial(np.ones, dtype=np.uint8), items, workers=1,
                                  memory_gb=1))
    assert isinstance(results[3 * 2**30],
                      VideoError) and "more than 1.0 GiB" in str(results[3 * 2**30])
    assert isinstance(results[2 * 2**30], VideoError)
    assert results[1000].sum() == 1000 and results[10].sum() == 10


def test_jsonl_torn_inside_a_character_garbage_and_a_last_row_without_newline(tmp_path):
    path = str(tmp_path / "rows.jsonl")
    whole = [{"video": "a", "caption": "一只猫在跳"}, {"video": "b", "caption": "ok"}]
    # inside 猫
    torn = json.dumps({"video": "c", "caption": "一只猫"}, ensure_ascii=False).encode()[:-6]
    with open(path, "wb") as f:
        f.write((json.dumps(whole[0], ensure_ascii=False) + "\n").encode())
        f.write(b"\xff\xfe not utf-8 at all\n[1, 2, 3]\nnot json\n\"a string\"\n"
                + b"[" * 100000 + b"\n")
        f.write((json.dumps(whole[1]) + "\n").encode() + torn)
    assert read_rows(path) == whole
    with Appender(path) as out:
        out.write({"video": "d", "caption": "next"})
    assert read_rows(path)[-1] == {"video": "d", "caption": "next"} and len(read_rows(path)) == 3
    # a whole last row that only lacks its newline is a row: kept, and the next goes on a line of
    # its own
    with open(path, "ab") as f:
        f.write(json.dumps({"video": "e", "caption": "no newline"}).encode())
    assert read_rows(path)[-1]["video"] == "e"
    with Appender(path) as out:
        out.write({"video": "f", "caption": "after"})
    assert [r["video"] for r in read_rows(path)] == ["a", "b", "d", "e", "f"]
    lines = open(path, "rb").read().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[-3:-1])


def test_a_second_writer_is_refused(tmp_path):
    path = str(tmp_path / "rows.jsonl")
    with Appender(path) as first:
        first.write({"video": "a"})
        with pytest.raises(Busy, match=f"pid {os.getpid()}"):
            Appender(path)
    with Appender(path) as again:   # free again once the first closed
        again.write({"video": "b"})
    assert [r["video"] for r in read_rows(path)] == ["a",
                                                     "b"] and not os.path.exists(path + ".lock")


def label_folder(folder, n):
    return solid_videos(folder, n, n_frames=6, size=(48, 32))


def run_label(args, wait=True):
    return run_tool("label.py", args, env={"DASHSCOPE_API_KEY": KEY}, wait=wait)


@pytest.mark.slow
def test_a_file_name_that_is_not_utf8(tmp_path):
    folder = tmp_path / "v"
    paths, colours = label_folder(str(folder), 2)
    bad = os.path.join(os.fsencode(str(folder)), b"caf\xe9-\xff.mp4")   # Latin-1 from an old disk
    os.rename(paths[1], bad)
    api = label_server(colours)
    out = str(tmp_path / "labels.jsonl")
    try:
        r = run_label([str(folder), "--out", out, "--api-base", api.url])
        again = run_label([str(folder), "--out", out, "--api-base", api.url])
    finally:
        api.close()
    assert r.returncode == 0 and again.returncode == 0, r.stderr + again.stderr
    rows = read_rows(out)
    assert sorted(os.fsencode(row["video"]) for row in rows) == sorted([os.fsencode(paths[0]), bad])
    # the rerun asked for nothing
    assert all("caption" in row for row in rows) and len(api.log) == 2
    # the file itself is valid UTF-8
    open(out, encoding="utf-8").read()


@pytest.mark.slow
def test_one_video_spelled_three_ways_is_one_row_and_retry_errors_leaves_one_row(tmp_path):
    folder = tmp_path / "vids"
    paths, colours = label_folder(str(folder), 3)
    api = label_server(colours)
    api.script = {1: [("status", 400, "data_inspection_failed", {})]}
    out = str(tmp_path / "labels.jsonl")
    rel = os.path.relpath(str(folder), ROOT)
    try:
        spellings = [str(folder), "./" + rel + "/", str(folder) + "//"]
        runs = [run_label([s, "--out", out, "--api-base", api.url]) for s in spellings]
        asked = len(api.log)
        retried = run_label(["./" + rel, "--out", out, "--api-base", api.url, "--retry-errors"])
    finally:
        api.close()
    assert all(r.returncode == 0 for r in runs + [retried])
    # spelled three ways: asked once; then the retry
    assert asked == 3 and len(api.log) == 4
    rows = read_rows(out)
    assert sorted(sources.canonical(r["video"]) for r in rows) == \
        sorted(sources.canonical(p) for p in paths)
    # the moderated one, answered on the retry
    assert all("caption" in r for r in rows)


@pytest.mark.slow
def test_two_label_runs_on_one_output(tmp_path):
    paths, colours = label_folder(str(tmp_path / "v"), 6)
    api = label_server(colours)
    api.script = {i: [("hang", 0.5)] for i in range(6)}
    out = str(tmp_path / "labels.jsonl")
    try:
        first = run_label([str(tmp_path / "v"), "--out", out, "--api-base", api.url,
                           "--concurrency", "1"], wait=False)
        while not os.path.exists(out + ".lock"):
            time.sleep(0.01)
        second = run_label([str(tmp_path / "v"), "--out", out, "--api-base", api.url])
        first.communicate(timeout=120)
    finally:
        api.close()
    last = second.stderr.strip().splitlines()[-1]
    assert second.returncode == 1 and "being written by another run" in last
    assert first.returncode == 0 and len(read_rows(out)) == 6 and len(api.log) == 6


@pytest.mark.parametrize("tool, args", [
    ("caption.py", ["--frames", "0"]), ("caption.py", ["--batch-size", "0"]),
    ("caption.py", ["--max-new-tokens", "0"]), ("caption.py", ["--top-p", "1.5"]),
    ("label.py", ["--frames", "0"]), ("label.py", ["--concurrency", "0"]),
    ("label.py", ["--timeout", "-1"]), ("label.py", ["--shard", "3/2"]),
    ("label.py", ["--rpm", "nan"]),
    ("judge.py", ["--gt", "a", "--pred", "b", "--out", "c", "--concurrency", "0"]),
    ("train.py", ["--data", "a", "--out", "o", "--model", "m", "--batch-size", "0"]),
    ("train.py", ["--data", "a", "--out", "o", "--model", "m", "--keep", "0"])])
def test_values_that_can_never_work_fail_once_at_start(tmp_path, tool, args):
    source = [] if tool in ("judge.py", "train.py") else [str(tmp_path)]
    r = run_main(tool, [*source, "--out", tmp_path / "o.jsonl", *args],
                 env={"DASHSCOPE_API_KEY": KEY})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: "), r.stderr
    assert not os.path.exists(tmp_path / "o.jsonl")


@pytest.mark.parametrize("breakage", ["num_frames 0", "0 heads", "frames a string", "config a list",
                                      "tokenizer garbage", "tokenizer empty", "index outside"])
def test_a_broken_checkpoint_fails_once_at_start(tmp_path, ckpt, breakage):
    import shutil
    model = shutil.copytree(ckpt, tmp_path / "model")
    config = json.load(open(model / "config.json"))
    if breakage == "num_frames 0":
        config["num_frames"] = 0
    elif breakage == "0 heads":
        config["text_config"]["num_attention_heads"] = 0
    elif breakage == "frames a string":
        config["num_frames"] = "16"
    elif breakage == "config a list":
        config = [config]
    elif breakage.startswith("tokenizer"):
        (model / "tokenizer.model").write_bytes(os.urandom(3000) if "garbage" in breakage else b"")
    else:
        os.rename(model / "model.safetensors", tmp_path / "weights.safetensors")
        index = {"weight_map": {"x": "../weights.safetensors"}}
        (model / "model.safetensors.index.json").write_text(json.dumps(index))
    (model / "config.json").write_text(json.dumps(config))
    videos = tmp_path / "v"
    videos.mkdir()
    write_video(str(videos / "a.mp4"), n_frames=6)
    out = tmp_path / "captions.jsonl"
    r = run_main("caption.py", [videos, "--model", model, "--out", out])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    # no row that a rerun would then skip
    assert read_rows(str(out)) == []


def test_missing_or_mistyped_inputs_leave_the_outputs_alone(tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "summary.json").write_text("{\"earlier\": true}")
    (tmp_path / "clean.jsonl").write_text("{\"video\": \"kept\"}\n")
    video = write_video(str(tmp_path / "a.mp4"), n_frames=4)
    env = {"OPENAI_API_KEY": KEY}
    kept, missing = str(tmp_path / "clean.jsonl"), str(tmp_path / "missing.jsonl")
    cases = [["judge.py", "--gt", missing, "--pred", kept, "--out", str(report)],
             ["judge.py", "--gt", video, "--pred", kept, "--out", str(report)],
             ["label.py", "clean", missing, "--out", kept],
             ["label.py", "clean", video, "--out", kept]]
    for args in cases:
        r = run_main(args[0], args[1:], env=env)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, (args, r.stderr)
        assert lines[0].startswith("error: "), (args, r.stderr)
    assert (report / "summary.json").read_text() == "{\"earlier\": true}"
    assert (tmp_path / "clean.jsonl").read_text() == "{\"video\": \"kept\"}\n"


@pytest.mark.slow
def test_a_full_disk_ends_the_run_with_one_line_and_loses_no_finished_row(tmp_path):
    import resource
    paths, colours = label_folder(str(tmp_path / "v"), 8)
    api = label_server(colours)
    out = str(tmp_path / "labels.jsonl")

    def small_disk():   # the output may not grow past 1,000 bytes: what a full disk does to a write
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
    env = {**os.environ, "DASHSCOPE_API_KEY": KEY}
    try:
        r = run_tool("label.py",
                     [str(tmp_path / "v"), "--out", out, "--api-base", api.url, "--concurrency",
                      "2"], env=env, timeout=120, preexec_fn=small_disk)
        first = read_rows(out)
        again = run_label([str(tmp_path / "v"), "--out", out, "--api-base", api.url])
    finally:
        api.close()
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1].startswith("error: "), r.stderr
    assert "File too large" in lines[-1], r.stderr
    assert "Traceback" not in r.stderr and 1 <= len(first) < 8
    assert again.returncode == 0 and sorted(row["video"] for row in read_rows(out)) == sorted(paths)


@pytest.mark.slow
def test_resume_and_shards_do_not_depend_on_how_or_where_the_folder_is_named(tmp_path):
    paths, colours = label_folder(str(tmp_path / "vids"), 12)
    # the same folder, mounted elsewhere
    os.symlink(tmp_path / "vids", tmp_path / "mnt")
    api = label_server(colours)
    out = str(tmp_path / "labels.jsonl")
    try:
        first = run_tool("label.py",
                         ["vids", "--out", out, "--api-base", api.url, "--shard", "0/2"],
                         env={"DASHSCOPE_API_KEY": KEY}, cwd=tmp_path)
        second = run_label([str(tmp_path / "mnt"), "--out", str(tmp_path / "b.jsonl"),
                            "--api-base", api.url, "--shard", "1/2"])
        again = run_label([str(tmp_path / "vids"), "--out", out, "--api-base", api.url,
                           "--shard", "0/2"])
    finally:
        api.close()
    assert first.returncode == second.returncode == again.returncode == 0
    a = [os.path.basename(r["video"]) for r in read_rows(out)]
    b = [os.path.basename(r["video"]) for r in read_rows(str(tmp_path / "b.jsonl"))]
    # every video once
    assert sorted(a + b) == sorted(os.path.basename(p) for p in paths) and a and b
    # from elsewhere: resumed
    assert "0 already done" not in again.stderr and len(api.log) == 12


@pytest.mark.slow
def test_unreadable_files_do_not_stop_a_run_and_missing_ones_are_not_done(tmp_path):
    paths, colours = label_folder(str(tmp_path / "v"), 2)
    for i in range(12):
        (tmp_path / "v" / f"broken{i:02d}.mp4").write_bytes(b"not a video" * i)
    listed = tmp_path / "list.txt"
    # a BOM first
    listed.write_bytes(b"\xef\xbb\xbf"
                       + "\n".join([paths[0], "gone/a.mp4", paths[1]]).encode() + b"\n")
    api = label_server(colours)
    try:
        folder = run_label([str(tmp_path / "v"), "--out", str(tmp_path / "a.jsonl"), "--api-base",
                            api.url, "--max-failures-in-a-row", "3"])
        listing = run_label([str(listed), "--out", str(tmp_path / "b.jsonl"),
                             "--api-base", api.url])
        (tmp_path / "gone").mkdir()
        # the path is fixed: a rerun labels it
        os.link(paths[0], tmp_path / "gone" / "a.mp4")
        again = run_label([str(listed), "--out", str(tmp_path / "b.jsonl"), "--api-base", api.url])
    finally:
        api.close()
    assert folder.returncode == 0 and "failed 12" in folder.stderr, folder.stderr
    assert listing.returncode == 0 and again.returncode == 0
    rows = {os.path.basename(os.path.dirname(r["video"])) + "/" + os.path.basename(r["video"]): r
            for r in read_rows(str(tmp_path / "b.jsonl"))}
    assert len(rows) == 3 and all("caption" in r for r in rows.values())
    assert "1 already done" not in again.stderr


def test_a_symlinked_output_is_one_file_with_one_lock(tmp_path):
    os.symlink(tmp_path / "real.jsonl", tmp_path / "link.jsonl")
    with Appender(str(tmp_path / "link.jsonl")) as out:
        out.write({"video": "a", "error": "x"})
        with pytest.raises(Busy):
            Appender(str(tmp_path / "real.jsonl"))
        # rewrites: the link stays a link
        out.resume(lambda r: r["video"], lambda r: "error" not in r)
        out.write({"video": "b", "caption": "y"})
    assert os.path.islink(tmp_path / "link.jsonl") and read_rows(str(tmp_path / "real.jsonl")) == [
        {"video": "b", "caption": "y"}]


def test_outputs_that_are_not_files_and_clean_into_its_own_input(tmp_path):
    rows = [{"video": "a", "caption": "A cat."},
            {"video": "b", "error": "x", "code": "unreadable_video"}]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = (tmp_path / "labels.jsonl").read_text()
    labels = str(tmp_path / "labels.jsonl")
    cases = [("label.py", [str(tmp_path), "--out", "/dev/null"]),
             ("label.py", ["clean", labels, "--out", labels]),
             ("label.py", [str(tmp_path), "--out", str(tmp_path / "o.jsonl"), "--rpm", "1e-300"])]
    for tool, args in cases:
        r = run_main(tool, args, env={"DASHSCOPE_API_KEY": KEY})
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, (args, r.stderr)
        assert lines[0].startswith("error: "), (args, r.stderr)
    assert (tmp_path / "labels.jsonl").read_text() == before
    assert not os.path.exists("/dev/null.lock")
    # clean into an output another run holds
    with Appender(str(tmp_path / "busy.jsonl")):
        r = run_tool("label.py",
                     ["clean", str(tmp_path / "labels.jsonl"), "--out",
                      str(tmp_path / "busy.jsonl")])
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
