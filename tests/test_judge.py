"""judge.py against a local chat-completions server: scores, verdicts, unparsed answers, A/B,
caching."""

import itertools
import json
import os

import numpy as np
import pytest
from plumbing.jsonl import read_rows

from judge import compare, parse_judgment, summarize

from chaos_api import ChaosAPI
from fake_api import KEY, FakeAPI
from tools import run_tool

GT = {f"v{i}": f"ground truth {i}: a cat sits on a red sofa and yawns" for i in range(6)}
# candidate caption -> the judge's (score, correct)
VERDICTS = {"A0": (5, True), "A1": (3, False), "A2": (4, True), "A3": (0, False), "A4": (2, False),
            "B0": (5, True), "B1": (4, True), "B2": (4, True), "B3": (1, False), "B4": (3, True)}


def candidate(body):
    text = body["messages"][1]["content"]
    return text.split("Candidate caption:\n", 1)[1].split("\n", 1)[0]


def judge_server():
    def answer(body, item):
        score, correct = VERDICTS[item]
        return json.dumps({"score": score, "correct": correct, "reason": "because"})
    return FakeAPI(candidate, answer)


def write(path, rows):
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_judge(args):
    return run_tool("judge.py", args, env={"OPENAI_API_KEY": KEY})


def test_judge_end_to_end_with_ab_and_cache(tmp_path):
    gt = write(tmp_path / "gt.jsonl", [{"video": v, "caption": c} for v, c in GT.items()] +
               [{"video": "v9", "error": "HTTP 400"}])
    a = write(tmp_path / "a.jsonl", [{"video": f"v{i}", "caption": f"A{i}"} for i in range(5)] +
              [{"video": "extra", "caption": "A0"}])
    b = write(tmp_path / "b.jsonl", [{"video": f"v{i}", "caption": f"B{i}"} for i in range(6)])
    api = judge_server()
    # out of range, then fine
    api.script = {"A1": [("content", '{"score": 7, "correct": false}')],
                  # not JSON, then fine
                  "B3": [("content", "Sure! I would give it a 1.")],
                  # never valid: unparsed
                  "A4": [("content", '{"score": "high"}')] * 3,
                  "B4": [("status", 500, "server_error", {})]}
    args = ["--gt", gt, "--pred", a, "--pred-b", b, "--out", str(tmp_path / "report"),
            "--api-base", api.url, "--backoff", "0.01", "--concurrency", "3", "--bootstrap", "2000"]
    try:
        r = run_judge(args)
        assert r.returncode == 0, r.stderr
        requests = len(api.log)
        # everything cached: no request
        again = run_judge(args)
        assert again.returncode == 0 and len(api.log) == requests
    finally:
        api.close()
    summary = json.load(open(tmp_path / "report" / "summary.json"))
    # v5 is not in a.jsonl and "extra" not in gt: 5 videos in all three files, 2 left out
    assert summary["videos"] == 5 and summary["dropped"] == 2
    sa, sb = summary["a"], summary["b"]
    # A4 unparsed, counted apart
    assert (sa["n"], sa["unparsed"]) == (4, 1)
    assert sa["accuracy"] == pytest.approx(100 * 2 / 4) and sa["mean_score"] == pytest.approx(
        (5 + 3 + 4 + 0) / 4
    )
    assert (sb["n"], sb["unparsed"]) == (5, 0)
    assert sb["accuracy"] == pytest.approx(100 * 4 / 5) and sb["mean_score"] == pytest.approx(
        (5 + 4 + 4 + 1 + 3) / 5
    )
    # paired over v0..v3 (A4 unparsed)
    d = summary["b_minus_a"]
    assert d["n"] == 4 and d["mean_score_diff"] == pytest.approx((0 + 1 + 0 + 1) / 4)
    assert d["accuracy_diff"] == pytest.approx(100 * (0 + 1 + 0 + 0) / 4)
    assert (d["b_wins"], d["ties"], d["b_losses"]) == (2, 2, 0)
    lo, hi = sa["mean_score_ci"]
    assert lo <= sa["mean_score"] <= hi
    assert {"report.md", "summary.json", "per_video.jsonl",
            "judgments.jsonl"} <= set(os.listdir(tmp_path / "report"))
    # JSON mode, and the word JSON in the prompt
    for e in api.log:
        assert (
            e["body"]["response_format"] == {"type": "json_object"}
            and "JSON" in e["body"]["messages"][1]["content"]
        )
        assert e["auth"] == f"Bearer {KEY}"
    # asked again twice, then given up
    assert sum(1 for e in api.log if e["item"] == "A4") == 3
    for name in os.listdir(tmp_path / "report"):
        assert KEY not in open(tmp_path / "report" / name).read()
    assert KEY not in r.stdout + r.stderr


def exact_bootstrap(values, q):
    """Percentiles of the mean over every resample with replacement (all n^n of them)."""
    means = [np.mean(s) for s in itertools.product(values, repeat=len(values))]
    return np.percentile(means, q)


def test_aggregates_equal_hand_computed_values():
    judgments = [{"score": s, "correct": c} for s,
                 c in ((5, True), (3, False), (4, True), (0, False), (2, True))]
    judgments += [{"unparsed": True}, {"error": "HTTP 401", "status": 401}]
    s = summarize(judgments, resamples=40000)
    assert (s["n"], s["unparsed"], s["failed"]) == (5, 1, 1)
    assert s["accuracy"] == 60.0 and s["mean_score"] == 2.8
    scores = [5, 3, 4, 0, 2]
    assert s["mean_score_ci"] == pytest.approx([exact_bootstrap(scores, 2.5),
                                                exact_bootstrap(scores, 97.5)], abs=0.1)
    acc = [100, 0, 100, 0, 100]
    assert s["accuracy_ci"] == pytest.approx([exact_bootstrap(acc, 2.5),
                                              exact_bootstrap(acc, 97.5)], abs=2.5)
    a = {v: {"score": sc, "correct": sc > 2} for v, sc in zip("pqrs", (1, 2, 3, 4))}
    b = {v: {"score": sc, "correct": sc > 2} for v, sc in zip("pqrs", (2, 2, 5, 3))}
    b["t"] = {"score": 5, "correct": True}
    c = compare(a, b, resamples=1000)
    assert c["n"] == 4 and c["mean_score_diff"] == 0.5 and c["accuracy_diff"] == 0.0
    assert (c["b_wins"], c["ties"], c["b_losses"]) == (2, 1, 1)


@pytest.mark.parametrize("text, ok",
                         [('{"score": 3, "correct": true, "reason": "x"}', True),
                          ('{"score": 3.0, "correct": false}', True),
                          ('{"score": 6, "correct": true}', False),
                          ('{"score": -1, "correct": true}', False),
                          ('{"score": true, "correct": true}', False),
                          ('{"score": 3, "correct": "yes"}', False), ("[3, true]", False),
                          ("score: 3", False)])
def test_parse_judgment(text, ok):
    assert (parse_judgment(text) is not None) == ok


def test_judge_keys_rows_per_shot(tmp_path):
    gt, pred = tmp_path / "gt.jsonl", tmp_path / "pred.jsonl"

    def shots(who, order):
        return "".join(json.dumps({"video": "v.mp4", "shot": s, "of": 2, "start": s, "end": s + 1,
                                   "caption": f"{who} shot {s}"}) + "\n" for s in order)
    gt.write_text(shots("gt", (0, 1)))
    pred.write_text(shots("pred", (1, 0)))
    seen = []

    def answer(body, item):
        seen.append(body["messages"][1]["content"])
        return json.dumps({"score": 4, "correct": True, "reason": "ok"})
    api = ChaosAPI(answer, identify=lambda body: "x", script={}, key=None)
    try:
        r = run_tool("judge.py",
                     ["--gt", gt, "--pred", pred, "--out", tmp_path / "rep", "--api-base",
                      api.url], env={"OPENAI_API_KEY": KEY})
    finally:
        api.close()
    assert r.returncode == 0, r.stderr
    assert len(seen) == 2 and all(("gt shot 0" in s) == ("pred shot 0" in s) for s in seen)
    per_video = read_rows(str(tmp_path / "rep" / "per_video.jsonl"))
    assert [row["shot"] for row in per_video] == [0, 1]
