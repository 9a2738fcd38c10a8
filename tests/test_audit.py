"""label.py audit: a sample of the teacher's labels asked of a second source, and a report that
names what the teacher says where the second source says something else, in how many of the
sampled videos that say it (checks.confusions, checks.audit_report)."""

import json
import re

import numpy as np
import pytest

from labelling import checks
from plumbing.jsonl import read_rows

from fake_api import KEY, FakeAPI, colour_of, frames_of
from tools import run_tool
from videos import solid_videos


def test_a_confusion_made_every_time_is_ranked_first_with_its_rate_and_a_one_off_is_not_named():
    pairs = [("A purple square moves right.", "A blue square moves right.")] * 10 + \
            [("A red circle moves up.", "A red circle moves up.")] * 9 + \
            [("A red circle moves up.", "A green circle moves up.")] + \
            [("A purple star moves left.", "A purple star moves left.")] * 2
    found = checks.confusions(pairs)
    assert found[0] == {"teacher": "purple", "second": "blue", "videos": 10, "of": 12,
                        "examples": [0, 1, 2]}
    assert all(c["teacher"] != "red" for c in found)                 # seen once: not a habit
    rows = [{"name": f"v{i}", "teacher": a, "caption": b} for i, (a, b) in enumerate(pairs)]
    report = checks.audit_report(rows, "second-vl")
    assert re.search(r"agreement \(word pairs, F1\) 0\.\d{3} \+- 0\.\d{3} \(95%\)", report), report
    assert 'teacher "purple" where second-vl says "blue": 10 of 12 (83%), e.g. v0, v1, v2' in report
    assert checks.says("A c++ (purple) star.", "(purple)") and checks.says("purple.", "PURPLE")
    assert not checks.says("A purpleish star.", "purple")
    forth = {(f"v{i}", None): {} for i in range(10)}
    back = {(f"v{i}", None): {} for i in reversed(range(10))}
    assert checks.audit_sample(forth, 0.3) == checks.audit_sample(back, 3)   # by hash, not order


@pytest.mark.slow
def test_audit_asks_a_sample_once_and_names_the_teachers_habit(tmp_path):
    """12 labels, the even videos' colour always wrong ("purple" for blue); 8 asked of the second
    source, each once over two runs; the report names the habit at 100% of the sampled labels that
    say purple."""
    videos, colours = solid_videos(str(tmp_path / "v"), 12, n_frames=8, size=(48, 32))
    truth = ["blue" if i % 2 == 0 else "red" for i in range(12)]
    said = ["purple" if i % 2 == 0 else "red" for i in range(12)]
    labels = [{"video": v, "caption": f"Video {i}: a {said[i]} square moves right.", "frames": 4}
              for i, v in enumerate(videos)]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels))

    def identify(body):
        mean, _ = colour_of(frames_of(body)[0])
        return int(np.argmin([np.abs(mean - np.array(c)).sum() for c in colours]))
    api = FakeAPI(identify, lambda body, item: f"Video {item}: a {truth[item]} square moves right.")
    args = ["audit", tmp_path / "labels.jsonl", "--sample", "8", "--api-base", api.url,
            "--model", "second-vl", "--backoff", "0.05"]
    try:
        first = run_tool("label.py", args, env={"DASHSCOPE_API_KEY": KEY})
        again = run_tool("label.py", args, env={"DASHSCOPE_API_KEY": KEY})
        other = run_tool("label.py", args[:3] + ["9"] + args[4:], env={"DASHSCOPE_API_KEY": KEY})
        api.log.clear()
        saying = run_tool("label.py", args[:3] + ["1", "--saying", "purple", "--out",
                                                  tmp_path / "purple.jsonl"] + args[4:],
                          env={"DASHSCOPE_API_KEY": KEY})
    finally:
        api.close()
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert other.returncode == 1 and "other settings" in other.stderr, other.stderr   # --sample
    assert saying.returncode == 0 and sorted(e["item"] for e in api.log) == [0, 2, 4, 6, 8, 10]
    assert "8 already done" in again.stderr
    rows = read_rows(str(tmp_path / "labels.audit.jsonl"))
    asked = [int(r["caption"].split()[1][:-1]) for r in rows]
    assert len(rows) == 8 and all(r["teacher"] == labels[i]["caption"] for r, i in zip(rows, asked))
    report = (tmp_path / "labels.audit.report.txt").read_text()
    evens = sum(i % 2 == 0 for i in asked)
    habit = f'teacher "purple" where second-vl says "blue": {evens} of {evens} (100%)'
    assert habit in report, report
    assert report.strip() in first.stderr and KEY not in report + first.stderr


@pytest.mark.slow
def test_a_second_source_that_refuses_is_no_reading_said_in_the_report_and_not_paid_twice(tmp_path):
    videos, _ = solid_videos(str(tmp_path / "v"), 4, n_frames=8, size=(48, 32))
    (tmp_path / "labels.jsonl").write_text("".join(
        json.dumps({"video": v, "caption": f"Video {i}: a red square.", "frames": 4}) + "\n"
        for i, v in enumerate(videos)))
    api = FakeAPI(lambda body: 0, lambda body, item: "I'm sorry, I can't help with that.")
    args = ["audit", tmp_path / "labels.jsonl", "--sample", "1", "--api-base", api.url,
            "--model", "second-vl", "--backoff", "0.05"]
    try:
        first = run_tool("label.py", args, env={"DASHSCOPE_API_KEY": KEY})
        asked = len(api.log)
        again = run_tool("label.py", args, env={"DASHSCOPE_API_KEY": KEY})
    finally:
        api.close()
    assert first.returncode == 0 and asked == 4 and len(api.log) == 4, first.stderr + again.stderr
    report = (tmp_path / "labels.audit.report.txt").read_text()
    assert "4 sampled labels without a usable reading (refused 4)" in report, report
    assert "4 already done" in again.stderr


def test_clean_fix_leaves_out_replaces_or_rewrites_the_labels_with_a_confirmed_confusion(tmp_path):
    """--fix purple=blue: drop leaves out the labels that say purple; replace puts the second
    source's label in their place; rewrite writes blue for purple where the second source says blue.
    A label the audit did not ask is kept as it was; each result goes through the cleaning after."""
    from labelling.clean import clean_file
    said = {"v0": "A purple square moves right.", "v1": "The video shows a purple circle.",
            "v2": "A red square moves up.", "v3": "A purple star spins."}
    # v3 was not asked
    second = {"v0": "A blue square moves right.", "v1": "A green circle sits still."}
    labels, audit, out = (tmp_path / f for f in ("labels.jsonl", "audit.jsonl", "out.jsonl"))
    labels.write_text("".join(json.dumps({"video": f"{k}.mp4", "name": f"{k}.mp4", "caption": c})
                              + "\n" for k, c in said.items()))
    audit.write_text("".join(json.dumps({"video": f"{k}.mp4", "name": f"{k}.mp4", "caption": c,
                                         "teacher": said[k]}) + "\n" for k, c in second.items()))

    def fixed(how, *extra):
        counts = clean_file([str(labels), "--out", str(out), "--fix", "purple=blue", "--how", how,
                             *extra])
        return {r["name"][:2]: r["caption"] for r in read_rows(str(out))}, counts
    rows, counts = fixed("drop")
    assert rows == {"v2": "A red square moves up."} and counts["says 'purple': left out"] == 3
    rows, counts = fixed("replace", "--audit", str(audit))
    assert rows == {"v0": "A blue square moves right.", "v1": "A green circle sits still.",
                    "v2": "A red square moves up.", "v3": "A purple star spins."}
    rows, counts = fixed("rewrite", "--audit", str(audit))
    # v1: the second source does not say blue: kept (its boilerplate stripped by the cleaning)
    assert rows == {"v0": "A blue square moves right.", "v1": "A purple circle.",
                    "v2": "A red square moves up.", "v3": "A purple star spins."}
    assert counts["says 'purple': rewritten to 'blue'"] == 1
    assert counts["says 'purple': not asked of the second source, kept as it was"] == 1
    with pytest.raises(SystemExit):
        clean_file([str(labels), "--out", str(out), "--fix", "purple=blue", "--how", "rewrite"])
    for wrong in (["--fix", "purple==blue"], ["--fix", "blue=blue"], ["--audit", str(audit)],
                  ["--how", "replace"]):
        with pytest.raises(SystemExit):
            clean_file([str(labels), "--out", str(out), *wrong])
    with pytest.raises(ValueError, match="no audit rows"):   # the labels given as the audit
        fixed("replace", "--audit", str(labels))
    # an audit of another file's labels (same names, other captions) fixes nothing; a reading
    # that is no label (refused, cut) replaces nothing; a replaced label says whose it is
    audit.write_text("".join(json.dumps(r) + "\n" for r in [
        {"name": "v0.mp4", "video": "v0.mp4", "caption": "A blue square.", "teacher": "other"},
        {"name": "v1.mp4", "video": "v1.mp4", "caption": "I'm sorry, I can't help with that.",
         "teacher": said["v1"]},
        {"name": "v3.mp4", "video": "v3.mp4", "caption": "A blue star spins.", "model": "second-vl",
         "finish_reason": "stop", "teacher": said["v3"]}]))
    rows, counts = fixed("replace", "--audit", str(audit))
    assert rows == {"v0": "A purple square moves right.", "v1": "A purple circle.",
                    "v2": "A red square moves up.", "v3": "A blue star spins."}
    assert counts["says 'purple': the second source's reading refused, kept"] == 1
    assert [r["model"] for r in read_rows(str(out)) if r["name"] == "v3.mp4"] == ["second-vl"]


def test_a_sample_that_would_ask_nothing_or_everything_by_mistake_is_refused():
    labels = {(f"v{i}", None): {"caption": f"A {'purple' if i % 2 else 'red'} square."}
              for i in range(10)}
    assert len(checks.audit_sample(labels, 1.0, "purple")) == 5 and \
        len(checks.audit_sample(labels, 3)) == 3
    for size, saying, said in ((1.0, "", "--saying is empty"), (1.5, None, "a whole number"),
                               (0.01, None, "chooses none"), (1.0, "green", "no label says")):
        with pytest.raises(ValueError, match=said):
            checks.audit_sample(labels, size, saying)
    assert checks.same_teacher("qwen-vl-max", " QWEN-VL-MAX-2025") and \
        not checks.same_teacher("qwen-vl-max", "gpt-4o")
    # a script written without spaces: its phrases found, its confusions named by the character
    assert checks.says("一个穿紫色衣服的人在走路", "紫色")
    pairs = [("一个穿紫色衣服的人", "一个穿蓝色衣服的人")] * 3
    assert checks.confusions(pairs)[0]["teacher"] == "紫"


def test_an_audit_by_the_model_that_made_the_labels_is_refused_in_one_line(tmp_path):
    from tools import run_main
    labels = tmp_path / "labels.jsonl"
    row = {"video": "v.mp4", "caption": "A red square.", "model": "qwen-vl-max"}
    labels.write_text(json.dumps(row) + "\n")
    r = run_main("label.py", ["audit", labels, "--api-base", "http://127.0.0.1:9/v1"],
                 env={"DASHSCOPE_API_KEY": KEY})
    said = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(said) == 1 and "made these labels" in said[0], r.stderr
    assert not (tmp_path / "labels.audit.jsonl").exists()


def test_the_toy_teachers_confusion_is_named_by_the_audit_and_the_fix_undoes_it(tmp_path):
    """Each toy teacher with a habit (lab/toyworld.TEACHERS) names one colour as another on every
    call; an audit of a third of its labels by the second source ranks that confusion first, and
    `label.py clean --fix B=A --how rewrite`, from the second source's reading of one frame of each
    label that says B, brings the labels' colour back to the true one but for the slips."""
    from labelling.clean import clean_file
    from lab import toyworld
    files = toyworld.make_world(str(tmp_path / "w"), 150, 0, 0, 0, seed=1)
    videos = files["train_videos"]
    for k, habits in enumerate(toyworld.TEACHERS.values()):
        truth, said = habits.confusion
        labels = toyworld.teacher(videos, 7, habits=habits)
        named = [toyworld.parse(r["caption"])["colour"] for r in labels]
        meant = [v["truth"]["colour"] for v in videos]
        if not habits.slips:   # the confusion every time; the slips, independent ones, aside
            assert all(n in (said, None) for n, m in zip(named, meant) if m == truth)
        confused = sum(n == said for n, m in zip(named, meant) if m == truth)
        assert confused >= 0.7 * meant.count(truth)
        keyed = {(r["video"], None): r for r in labels}
        sample = [v for v, _ in checks.audit_sample(keyed, 1 / 3)]
        second = toyworld.teacher([v for v in videos if v["video"] in sample], 9,
                                  habits=toyworld.SECOND)
        pairs = [(keyed[(r["video"], None)]["caption"], r["caption"]) for r in second]
        top = checks.confusions(pairs)[0]
        assert (top["teacher"], top["second"]) == (said, truth), checks.confusions(pairs)[:3]
        asked = [v for v in videos if checks.says(keyed[(v["video"], None)]["caption"], said)]
        reread = toyworld.teacher(asked, 11, [toyworld.FRAMES // 2], toyworld.SECOND)
        (tmp_path / f"fix{k}.jsonl").write_text("".join(
            json.dumps({**r, "teacher": keyed[(r["video"], None)]["caption"]}) + "\n"
            for r in reread))
        (tmp_path / f"labels{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels))
        clean_file([str(tmp_path / f"labels{k}.jsonl"), "--out", str(tmp_path / f"fixed{k}.jsonl"),
                    "--keep-duplicates", "--fix", f"{said}={truth}", "--how", "rewrite",
                    "--audit", str(tmp_path / f"fix{k}.jsonl")])
        fixed = {r["video"]: toyworld.parse(r["caption"])["colour"]
                 for r in read_rows(str(tmp_path / f"fixed{k}.jsonl"))}
        right = [fixed[v["video"]] == v["truth"]["colour"] for v in videos if v["video"] in fixed]
        before = [n == m for n, m in zip(named, meant)]
        before = sum(before) / len(before)   # 0.69 and 0.59 measured, 0.97 and 0.80 after
        assert sum(right) / len(right) >= (0.95 if not habits.slips else 0.75) > before
