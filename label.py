"""Pseudo-label videos with a teacher model (Qwen-VL-Max) over plain HTTP, at million-video scale.

    DASHSCOPE_API_KEY=... python label.py videos/ --out labels.jsonl [--concurrency 16 --rpm 600]
    python label.py clean labels.jsonl --out clean.jsonl
    DASHSCOPE_API_KEY=... python label.py verify labels.jsonl --out verified.jsonl
    DASHSCOPE_API_KEY=... python label.py recheck labels.jsonl --student captions.jsonl
    K=... python label.py audit labels.jsonl --sample 500 --api-base URL --model M --api-key-env K

`verify` shows the teacher a label's own frames again, its sentences numbered, and keeps those the
frames support. `recheck` asks the teacher again, from --frames 16, for the --share (0.3) of labels
a student agrees with least (labelling/checks.py). `audit` asks a second source about a sample of
the labels and reports where the teacher differs from it, consistently.

Four frames per video (segment middles, as the report) become JPEGs in decoding processes while the
HTTP requests run on threads. One row per video, appended and fsynced as it finishes: {"video",
"name", "caption", "model", "usage", "finish_reason"} or {"video", "name", "error", "status",
"code"} ("video": its path here; "name": what every node calls it, which shards and resume go by:
plumbing/sources.py). A video is done when it has a caption or a final answer (content moderation,
an unreadable file); a rerun skips what is done and tries the rest again, so a kill loses at most
the requests in flight. A refused key, an empty account or a server that stays unreachable stops the
run early (runner.Breaker). The rows are train.py data as they are.
"""

import functools
import os
import sys

import shots
from data import VideoError
from labelling import checks
from labelling.clean import clean_file, strip_boilerplate, unusable
from labelling.run import DONE_CODES, Run, identify, key_of
from plumbing import cli
from plumbing.cli import Stop
from plumbing.client import APIError, add_api_flags, failure_kind, frames_message
from plumbing.jsonl import Busy, iter_rows
from plumbing.outputs import file_hash
from plumbing.redact import Redactor
from plumbing.sources import find_videos, in_shard, names_of
from plumbing.workers import PoolError, failure

DASHSCOPE = "https://dashscope.aliyuncs.com/compatible-mode/v1"
PROMPT = ("These are {n} frames sampled evenly from one video, in order. Describe the video in "
          "one detailed paragraph: the setting, the characters and objects and how they look, what "
          "they do and how that changes from frame to frame, the camera's movement, and the mood. "
          "Describe only what is visible; do not guess names, sounds or anything outside the "
          "frames, and do not mention frames or images.")

# The flags that make a row what it is: with the prompt (and the labels checked) they give every
# row its "settings" id (plumbing/outputs.settings_id), and a rerun whose id differs refuses --out
# (or --overwrite starts it again). A new flag that changes labels belongs here.
LABEL_SETTINGS = ("frames", "frames_as", "max_side", "jpeg_q", "max_new_tokens", "temperature",
                  "shots", "window", "min_shot", "max_shot")
SETTINGS = {"label": LABEL_SETTINGS, "verify": LABEL_SETTINGS,
            "recheck": LABEL_SETTINGS + ("share",), "audit": LABEL_SETTINGS + ("sample", "saying")}


def parse_args(argv=None, mode="label"):
    p = cli.Parser(description="Label videos with an OpenAI-compatible vision model (`label.py "
                               "clean FILE --out FILE` cleans the labels; `label.py verify FILE` "
                               "checks them against their frames; `label.py recheck FILE --student "
                               "CAPTIONS` asks again where a student disagrees).")
    add = p.add_argument
    add("source", help="a folder (searched recursively), a video file, or a list (.txt / .jsonl)")
    add("--out", help="the JSONL file the rows are appended to (default: labels.jsonl; verify: "
                      "the input's name with .verified.jsonl)")
    add_api_flags(p, DASHSCOPE, "qwen-vl-max", "DASHSCOPE_API_KEY", concurrency=16)
    # what the teacher is asked, and shown
    add("--prompt", default=PROMPT, help="the instruction ({n}: the frame count)")
    add("--prompt-file", help="read the prompt from this file")
    add("--frames", type=cli.positive_int, default=16 if mode == "recheck" else 4,
        help="frames sent per video (or shot), at the middles of equal segments (recheck: 16)")
    add("--frames-as", choices=["video", "images"], default="video",
        help="one Qwen 'video' part, or one image_url part per frame")
    add("--max-side", type=cli.positive_int, default=768, help="longest side of each JPEG, pixels")
    add("--jpeg-q", type=int, choices=range(2, 32), default=4, metavar="2..31",
        help="JPEG quantizer: 2 best .. 31 worst")
    add("--max-new-tokens", type=cli.positive_int, default=1024,
        help="the answer's length, at most")
    add("--temperature", type=cli.non_negative,
        help="the API's sampling temperature (default: the API's own)")
    # decoding the videos
    add("--workers", "--decode-workers", type=cli.positive_int, default=4,
        help="video decoding processes")
    add("--decode-timeout", type=cli.positive, default=300.0,
        help="seconds allowed to decode one video")
    add("--decode-memory", type=cli.positive, default=8.0, help="GiB a decoding process may use")
    shots.add_flags(p)
    add("--shard", type=cli.shard, default="0/1",
        help="K/N: only the videos of shard K of N, by their names (the same on every node)")
    # the modes that read labels
    add("--video-root", help="verify, recheck: the folder the labels' video names are inside on "
                             "this machine (default: their paths as the labels write them)")
    add("--student",
        help="recheck: the student's captions (caption.py rows) of the labelled videos")
    add("--sample", type=cli.positive, default=500,
        help="audit: the labels asked of the second source: a share (1 or less; 1: all) or a count")
    add("--saying", help="audit: only among the labels that say this (a confusion to fix)")
    add("--share", type=cli.fraction, default=0.3,
        help="recheck: the share of labels asked again, those the student agrees with least")
    # the run
    add("--overwrite", action="store_true",
        help="label everything again (also what --out holds from a run with other settings)")
    add("--retry-errors", action="store_true",
        help="try again the videos with a final error row too (moderation, unreadable)")
    add("--price-in", type=cli.non_negative, default=0.0, help="$ per million prompt tokens")
    add("--price-out", type=cli.non_negative, default=0.0,
        help="$ per million completion tokens")
    args = p.parse_args(argv)
    if mode != "label":
        ending = {"verify": ".verified", "recheck": ".rechecked", "audit": ".audit"}[mode]
        args.out = args.out or os.path.splitext(args.source)[0] + ending + ".jsonl"
        if os.path.exists(args.out) and os.path.exists(args.source) and \
                os.path.samefile(args.out, args.source):
            p.error(f"--out {args.out} is the labels being checked: write the checked labels to "
                    f"another file")
    if mode == "recheck" and not args.student:
        p.error("recheck needs --student CAPTIONS (caption.py's captions of the same videos by a "
                "model trained on these labels)")
    args.out, args.mode = args.out or "labels.jsonl", mode
    return args


def label_one(client, args, prompt, tries, settings, job):
    """((video, shot, _), data URLs or VideoError) -> its row (with the shot's fields, --shots)."""
    (video, shot, _), urls = job
    row = _label_one(client, args, prompt, video, urls, tries.get(key_of(job), 0))
    return {**identify(job), **row, **({"settings": settings} if "caption" in row else {})}


def _label_one(client, args, prompt, video, urls, tries_before=0):
    if isinstance(urls, VideoError):
        if not os.path.lexists(video):
            return {"error": str(urls), "status": None, "code": "missing_video"}
        return {"status": None, **failure(urls, tries_before)}
    params = {"max_tokens": args.max_new_tokens}
    if args.temperature is not None:
        params["temperature"] = args.temperature
    for _ in range(3):   # an empty answer is asked for again, twice
        reply = client.chat(frames_message(urls, prompt, args.frames_as), **params)
        if reply.content.strip() or reply.finish_reason == "content_filter":
            break
    if reply.finish_reason == "content_filter":   # moderated on the way out: a final answer
        return {"error": "the reply was filtered", "status": 200, "code": "content_filter"}
    if not reply.content.strip():
        return {"error": "the reply was empty, three times", "status": 200, "code": "empty_reply"}
    return {"caption": reply.content.strip(), "model": reply.model or args.model,
            "frames": args.frames, "usage": reply.usage, "finish_reason": reply.finish_reason}


def verify_one(client, args, labels, tries, settings, job):
    """((video, shot, _), data URLs) -> its label with the sentences its frames do not support
    taken out; "usage" is the check's own (the label's stays in "label_usage")."""
    (video, shot, _), urls = job
    if isinstance(urls, VideoError):
        return {**identify(job), **_label_one(client, args, "", video, urls,
                                              tries.get(key_of(job), 0))}
    label = labels[key_of(job)]
    said = checks.sentences(label["caption"])
    listed = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(said))
    prompt = checks.VERIFY.format(frames=len(urls), n=len(said), sentences=listed)
    for _ in range(3):   # an answer that does not parse is asked again, twice
        reply = client.chat(frames_message(urls, prompt, args.frames_as),
                            response_format={"type": "json_object"}, max_tokens=args.max_new_tokens)
        marks = checks.parse_marks(reply.content, len(said))
        if marks is not None:
            break
    else:
        return {**identify(job), "error": f"unparsed: {client.scrub(reply.content, 200)}",
                "status": 200, "code": "unparsed"}
    kept = [s for s, ok in zip(said, marks) if ok]
    return {**label, **identify(job), "caption": " ".join(kept),
            "caption_original": label["caption"], "sentences": len(said), "supported": len(kept),
            "verifier": reply.model or args.model, "usage": reply.usage,
            "finish_reason": reply.finish_reason, "label_usage": label.get("usage"),
            "settings": settings}


def recheck_one(client, args, prompt, labels, chosen, tries, settings, job):
    """((video, shot, _), data URLs of more frames) -> a new label from them, cleaned as `label.py
    clean` cleans one (boilerplate stripped), the old kept beside. A final "no" (a refusal, a video
    unreadable from more frames) or a new label the cleaning would drop (refused in words, cut, a
    loop) keeps the old label as it was, saying why: a good label is not lost to a worse one."""
    try:
        row = label_one(client, args, prompt, tries, settings, job)
    except APIError as e:   # refused outright (moderation): as final as a refusal in the reply
        if failure_kind(e.status, e.code) != "final":
            raise
        row = {"code": e.code}
    old = labels[key_of(job)]
    if "caption" in row and unusable(row):   # as `clean` would: a refusal keeps the first label
        row = {"code": unusable(row)}
    if "caption" in row:
        return {**row, "caption": strip_boilerplate(row["caption"]),
                "caption_first": old["caption"], "frames_first": old.get("frames"),
                "rechecked": True, "agreement": round(chosen[key_of(job)], 3)}
    if row.get("code") in DONE_CODES:
        return {**old, **identify(job), "settings": settings, "rechecked": False,
                "recheck_refused": row["code"]}
    return row


def label_videos(args):
    """The videos of args.source, each labelled from --frames frames (or each of its shots,
    --shots)."""
    prompt, run = teacher_prompt(args), Run(args, "label", SETTINGS["label"])
    found = find_videos(args.source)
    videos = [v for v in found if in_shard(v.name, args.shard)]
    what = {"prompt": prompt, "mode": "label"}   # names_of: the rows of a run from before names
    with run.outputs(what, names_of(found), {v.name: str(v) for v in videos}) as (out, done):
        if shots.finder(args):   # shots found in the decode workers, then each shot labelled alone
            todo = [v for v in videos if not shots.whole(v, done, out.shot_counts)]
            asked = shots.jobs(shots.counted(run.decode(shots.finder(args), todo), run.stats), done)
        else:
            todo = [v for v in videos if (v.name, None) not in done]
            asked = [(v, None, None) for v in todo]
        work = functools.partial(label_one, run.client, args, prompt, run.tries, run.settings)
        run.ask(out, asked, work, len(todo), already=len(videos) - len(todo))


def verify_labels(args):
    """The labels of args.source, each shown to the teacher with its own frames: the sentences the
    frames do not support are taken out."""
    run = Run(args, "verify", SETTINGS["verify"])
    labels, mine, what, names, here = _of_labels(args, "verify", checks.VERIFY)
    with run.outputs(what, names, here) as (out, done):
        todo = jobs_of(r for k, r in mine.items() if k not in done)
        rows = {k: checks.label_row(r) for k, r in labels.items()}
        work = functools.partial(verify_one, run.client, args, rows, run.tries, run.settings)
        run.ask(out, todo, work, len(todo), already=len(mine) - len(todo))


def recheck_labels(args):
    """The --share of labels the student agrees with least, each labelled again from more frames
    (labelling/checks.py); the others copied as they are, with no request."""
    prompt, run = teacher_prompt(args), Run(args, "recheck", SETTINGS["recheck"])
    labels, mine, what, names, here = _of_labels(args, "recheck", prompt)
    chosen = checks.to_recheck(labels, checks.student_captions(args.student, labels), args.share)
    chosen = {k: a for k, a in chosen.items() if k in mine}   # chosen among all: shards agree
    with run.outputs(what, names, here) as (out, done):
        copied = 0
        for k, r in mine.items():
            if k not in chosen and k not in done:
                out.write({**checks.label_row(r), "settings": run.settings, "rechecked": False})
                copied += 1
        todo = jobs_of(r for k, r in mine.items() if k not in done and k in chosen)
        rows = {k: checks.label_row(r) for k, r in labels.items()}
        work = functools.partial(recheck_one, run.client, args, prompt, rows, chosen, run.tries,
                                 run.settings)
        said = f"copied {copied} labels as they were; asked again {len(chosen)} of {len(mine)} " \
               f"labels from {args.frames} frames ({{refused}} refused, their first label " \
               f"kept): {1 + len(chosen) / max(len(mine), 1):.2f} teacher calls a label in all"
        run.ask(out, todo, work, len(todo), already=len(mine) - len(todo) - copied, said=said)


def audit_labels(args):
    """A sample of the labels (--sample; --saying: among those that say it) labelled again by a
    second source (--api-base / --model) from the same frames, and the report (checks.audit_report),
    on stderr and beside --out (.report.txt): read it before paying for training; `label.py clean
    --fix` fixes what it confirms."""
    prompt, run = teacher_prompt(args), Run(args, "audit", SETTINGS["audit"])
    labels, mine, what, names, here = _of_labels(args, "audit", prompt)
    if any(checks.same_teacher(r.get("model"), args.model) for r in labels.values()):
        raise ValueError(f"--model {args.model} made these labels: an audit asks a second source "
                         f"(another --model, and its --api-base and --api-key-env)")
    sample = checks.audit_sample(labels, args.sample, args.saying)
    mine = {k: mine[k] for k in sample if k in mine}   # chosen among all labels: shards agree
    made = {r.get("frames") for r in labels.values()} - {args.frames, None}   # said, not refused
    note = f" (from {args.frames} frames, the labels from {made.pop()}: the frames differ too)" \
        if made else ""
    print(f"audit: {len(mine)} of {len(labels)} labels asked of {args.model}{note}",
          file=sys.stderr)
    with run.outputs(what, names, here) as (out, done):
        todo = jobs_of(r for k, r in mine.items() if k not in done)

        def work(job):   # a refusal, a cut or looping reading is no reading: counted in the report
            row = label_one(run.client, args, prompt, run.tries, run.settings, job)
            if why := "caption" in row and unusable(row):
                row = {**identify(job), "error": f"the second source's reading: {why}",
                       "status": 200, "code": why, "settings": run.settings}
            return {**row, "teacher": labels[key_of(job)]["caption"]} if "settings" in row else row
        run.ask(out, todo, work, len(todo), already=len(mine) - len(todo))
    report = checks.audit_report(iter_rows(args.out), args.model)
    with open(os.path.splitext(args.out)[0] + ".report.txt", "w", encoding="utf-8") as f:
        f.write(report + "\n")
    print(report, file=sys.stderr)


def teacher_prompt(args):
    prompt = args.prompt
    if args.prompt_file:
        prompt = open(args.prompt_file, encoding="utf-8").read().strip()
    return prompt.replace("{n}", str(args.frames))


def jobs_of(labels):
    """A job for each label's video (or shot): its frames are decoded, then asked about."""
    return [(r["_video"], shots.shot_of(r), None) for r in labels]


def _of_labels(args, mode, prompt):
    """The labels (all, this shard's), the settings (what is checked, against whom), the names by
    paths."""
    labels = checks.labelled_videos(args)
    if not labels:
        raise ValueError(f"{args.source}: no labelled rows in it (rows with a video and a caption)")
    mine = {k: r for k, r in labels.items() if in_shard(k[0], args.shard)}
    what = {"prompt": prompt, "mode": mode, "labels": file_hash(args.source),
            "student": file_hash(args.student) if args.student else None}
    names = {str(r["_video"]): k[0] for k, r in labels.items()}
    return labels, mine, what, names, {k[0]: str(r["_video"]) for k, r in labels.items()}


# each mode over one Run; videos sharded and resumed by name, whatever the mount
# (plumbing/sources.py)
MODES = {"label": label_videos, "verify": verify_labels, "recheck": recheck_labels,
         "audit": audit_labels}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "clean":
        return cli.run(lambda: clean_file(argv[1:]), (OSError, ValueError, Busy))
    mode = argv[0] if argv and argv[0] in ("verify", "recheck", "audit") else "label"
    args = parse_args(argv[1:] if mode != "label" else argv, mode)
    scrub = Redactor(os.environ.get(args.api_key_env, "").strip())
    return cli.run(lambda: MODES[mode](args), (OSError, ValueError, Busy, Stop, PoolError), scrub)


if __name__ == "__main__":
    main()
