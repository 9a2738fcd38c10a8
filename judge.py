"""Score captions against ground truth with a judge model (GPT-4-Turbo) over plain HTTP.

    OPENAI_API_KEY=... python judge.py --gt labels.jsonl --pred captions.jsonl [--pred-b other.jsonl] --out report

For each video the judge returns JSON: a semantic-similarity score (integer 0-5), whether the caption is
correct (contradicts nothing in the ground truth and invents nothing), and a short reason. An answer that
does not parse, or is out of range, is asked again, then recorded as unparsed and counted apart: never
scored. Judgments are cached by (ground truth, caption, prompt version, judge model) in the report folder,
so a rerun costs nothing. The report (report.md, summary.json) gives accuracy and mean score with 95%
bootstrap intervals; with --pred-b, the paired differences and wins / ties / losses: the seed's
"accuracy +8 points, mean score +0.2" comparison in one command.
"""

import argparse
import functools
import hashlib
import json
import os
import sys

import numpy as np

from client import APIError, Client, run_concurrently
from jsonl import Appender, read_rows

PROMPT_VERSION = "judge-v1"
SYSTEM = ("You evaluate video captions. You are given a ground-truth description of a video and a candidate "
          "caption of the same video. Judge only by meaning, not wording or length.")
QUESTION = """Ground-truth description:
{gt}

Candidate caption:
{pred}

Answer with a JSON object with exactly these keys:
"score": an integer from 0 to 5, the semantic similarity of the candidate to the ground truth (0: unrelated, 5: the same content);
"correct": true if the candidate contradicts nothing in the ground truth and adds no content the ground truth does not support, else false;
"reason": one short sentence."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Judge captions against ground truth with an LLM.")
    p.add_argument("--gt", required=True, help="JSONL with video + caption (what label.py writes)")
    p.add_argument("--pred", required=True, help="JSONL with video + caption (what caption.py writes)")
    p.add_argument("--pred-b", help="a second system's captions, to compare with --pred")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--api-base", default="https://api.openai.com/v1")
    p.add_argument("--model", default="gpt-4-turbo")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--rpm", type=float)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--retries", type=int, default=8)
    p.add_argument("--backoff", type=float, default=1.0)
    p.add_argument("--parse-retries", type=int, default=2, help="asks again when an answer does not parse")
    p.add_argument("--bootstrap", type=int, default=10000, help="resamples for the intervals")
    return p.parse_args(argv)


def captions(path):
    return {r["video"]: r["caption"] for r in read_rows(path) if r.get("video") and r.get("caption")}


def cache_key(gt, pred, model):
    return hashlib.sha256(json.dumps([gt, pred, PROMPT_VERSION, model]).encode()).hexdigest()


def parse_judgment(text):
    """{"score", "correct", "reason"} from the judge's answer, or None when it is not what was asked."""
    try:
        j = json.loads(text)
    except (TypeError, ValueError):
        return None
    if not isinstance(j, dict):
        return None
    score, correct = j.get("score"), j.get("correct")
    if isinstance(score, float) and score.is_integer():
        score = int(score)
    if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score <= 5 or not isinstance(correct, bool):
        return None
    return {"score": score, "correct": correct, "reason": str(j.get("reason", ""))[:500]}


def judge_one(client, args, job):
    key, video, gt, pred = job
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": QUESTION.format(gt=gt, pred=pred)}]
    row = {"key": key, "video": video, "model": args.model, "prompt_version": PROMPT_VERSION}
    for _ in range(args.parse_retries + 1):
        try:
            reply = client.chat(messages, response_format={"type": "json_object"}, temperature=0)
        except APIError as e:
            return {**row, "error": client.scrub(e), "status": e.status}
        judgment = parse_judgment(reply["choices"][0]["message"].get("content"))
        if judgment:
            return {**row, **judgment}
    return {**row, "unparsed": True, "raw": str(reply["choices"][0]["message"].get("content"))[:500]}


def interval(values, stat, resamples, seed=0):
    """95% percentile-bootstrap interval of stat over the rows of `values` (resampled with replacement)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return [None, None]
    idx = np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))
    stats = stat(values[idx])
    return [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))]


def summarize(judgments, resamples):
    """n, accuracy (% correct), mean score, their intervals, and the unparsed count."""
    ok = [j for j in judgments if "score" in j]
    correct = [100.0 * j["correct"] for j in ok]
    scores = [j["score"] for j in ok]
    mean = functools.partial(np.mean, axis=-1)
    return {"n": len(ok), "accuracy": float(np.mean(correct)) if ok else None,
            "accuracy_ci": interval(correct, mean, resamples), "mean_score": float(np.mean(scores)) if ok else None,
            "mean_score_ci": interval(scores, mean, resamples),
            "unparsed": sum(1 for j in judgments if j.get("unparsed")),
            "failed": sum(1 for j in judgments if "error" in j)}


def compare(a, b, resamples):
    """B minus A over the videos both were judged on: differences with intervals, wins / ties / losses."""
    both = [v for v in a if v in b and "score" in a[v] and "score" in b[v]]
    d_acc = [100.0 * (b[v]["correct"] - a[v]["correct"]) for v in both]
    d_score = [b[v]["score"] - a[v]["score"] for v in both]
    mean = functools.partial(np.mean, axis=-1)
    return {"n": len(both), "accuracy_diff": float(np.mean(d_acc)) if both else None,
            "accuracy_diff_ci": interval(d_acc, mean, resamples),
            "mean_score_diff": float(np.mean(d_score)) if both else None,
            "mean_score_diff_ci": interval(d_score, mean, resamples),
            "b_wins": sum(d > 0 for d in d_score), "ties": sum(d == 0 for d in d_score),
            "b_losses": sum(d < 0 for d in d_score)}


def report_md(summary):
    def fmt(x, ci, unit=""):
        return "-" if x is None else f"{x:.2f}{unit} [{ci[0]:.2f}, {ci[1]:.2f}]"
    lines = [f"# Caption judgments ({summary['judge_model']}, prompt {PROMPT_VERSION})", "",
             f"{summary['videos']} videos judged; {summary['dropped']} left out (not in every file).", "",
             "| system | n | accuracy % [95% CI] | mean score 0-5 [95% CI] | unparsed | failed |", "|---|---|---|---|---|---|"]
    for name in ("a", "b"):
        if name in summary:
            s = summary[name]
            lines.append(f"| {name}: {summary['files'][name]} | {s['n']} | {fmt(s['accuracy'], s['accuracy_ci'])} | "
                         f"{fmt(s['mean_score'], s['mean_score_ci'])} | {s['unparsed']} | {s['failed']} |")
    if "b_minus_a" in summary:
        c = summary["b_minus_a"]
        lines += ["", f"B minus A over {c['n']} paired videos: accuracy {fmt(c['accuracy_diff'], c['accuracy_diff_ci'], ' points')}, "
                      f"mean score {fmt(c['mean_score_diff'], c['mean_score_diff_ci'])}; "
                      f"B wins {c['b_wins']}, ties {c['ties']}, loses {c['b_losses']} (by score)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    try:
        client = Client(args.api_base, args.model, args.api_key_env, args.rpm, args.timeout, args.retries, args.backoff)
        gt, files = captions(args.gt), {"a": args.pred, **({"b": args.pred_b} if args.pred_b else {})}
        preds = {name: captions(path) for name, path in files.items()}
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    everywhere = set(gt).intersection(*preds.values())
    videos = sorted(everywhere)
    dropped = len(set(gt).union(*preds.values())) - len(videos)
    os.makedirs(args.out, exist_ok=True)
    cache_path = os.path.join(args.out, "judgments.jsonl")
    cache = {r["key"]: r for r in read_rows(cache_path) if "error" not in r}   # failed requests are tried again
    todo, wanted = {}, {}   # two systems with the same caption share one judgment
    for name, pred in preds.items():
        for v in videos:
            key = wanted[(name, v)] = cache_key(gt[v], pred[v], args.model)
            if key not in cache:
                todo.setdefault(key, (key, v, gt[v], pred[v]))
    jobs = list(todo.values())
    with Appender(cache_path, fsync=True) as out:
        for i, row in enumerate(run_concurrently(jobs, functools.partial(judge_one, client, args), args.workers), 1):
            out.write(row)
            cache[row["key"]] = row
            print(f"\r{i}/{len(jobs)} judged", end="", file=sys.stderr)
    judged = {name: {v: cache[wanted[(name, v)]] for v in videos} for name in preds}
    summary = {"judge_model": args.model, "prompt_version": PROMPT_VERSION, "files": files, "videos": len(videos),
               "dropped": dropped, **{name: summarize(list(j.values()), args.bootstrap) for name, j in judged.items()}}
    if "b" in judged:
        summary["b_minus_a"] = compare(judged["a"], judged["b"], args.bootstrap)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(args.out, "per_video.jsonl"), "w") as f:
        for v in videos:
            f.write(json.dumps({"video": v, **{name: judged[name][v] for name in judged}}) + "\n")
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report_md(summary))
    print("\n" + report_md(summary), file=sys.stderr)


if __name__ == "__main__":
    main()
