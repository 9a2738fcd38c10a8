"""Pseudo-label videos with a teacher model (Qwen-VL-Max) over plain HTTP, at million-video scale.

    DASHSCOPE_API_KEY=... python label.py videos/ --out labels.jsonl [--concurrency 16 --rpm 600 --shard 0/8]
    python label.py clean labels.jsonl --out clean.jsonl

Four frames per video (segment middles, as the seed) become JPEGs in decoding processes while the HTTP
requests run on threads. One row per video, appended and fsynced as it finishes:
{"video", "caption", "model", "usage", "finish_reason"} or {"video", "error", "status", "code"}. A video is
done when it has a caption or a final answer (content moderation, an unreadable file); a rerun skips what
is done and tries the rest again, so a kill loses at most the requests in flight. A refused key, an empty
account or a server that stays unreachable stops the run early (client.Breaker). The rows are train.py
data as they are.
"""

import collections
import functools
import os
import sys
import time
import zlib

import cli
from client import FINAL_CODES, APIError, Stop, add_api_flags, api_client, run_items
from clean import clean_file
from data import VideoError, canonical, find_videos, jpeg_data_urls, video_base
from jsonl import Appender, Busy
from redact import Redactor
from workers import imap_unordered

DASHSCOPE = "https://dashscope.aliyuncs.com/compatible-mode/v1"
PROMPT = ("These are {n} frames sampled evenly from one video, in order. Describe the video in one detailed "
          "paragraph: the setting, the characters and objects and how they look, what they do and how that "
          "changes from frame to frame, the camera's movement, and the mood. Describe only what is visible; "
          "do not guess names, sounds or anything outside the frames, and do not mention frames or images.")


def parse_args(argv=None):
    p = cli.Parser(description="Label videos with an OpenAI-compatible vision model "
                                            "(`label.py clean FILE --out FILE` cleans the labels).")
    p.add_argument("source", help="a folder (searched recursively), a video file, or a list (.txt / .jsonl)")
    p.add_argument("--out", default="labels.jsonl")
    add_api_flags(p, DASHSCOPE, "qwen-vl-max", "DASHSCOPE_API_KEY", concurrency=16)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--frames", type=cli.positive_int, default=4)
    p.add_argument("--frames-as", choices=["video", "images"], default="video",
                   help="one Qwen 'video' part, or one image_url part per frame")
    p.add_argument("--max-side", type=cli.positive_int, default=768, help="longest side of each JPEG, pixels")
    p.add_argument("--jpeg-q", type=int, choices=range(2, 32), default=4, metavar="2..31",
                   help="JPEG quantizer: 2 best .. 31 worst")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=1024, help="the answer's length, at most")
    p.add_argument("--temperature", type=cli.non_negative)
    p.add_argument("--workers", "--decode-workers", type=cli.positive_int, default=4, help="video decoding processes")
    p.add_argument("--decode-timeout", type=cli.positive, default=300.0, help="seconds allowed to decode one video")
    p.add_argument("--decode-memory", type=cli.positive, default=8.0, help="GiB a decoding process may use")
    p.add_argument("--shard", default="0/1", help="K/N: label only the videos of shard K of N")
    p.add_argument("--retry-errors", "--retry-failed", action="store_true",
                   help="try again the videos with a final error row too (moderation, unreadable)")
    p.add_argument("--price-in", type=cli.non_negative, default=0.0, help="$ per million prompt tokens")
    p.add_argument("--price-out", type=cli.non_negative, default=0.0, help="$ per million completion tokens")
    args = p.parse_args(argv)
    try:
        args.shard = tuple(int(x) for x in args.shard.split("/"))
        assert len(args.shard) == 2 and 0 <= args.shard[0] < args.shard[1]
    except (ValueError, AssertionError):
        p.error(f"--shard {args.shard}: expected K/N with 0 <= K < N")
    return args


def request(urls, prompt, frames_as):
    if frames_as == "video":   # Qwen's own part type; it needs at least 4 frames
        parts = [{"type": "video", "video": urls}]
    else:
        parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": prompt}]}]


def label_one(client, args, prompt, job):
    """(video, data URLs or VideoError) -> its row; None when the run stopped before it was asked."""
    video, urls = job
    if isinstance(urls, VideoError):
        code = "unreadable_video" if os.path.exists(video) else "missing_video"
        return {"video": video, "error": str(urls), "status": None, "code": code}
    params = {"max_tokens": args.max_new_tokens}
    if args.temperature is not None:
        params["temperature"] = args.temperature
    try:
        for _ in range(3):   # an empty answer is asked for again, twice
            reply = client.chat(request(urls, prompt, args.frames_as), **params)
            if reply.content.strip() or reply.finish_reason == "content_filter":
                break
    except APIError as e:
        return None if e.code == "stopped" else {"video": video, "error": str(e), "status": e.status, "code": e.code}
    except Exception as e:   # a fault nobody foresaw: this video's row (tried again next run), not the run's end
        return {"video": video, "error": f"{type(e).__name__}: {e}", "status": None, "code": "internal_error"}
    if reply.finish_reason == "content_filter":   # moderated on the way out: a final answer
        return {"video": video, "error": "the reply was filtered", "status": 200, "code": "content_filter"}
    if not reply.content.strip():
        return {"video": video, "error": "the reply was empty, three times", "status": 200, "code": "empty_reply"}
    return {"video": video, "caption": reply.content.strip(), "model": reply.model or args.model,
            "usage": reply.usage, "finish_reason": reply.finish_reason}


FILE_CODES = {"unreadable_video", "missing_video"}   # the file's trouble, which says nothing of the API


def in_shard(name, shard):
    """By the video's name inside its source (video_base), so that every machine agrees whatever its list
    order, and whatever it mounts the folder as."""
    k, n = shard
    return zlib.crc32(os.fsencode(name)) % n == k


def is_done(row, retry_errors=False):
    """A caption, or (unless retry_errors) a final answer: content moderation, an unreadable video (not a
    missing one: a wrong path is fixed, and the video labelled, by a rerun)."""
    return "caption" in row or (not retry_errors and row.get("code") in FINAL_CODES | {"unreadable_video"})


def video_key(row):
    return canonical(row["video"]) if isinstance(row.get("video"), str) else None


def label(args):
    prompt = open(args.prompt_file, encoding="utf-8").read().strip() if args.prompt_file else args.prompt
    prompt = prompt.replace("{n}", str(args.frames))
    client = api_client(args)
    base = video_base(args.source)
    videos = [v for v in find_videos(args.source) if in_shard(os.path.relpath(v, base), args.shard)]
    with Appender(args.out, fsync=True) as out:
        done = out.settle(video_key, functools.partial(is_done, retry_errors=args.retry_errors))
        todo = [v for v in videos if canonical(v) not in done]
        decode = functools.partial(jpeg_data_urls, n=args.frames, max_side=args.max_side, q=args.jpeg_q)
        jobs = imap_unordered(decode, todo, workers=args.workers, timeout=args.decode_timeout,
                              buffer=2 * args.concurrency, memory_gb=args.decode_memory)
        stats, failed, start = collections.Counter(), collections.Counter(), time.monotonic()

        def seen(row):
            if "error" in row:
                failed[f"{row['status'] or '-'} {row['code']}"] += 1
            else:
                stats["done"] += 1
                stats["in"] += row["usage"]["prompt_tokens"]
                stats["out"] += row["usage"]["completion_tokens"]
                stats["length"] += row["finish_reason"] == "length"
            progress(stats["done"] + sum(failed.values()), len(todo), sum(failed.values()), start)
        try:
            run_items(client, jobs, functools.partial(label_one, client, args, prompt), args.concurrency, out,
                      args.max_failures_in_a_row, neutral=FILE_CODES, seen=seen)
        finally:
            summary(args, stats, failed, len(videos) - len(todo), start)


def progress(finished, total, failed, start):
    rate = finished / max(time.monotonic() - start, 1e-9)
    eta = (total - finished) / rate if rate > 0 else float("inf")
    print(f"\r{finished}/{total} videos, {failed} failed, {rate:.2f} videos/s, ETA {eta / 60:.1f} min ",
          end="", file=sys.stderr, flush=True)


def summary(args, stats, failed, already, start):
    elapsed = time.monotonic() - start
    n_failed = sum(failed.values())
    cost = (stats["in"] * args.price_in + stats["out"] * args.price_out) / 1e6
    print(f"\nlabelled {stats['done']} ({stats['length']} cut at --max-new-tokens), failed {n_failed}"
          f"{' (' + ', '.join(f'{c} x {r}' for r, c in failed.most_common()) + ')' if failed else ''}, "
          f"{already} already done; tokens in {stats['in']}, out {stats['out']}, estimated cost ${cost:.2f}; "
          f"{elapsed:.1f} s, {(stats['done'] + n_failed) / max(elapsed, 1e-9):.2f} videos/s", file=sys.stderr)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "clean":
        return cli.run(lambda: clean_file(argv[1:]), (OSError, ValueError, Busy))
    args = parse_args(argv)
    scrub = Redactor(os.environ.get(args.api_key_env, "").strip())
    return cli.run(lambda: label(args), (OSError, ValueError, Busy, Stop), scrub)


if __name__ == "__main__":
    main()
