"""python caption.py end to end on tiny checkpoints: mixed folders, kill and rerun, torchrun, hub
downloads."""

import collections
import http.server
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time

import pytest

from plumbing import hub
from plumbing.jsonl import read_rows

from tools import ROOT, free_port, run_command, run_tool
from videos import write_audio_only, write_video


def make_folder(folder, good=5):
    os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
    videos = [write_video(os.path.join(folder, f"v{i}.mp4"),
                          n_frames=10 + 7 * i) for i in range(good - 2)]
    sub = os.path.join(folder, "sub")
    videos.append(write_video(os.path.join(sub, "w.webm"), codec="libvpx-vp9", n_frames=20))
    videos.append(write_video(os.path.join(sub, "g.gif"), codec="gif", pix_fmt="rgb8", n_frames=5))
    broken = [os.path.join(folder, n) for n in ("empty.mp4", "text.mp4", "sub/audio.mp4")]
    open(broken[0], "wb").close()
    open(broken[1], "w").write("not a video")
    write_audio_only(broken[2])
    return sorted(videos), sorted(broken)


def run_caption(args, **kw):
    return run_tool("caption.py", args, **kw)


def rows_by_video(path):
    rows = read_rows(path)
    counts = collections.Counter(r["video"] for r in rows)
    return {r["video"]: r for r in rows}, counts


@pytest.mark.slow
def test_folder_with_good_and_broken_videos(ckpt, tmp_path):
    good, broken = make_folder(str(tmp_path / "videos"))
    out = str(tmp_path / "captions.jsonl")
    r = run_caption([str(tmp_path / "videos"), "--model", ckpt, "--out", out, "--max-new-tokens",
                     "8", "--batch-size", "2", "--workers", "2"])
    assert r.returncode == 0, r.stderr
    rows, counts = rows_by_video(out)
    assert set(counts) == set(good + broken) and set(counts.values()) == {1}
    for v in good:
        assert isinstance(rows[v]["caption"],
                          str) and 1 <= rows[v]["tokens"] <= 8 and rows[v]["frames"] == 4
    for v in broken:
        assert "error" in rows[v] and rows[v]["error"].startswith(v)
    assert "5 captions, 3 unreadable" in r.stderr
    # a rerun does nothing; --overwrite redoes all; the same greedy captions come back
    again = run_caption([str(tmp_path / "videos"), "--model", ckpt, "--out", out,
                         "--max-new-tokens", "8"])
    assert again.returncode == 0 and "0 captions, 0 unreadable, 8 already done" in again.stderr
    redo = run_caption([str(tmp_path / "videos"), "--model", ckpt, "--out", out,
                        "--max-new-tokens", "8", "--overwrite", "--batch-size", "3"])
    assert redo.returncode == 0
    rows2, counts2 = rows_by_video(out)
    assert counts2 == counts and all(rows2[v]["caption"] == rows[v]["caption"] for v in good)


@pytest.mark.slow
def test_killed_mid_run_then_rerun_gives_every_video_once(ckpt, tmp_path):
    videos = [write_video(str(tmp_path / f"v{i:02d}.mp4"), n_frames=12) for i in range(14)]
    out = str(tmp_path / "c.jsonl")
    args = [str(tmp_path), "--model", ckpt, "--out", out, "--max-new-tokens", "40", "--batch-size",
            "1", "--workers", "1"]
    proc = run_caption(args, wait=False, output=False)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_rows(out)) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = len(read_rows(out))
    assert 3 <= first < len(videos)
    with open(out, "a") as f:
        # the worst case: a half-written row
        f.write('{"video": "torn line written by a kill mid-wr')
    r = run_caption(args)
    assert r.returncode == 0, r.stderr
    rows, counts = rows_by_video(out)
    assert set(counts) == set(videos) and set(counts.values()) == {1}
    assert all(json.loads(line) for line in open(out))                # no torn line left behind


@pytest.mark.slow
def test_retry_errors_leaves_one_row_and_spellings_and_a_second_run_are_refused(ckpt, tmp_path):
    folder = tmp_path / "vids"
    folder.mkdir()
    write_video(str(folder / "a.mp4"), n_frames=8)
    broken = str(folder / "b.mp4")
    open(broken, "w").write("not yet a video")
    out = str(tmp_path / "c.jsonl")
    args = ["--model", ckpt, "--out", out, "--max-new-tokens", "4"]
    assert run_caption([str(folder), *args]).returncode == 0
    # the file is fixed: try it again
    write_video(broken, n_frames=8)
    # the same folder, spelled otherwise
    rel = "./" + os.path.relpath(str(folder), ROOT) + "/"
    again = run_caption([rel, *args])
    assert again.returncode == 0 and "0 captions, 0 unreadable, 2 already done" in again.stderr
    retried = run_caption([rel, *args, "--retry-errors"])
    assert retried.returncode == 0 and "1 captions, 0 unreadable, 1 already done" in retried.stderr
    rows, counts = rows_by_video(out)
    assert set(counts.values()) == {1} and len(rows) == 2
    assert all("caption" in r for r in rows.values())
    # a second run holding the output
    with open(out + ".lock", "w") as f:
        import fcntl
        f.write("4242\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX)
        busy = run_caption([str(folder), *args])
    last = busy.stderr.strip().splitlines()[-1]
    assert busy.returncode == 1 and "being written by another run (pid 4242)" in last


@pytest.mark.slow
def test_torchrun_ranks_share_the_work_and_merge(ckpt, tmp_path):
    good, broken = make_folder(str(tmp_path / "videos"), good=6)
    out = str(tmp_path / "merged.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", os.path.join(ROOT, "caption.py"),
           str(tmp_path / "videos"), "--model", ckpt, "--out", out, "--max-new-tokens", "6",
           "--workers", "1"]
    r = run_command(cmd, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows, counts = rows_by_video(out)
    assert set(counts) == set(good + broken) and set(counts.values()) == {1}
    assert not [f for f in os.listdir(tmp_path) if ".rank" in f]
    assert "[rank 0]" in r.stderr and "[rank 1]" in r.stderr


class HubHandler(http.server.BaseHTTPRequestHandler):
    """Serves `root`/{repo}/{file} at /{repo}/resolve/main/{file}, with Range requests; can drop a
    connection half-way through a file once."""
    root, log, drop_once = None, [], set()

    def do_GET(self):
        type(self).log.append((self.path, self.headers.get("Range"),
                               self.headers.get("Authorization")))
        repo, _, rest = self.path.lstrip("/").partition("/resolve/main/")
        path = os.path.join(self.root, repo, rest)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        data = open(path, "rb").read()
        wanted = self.headers.get("Range")
        start = int(wanted.split("=")[1].split("-")[0]) if wanted else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if rest in self.drop_once:
            self.drop_once.discard(rest)
            self.wfile.write(data[start:start + (len(data) - start) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, ckpt):
    root = tmp_path / "hubroot"
    shutil.copytree(ckpt, root / "someone" / "tiny-pllava")
    HubHandler.root, HubHandler.log, HubHandler.drop_once = str(root), [], set()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root / "someone" / "tiny-pllava"
    httpd.shutdown()


def same_files(a, b, names):
    return all(open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n),
                                                             "rb").read() for n in names)


def test_hub_download_resume_and_token(server, tmp_path, monkeypatch):
    url, src = server
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_for_test")
    cache = str(tmp_path / "cache")
    target = os.path.join(cache, "someone--tiny-pllava", "main")
    os.makedirs(target)
    weights = open(src / "model.safetensors", "rb").read()
    with open(os.path.join(target, "model.safetensors.partial"), "wb") as f:
        # an earlier, interrupted download
        f.write(weights[:len(weights) // 3])
    # and the resumed one breaks half-way
    HubHandler.drop_once = {"model.safetensors"}
    folder = hub.resolve("someone/tiny-pllava", cache=cache)
    assert folder == target
    assert same_files(src, folder,
                      ["config.json", "model.safetensors", "tokenizer.model",
                       "tokenizer_config.json"])
    ranges = [int(r.split("=")[1].rstrip("-")) for p, r,
              _ in HubHandler.log if r and p.endswith("model.safetensors")]
    assert ranges[0] == len(weights) // 3 and len(ranges) == 2 and ranges[1] > ranges[0]
    assert all(auth == "Bearer hf_secret_for_test" for _, _, auth in HubHandler.log)
    n = len(HubHandler.log)
    # cached
    assert hub.resolve("someone/tiny-pllava", cache=cache) == folder and len(HubHandler.log) == n


def test_caption_with_a_hub_id(server, tmp_path):
    url, _ = server
    video = write_video(str(tmp_path / "one.mp4"), n_frames=9)
    env = {**os.environ, "HF_ENDPOINT": url, "PLLAVA_CACHE": str(tmp_path / "cache")}
    r = run_caption([video, "--model", "someone/tiny-pllava", "--out", str(tmp_path / "o.jsonl"),
                     "--max-new-tokens", "4"], env=env)
    assert r.returncode == 0, r.stderr
    assert read_rows(str(tmp_path / "o.jsonl"))[0]["video"] == video
    # each file's bytes, rate and (with a size) ETA, on stderr
    shown = r.stderr.replace("\r", "\n")
    assert re.search(r"model\.safetensors: [0-9.]+/[0-9.]+ MB, [0-9.]+ MB/s", shown), r.stderr


def test_offline_and_missing_model_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    # every retry is refused at once: no need to wait between them
    monkeypatch.setattr(hub, "BACKOFF", 0.01)
    with pytest.raises(hub.HubError, match="offline"):
        hub.resolve("someone/absent", cache=str(tmp_path))
    r = run_caption([str(tmp_path), "--model", str(tmp_path / "no-such-model"), "--out",
                     str(tmp_path / "x.jsonl")])
    assert r.returncode != 0 and r.stderr.strip().startswith("error:")
    assert "Traceback" not in r.stderr
    (tmp_path / "models").mkdir()   # a mistyped local folder is not a hub id to download
    for name in ("./models/x", "models/x"):
        with pytest.raises(hub.HubError, match="no such model folder"):
            monkeypatch.chdir(tmp_path)
            hub.resolve(name, cache=str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_a_rerun_with_other_settings_refuses_the_file_and_overwrite_redoes_it(ckpt, tmp_path):
    """Every caption carries the id of what made it: another prompt, frame count, alpha, model or
    --shots on the same --out refuses at start (the file untouched); --overwrite captions again."""
    video = write_video(str(tmp_path / "v.mp4"), n_frames=12)
    out = tmp_path / "c.jsonl"
    base = [video, "--model", ckpt, "--out", out, "--max-new-tokens", "4"]
    assert run_caption(base).returncode == 0
    before = out.read_bytes()
    # the same settings: resumed
    assert run_caption(base).returncode == 0 and out.read_bytes() == before
    for other in (["--prompt", "What happens?"], ["--frames", "2"], ["--lora-alpha", "2"],
                  ["--window", "1"], ["--max-new-tokens", "5"], ["--temperature", "0.7"]):
        r = run_caption(base + other)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, (other, r.stderr)
        assert "other settings" in lines[0], (other, r.stderr)
        assert out.read_bytes() == before
    r = run_caption(base + ["--prompt", "What happens?", "--overwrite"])
    rows = read_rows(str(out))
    assert r.returncode == 0 and len(rows) == 1
    assert rows[0]["settings"] != json.loads(before)["settings"]


@pytest.mark.slow
def test_a_model_folder_carries_its_prompt(ckpt, tmp_path):
    """prompt.json (train.py --export writes it) is the default question, system line and template;
    a flag still wins; a broken one is one line at start."""
    folder = tmp_path / "model"
    shutil.copytree(ckpt, folder)
    video = write_video(str(tmp_path / "v.mp4"), n_frames=12)
    args = [video, "--model", folder, "--max-new-tokens", "6", "--lora-alpha", "4"]
    plain = run_caption(args + ["--out", tmp_path / "a.jsonl", "--prompt", "Say what moves.",
                                "--system", "Be brief."])
    (folder / "prompt.json").write_text(json.dumps({"question": "Say what moves.",
                                                    "system": "Be brief.", "template": "vicuna"}))
    saved = run_caption(args + ["--out", tmp_path / "b.jsonl"])
    default = run_caption(args + ["--out", tmp_path / "c.jsonl", "--prompt",
                                  "Describe this video."])
    assert plain.returncode == saved.returncode == default.returncode == 0, saved.stderr
    a, b, c = (read_rows(str(tmp_path / f"{x}.jsonl"))[0] for x in "abc")
    assert a["caption"] == b["caption"] and a["settings"] == b["settings"]
    assert c["settings"] != b["settings"]
    (folder / "prompt.json").write_text('{"question": 3}')
    r = run_caption(args + ["--out", tmp_path / "d.jsonl"])
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "prompt.json" in r.stderr


@pytest.mark.slow
def test_a_folder_with_no_videos_or_only_broken_ones_exits_1_in_one_line(ckpt, tmp_path):
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "notes.txt").write_text("not a video")
    out = tmp_path / "c.jsonl"
    r = run_caption([str(tmp_path / "none"), "--model", ckpt, "--out", str(out)])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1].startswith("error: "), r.stderr
    assert "no videos found" in lines[-1], r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    good, broken = make_folder(str(tmp_path / "bad"), good=2)
    for v in good:
        os.remove(v)                                        # only the three broken files are left
    r = run_caption([str(tmp_path / "bad"), "--model", ckpt, "--out", str(out),
                     "--max-new-tokens", "4"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1].startswith("error: "), r.stderr
    assert "no video was captioned" in lines[-1], r.stderr
    rows, counts = rows_by_video(str(out))
    # their rows are kept
    assert set(counts) == set(broken) and all("error" in row for row in rows.values())


@pytest.mark.slow
def test_a_caption_that_loops_ends_where_the_loop_began_and_its_row_says_so(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file
    stuck = tmp_path / "stuck"
    shutil.copytree(ckpt, stuck)
    weights = load_file(str(stuck / "model.safetensors"))
    weights["language_model.model.norm.weight"].zero_()       # every logit 0: one token for ever
    save_file(weights, str(stuck / "model.safetensors"))
    os.makedirs(tmp_path / "v")
    write_video(str(tmp_path / "v" / "a.mp4"), n_frames=8)
    guarded = run_caption([tmp_path / "v", "--model", stuck, "--out", tmp_path / "g.jsonl",
                           "--max-new-tokens", "40"])
    free = run_caption([tmp_path / "v", "--model", stuck, "--out", tmp_path / "f.jsonl",
                        "--max-new-tokens", "40", "--keep-loops"])
    assert guarded.returncode == 0 and free.returncode == 0, guarded.stderr[-1000:]
    g, f = read_rows(str(tmp_path / "g.jsonl"))[0], read_rows(str(tmp_path / "f.jsonl"))[0]
    assert g["loop"] is True and g["truncated"] is False and g["tokens"] < 40
    assert f["loop"] is False and f["truncated"] is True and f["tokens"] == 40
    assert f["caption"].startswith(g["caption"])


@pytest.mark.slow
def test_rank_files_left_by_a_killed_run_belong_to_the_run_that_made_them(ckpt, tmp_path):
    """A killed torchrun run left out.rank0 / out.rank1: a single-process rerun folds their captions
    in (not captioned again) and removes them; --overwrite drops them."""
    folder = tmp_path / "v"
    folder.mkdir()
    videos = [write_video(str(folder / f"v{i}.mp4"), n_frames=10 + i) for i in range(3)]
    out = tmp_path / "c.jsonl"
    args = [folder, "--model", ckpt, "--out", out, "--max-new-tokens", "4"]
    assert run_tool("caption.py", args).returncode == 0
    rows = read_rows(str(out))
    os.remove(out)
    with open(str(out) + ".rank1", "w") as f:   # the first video's row, left by rank 1
        f.write(json.dumps(next(r for r in rows if r["video"] == videos[0])) + "\n")
    with open(str(out) + ".rank0", "w") as f:   # a half-written row
        f.write('{"video": "x')
    r = run_tool("caption.py", args)
    assert r.returncode == 0 and "2 captions" in r.stderr, r.stderr
    assert not list(tmp_path.glob("c.jsonl.rank*"))
    assert sorted(x["video"] for x in read_rows(str(out))) == videos
    with open(str(out) + ".rank1", "w") as f:
        f.write(json.dumps({"video": videos[0], "caption": "stale", "settings": "old"}) + "\n")
    r = run_tool("caption.py", args + ["--overwrite"])
    rows = read_rows(str(out))
    assert r.returncode == 0 and len(rows) == 3 and "stale" not in json.dumps(rows)
    assert not list(tmp_path.glob("c.jsonl.rank*"))
