"""Caption a folder of videos: python caption.py videos/ [--model DIR|hub-id] [--out captions.jsonl]

Videos are decoded in worker processes while the model generates, batch after batch. Each video gets one
JSONL row, a caption or the reason it could not be read, appended as soon as its batch finishes; a rerun
skips what is done (resume keys on the canonical path, however it is spelled) and tries again what failed
for another reason than the file. Under torchrun every rank captions its own share of the videos into its
own file, and rank 0 merges them into --out at the end. A second run writing the same --out stops at once.
"""

import contextlib
import datetime
import functools
import glob
import json
import os
import re
import sys
import time

import torch

import cli
import hub
from checkpoint import CheckpointError
from client import Stop
from data import VideoError, canonical, find_videos, mean_std, normalize, read_clip_frames
from config import PRESETS, Config
from engine import Engine, Item, OutOfMemory, plan
from generate import Sampling, can_pack, pack_for_cpu
from jsonl import Appender, Busy, iter_rows
from lora import merge_lora
from model import PLLaVA
from quant import quantize_int8
from tokenizer import QUESTION, SYSTEM, TEMPLATES, Tokenizer, prompt_ids, stop_id, template_for
from workers import imap_unordered

DEFAULT_MODEL = "ermu2001/pllava-7b"
UNREADABLE = "unreadable_video"


def parse_args(argv=None):
    p = cli.Parser(description="Caption videos with a PLLaVA model.")
    p.add_argument("source", help="a folder (searched recursively), a video file, or a list (.txt / .jsonl)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="a model folder or a hub id")
    p.add_argument("--out", default="captions.jsonl")
    p.add_argument("--prompt", default=QUESTION, help="the instruction")
    p.add_argument("--system", default=SYSTEM, help="the system line of the prompt template")
    p.add_argument("--template", choices=sorted(TEMPLATES), help="prompt template (default: from the tokenizer)")
    p.add_argument("--frames", type=cli.positive_int, help="frames per video (default: the checkpoint's num_frames)")
    p.add_argument("--pooling-shape", type=cli.shape, metavar="T,H,W",
                   help="visual tokens per video, (time, height, width) (default: the checkpoint's; Open-Sora: 4,12,12)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: the LLM's weights as int8 (a quarter of fp32's memory, half of bf16's)")
    p.add_argument("--batch-size", type=cli.positive_int, default=8,
                   help="videos decoded together; a video that ends hands its slot to the next")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=256)
    p.add_argument("--temperature", type=cli.non_negative, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=cli.positive, default=1.0)
    p.add_argument("--repetition-penalty", type=cli.positive, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--lora-alpha", type=cli.non_negative,
                   help="LoRA alpha at load, the share alpha/r of the adapter (default: the adapter's own; a "
                        "PLLaVA release, LoRA inside its weights: 4, as PLLaVA's own scripts use)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", help="default: cuda when there is one, else cpu")
    p.add_argument("--workers", type=cli.positive_int, default=4, help="video decoding processes")
    p.add_argument("--decode-timeout", type=cli.positive, default=300.0, help="seconds allowed to decode one video")
    p.add_argument("--decode-memory", type=cli.positive, default=8.0, help="GiB a decoding process may use")
    p.add_argument("--keyframes-only", action="store_true", help="faster decoding, less exact frame times")
    p.add_argument("--compile", action="store_true",
                   help="compile the decoding step (static cache, CUDA graphs on a GPU): minutes to start, then faster")
    p.add_argument("--overwrite", action="store_true", help="caption everything again")
    p.add_argument("--retry-errors", "--retry-failed", action="store_true",
                   help="try again the videos whose file could not be read too")
    p.add_argument("--max-failures-in-a-row", type=cli.positive_int, default=10,
                   help="stop the run after this many videos in a row failed in the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true",
                   help="print the device memory this run needs and whether it fits --card-gb, load nothing, stop")
    p.add_argument("--card-gb", type=cli.positive, help="the device's memory for --dry-run (default: this GPU's, or 80)")
    args = p.parse_args(argv)
    if args.top_p > 1:
        p.error("--top-p must be at most 1")
    return args


def is_done(row, retry_errors=False):
    """A caption, or (unless retry_errors) a file that could not be read; a missing file or a failure in
    the model is not."""
    return "caption" in row or (not retry_errors and "error" in row and row.get("code", UNREADABLE) == UNREADABLE)


def video_key(row):
    return canonical(row["video"]) if isinstance(row.get("video"), str) else None


class Captioner:
    def __init__(self, args, device, dtype):
        self.args, self.device, self.dtype = args, device, dtype
        folder = hub.resolve(args.model)
        self.model = PLLaVA.from_pretrained(folder, lora_alpha=args.lora_alpha, dtype=dtype, device=device)
        self.tok = Tokenizer(folder)
        config = self.model.config
        if self.tok.image_id is None:
            raise CheckpointError(f"{folder}: the tokenizer has no <image> token")
        if self.tok.image_id != config.image_token_index:   # pllava-34b's config says 64002, its tokenizer 64000
            print(f"note: using the tokenizer's <image> id {self.tok.image_id}, not config.json's "
                  f"{config.image_token_index}", file=sys.stderr)
            config.image_token_index = self.tok.image_id
        recipe(config, args)
        lm = self.model.language_model
        if args.quantize == "int8":
            quantize_int8(lm)
        elif can_pack(lm) and not args.compile:   # CPU fp32: oneDNN's faster layout
            pack_for_cpu(lm)
        else:   # one product per layer instead of three: the adapter folded in, at the alpha loaded
            merge_lora(lm)
        template = args.template or template_for(self.tok)
        self.prompt = prompt_ids(self.tok, args.prompt, template, args.system)
        self.stops = args.stop or (["USER:"] if template == "vicuna" else [])
        self.frames, self.size = config.num_frames, config.vision_config.image_size
        self.mean, self.std = mean_std(folder)
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty,
                            tuple({stop_id(self.tok, template), self.tok.eos_id} - {None}), tuple(self.stops))
        self.engine = Engine(self.model, args.batch_size, sampling, self.tok.decode,
                             torch.Generator(device=device).manual_seed(args.seed),
                             compile_mode="auto" if args.compile else None)

    def decoder(self):
        return functools.partial(read_clip_frames, n=self.frames, size=self.size,
                                 keyframes_only=self.args.keyframes_only)

    def items(self, stream, unreadable):
        """The decoder's (video, frames) stream as the engine's Items; a video that cannot be read goes to
        unreadable(video, error) instead."""
        for video, frames in stream:
            if isinstance(frames, VideoError):
                unreadable(video, frames)
            else:   # normalized in fp32, cast once
                yield Item(video, self.prompt, normalize(frames, self.mean, self.std, self.device).to(self.dtype))

    def row(self, video, tokens):
        if isinstance(tokens, OutOfMemory):
            return {"video": video, "error": str(tokens), "code": "internal_error"}
        text = self.tok.decode(tokens)
        for s in self.stops:
            text = text.split(s)[0]
        return {"video": video, "caption": text.strip(), "tokens": len(tokens),
                "truncated": len(tokens) >= self.args.max_new_tokens, "frames": self.frames, "model": self.args.model}


def recipe(config, args):
    """--frames and --pooling-shape at inference: PLLaVA's pooling has no weights, so fewer frames and
    tokens need no retraining (Open-Sora captioned with 4 frames pooled to 4x12x12: 576 tokens, not 2,304)."""
    if args.frames:
        config.num_frames = args.frames   # taken as they are, not repeated up to the checkpoint's count
    if args.pooling_shape:
        t, h, w = args.pooling_shape
        if max(h, w) > config.grid:
            raise ValueError(f"--pooling-shape {t},{h},{w}: a frame holds {config.grid}x{config.grid} patches, "
                             f"so at most {config.grid} a side")
        config.pooling_shape = (t, h, w)


def merge(out, parts):
    """Rank 0, at the end: the done rows of the rank files that `out` (an Appender) lacks, then the rank
    files go. Failures are not carried over: they are not done, and the next run tries them again."""
    have = out.settle(video_key, is_done)
    for part in parts:
        for row in iter_rows(part):
            if is_done(row) and video_key(row) not in have:
                out.write(row)
                have.add(video_key(row))
    for part in parts:
        os.remove(part)


def caption_batch(captioner, batch):
    """Rows for a batch; when the model fails on it, each video alone, and a video that fails alone gets
    an error row (not done: the next run tries it again)."""
    try:
        results = captioner.caption([frames for _, frames in batch])
    except (torch.OutOfMemoryError, KeyboardInterrupt):
        raise
    except Exception as e:
        if len(batch) > 1:
            return [row for one in batch for row in caption_batch(captioner, [one])]
        return [{"video": batch[0][0], "error": f"{type(e).__name__}: {e}", "code": "internal_error"}]
    return [{"video": video, "caption": text, "tokens": n, "truncated": truncated, "frames": captioner.frames,
             "model": captioner.args.model} for (video, _), (text, n, truncated) in zip(batch, results)]


def main(argv=None):
    args = parse_args(argv)
    return cli.run(lambda: dry_run(args) if args.dry_run else caption(args),
                   (OSError, ValueError, hub.HubError, CheckpointError, Busy, Stop))


def dry_run(args):
    """The memory plan (engine.plan) of a preset (pllava-7b/13b/34b) or a local model folder's config.json."""
    if args.model in PRESETS:
        config = Config.from_dict(PRESETS[args.model])
    else:
        with open(os.path.join(args.model, "config.json")) as f:   # a local folder: a hub id would mean a download
            config = Config.from_dict(json.load(f))
    recipe(config, args)
    card = args.card_gb or (torch.cuda.get_device_properties(0).total_memory / 1e9 if torch.cuda.is_available() else 80.0)
    dtype_bytes = 4 if args.dtype == "float32" else 2
    need = plan(config, args.batch_size, args.max_new_tokens, dtype_bytes, args.quantize == "int8")
    print(f"{args.model}: {args.batch_size} slots, {config.num_visual_tokens} visual tokens, {args.max_new_tokens} new "
          f"tokens, {'int8' if args.quantize == 'int8' else args.dtype or 'bfloat16'}: " +
          ", ".join(f"{k} {v:.1f} GB" for k, v in need.items()) + f" of {card:.0f} GB")
    if need["total"] > 0.95 * card:
        raise ValueError(f"{need['total']:.1f} GB does not fit in {card:.0f} GB: try --quantize int8, a smaller "
                         f"--batch-size, or fewer tokens (--pooling-shape)")
    return need


def caption(args):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):   # before anything touches CUDA, or every rank's context lands on GPU 0
        torch.cuda.set_device(torch.device(device))
    if world > 1:
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    videos = find_videos(args.source)
    mine = f"{args.out}.rank{rank}" if world > 1 else args.out
    with Appender(mine, truncate=args.overwrite) as out, \
            (Appender(args.out, fsync=True, truncate=args.overwrite) if world > 1 and rank == 0 else contextlib.nullcontext()) as merged:
        # the outputs are locked before the model loads: a second run on the same --out stops at once
        captioner = Captioner(args, device, dtype)
        done = out.settle(video_key, functools.partial(is_done, retry_errors=args.retry_errors))
        if world > 1:
            if rank == 0:
                merged.settle(video_key, functools.partial(is_done, retry_errors=args.retry_errors))
            torch.distributed.barrier()
            if not args.overwrite:   # what the merged file and earlier runs' rank files hold
                others = [args.out] + [p for p in rank_files(args.out) if p != mine]
                done |= {video_key(r) for p in others for r in iter_rows(p)
                         if is_done(r, args.retry_errors)}
        todo = [v for v in videos[rank::world] if canonical(v) not in done]
        stats = run(captioner, out, todo, rank, args, len(videos[rank::world]) - len(todo))
        if world > 1:
            torch.distributed.barrier()
            if rank == 0:
                merge(merged, rank_files(args.out))
            torch.distributed.destroy_process_group()
    return stats


def rank_files(out):
    return sorted(p for p in glob.glob(glob.escape(out) + ".rank*") if re.fullmatch(r".*\.rank\d+", p))


def run(captioner, out, todo, rank, args, already):
    """Caption `todo` into `out`; the summary on stderr, and the counts returned."""
    stats = dict(captions=0, errors=0, missing=0, failed=0, tokens=0, wait=0.0)   # errors: unreadable files
    kinds = {UNREADABLE: "errors", "missing_video": "missing", "internal_error": "failed"}
    engine, failures, start = captioner.engine, [0], time.monotonic()

    def write(row):
        out.write(row)
        stats["captions" if "caption" in row else kinds[row["code"]]] += 1
        stats["tokens"] += row.get("tokens", 0)
        failures[0] = failures[0] + 1 if row.get("code") == "internal_error" else 0 if "caption" in row else failures[0]
        if failures[0] >= args.max_failures_in_a_row:
            raise Stop(f"the last {failures[0]} videos all failed in the model ({row['error'][:200]}); "
                       f"they are not marked done: fix the cause, then run again")
        progress(rank, stats, len(todo), start, engine)

    def unreadable(video, error):   # a missing file is not done: a fixed path gets it captioned
        write({"video": video, "error": str(error), "code": UNREADABLE if os.path.exists(video) else "missing_video"})
    stream = waiting_time(imap_unordered(captioner.decoder(), todo, workers=args.workers, timeout=args.decode_timeout,
                                         buffer=2 * args.batch_size, memory_gb=args.decode_memory), stats)
    items = captioner.items(stream, unreadable)
    while True:
        try:
            for video, tokens in engine.run(items):
                write(captioner.row(video, tokens))
            break
        except (KeyboardInterrupt, Stop):
            raise
        except Exception as e:   # a failure in the model: the videos in flight get its row, the others go on
            for item in list(engine.waiting):
                write({"video": item.key, "error": f"{type(e).__name__}: {e}", "code": "internal_error"})
            engine.waiting.clear()
    elapsed = time.monotonic() - start
    n = stats["captions"] + stats["errors"] + stats["missing"] + stats["failed"]
    e = engine.stats
    print(f"\n[rank {rank}] {stats['captions']} captions, {stats['errors']} unreadable, {already} already done, "
          f"{stats['missing']} missing, {stats['failed']} failed in the model; {elapsed:.1f} s, "
          f"{n / max(elapsed, 1e-9):.2f} videos/s, {stats['tokens'] / max(elapsed, 1e-9):.1f} tokens/s, "
          f"{stats['tokens'] / max(stats['captions'], 1):.0f} tokens per caption, "
          f"{100 * e['finished_row_steps'] / max(e['row_steps'], 1):.1f}% of decode steps on finished rows, "
          f"{100 * stats['wait'] / max(elapsed, 1e-9):.1f}% of the time waiting for decoding", file=sys.stderr)
    return {**stats, "seconds": elapsed, "already_done": already, "engine": dict(e)}


def waiting_time(stream, stats):
    """The decoder's stream, with the time spent waiting on it added to stats["wait"]."""
    while True:
        t = time.monotonic()
        got = next(stream, None)
        stats["wait"] += time.monotonic() - t
        if got is None:
            return
        yield got


def progress(rank, stats, total, start, engine):
    n = stats["captions"] + stats["errors"] + stats["missing"] + stats["failed"]
    rate = n / max(time.monotonic() - start, 1e-9)
    eta = (total - n) / rate if rate > 0 else float("inf")
    print(f"\r[rank {rank}] {n}/{total} videos  {rate:.2f} videos/s  slots {engine.occupied}/{engine.slots}  "
          f"ETA {eta / 60:.1f} min ", end="", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
