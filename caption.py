"""Caption a folder of videos: python caption.py videos/ [--model pllava-7b|DIR|hub-id] [--out
FILE] [--shots]

Videos are decoded in worker processes while the model generates: the engine (engine.py) keeps
--batch-size videos in its slots and hands a finished video's slot to the next at once. Each video
gets one JSONL row, a caption or the reason it has none, appended as soon as it ends; with --shots
(or --window) each shot gets one, with its start and end in seconds. A rerun skips what is done,
whatever folder or mount it runs from (rows are keyed by the video's name: plumbing/sources.py),
and tries again what may succeed now. Every caption carries the id of the settings and weights that
made it (SETTINGS below, the prompt, the weights' content), and a rerun with others refuses the
file. Under torchrun every rank captions its share into a file of its own; rank 0 merges them.

A row: {"video": its path on this machine, "name": the name rows are kept and resumed by, "caption",
"tokens", "truncated": it reached --max-new-tokens, "loop": it repeated itself and was ended there
(--keep-loops), "frames", "model", "settings": the id above}, with "shot", "of", "start", "end" per
shot; or {"video", "name", "error", "code"} ("tries" on a failure the next run tries again).
"""

import functools
import os
import sys
import threading
import time

import torch

import memory
import shots
from captioning.placement import (CPU_SLOTS, decode_workers, decoder_threads, placement, plan,
                                  starting_slots)
from data import UNREADABLE, VideoError, mean_std, normalize
from engine import CompileLimit, Engine, Item, OutOfMemory
from generate import Sampling, looping, ready_for_inference
from model import PLLaVA
from plumbing import cli, hub
from plumbing.cli import Stop
from plumbing.jsonl import Busy
from plumbing.outputs import Outputs, settings_id
from plumbing.sources import find_videos, in_shard, names_of
from plumbing.workers import PoolError, cores_per_rank, failure, imap_unordered
from tokenizer import TEMPLATES, Tokenizer, prompt_for, prompt_ids, stop_id
from weights import RELEASES, ModelFolderError, read_config


# The flags that make a caption what it is: with the weights and the prompt they give every row its
# "settings" id (plumbing/outputs.settings_id), and a rerun whose id differs refuses the file (or
# --overwrite starts it again). A new flag that changes captions belongs here.
SETTINGS = ("frames", "pooling_shape", "lora_alpha", "quantize", "max_new_tokens", "temperature",
            "top_p", "repetition_penalty", "stop", "keyframes_only", "shots", "window", "min_shot",
            "max_shot")

def caption(args):
    """The run, as it reads: where it runs; the model's folder; its prompt and settings; --out
    locked and read once; the weights; then every video not done through the engine, a row each."""
    device, dtype, rank, world = placement(args)
    videos = find_videos(args.source)
    folder = hub.resolve(RELEASES.get(args.model, args.model))
    # the tokenizer, the prompt, the settings id: no weights yet
    captioner = Captioner(args, folder)
    # a second run stops here
    with Outputs(args.out, rank, world, overwrite=args.overwrite) as out:
        tries = {}
        # by name: any mount, any node
        key = functools.partial(shots.row_key, names=names_of(videos))
        done = out.resume(key, functools.partial(is_done, retry_errors=args.retry_errors),
                          captioner.settings, tries, {v.name: str(v) for v in videos})
        captioner.load(device, dtype)
        mine = [v for v in videos if in_shard(v.name, (rank, world))]
        if shots.finder(args):   # a video is done when each of its shots is
            todo = [v for v in mine if not shots.whole(v, done, out.shot_counts)]
        else:
            todo = [v for v in mine if (v.name, None) not in done]
        stats = run(captioner, out, todo, done, tries, rank, args, len(mine) - len(todo))
        captions, failures = out.finish([stats["captions"], stats["failed_total"]])
    if failures and not captions:   # a run that captioned nothing did not work, whatever stopped it
        raise Stop(f"no video was captioned: {failures} failed or could not be read "
                   f"(their rows are in {args.out})")
    return stats


class Captioner:
    """The model of a folder made ready to caption for these flags: its prompt, its settings id,
    and (after load()) the weights and the engine."""

    def __init__(self, args, folder):
        self.args, self.folder = args, folder
        self.tok = Tokenizer(folder)
        if self.tok.image_id is None:
            raise ModelFolderError(f"{folder}: the tokenizer has no <image> token")
        self.config = read_config(folder)
        # flags that cannot work fail before anything loads
        self.config.recipe(args.frames, args.pooling_shape)
        asks = prompt_for(folder, self.tok, args.prompt, args.system, args.template)
        del asks["source"]
        self.settings = settings_id(args, folder, asks, SETTINGS)
        self.prompt = prompt_ids(self.tok, asks["question"], asks["template"], asks["system"])
        self.stops = args.stop or (["USER:"] if asks["template"] == "vicuna" else [])
        self.stop_ids = tuple({stop_id(self.tok, asks["template"]), self.tok.eos_id} - {None})

    def load(self, device, dtype):
        """The weights, made ready for inference (int8: quantized onto the device a weight at a
        time from the memory-mapped checkpoint), and the engine over them."""
        args, int8 = self.args, self.args.quantize == "int8"
        self.device, self.dtype = device, dtype
        self.model = PLLaVA.from_pretrained(self.folder, lora_alpha=args.lora_alpha, dtype=dtype,
                                            device="cpu" if int8 else device)
        config = self.model.config
        # pllava-34b: config 64002, tokenizer 64000
        if self.tok.image_id != config.image_token_index:
            print(f"note: using the tokenizer's <image> id {self.tok.image_id}, not config.json's "
                  f"{config.image_token_index}", file=sys.stderr)
            config.image_token_index = self.tok.image_id
        config.recipe(args.frames, args.pooling_shape)
        rows = args.batch_size or CPU_SLOTS
        ready_for_inference(self.model, int8, device, args.compile, rows=rows)
        if int8 and device.startswith("cuda") and not args.compile:
            print("note: int8 on a GPU without --compile is slower than bf16 (each step widens "
                  "every weight in memory): it saves memory only; --compile can fuse the widening",
                  file=sys.stderr)
        self.frames, self.size = config.num_frames, config.vision_config.image_size
        self.mean, self.std = mean_std(self.folder)
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p,
                            args.repetition_penalty, self.stop_ids, tuple(self.stops),
                            stop_loops=not args.keep_loops)
        self.engine = Engine(self.model, starting_slots(args, config, device, dtype), sampling,
                             self.tok.decode, torch.Generator(device=device).manual_seed(args.seed),
                             compile_mode="auto" if args.compile else None)

    def frame_reader(self):
        """The decode workers' job: (video, shot or None, None) -> the frames of the shot or
        video."""
        return functools.partial(shots.shot_frames, n=self.frames, size=self.size,
                                 keyframes_only=self.args.keyframes_only)

    def items(self, stream, unreadable, failed):
        """The decoder's (job, frames) stream as the engine's Items; a job that cannot be read goes
        to unreadable(job, error) instead, one whose frames cannot go to the device to failed(job,
        error)."""
        for job, frames in stream:
            if isinstance(frames, VideoError):
                unreadable(job, frames)
                continue
            try:   # normalized in fp32, cast once
                pixels = normalize(frames, self.mean, self.std, self.device).to(self.dtype)
            # out of device memory, say: this video's row, and the stream goes on
            except Exception as e:
                failed(job, e)
                continue
            yield Item(job, self.prompt, pixels)

    def row(self, job, tokens):
        """A job's row: its caption, or why it has none."""
        if isinstance(tokens, Exception):
            return self.error(job, tokens, "internal_error")
        loop = 0 if self.args.keep_loops else looping(tokens)   # cut where the loop began
        text = self.tok.decode(tokens[:loop] if loop else tokens)
        for s in self.stops:
            text = text.split(s)[0]
        return {**shots.identity(job[0], job[1]), "caption": text.strip(), "tokens": len(tokens),
                "truncated": len(tokens) >= self.args.max_new_tokens and not loop,
                "loop": bool(loop),
                "frames": self.frames, "model": self.args.model, "settings": self.settings}

    @staticmethod
    def error(job, error, code):
        said = isinstance(error, (VideoError, OutOfMemory))   # their message is the reason
        why = str(error) if said else f"{type(error).__name__}: {error}"
        return {**shots.identity(job[0], job[1]), "error": why, "code": code}


def run(captioner, out, todo, done, tries, rank, args, already):
    """Caption the videos `todo` (or their shots not `done`) into `out`; the summary on stderr, and
    the counts returned."""
    stats = dict(captions=0, errors=0, missing=0, failed=0, retry=0, tokens=0)
    if shots.finder(args):
        stats["cut"] = 0
    kinds = {UNREADABLE: "errors", "missing_video": "missing", "internal_error": "failed"}
    engine, failures, start, lock = captioner.engine, [0], time.monotonic(), threading.Lock()

    def write(row):   # from the engine's loop, and from the thread that reads the decoders
        with lock:
            out.write(row)
            stats["captions" if "caption" in row else kinds.get(row["code"], "retry")] += 1
            stats["tokens"] += row.get("tokens", 0)
            if row.get("code") == "internal_error":
                failures[0] += 1
            elif "caption" in row:
                failures[0] = 0
            if failures[0] >= args.max_failures_in_a_row:
                raise Stop(f"the last {failures[0]} videos all failed in the model "
                           f"({row['error'][:200]}); they are not marked done: fix the cause, "
                           f"then run again")
            progress(rank, stats, len(todo), start, engine)

    def unreadable(job, error):   # a missing file is not done: a fixed path gets it captioned
        if not os.path.exists(job[0]):
            return write(captioner.error(job, error, "missing_video"))
        key = (job[0].name, job[1][0] if job[1] else None)
        write({**shots.identity(job[0], job[1]), **failure(error, tries.get(key, 0))})
    decode = functools.partial(imap_unordered, workers=decode_workers(args),
                               timeout=args.decode_timeout, buffer=2 * engine.slots,
                               memory_gb=args.decode_memory, threads=decoder_threads(args))
    if shots.finder(args):   # each video's shots found in decode workers (the time limit counts
        # from the last frame decoded: a 24-minute episode takes minutes), then each shot captioned
        jobs = shots.jobs(shots.counted(decode(shots.finder(args), todo), stats), done)
    else:
        jobs = [(v, None, None) for v in todo]
    items = captioner.items(decode(captioner.frame_reader(), jobs), unreadable,
                            lambda job, e: write(captioner.error(job, e, "internal_error")))
    while True:
        try:
            for job, tokens in engine.run(items):
                write(captioner.row(job, tokens))
            break
        except (KeyboardInterrupt, Stop, PoolError, CompileLimit):
            raise
        # a failure in the model: the videos in flight get its row, the others go on
        except Exception as e:
            for item in list(engine.waiting):
                write(captioner.error(item.key, e, "internal_error"))
            engine.waiting.clear()
    elapsed = time.monotonic() - start
    stats["failed_total"] = stats["errors"] + stats["missing"] + stats["failed"] + stats["retry"]
    summary(rank, stats, already, elapsed, engine.stats, args)
    return {**stats, "seconds": elapsed, "already_done": already, "engine": dict(engine.stats)}


def is_done(row, retry_errors=False):
    """A caption, or (unless retry_errors) a file that cannot be read however often it is tried; a
    missing file, a failure in the model and one that may not happen again (a decoder's time limit)
    are not."""
    unreadable = "error" in row and row.get("code", UNREADABLE) == UNREADABLE
    return "caption" in row or (not retry_errors and unreadable)


def progress(rank, stats, total, start, engine):
    n = stats["captions"] + stats["errors"] + stats["missing"] + stats["failed"] + stats["retry"]
    elapsed = max(time.monotonic() - start, 1e-9)
    if "cut" in stats:   # per shot: how many rows, and the ETA by the videos cut so far
        done, what = stats["cut"], f"{n} shots, {stats['cut']}/{total} videos cut"
    else:
        done, what = n, f"{n}/{total} videos"
    eta = (total - done) * elapsed / done if done else float("inf")
    print(f"\r[rank {rank}] {what}  {n / elapsed:.2f} rows/s  "
          f"slots {engine.occupied}/{engine.slots}  ETA {eta / 60:.1f} min ",
          end="", file=sys.stderr, flush=True)


def summary(rank, stats, already, elapsed, e, args):
    n, what = stats["failed_total"] + stats["captions"], "shots" if "cut" in stats else "videos"
    waited = 100 * e["waited_steps"] / max(e["steps"], 1)
    elapsed = max(elapsed, 1e-9)
    print(f"\n[rank {rank}] {stats['captions']} captions, {stats['errors']} unreadable, "
          f"{already} already done, {stats['missing']} missing, {stats['failed']} failed in the "
          f"model, {stats['retry']} to try again (a decoder's time or memory limit, or its crash: "
          f"the next run tries them); {elapsed:.1f} s, {n / elapsed:.2f} {what}/s, "
          f"{stats['tokens'] / elapsed:.1f} tokens/s, "
          f"{stats['tokens'] / max(stats['captions'], 1):.0f} tokens per caption, "
          f"{100 * e['finished_row_steps'] / max(e['row_steps'], 1):.1f}% of decode steps on "
          f"finished rows, waited for frames in {waited:.0f}% of steps and "
          f"{100 * e['wait_s'] / elapsed:.0f}% of the time", file=sys.stderr)
    if waited > 10:
        print(f"note: decoding did not keep up with the model ({decode_workers(args)} --workers on "
              f"{cores_per_rank()} cores): more cores, --keyframes-only, or fewer --frames",
              file=sys.stderr)


def parse_args(argv=None):
    p = cli.Parser(description="Caption videos with a PLLaVA model.")
    add = p.add_argument
    add("source", nargs="?",
        help="a folder (searched recursively), a video file, or a list (.txt / .jsonl)")
    add("--model", default="pllava-7b",
        help=f"a release ({', '.join(RELEASES)}: downloaded from the hub), a model folder, "
             f"or a hub id")
    add("--out", default="captions.jsonl", help="the JSONL file the rows are appended to")
    # the prompt
    add("--prompt", help="the instruction (default: the model folder's prompt.json, which "
                         "train.py --export writes, else PLLaVA's detailed-caption question)")
    add("--system", help="the system line of the prompt (default: prompt.json's, else PLLaVA's)")
    add("--template", choices=sorted(TEMPLATES),
        help="prompt template (default: prompt.json's, else from the tokenizer)")
    # the model's inputs and weights
    add("--frames", type=cli.positive_int,
        help="frames per video (default: the model's num_frames)")
    add("--pooling-shape", type=cli.shape, metavar="T,H,W",
        help="visual tokens per video, (time, height, width) (default: the model's; "
             "Open-Sora: 4,12,12)")
    add("--lora-alpha", type=cli.non_negative,
        help="LoRA alpha at load, the share alpha/r of the adapter (default: the adapter's own; "
             "a PLLaVA release, LoRA inside its weights: 4, as PLLaVA's own scripts use)")
    add("--quantize", choices=["none", "int8"], default="none",
        help="int8: the LLM's weights as int8 (half of bf16's memory; on a GPU slower than bf16 "
             "unless --compile fuses the widening)")
    add("--dtype", choices=["float32", "bfloat16", "float16"],
        help="default: bf16 on GPU, fp32 on CPU")
    add("--device", help="default: cuda when there is one, else cpu")
    add("--batch-size", type=cli.positive_int,
        help=f"videos captioned together (the engine's slots; a video that ends hands its slot "
             f"on); default: on a GPU what its memory holds, at most {memory.MAX_SLOTS}; on a "
             f"CPU {CPU_SLOTS}")
    add("--compile", action="store_true",
        help="compile the decoding step (CUDA graphs on a GPU): minutes to start, then faster")
    # the caption
    add("--max-new-tokens", type=cli.positive_int, default=256, help="a caption's length, at most")
    add("--temperature", type=cli.non_negative, default=0.0, help="0: greedy")
    add("--top-p", type=cli.positive, default=1.0,
        help="nucleus sampling (with --temperature above 0)")
    add("--repetition-penalty", type=cli.positive, default=1.0, help="1: none")
    add("--stop", action="append", default=[], help="a stop string (repeatable)")
    add("--keep-loops", action="store_true",
        help="let a caption that repeats itself run on to --max-new-tokens (by default it ends "
             "where the loop began, its row saying \"loop\": true)")
    add("--seed", type=int, default=0, help="of the sampling (with --temperature above 0)")
    # decoding the videos
    add("--workers", type=cli.positive_int,
        help="video decoding processes (default: this rank's cores but one, at most 32)")
    add("--decode-timeout", type=cli.positive, default=300.0,
        help="seconds allowed to read one video's (or shot's) frames; finding shots, seconds "
             "without a frame decoded")
    add("--decode-memory", type=cli.positive, default=8.0, help="GiB a decoding process may use")
    add("--keyframes-only", action="store_true", help="faster decoding, less exact frame times")
    shots.add_flags(p)
    # the run
    add("--overwrite", action="store_true",
        help="caption everything again (also what --out holds from a run with other settings)")
    add("--retry-errors", action="store_true",
        help="try again the videos whose file could not be read too")
    add("--max-failures-in-a-row", type=cli.positive_int, default=10,
        help="stop the run after this many videos in a row failed in the model")
    add("--dry-run", action="store_true",
        help="print the GPU memory this run needs (estimated, and rehearsed on fake tensors at the "
             "real sizes) and whether it fits --card-gb; load and download nothing")
    add("--card-gb", type=cli.positive,
        help="--dry-run for a GPU of this memory (default: this machine's GPU, else its RAM, "
             "in fp32)")
    args = p.parse_args(argv)
    if args.top_p > 1:
        p.error("--top-p must be at most 1")
    if not args.source and not args.dry_run:
        p.error("the videos to caption: a folder, a video file or a list")
    return args


def main(argv=None):
    args = parse_args(argv)
    said = (OSError, ValueError, hub.HubError, ModelFolderError, Busy, Stop, PoolError,
            CompileLimit)   # errors a user can act on: one line, no traceback
    return cli.run(lambda: plan(args) if args.dry_run else caption(args), said)


if __name__ == "__main__":
    main()
