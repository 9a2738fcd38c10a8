"""python toy.py --quick: the whole loop (world, stage 1, stage 2, captioning, scoring) learns, and a second
run with the same seed gives the same numbers. The thresholds were set from measured runs (README)."""

import json
import os

from tools import run_tool

# measured on the 2-core CPU: stage 2 shape 100, colour 100, position 94.8, motion 76.0, order 100
THRESHOLDS = {"shape": 85, "colour": 95, "position": 85, "motion": 60, "order": 80}


def run_quick(out):
    r = run_tool("toy.py", ["--quick", "--out", out], timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.load(open(os.path.join(out, "results.json"))), r.stdout


def test_quick_loop_learns_and_is_deterministic(tmp_path):
    first, log = run_quick(tmp_path / "a")
    stage2, stage1 = first["results"]["stage 2"], first["results"]["stage 1"]
    for attribute, floor in THRESHOLDS.items():
        assert stage2[attribute] >= floor, (attribute, stage2)
    assert stage1["motion"] <= 20 and stage1["order"] <= 20           # stills alone teach no motion from time
    assert first["results"]["stage 1 (stills)"]["exact"] >= 85          # the image-LLM works on stills
    assert "shape  colour  position  motion  order  exact" in log
    second, _ = run_quick(tmp_path / "b")
    assert second["results"] == first["results"]


def test_out_that_is_not_a_toy_run_is_never_deleted(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    r = run_tool("toy.py", ["--quick", "--out", tmp_path], timeout=60)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: ") and "not an earlier toy run" in r.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine" and os.listdir(tmp_path) == ["notes.txt"]
