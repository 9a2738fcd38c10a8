"""plumbing/outputs.py: what identifies the weights a row was made with, and what a resume keeps."""

import os

from plumbing import outputs
from plumbing.jsonl import read_rows
from plumbing.outputs import Outputs
from plumbing.workers import tries_of


def test_weights_rewritten_in_place_at_the_same_size_get_a_new_id_and_are_read_once(tmp_path, monkeypatch):
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
    monkeypatch.setattr(outputs.hashlib, "file_digest", lambda f, name: reads.append(f.name) or real(f, name))
    assert outputs.weights_id(str(folder)) == first and reads == []       # remembered: nothing read again
    blob[(5 << 20) + 12345] ^= 0xFF                                     # one byte of q_proj, say, fine-tuned
    with open(weights, "r+b") as f:                                      # in place: same size, same inode
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
        o.write({"video": "/a/y.mp4", "name": "y.mp4", "error": "slow", "code": "decode_timeout", "tries": 1})
    for _ in range(3):   # runs killed (or stopped) before they reach y.mp4
        tries = {}
        with Outputs(out) as o:
            assert o.resume(key, done, tries=tries) == {("x.mp4", None)}
        assert tries == {("y.mp4", None): 1}
    with Outputs(out) as o:   # the next run tries it again and fails again: the count goes on, one row
        tries = {}
        o.resume(key, done, tries=tries)
        o.write({"video": "/b/y.mp4", "name": "y.mp4", "error": "slow", "code": "decode_timeout",
                 "tries": tries[("y.mp4", None)] + 1})
    rows = read_rows(out)
    assert [r["name"] for r in rows] == ["x.mp4", "y.mp4"] and tries_of(rows[1]) == 2
