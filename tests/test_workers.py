"""plumbing/workers.py: decode workers in processes of their own, their time limit counted from
their last frame, the failures that may not repeat tried again by a later run, and nothing of the
folder they start in or of the keys in the environment reaching them."""

import os

import pytest
from work import beating, silent, worker_env

import caption
import data
from plumbing.jsonl import read_rows
from plumbing.workers import RETRIED, TRIES, failure, imap_unordered

from chaos_api import KEY
from tools import run_tool, stop_a_decode_worker
from videos import write_video


@pytest.mark.slow
def test_decode_workers_import_nothing_from_the_folder_they_start_in_and_see_no_key(
    ckpt, tmp_path, monkeypatch
):
    hostile = tmp_path / "project"
    hostile.mkdir()
    marker = tmp_path / "ran"
    for name in ("data.py", "cli.py", "numpy.py", "shots.py"):
        (hostile / name).write_text(
            f"open({str(marker)!r}, 'a').write({name!r})\nraise SystemExit(3)\n"
        )
    video = write_video(str(tmp_path / "v.mp4"), n_frames=12)
    r = run_tool("caption.py",
                 [video, "--model", ckpt, "--out", tmp_path / "c.jsonl", "--max-new-tokens", "4",
                  "--workers", "1"], cwd=hostile)
    assert r.returncode == 0 and not marker.exists(), r.stderr[-2000:]
    assert "caption" in read_rows(str(tmp_path / "c.jsonl"))[0]
    monkeypatch.setenv("DASHSCOPE_API_KEY", KEY)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    got = dict(imap_unordered(worker_env, ["DASHSCOPE_API_KEY", "HF_TOKEN", "PATH"], workers=1))
    assert (
        got["DASHSCOPE_API_KEY"] is None
        and got["HF_TOKEN"] is None
        and got["PATH"] == os.environ["PATH"]
    )


def test_a_decode_failure_that_may_not_repeat_is_tried_again_up_to_a_stated_number_of_runs():
    timeout = data.VideoError("v.mp4: decoding took longer than 300 s", "decode_timeout")
    rows = [failure(timeout, n) for n in range(TRIES)]
    assert [r["code"] for r in rows] == ["decode_timeout"] * (TRIES - 1) + ["unreadable_video"]
    assert rows[-1]["tries"] == TRIES and f"after {TRIES} tries" in rows[-1]["error"]
    assert not caption.is_done(rows[0]) and caption.is_done(rows[-1])
    assert failure(data.VideoError("v.mp4: no video stream"))["code"] == "unreadable_video"
    assert set(RETRIED) == {"decode_timeout", "decoder_died", "decode_memory"}


@pytest.mark.slow
def test_a_stopped_decoder_is_retried_by_the_next_run_not_final(ckpt, tmp_path):
    """SIGSTOP on caption.py's decode worker: that video gets a decode_timeout row (not done), the
    others their captions; the rerun captions it, and every video has exactly one row."""
    folder = tmp_path / "v"
    folder.mkdir()
    for i in range(4):
        write_video(str(folder / f"v{i}.mp4"), n_frames=12 + i)
    out = tmp_path / "c.jsonl"
    args = [folder, "--model", ckpt, "--out", out, "--max-new-tokens", "4", "--workers", "1",
            "--decode-timeout", "2"]
    proc = run_tool("caption.py", args, wait=False)
    stopped = stop_a_decode_worker(proc)
    _, err = proc.communicate(timeout=120)
    rows = read_rows(str(out))
    timed_out = [r for r in rows if r.get("code") == "decode_timeout"]
    assert stopped and len(timed_out) == 1 and timed_out[0]["tries"] == 1, (rows, err[-2000:])
    assert "1 to try again" in err
    again = run_tool("caption.py", args)
    rows = read_rows(str(out))
    assert again.returncode == 0 and len(rows) == 4 and all("caption" in r for r in rows), (
        again.stderr[-2000:]
    )


@pytest.mark.slow
def test_a_long_decode_that_moves_on_is_not_cut_by_the_time_limit():
    """Shot detection decodes every frame of an episode: its time limit counts from its last
    frame."""
    got = dict(imap_unordered(beating, [7.0], workers=1, timeout=3.0))
    assert got[7.0] == 7.0
    got = dict(imap_unordered(silent, [7.0], workers=1, timeout=3.0))
    assert isinstance(got[7.0], data.VideoError) and got[7.0].code == "decode_timeout"
