"""label.py recheck against a fake teacher: only the labels a student agrees with least are asked
again, from 16 frames; the rest are copied; resume after a kill, faults, shards, and the key never
written."""

import collections
import json
import os
import signal
import time

import numpy as np
import pytest

from plumbing.jsonl import read_rows

from fake_api import KEY, FakeAPI, colour_of, frames_of
from tools import run_tool
from videos import solid_videos


def teacher(colours):
    """Items are video indices (by colour); the answer names the item and how many frames it saw."""
    def identify(body):
        mean, _ = colour_of(frames_of(body)[0])
        return int(np.argmin([np.abs(mean - np.array(c)).sum() for c in colours]))

    return FakeAPI(identify,
                   lambda body, item: f"Video {item} seen in {len(frames_of(body))} frames.")


def setup(tmp_path, n, disagree, missing=()):
    """n videos labelled from 4 frames; the student agrees with every label but those in `disagree`,
    and has no caption for those in `missing`."""
    videos, colours = solid_videos(str(tmp_path / "v"), n, n_frames=8, size=(48, 32))
    labels = [
        {"video": v, "caption": f"Video {i}: a square moves right, then down.", "frames": 4}
        for i, v in enumerate(videos)
    ] + [{"video": str(tmp_path / "v" / "gone.mp4"), "error": "x", "code": "y"}]
    student = [
        {
            "video": v,
            "caption": "A circle spins in place." if i in disagree else labels[i]["caption"],
        }
        for i, v in enumerate(videos)
        if i not in missing
    ]
    for name, rows in (("labels", labels), ("student", student)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return videos, colours


def recheck(tmp_path, api, *flags, wait=True):
    args = ["recheck", tmp_path / "labels.jsonl", "--student", tmp_path / "student.jsonl",
            "--api-base", api.url, "--backoff", "0.05", *flags]
    return run_tool("label.py", args, env={"DASHSCOPE_API_KEY": KEY}, wait=wait)


@pytest.mark.slow
def test_recheck_asks_again_only_where_the_student_disagrees_most(tmp_path):
    videos, colours = setup(tmp_path, 8, disagree={2, 6}, missing={5})
    api = teacher(colours)
    try:
        r = recheck(tmp_path, api, "--share", "0.25")
        again = recheck(tmp_path, api, "--share", "0.25")
    finally:
        api.close()
    assert r.returncode == 0 and again.returncode == 0, r.stderr + again.stderr
    # the default: a new file beside the labels
    out = tmp_path / "labels.rechecked.jsonl"
    rows = {row["video"]: row for row in read_rows(str(out))}
    # every label once; the error row is no label
    assert sorted(rows) == sorted(videos)
    # 2 of 8: the two the student disputes
    assert sorted(e["item"] for e in api.log) == [2, 6]
    # asked from 16 frames, not the label's 4
    assert all(len(frames_of(e["body"])) == 16 for e in api.log)
    for i, v in enumerate(videos):
        row = rows[v]
        if i in (2, 6):
            assert row["caption"] == f"Video {i} seen in 16 frames." and row["rechecked"] is True
            assert (
                row["caption_first"] == f"Video {i}: a square moves right, then down."
                and row["agreement"] == 0
            )
        else:
            assert (
                row["caption"] == f"Video {i}: a square moves right, then down."
                and row["rechecked"] is False
            )
    assert "1.25 teacher calls a label" in r.stderr and "8 already done" in again.stderr
    for text in (out.read_text(), r.stdout, r.stderr):
        assert KEY not in text


@pytest.mark.slow
def test_recheck_shards_survive_faults_and_choose_as_one_run(tmp_path):
    """Two shards write every label once and ask again exactly the labels one run would (the share
    is of all labels); a 500 that echoes the key and a dropped connection are asked again."""
    videos, colours = setup(tmp_path, 8, disagree={1, 3, 4, 7})
    api = teacher(colours)
    api.script = {i: [("status", 500, "server_error", {}), ("drop",)] for i in (1, 3, 4, 7)}
    try:
        runs = [recheck(tmp_path, api, "--share", "0.5", "--shard", f"{k}/2", "--out",
                        tmp_path / "r.jsonl") for k in (0, 1)]
    finally:
        api.close()
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    rows = read_rows(str(tmp_path / "r.jsonl"))
    assert sorted(row["video"] for row in rows) == sorted(videos)
    assert sorted(row["video"] for row in rows if row["rechecked"]) == [
        videos[i] for i in (1, 3, 4, 7)
    ]
    assert collections.Counter(e["item"] for e in api.log) == {1: 3, 3: 3, 4: 3, 7: 3}
    assert KEY not in (tmp_path / "r.jsonl").read_text() and all(KEY not in r.stderr for r in runs)


@pytest.mark.slow
def test_recheck_killed_then_rerun_asks_only_what_was_not_done(tmp_path):
    videos, colours = setup(tmp_path, 12, disagree=set(range(6)))
    api = teacher(colours)
    api.script = {i: [("hang", 0.4)] for i in range(6)}
    out = tmp_path / "r.jsonl"
    try:
        proc = recheck(
            tmp_path, api, "--share", "0.5", "--concurrency", "1", "--out", out, wait=False
        )
        deadline = time.time() + 120
        while time.time() < deadline and len(read_rows(str(out))) < 8:   # 6 copied, 2 asked again
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        before = read_rows(str(out))
        r = recheck(tmp_path, api, "--share", "0.5", "--concurrency", "1", "--out", out)
    finally:
        api.close()
    assert r.returncode == 0, r.stderr
    assert 8 <= len(before) < 12
    rows = read_rows(str(out))
    assert collections.Counter(row["video"] for row in rows) == collections.Counter(videos)
    # nothing written was lost
    assert rows[:len(before)] == before
    asked = collections.Counter(e["item"] for e in api.log)
    done_before = {videos.index(row["video"]) for row in before if row["rechecked"]}
    # finished: never asked again
    assert done_before and all(asked[i] == 1 for i in done_before)
    # in flight: asked once more
    assert set(asked) == set(range(6)) and all(n <= 2 for n in asked.values())

def test_recheck_refuses_what_cannot_work(tmp_path):
    setup(tmp_path, 2, disagree=set())
    r = run_tool("label.py", ["recheck", tmp_path / "labels.jsonl"], env={"DASHSCOPE_API_KEY": KEY})
    assert r.returncode == 2 and "--student" in r.stderr and "Traceback" not in r.stderr
    r = run_tool("label.py",
                 ["recheck", tmp_path / "labels.jsonl", "--student", tmp_path / "student.jsonl",
                  "--share", "1.5"], env={"DASHSCOPE_API_KEY": KEY})
    assert r.returncode == 2 and "--share" in r.stderr and len(r.stderr.strip().splitlines()) <= 3
    r = run_tool("label.py",
                 ["recheck", tmp_path / "labels.jsonl", "--student", tmp_path / "nothing.jsonl"],
                 env={"DASHSCOPE_API_KEY": KEY})
    assert (
        r.returncode == 1 and r.stderr.strip().startswith("error:") and "nothing.jsonl" in r.stderr
    )
    assert not (tmp_path / "labels.rechecked.jsonl").exists()
    (tmp_path / "other.jsonl").write_bytes(
        b'{"video": 5, "caption": ["x"]}\n\xff\xfe\n{"video": "elsewhere.mp4", "capt'
    )
    (tmp_path / "none.jsonl").write_text("")
    for labels, student in [("labels.jsonl", "other.jsonl"), ("none.jsonl", "student.jsonl")]:
        # a student that names none of the labelled videos, or no labels: nothing would be checked
        r = run_tool("label.py", ["recheck", tmp_path / labels, "--student", tmp_path / student],
                     env={"DASHSCOPE_API_KEY": KEY})
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
        assert not list(tmp_path.glob("*.rechecked.jsonl"))


@pytest.mark.slow
def test_a_label_the_teacher_refuses_to_relabel_is_kept_as_it_was(tmp_path):
    videos, colours = setup(tmp_path, 6, disagree={1, 4})
    api = teacher(colours)
    api.script = {1: [("status", 400, "data_inspection_failed", {})]}    # moderated from 16 frames
    try:
        r = recheck(tmp_path, api, "--share", "0.34")
        again = recheck(tmp_path, api, "--share", "0.34")
    finally:
        api.close()
    assert r.returncode == 0 and again.returncode == 0, r.stderr
    rows = {row["video"]: row for row in read_rows(str(tmp_path / "labels.rechecked.jsonl"))}
    assert len(rows) == 6 and all("error" not in row for row in rows.values())
    kept = rows[videos[1]]
    assert (
        kept["caption"] == "Video 1: a square moves right, then down."
        and kept["rechecked"] is False
    )
    assert kept["recheck_refused"] == "data_inspection_failed"
    assert rows[videos[4]]["caption"] == "Video 4 seen in 16 frames."
    # the rerun asks nothing
    assert "1 refused, their first label kept" in r.stderr and len(api.log) == 2


@pytest.mark.slow
def test_a_rerun_with_another_student_or_other_labels_is_refused(tmp_path):
    videos, colours = setup(tmp_path, 4, disagree={2})
    api = teacher(colours)
    out = tmp_path / "r.jsonl"
    try:
        first = recheck(tmp_path, api, "--share", "0.25", "--out", out)
        student = tmp_path / "student.jsonl"
        student.write_text(student.read_text().replace("A circle spins in place.",
                                                       "Video 2: a square."))
        other_student = recheck(tmp_path, api, "--share", "0.25", "--out", out)
        with open(tmp_path / "labels.jsonl", "a") as f:
            f.write(json.dumps({"video": videos[0], "caption": "Another label.",
                                "frames": 4}) + "\n")
        other_labels = recheck(tmp_path, api, "--share", "0.25", "--out", out)
    finally:
        api.close()
    assert first.returncode == 0
    for r in (other_student, other_labels):
        said = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and said.startswith("error:") and "other settings" in said, (
            r.stderr
        )
    assert len(api.log) == 1 and len(read_rows(str(out))) == 4


@pytest.mark.slow
def test_new_labels_are_cleaned_as_the_first_ones_were(tmp_path):
    videos, colours = setup(tmp_path, 6, disagree={1, 4})
    api = teacher(colours)
    api.script = {1: [("content", "The video shows a square that moves right, then down.")],
                  4: [("content", "I'm sorry, I cannot describe this video.")]}
    try:
        r = recheck(tmp_path, api, "--share", "0.34")
    finally:
        api.close()
    assert r.returncode == 0, r.stderr
    rows = {row["video"]: row for row in read_rows(str(tmp_path / "labels.rechecked.jsonl"))}
    assert (
        rows[videos[1]]["caption"] == "A square that moves right, then down."
        and rows[videos[1]]["rechecked"]
    )
    # the first, kept
    assert rows[videos[4]]["caption"] == "Video 4: a square moves right, then down."
    assert rows[videos[4]]["recheck_refused"] == "refused" and "copied 4 labels" in r.stderr
