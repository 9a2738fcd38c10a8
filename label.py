"""Pseudo-label videos with a teacher model (Qwen-VL-Max) over plain HTTP, at million-video scale.

    DASHSCOPE_API_KEY=... python label.py videos/ --out labels.jsonl [--workers 16 --rpm 600 --shard 0/8]
    python label.py clean labels.jsonl --out clean.jsonl

Four frames per video (segment middles, as the seed) become JPEGs in decoding processes while the HTTP
requests run on threads. One row per video, appended and fsynced as it finishes:
{"video", "caption", "model", "usage", "finish_reason"} or {"video", "error", "status", "code"}; a rerun
skips what is done, so a kill loses at most the requests in flight. The rows are train.py data as they are.
"""

import argparse
import collections
import functools
import os
import sys
import time
import zlib

from client import APIError, Client, run_concurrently
from clean import clean_file
from data import VideoError, find_videos, jpeg_data_urls
from jsonl import Appender, read_rows
from workers import imap_unordered

DASHSCOPE = "https://dashscope.aliyuncs.com/compatible-mode/v1"
PROMPT = ("These are {n} frames sampled evenly from one video, in order. Describe the video in one detailed "
          "paragraph: the setting, the characters and objects and how they look, what they do and how that "
          "changes from frame to frame, the camera's movement, and the mood. Describe only what is visible; "
          "do not guess names, sounds or anything outside the frames, and do not mention frames or images.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Label videos with an OpenAI-compatible vision model "
                                            "(`label.py clean FILE --out FILE` cleans the labels).")
    p.add_argument("source", help="a folder (searched recursively), a video file, or a list (.txt / .jsonl)")
    p.add_argument("--out", default="labels.jsonl")
    p.add_argument("--api-base", default=DASHSCOPE)
    p.add_argument("--model", default="qwen-vl-max")
    p.add_argument("--api-key-env", default="DASHSCOPE_API_KEY", help="the environment variable holding the key")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--frames-as", choices=["video", "images"], default="video",
                   help="one Qwen 'video' part, or one image_url part per frame")
    p.add_argument("--max-side", type=int, default=768, help="longest side of each JPEG, pixels")
    p.add_argument("--jpeg-q", type=int, default=4, help="JPEG quantizer: 2 best .. 31 worst")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float)
    p.add_argument("--workers", type=int, default=16, help="concurrent requests")
    p.add_argument("--decode-workers", type=int, default=4)
    p.add_argument("--rpm", type=float, help="requests per minute, at most (retries count)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=8)
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay, seconds (doubles)")
    p.add_argument("--shard", default="0/1", help="K/N: label only the videos of shard K of N")
    p.add_argument("--retry-failed", action="store_true", help="try again the videos with an error row")
    p.add_argument("--price-in", type=float, default=0.0, help="$ per million prompt tokens")
    p.add_argument("--price-out", type=float, default=0.0, help="$ per million completion tokens")
    return p.parse_args(argv)


def request(urls, prompt, frames_as):
    if frames_as == "video":   # Qwen's own part type; it needs at least 4 frames
        parts = [{"type": "video", "video": urls}]
    else:
        parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": prompt}]}]


def label_one(client, args, prompt, job):
    """(video, data URLs or VideoError) -> its row."""
    video, urls = job
    if isinstance(urls, VideoError):
        return {"video": video, "error": str(urls), "status": None, "code": "unreadable_video"}
    params = {"max_tokens": args.max_tokens}
    if args.temperature is not None:
        params["temperature"] = args.temperature
    try:
        reply = client.chat(request(urls, prompt, args.frames_as), **params)
    except APIError as e:
        return {"video": video, "error": client.scrub(e), "status": e.status, "code": e.code}
    choice = reply["choices"][0]
    content = choice["message"].get("content") or ""
    if isinstance(content, list):   # some servers answer in parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not content.strip():
        return {"video": video, "error": "the reply was empty", "status": 200, "code": "empty_reply"}
    return {"video": video, "caption": content.strip(), "model": reply.get("model", args.model),
            "usage": reply.get("usage", {}), "finish_reason": choice.get("finish_reason")}


def in_shard(video, shard):
    k, n = shard
    return zlib.crc32(video.encode()) % n == k   # by name, so every machine agrees whatever its list order


def drop_error_rows(path):
    """For --retry-failed: rewrite the file without its error rows (atomically), keeping one row a video."""
    rows = [r for r in read_rows(path) if "error" not in r]
    with Appender(path + ".tmp", fsync=True, truncate=True) as f:
        for r in rows:
            f.write(r)
    os.replace(path + ".tmp", path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "clean":
        return clean_file(argv[1:])
    args = parse_args(argv)
    try:
        k, n = (int(x) for x in args.shard.split("/"))
        assert 0 <= k < n
        prompt = open(args.prompt_file).read().strip() if args.prompt_file else args.prompt
        client = Client(args.api_base, args.model, args.api_key_env, args.rpm, args.timeout, args.retries,
                        args.backoff)
        videos = [v for v in find_videos(args.source) if in_shard(v, (k, n))]
    except (ValueError, AssertionError, OSError) as e:
        sys.exit(f"error: {e or 'bad --shard, expected K/N with 0 <= K < N'}")
    prompt = prompt.replace("{n}", str(args.frames))
    if args.retry_failed and os.path.exists(args.out):
        drop_error_rows(args.out)
    done = {r["video"] for r in read_rows(args.out) if "video" in r}
    todo = [v for v in videos if v not in done]
    decode = functools.partial(jpeg_data_urls, n=args.frames, max_side=args.max_side, q=args.jpeg_q)
    jobs = imap_unordered(decode, todo, workers=args.decode_workers, timeout=args.timeout, buffer=2 * args.workers)
    stats, failed, start = collections.Counter(), collections.Counter(), time.monotonic()
    with Appender(args.out, fsync=True) as out:
        for row in run_concurrently(jobs, functools.partial(label_one, client, args, prompt), args.workers):
            out.write(row)
            if "error" in row:
                failed[f"{row['status'] or '-'} {row['code']}"] += 1
            else:
                stats["done"] += 1
                stats["in"] += row["usage"].get("prompt_tokens", 0)
                stats["out"] += row["usage"].get("completion_tokens", 0)
                stats["length"] += row["finish_reason"] == "length"
            finished = stats["done"] + sum(failed.values())
            print(f"\r{finished}/{len(todo)} videos, {sum(failed.values())} failed", end="", file=sys.stderr)
    elapsed = time.monotonic() - start
    cost = (stats["in"] * args.price_in + stats["out"] * args.price_out) / 1e6
    print(f"\nlabelled {stats['done']} ({stats['length']} cut at --max-tokens), failed {sum(failed.values())}"
          f"{' (' + ', '.join(f'{c} x {r}' for r, c in failed.most_common()) + ')' if failed else ''}, "
          f"{len(done)} already done; tokens in {stats['in']}, out {stats['out']}, estimated cost ${cost:.2f}; "
          f"{elapsed:.1f} s, {(stats['done'] + sum(failed.values())) / max(elapsed, 1e-9):.2f} videos/s", file=sys.stderr)


if __name__ == "__main__":
    main()
