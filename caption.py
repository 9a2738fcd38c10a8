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

import datetime
import functools
import os
import sys
import threading
import time

import torch

import memory
import shots
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
from weights import RELEASES, ModelFolderError, model_config, read_config


# The flags that make a caption what it is: with the weights and the prompt they give every row its
# "settings" id (plumbing/outputs.settings_id), and a rerun whose id differs refuses the file (or
# --overwrite starts it again). A new flag that changes captions belongs here.
SETTINGS = ("frames", "pooling_shape", "lora_alpha", "quantize", "max_new_tokens", "temperature", "top_p",
            "repetition_penalty", "stop", "keyframes_only", "shots", "window", "min_shot", "max_shot")

def caption(args):
    """The run, as it reads: where it runs; the model's folder; its prompt and settings; --out
    locked and read once; the weights; then every video not done through the engine, a row each."""
    device, dtype, rank, world = placement(args)
    videos = find_videos(args.source)
    folder = hub.resolve(RELEASES.get(args.model, args.model))
    captioner = Captioner(args, folder)   # the tokenizer, the prompt, the settings id: no weights yet
    with Outputs(args.out, rank, world, overwrite=args.overwrite) as out:   # a second run stops here
        tries = {}
        key = functools.partial(shots.row_key, names=names_of(videos))   # by name: any mount, any node
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
        raise Stop(f"no video was captioned: {failures} failed or could not be read (their rows are in "
                   f"{args.out})")
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
        self.config.recipe(args.frames, args.pooling_shape)   # flags that cannot work fail before anything loads
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
        if self.tok.image_id != config.image_token_index:   # pllava-34b: config 64002, tokenizer 64000
            print(f"note: using the tokenizer's <image> id {self.tok.image_id}, not config.json's "
                  f"{config.image_token_index}", file=sys.stderr)
            config.image_token_index = self.tok.image_id
        config.recipe(args.frames, args.pooling_shape)
        ready_for_inference(self.model, int8, device, args.compile, rows=args.batch_size or CPU_SLOTS)
        if int8 and device.startswith("cuda") and not args.compile:
            print("note: int8 on a GPU without --compile is slower than bf16 (each step widens every "
                  "weight in memory): it saves memory only; --compile can fuse the widening",
                  file=sys.stderr)
        self.frames, self.size = config.num_frames, config.vision_config.image_size
        self.mean, self.std = mean_std(self.folder)
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty,
                            self.stop_ids, tuple(self.stops), stop_loops=not args.keep_loops)
        self.engine = Engine(self.model, starting_slots(args, config, device, dtype), sampling,
                             self.tok.decode, torch.Generator(device=device).manual_seed(args.seed),
                             compile_mode="auto" if args.compile else None)

    def frame_reader(self):
        """The decode workers' job: (video, shot or None, None) -> the frames of the shot or video."""
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
            except Exception as e:   # out of device memory, say: this video's row, and the stream goes on
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
                "truncated": len(tokens) >= self.args.max_new_tokens and not loop, "loop": bool(loop),
                "frames": self.frames, "model": self.args.model, "settings": self.settings}

    @staticmethod
    def error(job, error, code):
        why = str(error) if isinstance(error, (VideoError, OutOfMemory)) else f"{type(error).__name__}: {error}"
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
            failures[0] = failures[0] + 1 if row.get("code") == "internal_error" else 0 if "caption" in row \
                else failures[0]
            if failures[0] >= args.max_failures_in_a_row:
                raise Stop(f"the last {failures[0]} videos all failed in the model ({row['error'][:200]}); "
                           f"they are not marked done: fix the cause, then run again")
            progress(rank, stats, len(todo), start, engine)

    def unreadable(job, error):   # a missing file is not done: a fixed path gets it captioned
        if not os.path.exists(job[0]):
            return write(captioner.error(job, error, "missing_video"))
        key = (job[0].name, job[1][0] if job[1] else None)
        write({**shots.identity(job[0], job[1]), **failure(error, tries.get(key, 0))})
    decode = functools.partial(imap_unordered, workers=decode_workers(args),
                               timeout=args.decode_timeout, buffer=2 * engine.slots,
                               memory_gb=args.decode_memory, threads=decoder_threads(args))
    if shots.finder(args):   # each video's shots found in decode workers (the time limit counts from the
        # last frame decoded: a 24-minute episode takes minutes), then each shot captioned alone
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
        except Exception as e:   # a failure in the model: the videos in flight get its row, the others go on
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
    return "caption" in row or (not retry_errors and "error" in row and row.get("code", UNREADABLE) == UNREADABLE)


def placement(args):
    """(device, dtype, rank, world): a GPU per rank under torchrun, bf16 there, fp32 on a CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):   # before anything touches CUDA, or every rank's context lands on GPU 0
        torch.cuda.set_device(torch.device(device))
    if world > 1:
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    if args.compile:   # inductor's compile workers: this rank's share of the cores, not all of them
        from torch._inductor import config as inductor
        inductor.compile_threads = cores_per_rank()
    default = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return device, getattr(torch, args.dtype) if args.dtype else default, rank, world


CPU_SLOTS = 8   # a CPU's default slots: past about 8 rows a step costs what it saves


def starting_slots(args, config, device, dtype):
    """--batch-size, or on a GPU (without it) the slots its free memory holds beside the weights
    (memory.py: the KV cache and frames of each, a prefill pass; compiled, the cache's rounding and a
    margin), at most memory.MAX_SLOTS; said at start. A --batch-size that does not fit starts at
    what does: the engine starts where it fits instead of running out."""
    if not device.startswith("cuda"):
        return args.batch_size or CPU_SLOTS
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    fit = max(1, memory.slots_that_fit(config, free / 1e9, args.max_new_tokens, torch.finfo(dtype).bits // 8,
                                       compiled=args.compile))
    if args.batch_size is None:
        slots = min(fit, memory.MAX_SLOTS)
        print(f"note: {slots} slots, what {free / 1e9:.1f} GB free on the GPU holds (at most "
              f"{memory.MAX_SLOTS}; --batch-size N to choose)", file=sys.stderr)
        return slots
    if fit < args.batch_size:
        print(f"note: {free / 1e9:.1f} GB free on the GPU holds {fit} slots, not --batch-size "
              f"{args.batch_size}: starting with {fit}", file=sys.stderr)
    return min(fit, args.batch_size)


def decode_workers(args):
    """--workers, or this rank's cores but one (the engine's), at most 32: 16 exact frames of a 1080p
    video cost a core about a second, and 13B on an H100 takes a video every ~0.4 s."""
    return args.workers or max(1, min(32, cores_per_rank() - 1))


def decoder_threads(args):
    """Threads per decoder: this rank's cores shared by its decoding processes (twice as many with
    shots)."""
    return max(1, cores_per_rank() // (decode_workers(args) * (2 if shots.finder(args) else 1)))


def progress(rank, stats, total, start, engine):
    n = stats["captions"] + stats["errors"] + stats["missing"] + stats["failed"] + stats["retry"]
    elapsed = max(time.monotonic() - start, 1e-9)
    if "cut" in stats:   # per shot: how many rows, and the ETA by the videos cut so far
        done, what = stats["cut"], f"{n} shots, {stats['cut']}/{total} videos cut"
    else:
        done, what = n, f"{n}/{total} videos"
    eta = (total - done) * elapsed / done if done else float("inf")
    print(f"\r[rank {rank}] {what}  {n / elapsed:.2f} rows/s  slots {engine.occupied}/{engine.slots}  "
          f"ETA {eta / 60:.1f} min ", end="", file=sys.stderr, flush=True)


def summary(rank, stats, already, elapsed, e, args):
    n, what = stats["failed_total"] + stats["captions"], "shots" if "cut" in stats else "videos"
    waited = 100 * e["waited_steps"] / max(e["steps"], 1)
    print(f"\n[rank {rank}] {stats['captions']} captions, {stats['errors']} unreadable, {already} already "
          f"done, {stats['missing']} missing, {stats['failed']} "
          f"failed in the model, {stats['retry']} to try again (a decoder's time or memory limit, or its "
          f"crash: the next run tries them); {elapsed:.1f} s, {n / max(elapsed, 1e-9):.2f} {what}/s, "
          f"{stats['tokens'] / max(elapsed, 1e-9):.1f} tokens/s, "
          f"{stats['tokens'] / max(stats['captions'], 1):.0f} tokens per caption, "
          f"{100 * e['finished_row_steps'] / max(e['row_steps'], 1):.1f}% of decode steps on finished rows, "
          f"waited for frames in {waited:.0f}% of steps and {100 * e['wait_s'] / max(elapsed, 1e-9):.0f}% of "
          f"the time", file=sys.stderr)
    if waited > 10:
        print(f"note: decoding did not keep up with the model ({decode_workers(args)} --workers on "
              f"{cores_per_rank()} cores): more cores, --keyframes-only, or fewer --frames", file=sys.stderr)


def dry_run(args):
    """What the run needs on each GPU: memory.py's estimate, and the same run rehearsed on fake
    tensors at the real sizes (lab/rehearse.py), beside the card's memory. Nothing is loaded
    or downloaded."""
    from lab import rehearse
    config = model_config(args.model)
    config.recipe(args.frames, args.pooling_shape)
    gpu = bool(args.card_gb) or torch.cuda.is_available()   # a card named, or this machine's; else its RAM
    card = args.card_gb or (memory.card_gb() if gpu else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9)
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    int8 = args.quantize == "int8"
    nbytes = torch.finfo(dtype).bits // 8
    slots = args.batch_size or (memory.default_slots(config, card, args.max_new_tokens, nbytes,
                                                     int8, args.compile) if gpu else CPU_SLOTS)
    need = memory.captioning(config, slots, args.max_new_tokens, nbytes, int8, compiled=args.compile)
    peak = rehearse.captioning(config, slots, args.max_new_tokens, dtype, int8, args.compile)
    total = peak["peak_gb"] + memory.CONTEXT_GB
    print(f"{args.model}: {slots} slots{'' if args.batch_size else ' (the default)'}, {config.num_visual_tokens} "
          f"visual tokens, {args.max_new_tokens} new tokens, {'int8' if int8 else str(dtype).split('.')[1]}: estimate " +
          ", ".join(f"{k} {v:.1f} GB" for k, v in need.items()) + f"; rehearsed on fake tensors: peak "
          f"{peak['peak_gb']:.1f} GB + context {memory.CONTEXT_GB} = {total:.1f} GB; "
          f"{f'card {card:.0f} GB' if gpu else f'no GPU here: RAM {card:.0f} GB (--card-gb N plans for a GPU)'}")
    if max(total, need["total"]) > 0.95 * card:
        tips = ([] if int8 else ["--quantize int8"]) + ([f"--batch-size {slots // 2}"]
                                                        if slots > 1 else [])
        raise ValueError(f"{max(total, need['total']):.1f} GB does not fit in {card:.0f} GB: try "
                         f"{', '.join(tips + ['fewer tokens (--pooling-shape, --max-new-tokens)'])}")
    return {**need, "rehearsed": total, "slots": slots}


def parse_args(argv=None):
    p = cli.Parser(description="Caption videos with a PLLaVA model.")
    p.add_argument("source", nargs="?",
                   help="a folder (searched recursively), a video file, or a list (.txt / .jsonl)")
    p.add_argument("--model", default="pllava-7b",
                   help=f"a release ({', '.join(RELEASES)}: downloaded from the hub), a model folder, or a "
                        f"hub id")
    p.add_argument("--out", default="captions.jsonl", help="the JSONL file the rows are appended to")
    p.add_argument("--prompt", help="the instruction (default: the model folder's prompt.json, which train.py "
                                    "--export writes, else PLLaVA's detailed-caption question)")
    p.add_argument("--system", help="the system line of the prompt (default: prompt.json's, else PLLaVA's)")
    p.add_argument("--template", choices=sorted(TEMPLATES),
                   help="prompt template (default: prompt.json's, else from the tokenizer)")
    p.add_argument("--frames", type=cli.positive_int, help="frames per video (default: the model's num_frames)")
    p.add_argument("--pooling-shape", type=cli.shape, metavar="T,H,W",
                   help="visual tokens per video, (time, height, width) (default: the model's; Open-Sora: 4,12,12)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: the LLM's weights as int8 (half of bf16's memory; on a GPU slower than bf16 "
                        "unless --compile fuses the widening)")
    p.add_argument("--batch-size", type=cli.positive_int,
                   help="videos captioned together (the engine's slots; a video that ends hands its slot on); "
                        f"default: on a GPU what its memory holds, at most {memory.MAX_SLOTS}; on a CPU {CPU_SLOTS}")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=256, help="a caption's length, at most")
    p.add_argument("--temperature", type=cli.non_negative, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=cli.positive, default=1.0, help="nucleus sampling (with --temperature above 0)")
    p.add_argument("--repetition-penalty", type=cli.positive, default=1.0, help="1: none")
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--keep-loops", action="store_true",
                   help="let a caption that repeats itself run on to --max-new-tokens (by default it ends "
                        "where the loop began, its row saying \"loop\": true)")
    p.add_argument("--lora-alpha", type=cli.non_negative,
                   help="LoRA alpha at load, the share alpha/r of the adapter (default: the adapter's own; a "
                        "PLLaVA release, LoRA inside its weights: 4, as PLLaVA's own scripts use)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", help="default: cuda when there is one, else cpu")
    p.add_argument("--workers", type=cli.positive_int,
                   help="video decoding processes (default: this rank's cores but one, at most 32)")
    p.add_argument("--decode-timeout", type=cli.positive, default=300.0,
                   help="seconds allowed to read one video's (or shot's) frames; finding shots, seconds "
                        "without a frame decoded")
    p.add_argument("--decode-memory", type=cli.positive, default=8.0, help="GiB a decoding process may use")
    p.add_argument("--keyframes-only", action="store_true", help="faster decoding, less exact frame times")
    shots.add_flags(p)
    p.add_argument("--compile", action="store_true",
                   help="compile the decoding step (CUDA graphs on a GPU): minutes to start, then faster")
    p.add_argument("--overwrite", action="store_true",
                   help="caption everything again (also what --out holds from a run with other settings)")
    p.add_argument("--retry-errors", action="store_true",
                   help="try again the videos whose file could not be read too")
    p.add_argument("--max-failures-in-a-row", type=cli.positive_int, default=10,
                   help="stop the run after this many videos in a row failed in the model")
    p.add_argument("--seed", type=int, default=0, help="of the sampling (with --temperature above 0)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the GPU memory this run needs (estimated, and rehearsed on fake tensors at the "
                        "real sizes) and whether it fits --card-gb; load and download nothing")
    p.add_argument("--card-gb", type=cli.positive,
                   help="--dry-run for a GPU of this memory (default: this machine's GPU, else its RAM, in fp32)")
    args = p.parse_args(argv)
    if args.top_p > 1:
        p.error("--top-p must be at most 1")
    if not args.source and not args.dry_run:
        p.error("the videos to caption: a folder, a video file or a list")
    return args


def main(argv=None):
    args = parse_args(argv)
    return cli.run(lambda: dry_run(args) if args.dry_run else caption(args),
                   (OSError, ValueError, hub.HubError, ModelFolderError, Busy, Stop, PoolError, CompileLimit))


if __name__ == "__main__":
    main()
