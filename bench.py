"""Speed and memory, ours against transformers (+ peft), side by side in one run, and against the hardware.

    python bench.py [--size tiny|small|7b|13b] [--device cpu|cuda] [--only vision,decode,...] [--json FILE]

The same random weights go into our model and into transformers' CLIPVisionModel / LlamaForCausalLM, every
measurement runs for both in this process (medians of --repeats), and the table gives ratios where > 1
means we are better. Memory is measured in child processes, each starting clean. 7b / 13b are the PLLaVA
presets in bf16, for a GPU; on a CPU use tiny or small (a ~130M-parameter LLM).
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import numpy as np
import torch

from config import PRESETS, Config
from generate import Sampling, can_pack, generate_from_embeddings, pack_for_cpu
from lora import add_lora
from model import PLLaVA
from synthetic import write_video

SIZES = {
    "tiny": dict(vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=112, patch_size=14),
                 text_config=dict(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=4), pooling_shape=[16, 4, 4]),
    "small": dict(vision_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                     num_attention_heads=6, image_size=336, patch_size=14),
                  text_config=dict(vocab_size=32064, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                   num_attention_heads=12, max_position_embeddings=4096), pooling_shape=[16, 12, 12]),
    "7b": PRESETS["pllava-7b"], "13b": PRESETS["pllava-13b"],
}
SECTIONS = ("vision", "prefill", "decode", "roofline", "sampler", "train", "load", "end2end")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", help=f"comma-separated sections of {','.join(SECTIONS)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, help="decode length (default 200 on GPU, 32 on CPU)")
    p.add_argument("--decode-context", type=int, help="prompt length for the decode test (default: visual "
                                                     "tokens + 64 on GPU, 256 on CPU)")
    p.add_argument("--load-gb", type=float, default=1.0, help="checkpoint size for the loading test")
    p.add_argument("--compile", action="store_true", help="also measure the compiled decoding step")
    p.add_argument("--json", help="write the rows here too")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def row(name, unit, ours, reference, higher_is_better=True):
    ratio = None if reference in (None, 0) or ours in (None, 0) else (ours / reference if higher_is_better
                                                                     else reference / ours)
    return {"name": name, "unit": unit, "ours": ours, "reference": reference, "ratio": ratio}


def config_for(size):
    return Config.from_dict(SIZES[size])


def reference_models(model, device, dtype):
    """transformers' CLIPVisionModel and LlamaForCausalLM holding our model's weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    c = model.config
    text = {k: v for k, v in asdict(c.text_config).items() if v is not None}
    clip = CLIPVisionModel(CLIPVisionConfig(**asdict(c.vision_config))).to(device, dtype).eval()
    clip.load_state_dict(model.vision_tower.vision_model.state_dict())   # transformers 5: no vision_model level
    lm = LlamaForCausalLM(LlamaConfig(**text)).to(device, dtype).eval()
    lm.load_state_dict(model.language_model.state_dict())
    return clip, lm


# ------------------------------------------------------------------------------------------ sections


def bench_vision(ctx):
    m, clip, a = ctx["model"], ctx["clip"], ctx["args"]
    c = m.config.vision_config
    frames = torch.randn(16, 3, c.image_size, c.image_size, device=a.device, dtype=ctx["dtype"])
    with torch.no_grad():
        ours = median_time(lambda: m.vision_tower.vision_model(frames, m.config.vision_feature_layer), a.device, a.repeats)
        ref = median_time(lambda: clip(frames, output_hidden_states=True).hidden_states[m.config.vision_feature_layer],
                          a.device, a.repeats)
    return [row("vision tower, 16 frames", "frames/s", 16 / ours, 16 / ref)]


def embeddings(ctx, batch, length):
    D = ctx["model"].config.text_config.hidden_size
    g = torch.Generator(device=ctx["args"].device).manual_seed(0)
    return 0.02 * torch.randn(batch, length, D, device=ctx["args"].device, dtype=ctx["dtype"], generator=g)


def bench_prefill(ctx):
    m, ref, a = ctx["fast_lm"], ctx["lm"], ctx["args"]
    n = ctx["model"].config.num_visual_tokens + 64
    x = embeddings(ctx, 1, n)

    def ours():
        m.setup_cache(1, n + 1)
        m.lm_head(m(x, torch.arange(n, device=a.device)[None], None, torch.arange(n, device=a.device))[:, -1])
        m.clear_cache()
    with torch.no_grad():
        t_ours = median_time(ours, a.device, a.repeats)
        t_ref = median_time(lambda: ref(inputs_embeds=x, use_cache=True, logits_to_keep=1), a.device, a.repeats)
    return [row(f"prefill, {n} tokens ({n - 64} visual + 64)", "s", t_ours, t_ref, higher_is_better=False)]


def decode_paths(ctx):
    """Our decoding paths: plain; packed for oneDNN (what caption.py runs on a CPU); compiled (--compile)."""
    lm = ctx["model"].language_model
    paths = {"plain": (lm, None)}   # (language model, compile mode)
    if can_pack(lm):
        paths["packed"] = (pack_for_cpu(copy.deepcopy(lm)), None)
    if ctx["args"].compile:
        paths["compiled"] = (lm, "auto")
    return paths


def decode_rate(ctx, batch, run):
    """Tokens/s of the decoding steps alone: (time for N new tokens - time for 1) / (N - 1), per row."""
    N, a = ctx["new_tokens"], ctx["args"]
    with torch.no_grad():
        t_n = median_time(lambda: run(N), a.device, a.repeats)
        t_1 = median_time(lambda: run(1), a.device, a.repeats)
    return batch * (N - 1) / max(t_n - t_1, 1e-9)


def bench_decode(ctx):
    a, ref, rows = ctx["args"], ctx["lm"], []
    for batch in (1, 8):
        x = embeddings(ctx, batch, ctx["context"])
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=a.device)
        theirs = decode_rate(ctx, batch, lambda k: ref.generate(
            inputs_embeds=x, attention_mask=valid.long(), max_new_tokens=k, min_new_tokens=k, do_sample=False,
            pad_token_id=0, eos_token_id=None))
        for name, (lm, mode) in ctx["paths"].items():
            ours = decode_rate(ctx, batch, lambda k: generate_from_embeddings(
                lm, x, valid, sampling=Sampling(max_new_tokens=k, stop_ids=()), compile_mode=mode))
            ctx["decode"][name, batch] = ours
            rows.append(row(f"decode ({name}), batch {batch}, {ctx['new_tokens']} new tokens after "
                            f"{ctx['context']}", "tokens/s", ours, theirs))
    return rows


def bench_roofline(ctx):
    """Bytes one batch-1 decode step must read (the weights, the KV cache) over its measured time, against
    the bandwidth of a large copy measured here."""
    a, m = ctx["args"], ctx["model"]
    n_bytes = 512 * 2 ** 20
    src = torch.empty(n_bytes, dtype=torch.uint8, device=a.device)
    dst = torch.empty_like(src)
    bandwidth = 2 * n_bytes / median_time(lambda: dst.copy_(src), a.device, max(a.repeats, 5))   # read + write
    c, size = m.config.text_config, torch.finfo(ctx["dtype"]).bits // 8
    weights = sum(p.numel() for n, p in m.language_model.named_parameters() if "embed_tokens" not in n) * size
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * (ctx["context"] + ctx["new_tokens"] / 2) * size
    rows = [row("memory bandwidth (copy of 512 MB: bytes read + written / s)", "GB/s", bandwidth / 1e9, None)]
    if not ctx["decode"]:
        bench_decode(ctx)
    for (name, batch), rate in ctx["decode"].items():
        if batch == 1:
            rows.append(row(f"decode ({name}), batch 1: weights + KV cache read per second, share of the "
                            "bandwidth", "%", 100 * (weights + kv) * rate / bandwidth, None))
    return rows


def long_clip(folder, minutes=5):
    """A synthetic 640x360 clip, 25 fps, x264 veryfast (B-frames), a keyframe every 10 s (cached)."""
    path = os.path.join(folder, f"long_{minutes}min_b.mp4")
    if not os.path.exists(path):
        y, x = np.mgrid[0:360, 0:640]
        write_video(path, (np.stack([(x + 3 * i) % 256, (y + i) % 256, (x + y) % 256], -1).astype(np.uint8)
                           for i in range(minutes * 60 * 25)), fps=25, options={"preset": "veryfast", "g": "250"})
    return path


def bench_sampler(ctx):
    import av
    from data import read_frames
    path = long_clip(ctx["cache"])

    def decode_all():
        with av.open(path) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            frames = list(range(s.frames))
            keep = {frames[int((i + 0.5) * len(frames) / 16)] for i in range(16)}
            for i, f in enumerate(c.decode(s)):
                if i in keep:
                    f.to_ndarray(format="rgb24")
    ours = median_time(lambda: read_frames(path, 16), "cpu", ctx["args"].repeats)
    ref = median_time(decode_all, "cpu", 1, warmup=0)
    return [row("16 frames from a 5-minute 640x360 clip (vs decoding every frame)", "ms/video", 1000 * ours,
                1000 * ref, higher_is_better=False)]


def child(name, kwargs):
    """Run a memory measurement in a fresh process; it prints one JSON line."""
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps({"name": name, **kwargs})],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"child {name} failed: {r.stderr[-2000:]}")
    return json.loads(lines[-1])


def rss_mb():
    """Resident memory now, from /proc (file-backed pages of memory-mapped weights included)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """The highest resident memory seen while the block runs, sampled every millisecond on a thread."""

    def __enter__(self):
        import threading
        self.start = self.peak = rss_mb()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.done.wait(0.001):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, rss_mb())


def train_step_child(k):
    """One LoRA training step of the LLM (q_proj, k_proj, r=128, alpha=32, AdamW), ours or transformers + peft,
    on the same embeddings; the loss on the last 64 positions. Returns samples/s and peak memory."""
    device, dtype = k["device"], getattr(torch, k["dtype"])
    model = PLLaVA.from_config(config_for(k["size"]), dtype=dtype, device=device)
    lm = model.language_model
    x = (0.02 * torch.randn(k["batch"], k["length"], lm.config.hidden_size)).to(device, dtype)
    labels = torch.randint(0, lm.config.vocab_size, (k["batch"], k["length"]), device=device)
    labels[:, :-64] = -100
    if k["impl"] == "ours":
        add_lora(lm, r=128, alpha=32, dropout=0.0)
        for n, p in lm.named_parameters():
            p.requires_grad = ".lora_" in n

        def loss_fn():
            h = lm(x, torch.arange(k["length"], device=device)[None].expand(k["batch"], -1))
            keep = labels[:, 1:] != -100
            return torch.nn.functional.cross_entropy(lm.lm_head(h[:, :-1][keep]).float(), labels[:, 1:][keep])
        params = [p for p in lm.parameters() if p.requires_grad]
    else:
        from peft import LoraConfig, get_peft_model
        _, ref = reference_models(model, device, dtype)
        del model, lm
        ref = get_peft_model(ref, LoraConfig(r=128, lora_alpha=32, target_modules=["q_proj", "k_proj"], lora_dropout=0.0))

        def loss_fn():
            return ref(inputs_embeds=x, labels=labels).loss
        params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()   # the optimizer state exists from here on, as in a training run
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem:
        t = median_time(step, device, k["repeats"], warmup=0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else mem.peak - mem.start
    return {"samples_per_s": k["batch"] / t, "peak_mb": peak}


def load_child(k):
    """Load a checkpoint, ours or transformers', and touch every weight (a lazily mapped file counts in full).
    Either the time it takes (k["timed"]: nothing else running) or the peak RSS (sampled on a thread)."""
    import contextlib
    import checkpoint  # noqa: F401  (imports out of the measurement, for both)
    from transformers import LlavaForConditionalGeneration
    t = time.perf_counter()
    with contextlib.nullcontext() if k["timed"] else PeakRSS() as mem:
        if k["impl"] == "ours":
            model = PLLaVA.from_pretrained(k["path"])
        else:
            model = LlavaForConditionalGeneration.from_pretrained(k["path"], dtype=torch.float32)
        total = sum(float(p.sum()) for p in model.parameters())
    if k["timed"]:
        return {"seconds": time.perf_counter() - t, "checksum": total}
    return {"peak_mb": mem.peak, "before_mb": mem.start, "checksum": total}


def bench_train(ctx):
    a = ctx["args"]
    batch, length = (2, 640) if a.device == "cpu" else (4, ctx["model"].config.num_visual_tokens + 128)
    common = dict(size=a.size, device=a.device, dtype=str(ctx["dtype"]).split(".")[1], batch=batch, length=length,
                  repeats=a.repeats)
    ours, ref = child("train", {**common, "impl": "ours"}), child("train", {**common, "impl": "reference"})
    return [row(f"LoRA training step, batch {batch} x {length} tokens", "samples/s", ours["samples_per_s"],
                ref["samples_per_s"]),
            row("LoRA training step: peak memory", "MB", ours["peak_mb"], ref["peak_mb"], higher_is_better=False)]


def bench_load(ctx):
    """A random checkpoint of about --load-gb (fp32), written once, loaded by each library in a fresh process."""
    gb = ctx["args"].load_gb
    folder = os.path.join(ctx["cache"], f"load_{gb:g}gb")
    if not os.path.exists(os.path.join(folder, "config.json")):
        hidden = 1024
        layers = max(1, int(gb * 2**30 / 4 / (12 * hidden * hidden)))   # ~12 h^2 parameters per block
        cfg = dict(SIZES["tiny"], text_config=dict(vocab_size=32064, hidden_size=hidden, intermediate_size=4 * hidden,
                                                    num_hidden_layers=layers, num_attention_heads=16))
        PLLaVA.from_config(Config.from_dict(cfg)).save_pretrained(folder)
    size_mb = os.path.getsize(os.path.join(folder, "model.safetensors")) / 2**20
    ours, ref = ({**child("load", {"impl": impl, "path": folder, "timed": False}),
                  **child("load", {"impl": impl, "path": folder, "timed": True})} for impl in ("ours", "reference"))
    return [row(f"load a {size_mb / 1024:.2f} GB checkpoint and read every weight", "s", ours["seconds"],
                ref["seconds"], False),
            row("load: peak RSS / checkpoint size", "x", ours["peak_mb"] / size_mb, ref["peak_mb"] / size_mb, False),
            row("load: (peak RSS - RSS before loading) / checkpoint size", "x",
                (ours["peak_mb"] - ours["before_mb"]) / size_mb, (ref["peak_mb"] - ref["before_mb"]) / size_mb, False)]


def write_clips(folder, n, seconds=10):
    """n synthetic 854x480 clips at 25 fps (cached between runs)."""
    os.makedirs(folder, exist_ok=True)
    y, x = np.mgrid[0:480, 0:854]
    for k in range(n):
        path = os.path.join(folder, f"clip_{k:02d}.mp4")
        if os.path.exists(path):
            continue
        write_video(path, (np.stack([(x + 5 * i + 40 * k) % 256, (y + 2 * i) % 256, (x // 2 + y + k) % 256],
                                    -1).astype(np.uint8) for i in range(seconds * 25)), options={"preset": "ultrafast"})
    return folder


def bench_end2end(ctx):
    """caption.py's own path on synthetic videos: videos/s, and the time spent waiting for decoding."""
    import caption
    from tokenizer import Tokenizer, train_tokenizer
    a, folder = ctx["args"], os.path.join(ctx["cache"], "e2e")
    videos = write_clips(os.path.join(folder, "videos"), n=8)
    ckpt = os.path.join(folder, f"model_{a.size}")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        train_tokenizer(ckpt, ["a video of a thing that moves across the screen"] * 50, 300)
        cfg = ctx["model"].config.to_dict()
        cfg["image_token_index"] = Tokenizer(ckpt).image_id
        model = PLLaVA.from_config(Config.from_dict(cfg))
        model.save_pretrained(ckpt)
    stats = caption.main([videos, "--model", ckpt, "--out", os.path.join(folder, "captions.jsonl"), "--overwrite",
                          "--max-new-tokens", str(ctx["new_tokens"]), "--batch-size", "4", "--workers", "2",
                          "--device", a.device, "--dtype", str(ctx["dtype"]).split(".")[1]])
    n = stats["captions"] + stats["errors"]
    return [row(f"caption.py end to end, {n} videos", "videos/s", n / stats["seconds"], None),
            row("caption.py: time waiting for video decoding", "%", 100 * stats["wait"] / stats["seconds"], None)]


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        k = json.loads(args.child)
        torch.manual_seed(0)
        print(json.dumps({"train": train_step_child, "load": load_child}[k["name"]](k)))
        return
    dtype = torch.bfloat16 if args.size in ("7b", "13b") else torch.float32
    sections = args.only.split(",") if args.only else list(SECTIONS)
    gpu = args.device.startswith("cuda")
    model = PLLaVA.from_config(config_for(args.size), dtype=dtype, device=args.device).eval()
    ctx = dict(args=args, model=model, dtype=dtype, cache=os.path.join(tempfile.gettempdir(), "pllava_bench"),
               new_tokens=args.new_tokens or (200 if gpu else 32),
               context=args.decode_context or (model.config.num_visual_tokens + 64 if gpu else 256))
    os.makedirs(ctx["cache"], exist_ok=True)
    if {"vision", "prefill", "decode", "roofline"} & set(sections):
        ctx["clip"], ctx["lm"] = reference_models(model, args.device, dtype)
        ctx["paths"], ctx["decode"] = decode_paths(ctx), {}
        ctx["fast_lm"] = ctx["paths"].get("packed", ctx["paths"]["plain"])[0]
    device_name = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"{device_name}, torch {torch.__version__}, size {args.size} "
          f"({sum(p.numel() for p in model.language_model.parameters()) / 1e6:.0f}M LLM parameters), {dtype}")
    rows = []
    for name in SECTIONS:
        if name in sections:
            new = globals()[f"bench_{name}"](ctx)
            rows += new
            for r in new:
                print(format_row(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(r, device=device_name, size=args.size) for r in rows], f, indent=2)


def format_row(r):
    def num(x):
        return "-" if x is None else f"{x:.3g}"
    return f"{r['name']:<72} {r['unit']:>9}  ours {num(r['ours']):>8}  ref {num(r['reference']):>8}  ratio {num(r['ratio'])}"


if __name__ == "__main__":
    main()
