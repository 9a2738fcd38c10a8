"""Score captions against ground truth with a judge model (GPT-4-Turbo) over plain HTTP.

    OPENAI_API_KEY=... python judge.py --gt labels.jsonl --pred captions.jsonl --out report
        [--pred-b other.jsonl]

For each video the judge returns JSON: a semantic-similarity score (integer 0-5), whether the
caption is correct (contradicts nothing in the ground truth and invents nothing), and a short
reason. An answer that does not parse, or is out of range, is asked again, then recorded as
unparsed and counted apart: never scored. Judgments are cached by (ground truth, caption, prompt
version, judge model) in the report folder, so a rerun costs nothing; a failed request is not
cached and is asked again on the next run, and a refused key, an empty account or an unreachable
server stops the run early. The report (report.md, summary.json) gives accuracy and mean score with
95% bootstrap intervals; with --pred-b, the paired differences and wins / ties / losses: the
report's "accuracy +8 points, mean score +0.2" comparison in one command.
"""

import functools
import hashlib
import itertools
import json
import os
import sys

import numpy as np

import events
import shots
from plumbing import cli
from plumbing.cli import Stop
from plumbing.client import add_api_flags, api_client
from plumbing.jsonl import Appender, Busy, iter_rows, replace_atomic
from plumbing.redact import Redactor
from plumbing.runner import run_items
from plumbing.sources import paired

PROMPT_VERSION = "judge-v1"
SYSTEM = ("You evaluate video captions. You are given a ground-truth description of a video and a "
          "candidate caption of the same video. Judge only by meaning, not wording or length.")
QUESTION = ("Ground-truth description:\n"
            "{gt}\n"
            "\n"
            "Candidate caption:\n"
            "{pred}\n"
            "\n"
            "Answer with a JSON object with exactly these keys:\n"
            '"score": an integer from 0 to 5, the semantic similarity of the candidate to the '
            "ground truth (0: unrelated, 5: the same content);\n"
            '"correct": true if the candidate contradicts nothing in the ground truth and adds no '
            "content the ground truth does not support, else false;\n"
            '"reason": one short sentence.')


def parse_args(argv=None):
    p = cli.Parser(description="Judge captions against ground truth with an LLM.")
    p.add_argument("--gt", required=True, help="JSONL with video + caption (what label.py writes)")
    p.add_argument("--pred", required=True,
                   help="JSONL with video + caption (what caption.py writes)")
    p.add_argument("--pred-b", help="a second system's captions, to compare with --pred")
    p.add_argument("--out", required=True, help="report folder")
    add_api_flags(p, "https://api.openai.com/v1", "gpt-4-turbo", "OPENAI_API_KEY", concurrency=8)
    p.add_argument("--parse-retries", type=cli.count, default=2,
                   help="asks again when an answer does not parse")
    p.add_argument("--bootstrap", type=cli.positive_int, default=10000,
                   help="resamples for the intervals")
    p.add_argument("--events", action="store_true",
                   help="also event precision / recall / F1 (DREAM-1K's AutoDQ): up to 5 requests "
                        "a video, not 1")
    p.add_argument("--max-events", type=cli.positive_int, default=10,
                   help="events listed per caption, at most")
    return p.parse_args(argv)


def captions(path):
    """{(video name, shot or None): (the path as written, caption)} of a JSONL file (rows per shot,
    caption.py --shots, are keyed by their shot too; names: plumbing/sources.py); an error if there
    is none."""
    rows = {}
    for r in iter_rows(path, must_exist=True):
        caption = r.get("caption")
        if isinstance(r.get("video"), str) and isinstance(caption, str) and caption.strip() \
                and shots.row_key(r) is not None:
            rows.setdefault(shots.row_key(r), (r["video"], r["caption"]))
    if not rows:
        raise ValueError(f"{path}: no rows with a \"video\" and a \"caption\" (is it the right "
                         f"file?)")
    return rows


def cache_key(gt, pred, model):
    return hashlib.sha256(json.dumps([gt, pred, PROMPT_VERSION, model]).encode()).hexdigest()


def parse_judgment(text):
    """{"score", "correct", "reason"} from the judge's answer, or None when it is not what was
    asked."""
    try:
        j = json.loads(text)
    except (TypeError, ValueError):
        return None
    if not isinstance(j, dict):
        return None
    score, correct = j.get("score"), j.get("correct")
    if isinstance(score, float) and score.is_integer():
        score = int(score)
    if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score <= 5 \
            or not isinstance(correct, bool):
        return None
    return {"score": score, "correct": correct, "reason": str(j.get("reason", ""))[:500]}


def judge_one(client, args, job):
    """A judgment row, or an unparsed one."""
    _, _, gt, pred = job
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": QUESTION.format(gt=gt, pred=pred)}]
    for _ in range(args.parse_retries + 1):
        reply = client.chat(messages, response_format={"type": "json_object"}, temperature=0)
        judgment = parse_judgment(reply.content)
        if judgment:
            return {**judgment_row(args, job), **judgment}
    return {**judgment_row(args, job), "unparsed": True, "raw": client.scrub(reply.content, 500)}


def judgment_row(args, job):
    """The fields that say which judgment a row is (runner.guarded)."""
    return {"key": job[0], "video": job[1], "model": args.model, "prompt_version": PROMPT_VERSION}


def interval(values, stat, resamples, seed=0):
    """95% percentile-bootstrap interval of stat over the rows of `values` (resampled with
    replacement)."""
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
            "accuracy_ci": interval(correct, mean, resamples),
            "mean_score": float(np.mean(scores)) if ok else None,
            "mean_score_ci": interval(scores, mean, resamples),
            "unparsed": sum(1 for j in judgments if j.get("unparsed")),
            "failed": sum(1 for j in judgments if "error" in j)}


def compare(a, b, resamples):
    """B minus A over the videos both were judged on: differences with intervals, wins / ties /
    losses."""
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
             f"{summary['videos']} videos judged; {summary['dropped']} left out (not in every "
             f"file).", "",
             "| system | n | accuracy % [95% CI] | mean score 0-5 [95% CI] | unparsed | failed |",
             "|---|---|---|---|---|---|"]
    for name in ("a", "b"):
        if name in summary:
            s = summary[name]
            lines.append(f"| {name}: {summary['files'][name]} | {s['n']} | "
                         f"{fmt(s['accuracy'], s['accuracy_ci'])} | "
                         f"{fmt(s['mean_score'], s['mean_score_ci'])} | {s['unparsed']} | "
                         f"{s['failed']} |")
    if "b_minus_a" in summary:
        c = summary["b_minus_a"]
        accuracy = fmt(c['accuracy_diff'], c['accuracy_diff_ci'], ' points')
        lines += ["", f"B minus A over {c['n']} paired videos: accuracy {accuracy}, "
                      f"mean score {fmt(c['mean_score_diff'], c['mean_score_diff_ci'])}; "
                      f"B wins {c['b_wins']}, ties {c['ties']}, loses {c['b_losses']} (by score)."]
    if "events" in summary:
        lines += events.table(summary["events"], summary["files"])
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    scrub = Redactor(os.environ.get(args.api_key_env, "").strip())
    return cli.run(lambda: judge(args), (OSError, ValueError, Busy, Stop), scrub)


def judge(args):
    client = api_client(args)
    gt, files = captions(args.gt), {"a": args.pred, **({"b": args.pred_b} if args.pred_b else {})}
    read = {name: captions(path) for name, path in files.items()}
    pairs = {name: paired({k: v for k, (v, _) in gt.items()}, {k: v for k, (v, _) in pred.items()})
             for name, pred in read.items()}   # by file here, else by name (plumbing/sources.py)
    preds = {name: {k: read[name][p] for k, p in pairs[name].items()} for name in read}
    videos = sorted(set(gt).intersection(*preds.values()),
                    key=lambda k: (k[0], -1 if k[1] is None else k[1]))
    # in no --gt
    alone = set().union(*(set(read[name]) - set(pairs[name].values()) for name in read))
    dropped = len(set(gt) - set(videos)) + len(alone)
    if not videos:
        raise ValueError(f"no video is in both --gt and --pred ({len(gt)} and "
                         f"{' / '.join(str(len(p)) for p in preds.values())} rows): are the paths "
                         f"the same videos?")
    os.makedirs(args.out, exist_ok=True)
    wanted = {(name, v): cache_key(gt[v][1], pred[v][1], args.model) for name,
              pred in preds.items() for v in videos}
    jobs = {}   # two systems with the same caption share one judgment
    for (name, v), key in wanted.items():
        jobs.setdefault(key, (key, gt[v][0], gt[v][1], preds[name][v][1]))
    cache = cached_run(client, args, "judgments.jsonl", jobs,
                       functools.partial(judge_one, client, args),
                       functools.partial(judgment_row, args), "judged")
    judged = {name: {v: cache.get(wanted[(name, v)],
                                  {"error": "not judged"}) for v in videos} for name in preds}
    by_events = judge_events(client, args, gt, preds, videos) if args.events else None
    write_report(args, files, judged, len(videos), dropped, gt, by_events)
    failed = sum("error" in j for by_video in judged.values() for j in by_video.values())
    if failed and failed == sum(len(by_video) for by_video in judged.values()):
        raise Stop(f"every judgment failed ({failed}, see report.md); run again to ask again")


def cached_run(client, args, name, jobs, work, identify, verb):
    """{key: row} for every job ({key: job}): the rows of the report folder's cache file `name`,
    and the answers to the jobs it lacks, asked now (work(job), identify(job) the fields of its
    error row) and appended. Failed requests are not cached (resume drops them), so a rerun asks
    them again."""
    with Appender(os.path.join(args.out, name), fsync=True) as out:
        done = out.resume(lambda r: r.get("key") if isinstance(r.get("key"), str) else None,
                          lambda r: "error" not in r)
        cache = {r["key"]: r for r in iter_rows(out.path) if r.get("key") in done}
        todo, count = [job for key, job in jobs.items() if key not in cache], itertools.count(1)

        def seen(row):
            cache[row["key"]] = row
            print(f"\r{next(count)}/{len(todo)} {verb}", end="", file=sys.stderr)
        run_items(client, todo, work, args.concurrency, out, args.max_failures_in_a_row, identify,
                  seen=seen)
    return cache


def judge_events(client, args, gt, preds, videos):
    """{system: {video: event scores, or why there are none}}: the events of every caption listed,
    then each side's events judged against the other caption (events.py)."""
    work = functools.partial(events.ask, client, args)
    identify = functools.partial(events.row, args)
    texts = {gt[v][1] for v in videos} | {pred[v][1] for pred in preds.values() for v in videos}
    listed = {t: events.extract_job(t, args) for t in texts}
    cache = cached_run(client, args, "events.jsonl", {j["key"]: j for j in listed.values()}, work,
                       identify, "listed")
    pairs = {}
    for name, pred in preds.items():
        for v in videos:
            g, c = cache.get(listed[gt[v][1]]["key"], {}), cache.get(listed[pred[v][1]]["key"], {})
            if "value" in g and "value" in c:
                # precision: candidate events
                pairs[(name, v)] = (events.entail_job(c["value"], gt[v][1], args),
                                    # recall: reference events
                                    events.entail_job(g["value"], pred[v][1], args))
    cache.update(cached_run(client, args, "events.jsonl",
                            {j["key"]: j for p in pairs.values() for j in p}, work, identify,
                            "events judged"))
    out = {}
    for name, pred in preds.items():
        out[name] = {}
        for v in videos:
            rows = [cache.get(listed[gt[v][1]]["key"], {}),
                    cache.get(listed[pred[v][1]]["key"], {})]
            rows += [cache.get(j["key"], {}) for j in pairs.get((name, v), ())]
            if len(rows) == 4 and all("value" in r for r in rows):
                out[name][v] = events.scores(rows[2]["value"], rows[3]["value"])
            else:
                unparsed = any(r.get("unparsed") for r in rows)
                out[name][v] = {"unparsed": True} if unparsed else {"error": "not judged"}
    return out


def write_report(args, files, judged, n_videos, dropped, gt, by_events=None):
    """summary.json, per_video.jsonl and report.md, each written whole and then put in place."""
    summary = {"judge_model": args.model, "prompt_version": PROMPT_VERSION, "files": files,
               "videos": n_videos, "dropped": dropped,
               **{name: summarize(list(j.values()), args.bootstrap) for name, j in judged.items()}}
    if "b" in judged:
        summary["b_minus_a"] = compare(judged["a"], judged["b"], args.bootstrap)
    if by_events:
        summary["events"] = {"versions": f"{events.EXTRACT_VERSION}, {events.ENTAIL_VERSION}",
                             "max_events": args.max_events,
                             "systems": {n: events.summarize(s, interval, args.bootstrap) for n,
                                         s in by_events.items()}}
        if "b" in by_events:
            summary["events"]["b_minus_a"] = events.compare(by_events["a"], by_events["b"],
                                                            interval, args.bootstrap)

    def row(v):
        return {"video": gt[v][0], "name": v[0], **({"shot": v[1]} if v[1] is not None else {}),
                **{name: judged[name][v] for name in judged},
                **({"events": {n: s[v] for n, s in by_events.items()}} if by_events else {})}
    per_video = "".join(json.dumps(row(v)) + "\n" for v in sorted(judged["a"]))
    for name, text in (("summary.json", json.dumps(summary, indent=2)),
                       ("per_video.jsonl", per_video), ("report.md", report_md(summary))):
        replace_atomic(os.path.join(args.out, name), lambda f, text=text: f.write(text.encode()))
    print("\n" + report_md(summary), file=sys.stderr)


if __name__ == "__main__":
    main()
