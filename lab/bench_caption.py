"""bench.py's rows for captioning as a whole: the engine's continuous against static batching on a
mix of caption lengths, int8 against fp32 weights, the prefill of fewer frames and tokens
(--pooling-shape), and caption.py end to end.

The lengths are forced (each video ends after its own drawn number of tokens, 30 to 256): random
weights never say their stop token, and real captions have that spread. The engine rows are whole
runs: each side warmed up, then three turns of each, alternating; ratios from one run, on the same
videos and weights.
"""

import copy
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import engine as engine_module
from engine import Engine, Item
from generate import Sampling, generate, pack_for_cpu, prefill
from lab import measure
from lab.measure import row, value
from lab.synthetic import clip
from quant import quantize_int8, weight_bytes

SLOTS, VIDEOS = 8, 16


def same_weights(model):
    """The model's weights under a config of its own (recipe() changes only the config): no second
    copy of 26 GB on the card for 13B."""
    view = copy.copy(model)   # a new __dict__ over the same submodules and parameters
    view.config = copy.deepcopy(model.config)
    return view


def videos(model, n, frames, seed=0):
    c, g = model.config, torch.Generator().manual_seed(seed)
    ids = [1] + [5 + i % 50 for i in range(40)] + [c.image_token_index] + [7, 8, 9]
    device = model.language_model.model.embed_tokens.weight.device
    dtype = next(model.vision_tower.parameters()).dtype
    size = c.vision_config.image_size
    return [Item(i, ids, torch.randn(frames, 3, size, size, generator=g).to(device, dtype))
            for i in range(n)]


def bench_engine(ctx):
    """Static batches of SLOTS decode until their longest caption ends; continuous batching refills.
    Both warmed up on a short run, then taken in turns (static, continuous, ...) three times: each
    side's decode phase (its prefills timed apart and taken out) and its whole run."""
    a = ctx["args"]
    # packing for a CPU (what caption.py runs there) changes the layers: a copy
    cpu = a.device == "cpu"
    model = (copy.deepcopy if cpu else same_weights)(ctx["model"])
    model.config.recipe(4, (4,) + tuple(ctx["model"].config.pooling_shape[1:]))
    if cpu:
        pack_for_cpu(model.language_model)
    items = videos(model, VIDEOS, 4)
    lengths = np.random.default_rng(0).integers(30, 257, VIDEOS).tolist()
    sync = lambda: measure.sync(a.device)   # noqa: E731
    whole = {"static": [], "continuous": []}
    stats = {}

    def static(n=VIDEOS):
        prefills, t0 = 0.0, time.perf_counter()
        for k in range(0, n, SLOTS):
            batch = items[k:min(k + SLOTS, n)]
            ids = torch.tensor([it.ids for it in batch], device=a.device)
            pixels = torch.stack([it.pixels for it in batch])
            sync()
            p0 = time.perf_counter()
            x, _, _ = model.prepare(ids, pixels)   # the batch's prefill timed alone, to take it out
            lm = model.language_model
            lm.setup_cache(len(batch), x.shape[1])
            positions = torch.arange(x.shape[1], device=a.device)[None].expand(len(batch), -1)
            prefill(lm, x, positions, None)
            lm.clear_cache()
            sync()
            prefills += time.perf_counter() - p0
            generate(model, ids, pixels,
                     sampling=Sampling(max_new_tokens=max(lengths[k:k + SLOTS]), stop_ids=()))
        sync()
        # the prefills counted once, as generate does them
        total = time.perf_counter() - t0 - prefills
        whole["static"].append(total)
        return total - prefills

    def continuous(n=VIDEOS):
        eng = Engine(model, SLOTS, Sampling(max_new_tokens=256, stop_ids=()))
        t0 = time.perf_counter()
        got = dict(eng.run(Item(it.key, it.ids, it.pixels, m) for it, m in zip(items[:n], lengths)))
        sync()
        total = time.perf_counter() - t0
        assert [len(got[it.key]) for it in items[:n]] == lengths[:n]
        whole["continuous"].append(total)
        stats.update(eng.stats)
        return total - eng.stats["prefill_s"]

    shares = {}

    # the engine's whole run with at most `tokens` prompt tokens a prefill pass
    def prefilled(tokens):
        def run():
            engine_module.PREFILL_TOKENS, before = tokens, engine_module.PREFILL_TOKENS
            try:
                total = continuous() + stats["prefill_s"]
            finally:
                engine_module.PREFILL_TOKENS = before
            shares.setdefault(tokens, []).append(stats["prefill_s"] / total)
            return total
        return run

    with torch.no_grad():
        static(SLOTS // 2), continuous(SLOTS // 2)   # warm-up: a short run of each
        whole = {"static": [], "continuous": []}
        result = measure.compare(continuous, static, a.device, repeats=3, warmup=0)
        ends = {"ours": measure.spread(whole["continuous"]),
                "reference": measure.spread(whole["static"]),
                "pair_ratios": [s / c for s, c in zip(whole["static"], whole["continuous"])]}
        batched = measure.compare(prefilled(engine_module.PREFILL_TOKENS), prefilled(1), a.device,
                                  repeats=3, warmup=0)
    name = f"continuous (ours) vs static batching, {SLOTS} slots, {VIDEOS} videos of 30-256 tokens"
    return [row(f"{name}: decode phase", "tokens/s", result, sum(lengths)),
            row(f"{name}: end to end", "videos/s", ends, VIDEOS),
            value("continuous batching: share of decode row-steps spent on finished rows", "%",
                  100 * stats["finished_row_steps"] / max(stats["row_steps"], 1)),
            row("continuous: arrivals prefilled together (ours) vs one a pass, whole run",
                "videos/s", batched, VIDEOS),
            *[value(f"continuous: prefill share of the time, {what}", "%", 100 * min(shares[k]))
              for what, k in (("one video a pass", 1),
                              ("arrivals together", engine_module.PREFILL_TOKENS))],
            *[value(f"continuous vs static: decode steps of the schedules for {n} such videos "
                    f"(computed, not timed)", "x", schedule_ratio(n)) for n in (VIDEOS, 128)]]


def schedule_ratio(n, seed=0):
    """Decode steps of static batches of SLOTS over those of a continuous schedule (each video in
    the first slot to free up), for n lengths drawn as bench_engine draws them: the most the engine
    can gain there."""
    lengths = np.random.default_rng(seed).integers(30, 257, n).tolist()
    static = sum(max(lengths[k:k + SLOTS]) for k in range(0, n, SLOTS))
    ends = [0] * SLOTS
    for length in lengths:
        ends[ends.index(min(ends))] += length
    return static / max(ends)


def bench_int8(ctx):
    """int8 weights (quant.py) against the fp32 path caption.py runs (packed on a CPU), same
    weights."""
    a, model = ctx["args"], ctx["model"]
    fp = model.language_model   # what caption.py runs: packed on a CPU
    if a.device == "cpu":
        fp = pack_for_cpu(copy.deepcopy(model.language_model))
    q8 = int8_copy(model.language_model)
    rows = [value("int8 weights / fp32 weights, the language model", "x",
                  weight_bytes(q8) / weight_bytes(model.language_model))]
    with torch.no_grad():
        x = measure.embeddings(ctx, 1, 32)
        positions = torch.arange(32, device=a.device)[None]
        want = model.language_model.lm_head(model.language_model(x, positions))
        got = q8.lm_head(q8(x, positions))
        rows.append(value("int8: max |logit error| / max |logit|, 32 positions", "x",
                          float((got - want).abs().max() / want.abs().max())))
        for batch in (1, 8):
            x = measure.embeddings(ctx, batch, ctx["context"])
            result = measure.compare(measure.our_decoder(q8, x, ctx["new_tokens"], None, a.device),
                                     measure.our_decoder(fp, x, ctx["new_tokens"], None, a.device),
                                     a.device, a.repeats)
            q8.clear_cache()
            fp.clear_cache()
            fp32 = "fp32 packed" if a.device == "cpu" else "fp32"
            rows.append(row(f"decode int8 (ours) vs {fp32}, batch {batch}", "tokens/s", result,
                            batch * ctx["new_tokens"]))
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    fused = widening_fused(q8.model.layers[0].mlp.up_proj, 8, dtype, a.device)
    rows.append(value("int8 in a GPU's form (widen, multiply, scale) compiled here, 8 rows: "
                      "widening fused (1) or a widened copy written (0)", "-", int(fused)))
    del q8, fp
    # what the children load must find the card as free as it can be
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()
    rss = {q: caption_peak_rss(ctx, q) for q in ("int8", "none")}
    rows.append(value("caption.py peak RSS, --quantize int8 / none", "x", rss["int8"] / rss["none"])
                | {"detail": {"int8_mb": rss["int8"], "none_mb": rss["none"]}})
    return rows


def widening_fused(layer, rows, dtype, device, mode=None) -> bool:
    """Whether inductor fuses the widening of an int8 weight into its matmul, in the form a GPU runs
    (quant.Int8Linear: F.linear(x, w.to(dtype)) * scales) at `rows` rows: true when the generated
    code writes no buffer of the weight's shape (a widened copy, read again by the matmul: more
    bytes than bf16)."""
    import re

    from torch._inductor.utils import run_and_get_code

    def widened(x, w, s):
        return F.linear(x, w.to(x.dtype)) * s.to(x.dtype)
    gpu = str(device).startswith("cuda")
    mode = mode or ("max-autotune" if gpu else "max-autotune-no-cudagraphs")
    x = torch.randn(rows, layer.weight.shape[1], dtype=dtype, device=device)
    compiled = torch.compile(widened, mode=mode, dynamic=False)
    _, code = run_and_get_code(compiled, x, layer.weight, layer.scales)
    out, inp = layer.weight.shape
    return not re.search(rf"empty_strided_\w+\(\({out}, {inp}\)", "\n".join(code))


def int8_copy(lm):
    """The language model quantized beside the original: its modules copied, its weights shared
    until each is quantized (13B: 13 GB more on the card, not a 26 GB copy first)."""
    shared = {id(t): t for t in list(lm.parameters()) + list(lm.buffers())}
    return quantize_int8(copy.deepcopy(lm, memo=shared))


def caption_peak_rss(ctx, quantize):
    """caption.py on two clips in a fresh process: its peak resident memory, MB."""
    videos_dir, ckpt = caption_world(ctx, 2)
    args = [videos_dir, "--model", ckpt, "--out",
            os.path.join(videos_dir, f"rss-{quantize}.jsonl"), "--overwrite", "--max-new-tokens",
            "4", "--quantize", quantize, "--workers", "1"]
    # VmHWM starts anew at exec; ru_maxrss would not
    code = (f"import caption; caption.main({args!r}); "
            "print([line for line in open('/proc/self/status') if "
            "line.startswith('VmHWM')][0].split()[1])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=measure.ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"caption.py failed: {r.stderr[-2000:]}")
    return int(r.stdout.split()[-1]) / 1024


def bench_recipe(ctx):
    """Open-Sora's recipe (4 frames pooled to 4 x H' x W'): fewer visual tokens, a shorter
    prefill."""
    a = ctx["args"]
    full, few = same_weights(ctx["model"]), same_weights(ctx["model"])
    T, H, W = full.config.pooling_shape
    few.config.recipe(4, (4, H, W))
    lm = full.language_model   # the same weights for both

    def prefill_of(model, frames):
        item = videos(model, 1, frames)[0]

        def run():
            x, _, _ = model.prepare(torch.tensor([item.ids], device=a.device), item.pixels[None])
            lm.setup_cache(1, x.shape[1])
            prefill(lm, x, torch.arange(x.shape[1], device=a.device)[None], None)
            lm.clear_cache()
        return run
    with torch.no_grad():
        result = measure.compare(prefill_of(few, 4), prefill_of(full, full.config.num_frames),
                                 a.device, a.repeats)
    return [row(f"frames + prefill: 4 frames pooled {4}x{H}x{W} ({4 * H * W} tokens) vs "
                f"{full.config.num_frames} pooled {T}x{H}x{W} ({T * H * W})", "s", result)]


def caption_world(ctx, n):
    """n synthetic 10 s 854x480 clips and a checkpoint of the benchmark's size, for caption.py
    (cached)."""
    from config import Config
    from model import PLLaVA
    from tokenizer import Tokenizer, train_tokenizer
    a = ctx["args"]
    folder = os.path.join(a.cache, "e2e", f"videos{n}")
    os.makedirs(folder, exist_ok=True)
    for k in range(n):
        clip(os.path.join(folder, f"clip_{k:02d}.mp4"), 854, 480, 250, k, preset="ultrafast")
    ckpt = os.path.join(a.cache, "e2e", f"model_{a.size}")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        train_tokenizer(ckpt, ["a video of a thing that moves across the screen"] * 50, 300)
        cfg = ctx["model"].config.to_dict()
        cfg["image_token_index"] = Tokenizer(ckpt).image_id
        # 13B: 26 GB, not 52
        PLLaVA.from_config(Config.from_dict(cfg), dtype=ctx["dtype"]).save_pretrained(ckpt)
    return folder, ckpt


def bench_end2end(ctx):
    """caption.py's own path on synthetic videos, in a process of its own (as a user starts it):
    videos/s, and the time spent waiting for decoding."""
    a = ctx["args"]
    folder, ckpt = caption_world(ctx, 8)
    args = [folder, "--model", ckpt, "--out", os.path.join(folder, "c.jsonl"), "--overwrite",
            "--max-new-tokens", str(ctx["new_tokens"]), "--batch-size", "4", "--workers", "2",
            "--device", a.device, "--dtype", str(ctx["dtype"]).split(".")[1]]
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()
    r = subprocess.run([sys.executable, "-c",
                        f"import caption, json; print(json.dumps(caption.main({args!r})))"],
                       capture_output=True, text=True, cwd=measure.ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"caption.py failed: {r.stderr[-2000:]}")
    stats = json.loads(r.stdout.splitlines()[-1])
    n = stats["captions"] + stats["errors"]
    e = stats["engine"]
    return [value(f"caption.py end to end, {n} videos", "videos/s", n / stats["seconds"]),
            value("caption.py: decode steps that waited for frames", "%",
                  100 * e["waited_steps"] / max(e["steps"], 1)),
            value("caption.py: time the engine stood idle waiting for frames", "%",
                  100 * e["wait_s"] / stats["seconds"])]


def bench_shots(ctx):
    """shots.py in a process of its own held to one core, on the sampler's long clip and on one a
    quarter as long: its speed against the clip's own time, and its peak memory at both lengths (it
    streams: a few 64x36 frames whatever the length, so the two peaks match). The peak is VmHWM,
    which starts anew at exec (ru_maxrss would carry the parent's)."""
    minutes, peaks = ctx["args"].sampler_minutes, []
    for m in (minutes / 4, minutes):
        path = clip(os.path.join(ctx["args"].cache, f"long_{m:g}min_b.mp4"), 640, 360,
                    int(m * 1500), preset="veryfast", g="250")
        code = ("import json, os, time, shots\n"
                "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
                f"t = time.perf_counter(); found = shots.shots({path!r})\n"
                "t = time.perf_counter() - t\n"
                "status = open('/proc/self/status').read().splitlines()\n"
                "hwm = [line for line in status if line.startswith('VmHWM')][0]\n"
                "print(json.dumps({'seconds': t, 'shots': len(found),\n"
                "                  'peak_mb': int(hwm.split()[1]) / 1024}))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=measure.ROOT)
        if r.returncode != 0:
            raise RuntimeError(f"shots.py failed: {r.stderr[-2000:]}")
        got = json.loads(r.stdout.splitlines()[-1])
        peaks.append(got["peak_mb"])
    frames, seconds = int(minutes * 1500), minutes * 60
    return [value(f"shot detection, {minutes:g}-minute 640x360 clip, one core", "frames/s",
                  frames / got["seconds"]),
            value("shot detection: times real time (25 fps)", "x", seconds / got["seconds"]),
            value(f"shot detection: peak RSS of its process, {minutes / 4:g} min clip", "MB",
                  peaks[0]),
            value(f"shot detection: peak RSS of its process, {minutes:g} min clip (Python and "
                  f"PyAV included)", "MB", peaks[1])]
