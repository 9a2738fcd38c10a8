"""bench.py's pipeline section: caption.py end to end on real-size videos against its two stages
alone.

caption.py decodes frames in worker processes while the engine generates; at best it runs at the
rate of the slower stage. For 640x360 and 1080p clips and two models, one small enough that decoding
frames is the bottleneck (tiny) and one where the model is (small), it measures: frames alone (the
decode workers as caption.py starts them, nothing consuming but a loop), the model alone (the engine
over frames already in memory), and caption.py end to end (its own run time, the model loaded
before), and reports end to end over min(frames, model). On a CPU the two stages share the cores, so
the ratio to 1 / (1/frames + 1/model), what one set of cores doing both in turn would reach, is
reported too.
"""

import json
import os
import subprocess
import sys
import time

import torch

from lab import measure
from lab.measure import value
from lab.synthetic import clip

# width, height, frames (25 fps)
FORMATS = {"640x360": (640, 360, 250), "1080p": (1920, 1080, 125)}
MODELS = {"frames-bound": ("tiny", 24), "model-bound": ("small", 6)}   # lab/bench.py's size, clips


def checkpoint(cache, size):
    """A random-weight checkpoint of lab/bench.py's size `size`, with a tokenizer (made once,
    cached)."""
    from config import Config
    from lab.measure import SIZES
    from model import PLLaVA
    from tokenizer import Tokenizer, train_tokenizer
    folder = os.path.join(cache, "pipeline", f"model_{size}")
    if not os.path.exists(os.path.join(folder, "config.json")):
        train_tokenizer(folder, ["a video of a thing that moves across the screen"] * 50, 300)
        config = Config.from_dict({**SIZES[size], "image_token_index": Tokenizer(folder).image_id})
        PLLaVA.from_config(config).save_pretrained(folder)
    return folder


def frames_alone(args, videos, captioner):
    """Videos/s of the decode workers as caption.py starts them, and the frames they gave
    (normalized)."""
    from captioning.placement import decode_workers, decoder_threads
    from plumbing.workers import imap_unordered
    t = time.perf_counter()
    stream = imap_unordered(captioner.frame_reader(), [(v, None, None) for v in videos],
                            workers=decode_workers(args), timeout=300,
                            buffer=2 * captioner.engine.slots,
                            threads=decoder_threads(args))
    items = list(captioner.items(stream, lambda job, e: None, lambda job, e: None))
    return len(videos) / (time.perf_counter() - t), items


def model_alone(captioner, items):
    """Videos/s of the engine over frames already in memory."""
    t = time.perf_counter()
    n = sum(1 for _ in captioner.engine.run(list(items)))
    return n / (time.perf_counter() - t)


def end_to_end(argv):
    """caption.py in a process of its own: videos/s over its run (after the model is loaded), the
    engine's share of steps that waited for frames."""
    code = f"import caption, json; print(json.dumps(caption.main({argv!r})))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=measure.ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"caption.py failed: {r.stderr[-2000:]}")
    stats = json.loads(r.stdout.splitlines()[-1])
    e = stats["engine"]
    return stats["captions"] / stats["seconds"], 100 * e["waited_steps"] / max(e["steps"], 1)


def bench_pipeline(ctx):
    import caption
    from plumbing.sources import find_videos
    a, rows = ctx["args"], []
    for fmt, (w, h, n) in FORMATS.items():
        for regime, (size, clips) in MODELS.items():
            folder = os.path.join(a.cache, "pipeline", f"{fmt}-{clips}")
            os.makedirs(folder, exist_ok=True)
            for k in range(clips):
                clip(os.path.join(folder, f"clip_{k:02d}.mp4"), w, h, n, k, preset="ultrafast")
            ckpt = checkpoint(a.cache, size)
            argv = [folder, "--model", ckpt, "--out", os.path.join(a.cache, "pipeline", "c.jsonl"),
                    "--overwrite", "--max-new-tokens", str(ctx["new_tokens"]), "--device", a.device]
            args = caption.parse_args(argv)
            captioner = caption.Captioner(args, ckpt)
            dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
            captioner.load(a.device, dtype)
            frames, items = frames_alone(args, find_videos(folder), captioner)
            model = model_alone(captioner, items)
            both, waited = end_to_end(argv)
            name = f"pipeline, {clips} {fmt} clips, {regime} ({size})"
            rows += [value(f"{name}: frames alone", "videos/s", frames),
                     value(f"{name}: model alone", "videos/s", model),
                     value(f"{name}: end to end", "videos/s", both),
                     value(f"{name}: end to end / min(frames, model)", "x",
                           both / min(frames, model)),
                     value(f"{name}: end to end / both on one set of cores in turn", "x",
                           both * (1 / frames + 1 / model)),
                     value(f"{name}: decode steps that waited for frames", "%", waited)]
    return rows
