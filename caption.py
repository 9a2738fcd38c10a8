"""Caption a folder of videos: python caption.py videos/ [--model DIR|hub-id] [--out captions.jsonl]

Videos are decoded in worker processes while the model generates, batch after batch. Each video gets one
JSONL row, a caption or the reason it could not be read, appended as soon as its batch finishes; a rerun
skips what is done. Under torchrun every rank captions its own share of the videos into its own file,
and rank 0 merges them into --out at the end.
"""

import argparse
import datetime
import functools
import json
import os
import sys
import time

import torch

import hub
from checkpoint import CheckpointError
from data import CLIP_MEAN, CLIP_STD, VideoError, find_videos, normalize, read_clip_frames
from generate import can_pack, generate, pack_for_cpu
from jsonl import Appender, read_rows
from model import PLLaVA
from tokenizer import QUESTION, SYSTEM, TEMPLATES, Tokenizer, prompt_ids, stop_id, template_for
from workers import imap_unordered

DEFAULT_MODEL = "ermu2001/pllava-7b"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Caption videos with a PLLaVA model.")
    p.add_argument("source", help="a folder (searched recursively), a video file, or a list (.txt / .jsonl)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="a model folder or a hub id")
    p.add_argument("--out", default="captions.jsonl")
    p.add_argument("--prompt", default=QUESTION, help="the instruction")
    p.add_argument("--system", default=SYSTEM, help="the system line of the prompt template")
    p.add_argument("--template", choices=sorted(TEMPLATES), help="prompt template (default: from the tokenizer)")
    p.add_argument("--frames", type=int, help="frames per video (default: the checkpoint's num_frames)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--lora-alpha", type=float, help="LoRA share alpha/r at load (PLLaVA's inference uses 4)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", help="default: cuda when there is one, else cpu")
    p.add_argument("--workers", type=int, default=4, help="video decoding processes")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed to decode one video")
    p.add_argument("--keyframes-only", action="store_true", help="faster decoding, less exact frame times")
    p.add_argument("--compile", action="store_true",
                   help="compile the decoding step (static cache, CUDA graphs on a GPU): minutes to start, then faster")
    p.add_argument("--overwrite", action="store_true", help="caption everything again")
    p.add_argument("--retry-errors", action="store_true", help="try again the videos that got an error row")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def done_videos(paths, retry_errors):
    done = set()
    for path in paths:
        for row in read_rows(path):
            if "video" in row and ("caption" in row or ("error" in row and not retry_errors)):
                done.add(row["video"])
    return done


def preprocessing(folder, size):
    """Mean and std from preprocessor_config.json when the checkpoint has one, else CLIP's."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return CLIP_MEAN, CLIP_STD
    with open(path) as f:
        config = json.load(f)
    return tuple(config.get("image_mean", CLIP_MEAN)), tuple(config.get("image_std", CLIP_STD))


class Captioner:
    def __init__(self, args, device, dtype):
        self.args, self.device = args, device
        folder = hub.resolve(args.model)
        self.model = PLLaVA.from_pretrained(folder, lora_alpha=args.lora_alpha, dtype=dtype, device=device)
        if can_pack(self.model.language_model) and not args.compile:   # CPU fp32: oneDNN's faster layout
            pack_for_cpu(self.model.language_model)
        self.tok = Tokenizer(folder)
        config = self.model.config
        if self.tok.image_id is None:
            raise CheckpointError(f"{folder}: the tokenizer has no <image> token")
        if self.tok.image_id != config.image_token_index:   # pllava-34b's config says 64002, its tokenizer 64000
            print(f"note: using the tokenizer's <image> id {self.tok.image_id}, not config.json's "
                  f"{config.image_token_index}", file=sys.stderr)
            config.image_token_index = self.tok.image_id
        template = args.template or template_for(self.tok)
        self.prompt = prompt_ids(self.tok, args.prompt, template, args.system)
        self.stop_ids = {stop_id(self.tok, template), self.tok.eos_id}
        self.stops = args.stop or (["USER:"] if template == "vicuna" else [])
        self.frames = args.frames or config.num_frames
        self.size = config.vision_config.image_size
        self.mean, self.std = preprocessing(folder, self.size)
        self.batch_size = args.batch_size
        self.generator = torch.Generator(device=device).manual_seed(args.seed)

    def decoder(self):
        return functools.partial(read_clip_frames, n=self.frames, size=self.size,
                                 keyframes_only=self.args.keyframes_only)

    def caption(self, frames):
        """[(n, H, W, 3) uint8, ...] -> [(caption, new tokens, hit the token limit), ...]; halves the batch
        and tries again when the GPU runs out of memory."""
        try:
            return self._caption(frames)
        except torch.OutOfMemoryError:
            if len(frames) == 1:
                raise
            torch.cuda.empty_cache()
            self.batch_size = max(1, len(frames) // 2)
            print(f"\nout of GPU memory: batch size now {self.batch_size}", file=sys.stderr)
            half = len(frames) // 2
            return self.caption(frames[:half]) + self.caption(frames[half:])

    def _caption(self, frames):
        a = self.args
        pixels = normalize(torch.stack([torch.as_tensor(f) for f in frames]), self.mean, self.std, self.device,
                           self.model.multi_modal_projector.linear_1.weight.dtype)
        ids = torch.tensor([self.prompt] * len(frames), device=self.device)   # one prompt: no padding
        out = generate(self.model, ids, pixels, max_new_tokens=a.max_new_tokens, stop_ids=self.stop_ids,
                       stop_strings=self.stops, decode=self.tok.decode, temperature=a.temperature, top_p=a.top_p,
                       repetition_penalty=a.repetition_penalty, generator=self.generator, compile=a.compile)
        results = []
        for tokens in out:
            text = self.tok.decode(tokens)
            for s in self.stops:
                text = text.split(s)[0]
            results.append((text.strip(), len(tokens), len(tokens) >= a.max_new_tokens))
        return results


def batches(results, size_of):
    """Group the decoder's (video, frames) stream into batches; unreadable videos pass through alone."""
    batch = []
    for video, frames in results:
        if isinstance(frames, VideoError):
            yield [(video, frames)]
            continue
        batch.append((video, frames))
        if len(batch) >= size_of():
            yield batch
            batch = []
    if batch:
        yield batch


def merge(out, parts):
    """Rank 0, at the end: every row of the rank files not already in `out`, then the rank files go."""
    have = {row.get("video") for row in read_rows(out)}
    with Appender(out, fsync=True) as f:
        for part in parts:
            for row in read_rows(part):
                if row.get("video") not in have:
                    f.write(row)
                    have.add(row.get("video"))
    for part in parts:
        os.remove(part)


def main(argv=None):
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    try:
        videos = find_videos(args.source)
        captioner = Captioner(args, device, dtype)
    except (OSError, ValueError, hub.HubError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    parts = [f"{args.out}.rank{r}" for r in range(world)] if world > 1 else []
    mine = parts[rank] if parts else args.out
    done = set() if args.overwrite else done_videos([args.out] + [p for p in parts if os.path.exists(p)],
                                                     args.retry_errors)
    todo = [v for v in videos[rank::world] if v not in done]
    stats = dict(captions=0, errors=0, tokens=0, wait=0.0)
    start = time.monotonic()
    with Appender(mine, truncate=args.overwrite) as out:
        stream = imap_unordered(captioner.decoder(), todo, workers=args.workers, timeout=args.timeout,
                                buffer=2 * args.batch_size)
        waited = time.monotonic()
        for batch in batches(stream, lambda: captioner.batch_size):
            stats["wait"] += time.monotonic() - waited
            if isinstance(batch[0][1], VideoError):
                out.write({"video": batch[0][0], "error": str(batch[0][1])})
                stats["errors"] += 1
            else:
                t0 = time.monotonic()
                results = captioner.caption([frames for _, frames in batch])
                seconds = (time.monotonic() - t0) / len(batch)
                for (video, _), (text, n, truncated) in zip(batch, results):
                    out.write({"video": video, "caption": text, "tokens": n, "truncated": truncated,
                               "seconds": round(seconds, 3), "frames": captioner.frames, "model": args.model})
                    stats["captions"] += 1
                    stats["tokens"] += n
            progress(rank, stats, len(todo), start)
            waited = time.monotonic()
    elapsed = time.monotonic() - start
    if world > 1:
        torch.distributed.barrier()
        if rank == 0:
            merge(args.out, parts)
        torch.distributed.destroy_process_group()
    n = stats["captions"] + stats["errors"]
    print(f"\n[rank {rank}] {stats['captions']} captions, {stats['errors']} unreadable, {len(done)} already done; "
          f"{elapsed:.1f} s, {n / max(elapsed, 1e-9):.2f} videos/s, "
          f"{stats['tokens'] / max(stats['captions'], 1):.0f} tokens per caption, "
          f"{100 * stats['wait'] / max(elapsed, 1e-9):.1f}% of the time waiting for decoding", file=sys.stderr)
    return {**stats, "seconds": elapsed, "already_done": len(done)}


def progress(rank, stats, total, start):
    n = stats["captions"] + stats["errors"]
    rate = n / max(time.monotonic() - start, 1e-9)
    eta = (total - n) / rate if rate > 0 else float("inf")
    print(f"\r[rank {rank}] {n}/{total} videos  {rate:.2f} videos/s  ETA {eta / 60:.1f} min ", end="",
          file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
