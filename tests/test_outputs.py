"""plumbing/outputs.py: what identifies the weights a row was made with, and what a resume keeps."""

import json
import os

import pytest

import caption

from plumbing import jsonl, outputs
from plumbing.jsonl import Appender, read_rows
from plumbing.outputs import Outputs
from plumbing.workers import tries_of

from tools import run_tool
from videos import write_video


def test_weights_rewritten_in_place_at_the_same_size_get_a_new_id_and_are_read_once(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    weights = folder / "model.safetensors"
    blob = bytearray(os.urandom(9 << 20))   # over the 4 MiB that the old id read whole
    weights.write_bytes(blob)
    (folder / "config.json").write_text("{}")
    first = outputs.weights_id(str(folder))
    reads = []
    real = outputs.hashlib.file_digest
    monkeypatch.setattr(outputs.hashlib, "file_digest",
                        lambda f, name: reads.append(f.name) or real(f, name))
    # remembered: nothing read again
    assert outputs.weights_id(str(folder)) == first and reads == []
    # one byte of q_proj, say, fine-tuned
    blob[(5 << 20) + 12345] ^= 0xFF
    # in place: same size, same inode
    with open(weights, "r+b") as f:
        f.write(blob)
    assert outputs.weights_id(str(folder)) != first and len(reads) == 1
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(folder):
        (copy / name).write_bytes((folder / name).read_bytes())
    assert outputs.weights_id(str(copy)) == outputs.weights_id(str(folder))   # a copy keeps the id


def test_a_try_again_count_survives_runs_interrupted_before_the_video_is_tried(tmp_path):
    out = str(tmp_path / "rows.jsonl")
    key = lambda row: (row.get("name"), row.get("shot"))   # noqa: E731
    done = lambda row: "caption" in row                    # noqa: E731
    with Outputs(out) as o:
        o.resume(key, done)
        o.write({"video": "/a/x.mp4", "name": "x.mp4", "caption": "fine"})
        o.write(
            {
                "video": "/a/y.mp4",
                "name": "y.mp4",
                "error": "slow",
                "code": "decode_timeout",
                "tries": 1,
            }
        )
    for _ in range(3):   # runs killed (or stopped) before they reach y.mp4
        tries = {}
        with Outputs(out) as o:
            assert o.resume(key, done, tries=tries) == {("x.mp4", None)}
        assert tries == {("y.mp4", None): 1}
    # the next run tries it again and fails again: the count goes on, one row
    with Outputs(out) as o:
        tries = {}
        o.resume(key, done, tries=tries)
        o.write({"video": "/b/y.mp4", "name": "y.mp4", "error": "slow", "code": "decode_timeout",
                 "tries": tries[("y.mp4", None)] + 1})
    rows = read_rows(out)
    assert [r["name"] for r in rows] == ["x.mp4", "y.mp4"] and tries_of(rows[1]) == 2


def test_symlinks_planted_at_the_lock_or_a_temporary_are_never_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out.jsonl"
    os.symlink(victim, str(out) + ".lock")
    with pytest.raises(ValueError, match="symbolic link"):
        Appender(str(out))
    assert victim.read_text() == "precious"
    os.remove(str(out) + ".lock")
    os.symlink(victim, str(out) + ".tmp")   # the old temporary name, planted
    with Appender(str(out)) as a:
        a.write({"video": "a", "error": "x"})
        a.write({"video": "b", "caption": "y"})
        a.resume(lambda r: r["video"], lambda r: "caption" in r)   # a rewrite
    assert victim.read_text() == "precious" and not os.path.islink(out) and read_rows(str(out)) == [
        {"video": "b", "caption": "y"}]


@pytest.mark.slow
def test_new_weights_in_the_same_folder_do_not_keep_the_old_captions(ckpt, tmp_path):
    import shutil

    from model import PLLaVA
    folder = tmp_path / "model"
    shutil.copytree(ckpt, folder)
    video = write_video(str(tmp_path / "v.mp4"), n_frames=12)
    args = [video, "--model", folder, "--out", tmp_path / "c.jsonl", "--max-new-tokens", "4"]
    assert run_tool("caption.py", args).returncode == 0
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)   # a copy of the same weights is the same model
    assert outputs.weights_id(str(copy)) == outputs.weights_id(str(folder))
    model = PLLaVA.from_pretrained(str(folder))
    with __import__("torch").no_grad():
        model.multi_modal_projector.linear_2.bias.add_(1.0)
    model.save_pretrained(str(folder))   # re-exported into the same folder
    r = run_tool("caption.py", args)
    assert r.returncode == 1 and "other settings" in r.stderr, r.stderr


def test_a_resume_file_is_read_once(tmp_path, monkeypatch):
    out = tmp_path / "c.jsonl"
    out.write_text("".join(json.dumps({"video": f"/v/{i}.mp4", "caption": "x",
                                       "settings": "s"}) + "\n" for i in range(1000)))
    reads = []
    real = jsonl.iter_rows
    monkeypatch.setattr(jsonl, "iter_rows", lambda path, *a: reads.append(path) or real(path, *a))
    monkeypatch.setattr(outputs, "iter_rows", jsonl.iter_rows)
    import shots
    tries = {}
    with outputs.Outputs(str(out)) as o:
        done = o.resume(shots.row_key, caption.is_done, "s", tries)
    assert len(done) == 1000 and reads == [str(out)]
