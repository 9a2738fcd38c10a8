"""Caption a folder of videos: python caption.py videos/ [--model DIR|hub-id] [--out captions.jsonl] [--shots]

Videos are decoded in worker processes while the model generates (engine.py keeps --batch-size videos
decoding at once). Each video gets one JSONL row, a caption or the reason it could not be read, appended
as soon as it ends; with --shots (or --window) each shot of it gets one, with its start and end in
seconds. A rerun skips what is done (resume keys on the canonical path, however it is spelled, and the
shot) and tries again what failed for another reason than the file; every caption carries the id of the
settings that made it, and a rerun with other settings refuses the file. Under torchrun every rank
captions its own share of the videos into its own file, and rank 0 merges them into --out at the end. A
second run writing the same --out stops at once.
"""

import contextlib
import datetime
import functools
import glob
import hashlib
import json
import os
import re
import sys
import time

import torch

import shots
from config import PRESETS, Config
from data import VideoError, mean_std, normalize
from engine import Engine, Item, OutOfMemory
from generate import Sampling, can_pack, pack_for_cpu
from lora import merge_lora
from model import PLLaVA
from plumbing import cli, hub, memory
from plumbing.cli import Stop
from plumbing.jsonl import Appender, Busy, iter_rows
from plumbing.sources import canonical, find_videos
from plumbing.workers import PoolError, imap_unordered
from quant import quantize_int8
from tokenizer import QUESTION, SYSTEM, TEMPLATES, Tokenizer, load_prompt, prompt_ids, stop_id, template_for
from weights import ModelFolderError, read_config

DEFAULT_MODEL = "ermu2001/pllava-7b"
UNREADABLE = "unreadable_video"


def parse_args(argv=None):
    p = cli.Parser(description="Caption videos with a PLLaVA model.")
    p.add_argument("source", help="a folder (searched recursively), a video file, or a list (.txt / .jsonl)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="a model folder or a hub id")
    p.add_argument("--out", default="captions.jsonl", help="the JSONL file the rows are appended to")
    p.add_argument("--prompt", help="the instruction (default: the model folder's prompt.json, which train.py "
                                    "--export writes, else PLLaVA's detailed-caption question)")
    p.add_argument("--system", help="the system line of the prompt template (default: prompt.json's, else PLLaVA's)")
    p.add_argument("--template", choices=sorted(TEMPLATES),
                   help="prompt template (default: prompt.json's, else from the tokenizer)")
    p.add_argument("--frames", type=cli.positive_int, help="frames per video (default: the checkpoint's num_frames)")
    p.add_argument("--pooling-shape", type=cli.shape, metavar="T,H,W",
                   help="visual tokens per video, (time, height, width) (default: the checkpoint's; Open-Sora: 4,12,12)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: the LLM's weights as int8 (a quarter of fp32's memory, half of bf16's)")
    p.add_argument("--batch-size", type=cli.positive_int, default=8,
                   help="videos decoded together; a video that ends hands its slot to the next")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=256, help="a caption's length, at most, in tokens")
    p.add_argument("--temperature", type=cli.non_negative, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=cli.positive, default=1.0, help="nucleus sampling (with --temperature above 0)")
    p.add_argument("--repetition-penalty", type=cli.positive, default=1.0, help="1: none")
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
    shots.add_flags(p)
    p.add_argument("--compile", action="store_true",
                   help="compile the decoding step (static cache, CUDA graphs on a GPU): minutes to start, then faster")
    p.add_argument("--overwrite", action="store_true",
                   help="caption everything again (also what --out holds from a run with other settings)")
    p.add_argument("--retry-errors", action="store_true",
                   help="try again the videos whose file could not be read too")
    p.add_argument("--max-failures-in-a-row", type=cli.positive_int, default=10,
                   help="stop the run after this many videos in a row failed in the model")
    p.add_argument("--seed", type=int, default=0, help="of the sampling (with --temperature above 0)")
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


def asked(args, folder, tok):
    """The prompt (question, system line, template): the flags, else the model folder's prompt.json (what
    it was trained with), else PLLaVA's."""
    saved = load_prompt(folder)
    return {"question": args.prompt or saved.get("question", QUESTION), "system": args.system or saved.get("system", SYSTEM),
            "template": args.template or saved.get("template") or template_for(tok)}


SETTINGS = ("frames", "pooling_shape", "lora_alpha", "quantize", "max_new_tokens", "temperature", "top_p",
            "repetition_penalty", "stop", "keyframes_only", "shots", "window", "min_shot", "max_shot")


def settings_id(args, folder, prompt) -> str:
    """What makes a caption what it is (the model, the prompt, the frames and tokens, the adapter's share,
    the sampling, the spans), as a short hash every row carries: a rerun with other settings must not keep
    the old captions as if they were its own. How it runs (device, dtype, batch size) is not in it."""
    model = os.path.realpath(folder) if os.path.isdir(args.model) else args.model
    what = {"model": model, **prompt, **{k: getattr(args, k) for k in SETTINGS}}
    if args.temperature > 0:
        what["seed"] = args.seed
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def check_settings(paths, settings):
    """Refuse to go on with an --out whose captions another setting made."""
    for path in paths:
        other = sum(1 for r in iter_rows(path) if "caption" in r and r.get("settings") != settings)
        if other:
            raise ValueError(f"{path} holds {other} captions made with other settings (model, prompt, frames, "
                             f"pooling, LoRA alpha, quantization, sampling or --shots / --window): caption into "
                             f"another --out, or pass --overwrite to caption everything again")


class Captioner:
    def __init__(self, args, device, dtype, folder, check=None):
        """The model of `folder` loaded for these flags; check(settings id) is called before it loads."""
        self.args, self.device, self.dtype = args, device, dtype
        self.tok = Tokenizer(folder)
        asks = asked(args, folder, self.tok)
        self.settings = settings_id(args, folder, asks)
        recipe(read_config(folder), args)   # flags that cannot work with this model fail before it loads
        if check:
            check(self.settings)
        int8 = args.quantize == "int8"   # loaded on the CPU (memory-mapped), onto the device as int8
        self.model = PLLaVA.from_pretrained(folder, lora_alpha=args.lora_alpha, dtype=dtype,
                                            device="cpu" if int8 else device)
        config = self.model.config
        if self.tok.image_id is None:
            raise ModelFolderError(f"{folder}: the tokenizer has no <image> token")
        if self.tok.image_id != config.image_token_index:   # pllava-34b's config says 64002, its tokenizer 64000
            print(f"note: using the tokenizer's <image> id {self.tok.image_id}, not config.json's "
                  f"{config.image_token_index}", file=sys.stderr)
            config.image_token_index = self.tok.image_id
        recipe(config, args)
        lm = self.model.language_model
        if int8:
            quantize_int8(lm, device)
            self.model.to(device)   # the vision tower, projector and norms, in the compute dtype
        elif can_pack(lm) and not args.compile:   # CPU fp32: oneDNN's faster layout
            pack_for_cpu(lm)
        else:   # one product per layer instead of three: the adapter folded in, at the alpha loaded
            merge_lora(lm)
        template = asks["template"]
        self.prompt = prompt_ids(self.tok, asks["question"], template, asks["system"])
        self.stops = args.stop or (["USER:"] if template == "vicuna" else [])
        self.frames, self.size = config.num_frames, config.vision_config.image_size
        self.mean, self.std = mean_std(folder)
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty,
                            tuple({stop_id(self.tok, template), self.tok.eos_id} - {None}), tuple(self.stops))
        self.engine = Engine(self.model, args.batch_size, sampling, self.tok.decode,
                             torch.Generator(device=device).manual_seed(args.seed),
                             compile_mode="auto" if args.compile else None)

    def decoder(self):
        """The decode workers' job: (video, shot or None, None) -> the frames of the shot, or of the video."""
        return functools.partial(shots.shot_frames, n=self.frames, size=self.size,
                                 keyframes_only=self.args.keyframes_only)

    def items(self, stream, unreadable, failed):
        """The decoder's (job, frames) stream as the engine's Items; a job that cannot be read goes to
        unreadable(job, error) instead, one whose frames cannot go to the device to failed(job, error)."""
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
        if isinstance(tokens, (OutOfMemory, Exception)):
            return self.error(job, tokens, "internal_error")
        text = self.tok.decode(tokens)
        for s in self.stops:
            text = text.split(s)[0]
        return {"video": job[0], **shots.fields(job[1]), "caption": text.strip(), "tokens": len(tokens),
                "truncated": len(tokens) >= self.args.max_new_tokens, "frames": self.frames, "model": self.args.model,
                "settings": self.settings}

    @staticmethod
    def error(job, error, code):
        why = str(error) if isinstance(error, (VideoError, OutOfMemory)) else f"{type(error).__name__}: {error}"
        return {"video": job[0], **shots.fields(job[1]), "error": why, "code": code}


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
    have = out.settle(shots.row_key, is_done)
    for part in parts:
        for row in iter_rows(part):
            if is_done(row) and shots.row_key(row) not in have:
                out.write(row)
                have.add(shots.row_key(row))
    for part in parts:
        os.remove(part)


def main(argv=None):
    args = parse_args(argv)
    return cli.run(lambda: dry_run(args) if args.dry_run else caption(args),
                   (OSError, ValueError, hub.HubError, ModelFolderError, Busy, Stop, PoolError))


def dry_run(args):
    """The memory plan (memory.captioning) of a preset (pllava-7b/13b/34b) or a local model folder's
    config.json (a hub id would mean a download)."""
    config = Config.from_dict(PRESETS[args.model]) if args.model in PRESETS else read_config(args.model)
    recipe(config, args)
    card = args.card_gb or memory.card_gb()
    dtype_bytes = 4 if args.dtype == "float32" else 2
    need = memory.captioning(config, args.batch_size, args.max_new_tokens, dtype_bytes, args.quantize == "int8")
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
        others = [] if world == 1 or args.overwrite else [args.out] + [p for p in rank_files(args.out) if p != mine]
        captioner = Captioner(args, device, dtype, hub.resolve(args.model),
                              check=lambda settings: check_settings([out.path] + others, settings))
        key, done_row = shots.row_key, functools.partial(is_done, retry_errors=args.retry_errors)
        done = out.settle(key, done_row)
        if world > 1:
            if rank == 0:
                merged.settle(key, done_row)
            torch.distributed.barrier()
            done |= {key(r) for p in others for r in iter_rows(p) if done_row(r)}   # the merged file, older rank files
        videos = videos[rank::world]
        if shots.finder(args):   # a video is done when each of its shots is
            of = shots.counts([out.path] + others)
            todo = [v for v in videos if not shots.whole(v, done, of)]
        else:
            todo = [v for v in videos if (canonical(v), None) not in done]
        stats = run(captioner, out, todo, done, rank, args, len(videos) - len(todo))
        tried = torch.tensor([stats["captions"], stats["errors"] + stats["missing"] + stats["failed"]])
        if world > 1:
            torch.distributed.all_reduce(tried)   # a barrier too: every rank has written its rows
            if rank == 0:
                merge(merged, rank_files(args.out))
            torch.distributed.destroy_process_group()
    captions, failures = tried.tolist()
    if failures and not captions:   # a run that captioned nothing did not work, whatever stopped it
        raise Stop(f"no video was captioned: {failures} failed or could not be read (their rows are in {args.out})")
    return stats


def rank_files(out):
    return sorted(p for p in glob.glob(glob.escape(out) + ".rank*") if re.fullmatch(r".*\.rank\d+", p))


def run(captioner, out, todo, done, rank, args, already):
    """Caption the videos `todo` (or their shots not `done`) into `out`; the summary on stderr, and the
    counts returned."""
    stats = dict(captions=0, errors=0, missing=0, failed=0, tokens=0, wait=0.0)   # errors: unreadable files
    if shots.finder(args):
        stats["cut"] = 0
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

    def unreadable(job, error):   # a missing file is not done: a fixed path gets it captioned
        write(captioner.error(job, error, UNREADABLE if os.path.exists(job[0]) else "missing_video"))
    decode = functools.partial(imap_unordered, workers=args.workers, timeout=args.decode_timeout,
                               buffer=2 * args.batch_size, memory_gb=args.decode_memory)
    if shots.finder(args):   # each video's shots found in decode workers, then each shot captioned alone
        jobs = shots.jobs(shots.counted(decode(shots.finder(args), todo), stats), done)
    else:
        jobs = [(v, None, None) for v in todo]
    items = captioner.items(waiting_time(decode(captioner.decoder(), jobs), stats), unreadable,
                            lambda job, e: write(captioner.error(job, e, "internal_error")))
    while True:
        try:
            for job, tokens in engine.run(items):
                write(captioner.row(job, tokens))
            break
        except (KeyboardInterrupt, Stop, PoolError):
            raise
        except Exception as e:   # a failure in the model: the videos in flight get its row, the others go on
            for item in list(engine.waiting):
                write(captioner.error(item.key, e, "internal_error"))
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
    elapsed = max(time.monotonic() - start, 1e-9)
    if "cut" in stats:   # per shot: how many rows, and the ETA by the videos cut so far
        done, what = stats["cut"], f"{n} shots, {stats['cut']}/{total} videos cut"
    else:
        done, what = n, f"{n}/{total} videos"
    eta = (total - done) * elapsed / done if done else float("inf")
    print(f"\r[rank {rank}] {what}  {n / elapsed:.2f} rows/s  slots {engine.occupied}/{engine.slots}  "
          f"ETA {eta / 60:.1f} min ", end="", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
