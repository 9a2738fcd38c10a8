"""Faithfulness as events, for judge.py --events: precision (how much of what a caption says the
reference supports) and recall (how much of the reference the caption covers), DREAM-1K's AutoDQ
over the judge's own client.

The judge lists the events of each caption (at most --max-events; cached per caption and judge
model, so a caption judged against two systems is listed once); then it marks every event of the
candidate entailed, neutral or contradicted by the reference, and every event of the reference by
the candidate. precision = entailed candidate events / candidate events, recall = entailed
reference events / reference events, F1 their harmonic mean. Contradicted candidate events are
counted apart: saying the opposite of what happened is worse than leaving something out. An answer
that does not parse is asked again, then recorded as unparsed: that video gets no event scores (it
is counted apart, never scored 0).
"""

import hashlib
import json

import numpy as np

EXTRACT_VERSION, ENTAIL_VERSION = "events-v1", "entail-v1"
EXTRACT = ("Video description:\n"
           "{caption}\n"
           "\n"
           "List the events of this description: each one short sentence saying who or what does "
           "what, in the order they\n"
           'happen, at most {n}. Answer with a JSON object {{"events": ["...", "..."]}}.')
ENTAIL = ("Video description:\n"
          "{caption}\n"
          "\n"
          "Events:\n"
          "{events}\n"
          "\n"
          "For each event, answer whether the description above entails it (says it happened), "
          "contradicts it (says\n"
          "something that cannot be true together with it), or neither (neutral). Answer with a "
          "JSON object\n"
          '{{"verdicts": ["entailed" | "neutral" | "contradicted", ...]}}, one verdict per event, '
          "in order.")
LABELS = ("entailed", "neutral", "contradicted")


def _json(text):
    try:
        value = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def parse_events(text, n):
    events = (_json(text) or {}).get("events")
    if (
        not isinstance(events, list)
        or not events
        or not all(isinstance(e, str) and e.strip() for e in events)
    ):
        return None
    return distinct([e.strip()[:300] for e in events])[:n]


def distinct(events):
    """Each event once (case, spacing and a closing full stop aside): an event listed ten times is
    one event, not ten that the reference entails."""
    seen = {}
    for event in events:
        seen.setdefault(" ".join(event.casefold().split()).rstrip("."), event)
    return list(seen.values())


def parse_verdicts(text, n):
    verdicts = (_json(text) or {}).get("verdicts")
    if (not isinstance(verdicts,
                       list) or len(verdicts) != n or not all(v in LABELS for v in verdicts)):
        return None
    return verdicts


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def row(args, job):
    """The fields that say which request a row answers (runner.guarded)."""
    return {"key": job["key"], "kind": job["kind"], "model": args.model}


def ask(client, args, job):
    """The judge's parsed JSON answer to a job's prompt, asked again while it does not parse: its
    row with the answer as "value", or marked unparsed."""
    messages = [{"role": "user", "content": job["prompt"]}]
    for _ in range(args.parse_retries + 1):
        reply = client.chat(messages, response_format={"type": "json_object"}, temperature=0)
        value = job["parse"](reply.content)
        if value is not None:
            return {**row(args, job), "value": value}
    return {**row(args, job), "unparsed": True, "raw": client.scrub(reply.content, 500)}


def extract_job(caption, args):
    return {"key": key("extract", caption, EXTRACT_VERSION, args.model, args.max_events),
            "kind": "events", "prompt": EXTRACT.format(caption=caption, n=args.max_events),
            "parse": lambda text: parse_events(text, args.max_events)}


def entail_job(events, caption, args):
    events = distinct(events)   # also those of a cache written before events were made distinct
    listed = "\n".join(f"{i + 1}. {e}" for i, e in enumerate(events))
    return {"key": key("entail", events, caption, ENTAIL_VERSION, args.model), "kind": "verdicts",
            "prompt": ENTAIL.format(caption=caption, events=listed),
            "parse": lambda text: parse_verdicts(text, len(events))}


def scores(pred_verdicts, gt_verdicts):
    """Per video: precision (candidate events the reference entails), recall (reference events the
    candidate entails), F1, and the share of candidate events the reference contradicts."""
    p = sum(v == "entailed" for v in pred_verdicts) / len(pred_verdicts)
    r = sum(v == "entailed" for v in gt_verdicts) / len(gt_verdicts)
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "contradicted": sum(v == "contradicted" for v in pred_verdicts) / len(pred_verdicts)}


def summarize(per_video, interval, resamples):
    """Means of precision / recall / F1 / contradicted (in %) with their bootstrap intervals;
    unparsed and failed videos counted apart."""
    ok = [s for s in per_video.values() if "f1" in s]
    out = {"n": len(ok), "unparsed": sum(1 for s in per_video.values() if s.get("unparsed")),
           "failed": sum(1 for s in per_video.values() if "error" in s)}
    for name in ("precision", "recall", "f1", "contradicted"):
        values = [100 * s[name] for s in ok]
        out[name] = float(np.mean(values)) if ok else None
        out[name + "_ci"] = interval(values, lambda v: np.mean(v, axis=-1), resamples)
    return out


def compare(a, b, interval, resamples):
    """B minus A (points) over the videos both have event scores for."""
    both = [v for v in a if v in b and "f1" in a[v] and "f1" in b[v]]
    out = {"n": len(both)}
    for name in ("precision", "recall", "f1", "contradicted"):
        d = [100 * (b[v][name] - a[v][name]) for v in both]
        out[name + "_diff"] = float(np.mean(d)) if both else None
        out[name + "_diff_ci"] = interval(d, lambda x: np.mean(x, axis=-1), resamples)
    return out


def table(summary, files):
    """Markdown lines of the event table of judge.py's report; `files`: {system: the file it came
    from}."""
    def fmt(s, name):
        return (
            "-"
            if s[name] is None
            else f"{s[name]:.1f} [{s[name + '_ci'][0]:.1f}, {s[name + '_ci'][1]:.1f}]"
        )

    lines = [
        "",
        f"Events ({summary['versions']}, at most {summary['max_events']} a caption; % with 95% "
        f"CI):",
        "",
        "| system | n | precision | recall | F1 | contradicted | unparsed | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary["systems"].items():
        lines.append(
            f"| {name}: {files[name]} | {s['n']} | {fmt(s, 'precision')} | {fmt(s, 'recall')} | "
            f"{fmt(s, 'f1')} | {fmt(s, 'contradicted')} | {s['unparsed']} | {s['failed']} |"
        )
    if "b_minus_a" in summary:
        c = summary["b_minus_a"]
        lines.append(
            f"\nB minus A over {c['n']} videos: F1 {c['f1_diff']:+.1f} points "
            f"[{c['f1_diff_ci'][0]:.1f}, {c['f1_diff_ci'][1]:.1f}], precision "
            f"{c['precision_diff']:+.1f}, recall {c['recall_diff']:+.1f}, contradicted "
            f"{c['contradicted_diff']:+.1f}."
            if c["n"]
            else "\nB minus A: no video to compare."
        )
    return lines
