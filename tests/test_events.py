"""judge.py --events against a judge whose answers follow rules a test can apply by hand: sentences
are events; an event is entailed when the other caption holds all its words of four letters or more,
and contradicted when it holds the opposite of one of them."""

import json
import re

import numpy as np
import pytest

import events

from chaos_api import KEY, ChaosAPI
from tools import run_tool

OPPOSITE = {"left": "right", "right": "left", "sits": "stands", "stands": "sits",
            "opens": "closes", "closes": "opens"}
GT = {"v1": "A cat sits on the sofa. The cat jumps left. A door opens.",
      "v2": "A red ball rolls across the floor. A dog chases the ball.",
      "v3": "Two girls walk under cherry trees. They laugh."}
# one contradiction, one entailed
PRED = {"v1": "A cat stands on the sofa. The cat jumps left.",
        "v2": "A red ball rolls across the floor. A dog chases the ball. A bird sings.",
        # its events never parse
        "v3": "UNPARSABLE two girls talk."}
PRED_B = {**PRED, "v1": "A cat sits on the sofa. The cat jumps left. A door opens."}


def sentences(text):
    return [s.strip() for s in re.split(r"(?<=\.)\s+", text.strip()) if s.strip()]


def words(text):
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 4}


def verdict(event, caption):
    have = words(caption)
    if any(OPPOSITE.get(w) in have for w in words(event)):
        return "contradicted"
    return "entailed" if words(event) <= have else "neutral"


def answer(body, item):
    messages = body["messages"]
    if messages[0]["role"] == "system":   # the report's score + verdict
        return json.dumps({"score": 3, "correct": True, "reason": "r"})
    prompt = messages[0]["content"]
    caption = prompt.split("Video description:\n", 1)[1].split("\n\n", 1)[0]
    if prompt.rstrip().endswith('{"events": ["...", "..."]}.'):
        return (
            "not json at all"
            if "UNPARSABLE" in caption
            else json.dumps({"events": sentences(caption)})
        )
    events = re.findall(r"^\d+\. (.*)$", prompt.split("Events:\n", 1)[1], re.M)
    return json.dumps({"verdicts": [verdict(e, caption) for e in events]})


def by_hand(gt, pred):
    p = [verdict(e, gt) for e in sentences(pred)]
    r = [verdict(e, pred) for e in sentences(gt)]
    P, R = p.count("entailed") / len(p), r.count("entailed") / len(r)
    return {"precision": P, "recall": R, "f1": 2 * P * R / (P + R) if P + R else 0.0,
            "contradicted": p.count("contradicted") / len(p)}


def write(path, captions):
    path.write_text("".join(json.dumps({"video": v, "caption": c}) + "\n" for v,
                            c in captions.items()))
    return path


@pytest.fixture
def judged(tmp_path):
    api = ChaosAPI(answer, identify=lambda body: "x", script={"x": ["ok"] * 1000})
    args = ["--gt", write(tmp_path / "gt.jsonl", GT), "--pred", write(tmp_path / "a.jsonl", PRED),
            "--pred-b", write(tmp_path / "b.jsonl", PRED_B), "--out", tmp_path / "rep",
            "--api-base", api.url, "--events", "--bootstrap", "500", "--parse-retries", "1"]
    try:
        first = run_tool("judge.py", args, env={"OPENAI_API_KEY": KEY})
        asked = len(api.log)
        again = run_tool("judge.py", args, env={"OPENAI_API_KEY": KEY})
    finally:
        api.close()
    return first, again, asked, len(api.log), tmp_path / "rep"


def test_event_precision_recall_f1_as_computed_by_hand(judged):
    first, _, _, _, rep = judged
    assert first.returncode == 0, first.stderr
    summary = json.loads((rep / "summary.json").read_text())["events"]
    assert summary["versions"] == "events-v1, entail-v1" and summary["max_events"] == 10
    for name, preds in (("a", PRED), ("b", PRED_B)):
        want = {v: by_hand(GT[v], preds[v]) for v in ("v1", "v2")}   # v3's events never parse
        s = summary["systems"][name]
        assert s["n"] == 2 and s["unparsed"] == 1 and s["failed"] == 0
        for metric in ("precision", "recall", "f1", "contradicted"):
            values = [100 * want[v][metric] for v in ("v1", "v2")]
            assert s[metric] == pytest.approx(np.mean(values))
            # two videos: a resample's mean is one of them (p 1/4 each) or their mean, so the 2.5th
            # and 97.5th percentiles of 500 resamples are the smaller and the larger
            assert s[metric + "_ci"] == pytest.approx([min(values), max(values)])
    a, b = by_hand(GT["v1"], PRED["v1"]), by_hand(GT["v1"], PRED_B["v1"])
    # the rules did what they say
    assert a["contradicted"] == 0.5 and b["f1"] == 1.0
    diff = summary["b_minus_a"]
    assert diff["n"] == 2 and diff["f1_diff"] == pytest.approx(100 * (b["f1"] - a["f1"]) / 2)
    report = (rep / "report.md").read_text()
    assert "precision" in report and "events-v1, entail-v1" in report and "contradicted" in report
    events_table = report[report.index("| system | n | precision"):]
    # named as above
    assert "| a: " in events_table and "| b: " in events_table and "a.jsonl" in events_table


def test_events_are_listed_once_per_caption_and_cached(judged):
    first, again, asked, total, _ = judged
    # the rerun asked nothing
    assert again.returncode == 0 and total == asked
    # 3 score judgments for a, 1 more for b (only v1 differs); events listed once per distinct
    # caption (6: b's v1
    # is the reference itself), the one that does not parse asked twice; verdicts: a's v1 and v2
    # both ways, and
    # b's v1 once (both ways are the same question: the reference's events against the reference)
    assert asked == 4 + 7 + 5


def teacher(body, item):
    """Marks a sentence supported when it speaks of the square (what the frames show), else not."""
    parts = body["messages"][0]["content"]
    text = parts[-1]["text"]
    said = re.findall(r"^\d+\. (.*)$", text, re.M)
    # the same 4 frames again
    assert parts[0]["type"] == "video" and len(parts[0]["video"]) == 4
    return json.dumps({"supported": ["square" in s for s in said]})


@pytest.mark.slow
def test_label_verify_keeps_the_sentences_the_frames_support(tmp_path):
    from plumbing.jsonl import read_rows

    from videos import solid_videos
    videos, _ = solid_videos(str(tmp_path / "v"), 3, n_frames=6, size=(48, 32))
    labels = [
        {
            "video": videos[0],
            "caption": "A red square sits still. A dog barks loudly. The square fades.",
            "model": "t",
        },
        {"video": videos[1], "caption": "Nothing but a cat here.", "model": "t"},
        {"video": videos[2], "error": "HTTP 400", "code": "data_inspection_failed"},
    ]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels))
    api = ChaosAPI(teacher, identify=lambda body: "x", script={"x": ["ok"] * 100})
    out = tmp_path / "verified.jsonl"
    try:
        r = run_tool("label.py",
                     ["verify", tmp_path / "labels.jsonl", "--out", out, "--api-base", api.url],
                     env={"DASHSCOPE_API_KEY": KEY})
        again = run_tool("label.py",
                         ["verify", tmp_path / "labels.jsonl", "--out", out, "--api-base",
                          api.url], env={"DASHSCOPE_API_KEY": KEY})
    finally:
        api.close()
    assert r.returncode == 0 and again.returncode == 0, r.stderr
    rows = {row["video"]: row for row in read_rows(str(out))}
    assert rows[videos[0]]["caption"] == "A red square sits still. The square fades."
    assert rows[videos[0]]["caption_original"] == labels[0]["caption"]
    assert (rows[videos[0]]["sentences"], rows[videos[0]]["supported"]) == (3, 2)
    assert rows[videos[1]]["caption"] == "" and rows[videos[1]]["supported"] == 0
    # the rerun asked nothing
    assert len(rows) == 2 and len(api.log) == 2


def test_at_most_max_events_and_unparsed_verdicts_are_counted_apart(tmp_path):
    """--max-events 2 cuts every list to 2 events (the prompt says so, and longer answers are cut);
    verdicts that never parse leave that video unscored, counted as unparsed."""
    prompts = []

    def cut_answer(body, item):
        prompt = body["messages"][0]["content"]
        prompts.append(prompt)
        if "Events:" in prompt and "chases" in prompt:
            return "no verdicts here"
        return answer(body, item)
    api = ChaosAPI(cut_answer, identify=lambda body: "x", script={"x": ["ok"] * 1000})
    args = ["--gt", write(tmp_path / "gt.jsonl", GT), "--pred", write(tmp_path / "a.jsonl", PRED),
            "--out", tmp_path / "rep", "--api-base", api.url, "--events", "--max-events", "2",
            "--bootstrap", "200", "--parse-retries", "1"]
    try:
        r = run_tool("judge.py", args, env={"OPENAI_API_KEY": KEY})
    finally:
        api.close()
    assert r.returncode == 0, r.stderr
    listed = [
        row
        for row in map(json.loads, (tmp_path / "rep" / "events.jsonl").read_text().splitlines())
        if row["kind"] == "events" and "value" in row
    ]
    assert listed and all(len(row["value"]) <= 2 for row in listed)
    asked = [p for p in prompts if "List the events" in p]
    assert asked and all("at most 2." in p for p in asked)
    s = json.loads((tmp_path / "rep" / "summary.json").read_text())["events"]["systems"]["a"]
    want = by_hand(" ".join(sentences(GT["v1"])[:2]), " ".join(sentences(PRED["v1"])[:2]))
    # v2's verdicts, v3's events
    assert s["n"] == 1 and s["unparsed"] == 2 and s["f1"] == pytest.approx(100 * want["f1"])


@pytest.mark.slow
def test_label_verify_shards_survive_faults_and_use_the_labels_frames(tmp_path):
    """Two shards cover every label once; a 500 and a dropped body are asked again; labels made from
    8 frames are not checked against 4."""
    from plumbing.jsonl import read_rows

    from videos import solid_videos
    videos, _ = solid_videos(str(tmp_path / "v"), 6, n_frames=6, size=(48, 32))
    labels = [{"video": v, "caption": "A square. A cat.", "frames": 4} for v in videos]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels))
    # every other request fails
    faults = ["e500_echo", "ok", "drop_in_body", "ok", "html_502", "ok"] * 3
    api = ChaosAPI(teacher, identify=lambda body: "x", script={"x": faults})
    out = tmp_path / "verified.jsonl"
    try:
        runs = [run_tool("label.py",
                         ["verify", tmp_path / "labels.jsonl", "--out", out, "--api-base", api.url,
                          "--shard", f"{k}/2", "--backoff", "0"],
                         env={"DASHSCOPE_API_KEY": KEY}) for k in (0, 1)]
    finally:
        api.close()
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    rows = read_rows(str(out))
    assert sorted(row["video"] for row in rows) == sorted(videos) and all(
        row["caption"] == "A square." for row in rows
    )
    (tmp_path / "eight.jsonl").write_text("".join(json.dumps({**r,
                                                              "frames": 8}) + "\n" for r in labels))
    r = run_tool("label.py",
                 ["verify", tmp_path / "eight.jsonl", "--out", tmp_path / "v8.jsonl", "--api-base",
                  api.url], env={"DASHSCOPE_API_KEY": KEY})
    assert r.returncode == 1 and "--frames 8" in r.stderr and not (tmp_path / "v8.jsonl").exists()


def test_verify_without_out_writes_a_new_file_and_never_its_input(tmp_path):
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"video": str(tmp_path / "v.mp4"), "caption": "A cat.",
                                  "frames": 4}) + "\n")
    before = labels.read_text()
    r = run_tool("label.py", ["verify", labels, "--out", labels], env={"DASHSCOPE_API_KEY": KEY})
    assert (
        r.returncode == 2
        and "is the labels being checked" in r.stderr
        and labels.read_text() == before
    )
    import label
    assert label.parse_args([str(labels)], "verify").out == str(tmp_path / "labels.verified.jsonl")


def test_an_event_listed_ten_times_is_one_event():
    text = json.dumps({"events": ["The person walks."] * 10 + ["the person  walks",
                                                               "A dog barks."]})
    assert events.parse_events(text, 10) == ["The person walks.", "A dog barks."]
    assert "1. The person walks.\n2. A dog barks." in events.entail_job(
        ["The person walks."] * 3 + ["A dog barks."], "x", type("A", (), {"model": "m"}))["prompt"]
