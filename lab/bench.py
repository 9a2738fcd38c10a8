"""Speed and memory, ours against transformers (+ peft), side by side in one run, and against the hardware.

    python -m lab.bench [--size tiny|small|7b|13b] [--device cpu|cuda] [--only vision,decode,...] [--json FILE]

The same random weights go into our model and into transformers' CLIPVisionModel / LlamaForCausalLM. Each
row times exactly the work its name says, the same work on both sides, ours and the reference in turns
(measure.py: A B A B ..., --repeats after a warm-up); it shows each side's median [min - max] and the
ratio of medians [the range of the pairs' ratios], > 1 where we are better. Decoding is timed step by
step after one prefill. Memory is measured in child processes, each starting clean. 7b / 13b are the
PLLaVA presets in bf16, for a GPU; on a CPU use tiny or small (a ~130M-parameter LLM).
"""

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict

import torch

from config import Config
from generate import can_pack, pack_for_cpu, prefill
from lab import bench_caption, measure, pipeline
from lab.measure import SIZES, PeakRSS, embeddings, format_row, our_decoder, row, value
from lab.synthetic import clip
from lora import add_lora
from model import PLLaVA
from plumbing import cli

SECTIONS = ("vision", "prefill", "decode", "roofline", "sampler", "train", "load", "engine", "int8", "recipe",
            "steps", "shots", "end2end", "rehearsal", "pipeline")   # from engine on: bench_caption.py, pipeline.py
DEFAULT = ("vision", "prefill", "decode", "roofline", "sampler", "train", "load", "recipe", "steps", "shots",
           "rehearsal")   # without --only or --all: about 10 minutes there; --all adds engine, int8, end2end


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="the model's size (random weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the model runs")
    p.add_argument("--only", help=f"comma-separated sections of {','.join(SECTIONS)} (default: "
                                  f"{','.join(DEFAULT)}; --all: every one)")
    p.add_argument("--all", action="store_true", help="every section (about %.0f minutes at --size small on this project's 2 cores)"
                   % (sum(measure.section_seconds().values()) / 60))
    p.add_argument("--repeats", type=cli.positive_int, default=5, help="timed turns of each side, after one warm-up")
    p.add_argument("--new-tokens", type=cli.positive_int, help="decode steps timed (default 200 on GPU, 32 on CPU)")
    p.add_argument("--decode-context", type=cli.positive_int, help="prompt length for the decode test (default: "
                                                                  "visual tokens + 64 on GPU, 256 "
                                                                  "on CPU)")
    p.add_argument("--load-gb", type=cli.positive, default=1.0, help="checkpoint size for the loading test")
    p.add_argument("--sampler-minutes", type=cli.positive, default=5.0, help="length of the sampler's clip")
    p.add_argument("--compile", action="store_true", help="also measure the compiled decoding step")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "pllava", "bench"),
                   help="where generated checkpoints and clips are kept between runs")
    p.add_argument("--strict", action="store_true", help="refuse to run on a busy machine")
    p.add_argument("--json", help="write the rows here too, each as it is measured")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS) if args.only else set()
    if unknown:
        p.error(f"--only {args.only}: no section {', '.join(sorted(unknown))} (there are {', '.join(SECTIONS)})")
    return args


def reference_models(config, device, dtype, weights=None):
    """transformers' CLIPVisionModel and LlamaForCausalLM of our `config` in `dtype`, sharing the tensors of
    `weights` (our model) when given: one copy of 13B on the card, not two; else built on the device
    with weights of their own (never an fp32 copy first: 13B is 52 GB in fp32)."""
    from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM)
    text = {k: v for k, v in asdict(config.text_config).items() if v is not None}
    with torch.device("meta" if weights is not None else device):
        clip = CLIPVisionModel._from_config(CLIPVisionConfig(**asdict(config.vision_config)), dtype=dtype).eval()
        lm = LlamaForCausalLM._from_config(LlamaConfig(**text), dtype=dtype).eval()
    if weights is not None:   # transformers 5: no vision_model level; assign: the very same tensors
        clip.load_state_dict(weights.vision_tower.vision_model.state_dict(), assign=True)
        lm.load_state_dict(weights.language_model.state_dict(), assign=True)
        # the buffers transformers derives, made again on the device
        clip.embeddings.position_ids = torch.arange(clip.embeddings.num_positions, device=device)[None]
        with torch.device(device):
            lm.model.rotary_emb = type(lm.model.rotary_emb)(lm.config)
        left = [name for module in (clip, lm) for name, t in module.state_dict(keep_vars=True).items() if t.is_meta]
        if left:
            raise RuntimeError(f"transformers' {left[:3]} were not set from our weights")
    return clip, lm


# ------------------------------------------------------------------------------------------ sections

@torch.no_grad()
def bench_vision(ctx):
    """Our tower stops at its feature layer (-2: all layers but the last). Against transformers' tower cut
    to the same layers the work is the same; LLaVA calls the whole tower and keeps every hidden state,
    which is where the gain of the second row comes from, not from faster kernels."""
    m, clip, a = ctx["model"], ctx.pop("clip"), ctx["args"]
    c, layer = m.config.vision_config, m.config.vision_feature_layer
    frames = torch.randn(16, 3, c.image_size, c.image_size, device=a.device, dtype=ctx["dtype"])
    cut = copy.deepcopy(clip)
    cut.encoder.layers = cut.encoder.layers[:c.num_hidden_layers + layer + 1]
    ours = lambda: m.vision_tower.vision_model(frames, layer)   # noqa: E731
    same = measure.compare(ours, lambda: cut(frames).last_hidden_state, a.device, a.repeats)
    whole = measure.compare(ours, lambda: clip(frames, output_hidden_states=True).hidden_states[layer], a.device,
                           a.repeats)
    n = c.num_hidden_layers + layer + 1
    return [row(f"vision tower, 16 frames, {n} of {c.num_hidden_layers} layers on both sides", "frames/s", same, 16),
            row(f"vision tower, 16 frames, vs transformers as LLaVA calls it (all {c.num_hidden_layers} layers, "
                f"every hidden state kept)", "frames/s", whole, 16)]


@torch.no_grad()
def bench_prefill(ctx):
    lm, ref, a = ctx["fast_lm"], ctx["lm"], ctx["args"]
    n = ctx["model"].config.num_visual_tokens + 64
    x, positions = embeddings(ctx, 1, n), torch.arange(n, device=a.device)[None]

    def ours():   # the cache is allocated per video by generate, so here too
        lm.setup_cache(1, n + 1)
        prefill(lm, x, positions, None)
        lm.clear_cache()
    result = measure.compare(ours, lambda: ref(inputs_embeds=x, use_cache=True, logits_to_keep=1), a.device, a.repeats)
    return [row(f"prefill, {n} tokens ({n - 64} visual + 64), to the first token's logits", "s", result)]


def reference_decoder(ref, x, n, device):
    """n decode steps of transformers after x, from its own cache (DynamicCache), cut back after each run."""
    state = {}

    def first():
        out = ref(inputs_embeds=x, use_cache=True, logits_to_keep=1)
        state.update(cache=out["cache"] if "cache" in out else out["past_key_values"],
                     logits=out.logits[:, -1], cache_kw="cache" in out)

    def reset():
        extra = state["cache"].get_seq_length() - x.shape[1]
        if extra:
            state["cache"].crop(-extra)   # transformers 5: a negative count of tokens to drop

    def step(i):
        cache = {"cache" if state["cache_kw"] else "past_key_values": state["cache"]}   # transformers 5.24 renamed it
        out = ref(input_ids=state["logits"].argmax(-1)[:, None], use_cache=True, **cache)
        state["logits"] = out.logits[:, -1]
    return measure.decode_steps(first, step, n, device, reset)


@torch.no_grad()
def bench_decode(ctx):
    a, n, rows = ctx["args"], ctx["new_tokens"], []
    for batch in (1, 8):
        x = embeddings(ctx, batch, ctx["context"])
        theirs = reference_decoder(ctx["lm"], x, n, a.device)
        for name, (lm, mode) in ctx["paths"].items():
            result = measure.compare(our_decoder(lm, x, n, mode, a.device), theirs, a.device, a.repeats)
            lm.clear_cache()
            ctx["decode"][name, batch] = result
            rows.append(row(f"decode ({name}), batch {batch}, {n} steps after {ctx['context']} tokens", "tokens/s",
                            result, batch * n))
    chosen = getattr(ctx["paths"].get("packed", [None])[0], "packed", {})   # pack_for_cpu's measured choice
    return rows + [value(f"packed path: {sorted(s for s, p in chosen.items() if p)} packed, "
                         f"{sorted(s for s, p in chosen.items() if not p)} plain (at 8 rows)", "shapes",
                         sum(chosen.values()))] if chosen else rows


def bench_roofline(ctx):
    """Bytes one batch-1 decode step must read (the weights, the KV cache) over its measured time, against
    the bandwidth of a large copy measured here; only from a steady measure."""
    a, m, n = ctx["args"], ctx["model"], ctx["new_tokens"]
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device=a.device)
    dst = torch.empty_like(src)
    copy_time = measure.compare(lambda: dst.copy_(src), None, a.device, max(a.repeats, 5))["ours"]
    bandwidth = 2 * src.numel() / copy_time["median"]   # bytes read + written
    c, size = m.config.text_config, torch.finfo(ctx["dtype"]).bits // 8
    weights = sum(p.numel() for name, p in m.language_model.named_parameters() if "embed_tokens" not in name) * size
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * (ctx["context"] + n / 2) * size
    rows = [value("memory bandwidth (copy of 512 MB: bytes read + written / s)", "GB/s", bandwidth / 1e9)]
    if not ctx["decode"]:
        bench_decode(ctx)
    for (name, batch), result in ctx["decode"].items():
        steps = result["ours"]
        if batch == 1 and steps["max"] / steps["min"] < measure.STEADY:
            share = 100 * (weights + kv) * n / steps["median"] / bandwidth
            rows.append(value(f"decode ({name}), batch 1: weights + KV cache read per second, share of the "
                              "bandwidth", "%", share))
        elif batch == 1:
            rows.append(value(f"decode ({name}), batch 1: share of the bandwidth: noisy (max / min of the step "
                              f"timings {steps['max'] / steps['min']:.2f} > {measure.STEADY})", "%", None))
    return rows


def bench_sampler(ctx):
    import av

    from data import read_frames
    minutes = ctx["args"].sampler_minutes   # x264 veryfast (B-frames), a keyframe every 10 s
    path = clip(os.path.join(ctx["args"].cache, f"long_{minutes:g}min_b.mp4"), 640, 360,
                int(minutes * 1500), preset="veryfast", g="250")

    def decode_all():   # the frame-index sampler: decode every frame, convert the 16 it picks
        with av.open(path) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            keep = {int((i + 0.5) * s.frames / 16) for i in range(16)}
            for i, f in enumerate(c.decode(s)):
                if i in keep:
                    f.to_ndarray(format="rgb24")
    result = measure.compare(lambda: read_frames(path, 16), decode_all, "cpu", ctx["args"].repeats)
    return [row(f"16 frames from a {minutes:g}-minute 640x360 clip, vs decoding every frame", "s/video", result)]


def train_step_child(k):
    """LoRA training steps of the LLM (q_proj, k_proj, r=128, alpha=32, AdamW), ours or transformers + peft,
    on the same embeddings; the loss on the last 64 positions. Returns each step's time and the peak memory."""
    device, dtype, config = k["device"], getattr(torch, k["dtype"]), Config.from_dict(SIZES[k["size"]])
    text = config.text_config
    x = (0.02 * torch.randn(k["batch"], k["length"], text.hidden_size)).to(device, dtype)
    labels = torch.randint(0, text.vocab_size, (k["batch"], k["length"]), device=device)
    labels[:, :-64] = -100
    if k["impl"] == "ours":
        lm = PLLaVA.from_config(config, dtype=dtype, device=device).language_model
        add_lora(lm, r=128, alpha=32, dropout=0.0)
        lm.recompute = k["checkpointing"]
        for n, p in lm.named_parameters():
            p.requires_grad = ".lora_" in n

        def loss_fn():
            h = lm(x, torch.arange(k["length"], device=device)[None].expand(k["batch"], -1))
            keep = labels[:, 1:] != -100
            return torch.nn.functional.cross_entropy(lm.lm_head(h[:, :-1][keep]).float(), labels[:, 1:][keep])
        params = [p for p in lm.parameters() if p.requires_grad]
    else:
        from peft import LoraConfig, get_peft_model
        _, ref = reference_models(config, device, dtype)   # weights of its own: one model in memory, not two
        if k["checkpointing"]:
            ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
        times = [measure.timed(step, device) for _ in range(k["repeats"])]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else mem.peak - mem.start
    return {"times": times, "peak_mb": peak}


def load_child(k):
    """Load a checkpoint, ours or transformers', and touch every weight (a lazily mapped file counts in full):
    its time, and its peak RSS (sampled on a thread, in a run of its own: k["timed"] False)."""
    import contextlib

    from transformers import LlavaForConditionalGeneration

    import weights  # noqa: F401  (imports out of the measurement, for both)
    t = time.perf_counter()
    with contextlib.nullcontext() if k["timed"] else PeakRSS() as mem:
        if k["impl"] == "ours":
            model = PLLaVA.from_pretrained(k["path"])
        else:
            model = LlavaForConditionalGeneration.from_pretrained(k["path"], dtype=torch.float32)
        total = sum(float(p.sum()) for p in model.parameters())
    if k["timed"]:
        return {"times": [time.perf_counter() - t], "checksum": total}
    return {"peak_mb": mem.peak, "before_mb": mem.start, "checksum": total}


def bench_train(ctx):
    a = ctx["args"]
    big = a.size in ("7b", "13b")   # sized for an 80 GB card: one sample, activations recomputed
    batch, length = (2, 640) if a.device == "cpu" else (1 if big else 4, ctx["model"].config.num_visual_tokens + 128)
    common = dict(size=a.size, device=a.device, dtype=str(ctx["dtype"]).split(".")[1], batch=batch,
                  length=length, repeats=a.repeats, checkpointing=big)
    result, got = measure.alternate("lab.bench", "train", common, rounds=2)
    peak = {impl: max(r["peak_mb"] for r in runs) for impl, runs in got.items()}
    return [row(f"LoRA training step, batch {batch} x {length} tokens", "samples/s", result, batch),
            value("LoRA training step: peak memory, ours / transformers + peft", "MB / MB",
                  peak["ours"] / peak["reference"]) | {"detail": peak}]


def bench_load(ctx):
    """A random checkpoint of about --load-gb (fp32), written once, loaded by each library in fresh processes."""
    gb, a = ctx["args"].load_gb, ctx["args"]
    folder = os.path.join(a.cache, f"load_{gb:g}gb")
    if not os.path.exists(os.path.join(folder, "config.json")):
        hidden = 1024
        layers = max(1, int(gb * 2**30 / 4 / (12 * hidden * hidden)))   # ~12 h^2 parameters per block
        cfg = dict(SIZES["tiny"], text_config=dict(vocab_size=32064, hidden_size=hidden, intermediate_size=4 * hidden,
                                                    num_hidden_layers=layers, num_attention_heads=16))
        PLLaVA.from_config(Config.from_dict(cfg)).save_pretrained(folder)
    size_mb = os.path.getsize(os.path.join(folder, "model.safetensors")) / 2**20
    result, _ = measure.alternate("lab.bench", "load", {"path": folder, "timed": True}, rounds=a.repeats)
    mem = {impl: measure.child("lab.bench", "load", {"impl": impl, "path": folder, "timed": False})
           for impl in ("ours", "reference")}
    return [row(f"load a {size_mb / 1024:.2f} GB checkpoint and read every weight", "s", result),
            value("load: peak RSS / checkpoint size, ours (transformers in detail)", "x",
                  mem["ours"]["peak_mb"] / size_mb) | {"detail": {i: m["peak_mb"] / size_mb for i, m in mem.items()}},
            value("load: (peak RSS - RSS before loading) / checkpoint size, ours (transformers in detail)", "x",
                  (mem["ours"]["peak_mb"] - mem["ours"]["before_mb"]) / size_mb)
            | {"detail": {i: (m["peak_mb"] - m["before_mb"]) / size_mb for i, m in mem.items()}}]


def main(argv=None):
    args = parse_args(argv)
    try:
        import transformers  # noqa: F401  (the reference every row is measured against)
    except ImportError:
        sys.exit("error: bench.py measures against transformers: pip install -r requirements-dev.txt")
    cli.run(lambda: bench(args))


def expected(args, sections):
    """The time these sections took on this project's CPU, said before they start (at --size small)."""
    if args.size != "small" or args.device.startswith("cuda"):
        return None
    took = measure.section_seconds()
    known = [took[s] for s in sections if s in took]
    return (f"sections {','.join(sections)}: about {sum(known) / 60:.0f} minutes on a 2-core CPU (this project's "
            f"machine, alone; more on a busy "
            f"one){'' if args.all else '; --all runs every section'}")


def bench(args):
    if args.child:
        k = json.loads(args.child)
        torch.manual_seed(0)
        print(json.dumps({"train": train_step_child, "load": load_child}[k["name"]](k)))
        return
    measure.check_quiet(args.strict)
    os.makedirs(args.cache, exist_ok=True)
    cached = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.cache) for f in fs)
    print(f"cache: {args.cache} ({cached / 2**20:.0f} MB; --cache to move it)", file=sys.stderr)
    dtype = torch.bfloat16 if args.size in ("7b", "13b") else torch.float32
    sections = args.only.split(",") if args.only else list(SECTIONS) if args.all else list(DEFAULT)
    if said := expected(args, sections):
        print(said, file=sys.stderr)
    if args.size == "tiny":
        print("size tiny: a check that every section runs; use --size small for numbers", file=sys.stderr)
    gpu = args.device.startswith("cuda")
    model = PLLaVA.from_config(Config.from_dict(SIZES[args.size]), dtype=dtype, device=args.device).eval()
    ctx = dict(args=args, model=model, dtype=dtype, new_tokens=args.new_tokens or (200 if gpu else 32),
               context=args.decode_context or (model.config.num_visual_tokens + 64 if gpu else 256), decode={})
    env = measure.machine(args.device)
    if {"vision", "prefill", "decode", "roofline"} & set(sections):
        ctx["clip"], ctx["lm"] = reference_models(model.config, args.device, dtype, model)
        lm = model.language_model
        ctx["paths"] = {"plain": (lm, None)}   # (language model, compile mode)
        if can_pack(lm):
            ctx["paths"]["packed"] = (pack_for_cpu(copy.deepcopy(lm)), None)   # what caption.py runs on a CPU
        if args.compile:
            ctx["paths"]["compiled"] = (lm, "auto")
        ctx["fast_lm"] = ctx["paths"].get("packed", ctx["paths"]["plain"])[0]
    print(f"{env['device']}, torch {torch.__version__}, size {args.size} "
          f"({sum(p.numel() for p in model.language_model.parameters()) / 1e6:.0f}M LLM "
          f"parameters), {dtype}")
    rows, seconds = [], {}
    for name in SECTIONS:
        if name in sections:
            t = time.monotonic()
            try:
                got = (globals().get(f"bench_{name}") or getattr(bench_caption, f"bench_{name}", None)
                       or getattr(pipeline, f"bench_{name}"))(ctx)
            except Exception as e:   # one section's failure (out of memory on a card, say) ends that section only
                got = [value(f"{name}: failed ({type(e).__name__}: {str(e)[:200]})", "-", None)]
                if gpu:
                    torch.cuda.empty_cache()
            seconds[name] = round(time.monotonic() - t, 1)
            rows += got
            print("\n".join(map(format_row, got)), flush=True)
            print(f"[{name}: {seconds[name]:.0f} s]", file=sys.stderr, flush=True)
            if args.json:   # written after each section: a section that fails later loses nothing
                measure.save(args.json, {"machine": {**env, "load_after": os.getloadavg()}, "size": args.size,
                                         "section_seconds": seconds, "rows": rows})
        if name in ("vision", "roofline"):   # what later sections no longer need goes
            ctx.pop("clip", None)
            if name == "roofline":
                ctx.pop("lm", None)
            if gpu:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
