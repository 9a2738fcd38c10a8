"""Speed and memory, ours against transformers (+ peft), side by side in one run, and against the
hardware.

    python -m lab.bench [--size tiny|small|7b|13b] [--device cpu|cuda] [--only vision,..] [--json J]

The same random weights go into our model and into transformers' CLIPVisionModel /
LlamaForCausalLM. Each row times exactly the work its name says, the same work on both sides, ours
and the reference in turns (measure.py: A B A B ..., --repeats after a warm-up); it shows each
side's median [min - max] and the ratio of medians [the range of the pairs' ratios], > 1 where we
are better. Decoding is timed step by step after one prefill. Memory is measured in child
processes, each starting clean (bench_train.py). 7b / 13b are the PLLaVA presets in bf16, for a
GPU; on a CPU use tiny or small (a ~130M-parameter LLM).
"""

import copy
import inspect
import os
import sys
import time

import torch

from config import Config
from generate import can_pack, pack_for_cpu, prefill
from lab import bench_caption, bench_step, bench_train, measure, pipeline
from lab.measure import SIZES, embeddings, format_row, our_decoder, reference_models, row, value
from lab.synthetic import clip
from model import PLLaVA
from plumbing import cli

# train and load: bench_train.py; steps and rehearsal: bench_step.py; engine, int8, recipe, shots,
# end2end: bench_caption.py; pipeline: pipeline.py
SECTIONS = ("vision", "prefill", "decode", "roofline", "sampler", "train", "load", "engine",
            "int8", "recipe", "steps", "shots", "end2end", "rehearsal", "pipeline")
# without --only or --all: about 10 minutes there; --all adds engine, int8, end2end, pipeline
DEFAULT = ("vision", "prefill", "decode", "roofline", "sampler", "train", "load", "recipe",
           "steps", "shots", "rehearsal")


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--size", choices=sorted(SIZES), default="small", help="the model's size (random weights)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the model runs")
    add("--only", help=f"comma-separated sections of {','.join(SECTIONS)} (default: "
                       f"{','.join(DEFAULT)}; --all: every one)")
    minutes = sum(measure.section_seconds().values()) / 60
    add("--all", action="store_true",
        help=f"every section (about {minutes:.0f} minutes at --size small on this project's "
             f"2 cores)")
    add("--repeats", type=cli.positive_int, default=5,
        help="timed turns of each side, after one warm-up")
    add("--new-tokens", type=cli.positive_int,
        help="decode steps timed (default 200 on GPU, 32 on CPU)")
    add("--decode-context", type=cli.positive_int,
        help="prompt length for the decode test (default: visual tokens + 64 on GPU, 256 on CPU)")
    add("--load-gb", type=cli.positive, default=1.0, help="checkpoint size for the loading test")
    add("--sampler-minutes", type=cli.positive, default=5.0, help="length of the sampler's clip")
    add("--compile", action="store_true", help="also measure the compiled decoding step")
    add("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "pllava", "bench"),
        help="where generated checkpoints and clips are kept between runs")
    add("--strict", action="store_true", help="refuse to run on a busy machine")
    add("--json", help="write the rows here too, each as it is measured")
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS) if args.only else set()
    if unknown:
        p.error(f"--only {args.only}: no section {', '.join(sorted(unknown))} "
                f"(there are {', '.join(SECTIONS)})")
    return args


def section(name):
    """The function that measures section `name`: here, or in the file its rows come from."""
    for module in (sys.modules[__name__], bench_train, bench_caption, bench_step, pipeline):
        found = getattr(module, f"bench_{name}", None)
        if inspect.isfunction(found):   # not lab.bench_train, the module, seen from here
            return found


# ----------------------------------------------------------------------------------- sections

@torch.no_grad()
def bench_vision(ctx):
    """Our tower stops at its feature layer (-2: all layers but the last). Against transformers'
    tower cut to the same layers the work is the same; LLaVA calls the whole tower and keeps every
    hidden state, which is where the gain of the second row comes from, not from faster kernels."""
    m, clip, a = ctx["model"], ctx.pop("clip"), ctx["args"]
    c, layer = m.config.vision_config, m.config.vision_feature_layer
    frames = torch.randn(16, 3, c.image_size, c.image_size, device=a.device, dtype=ctx["dtype"])
    cut = copy.deepcopy(clip)
    cut.encoder.layers = cut.encoder.layers[:c.num_hidden_layers + layer + 1]
    ours = lambda: m.vision_tower.vision_model(frames, layer)   # noqa: E731
    same = measure.compare(ours, lambda: cut(frames).last_hidden_state, a.device, a.repeats)
    whole = measure.compare(ours,
                            lambda: clip(frames, output_hidden_states=True).hidden_states[layer],
                            a.device, a.repeats)
    n = c.num_hidden_layers + layer + 1
    return [row(f"vision tower, 16 frames, {n} of {c.num_hidden_layers} layers on both sides",
                "frames/s", same, 16),
            row(f"vision tower, 16 frames, vs transformers as LLaVA calls it "
                f"(all {c.num_hidden_layers} layers, every hidden state kept)", "frames/s",
                whole, 16)]


@torch.no_grad()
def bench_prefill(ctx):
    lm, ref, a = ctx["fast_lm"], ctx["lm"], ctx["args"]
    n = ctx["model"].config.num_visual_tokens + 64
    x, positions = embeddings(ctx, 1, n), torch.arange(n, device=a.device)[None]

    def ours():   # the cache is allocated per video by generate, so here too
        lm.setup_cache(1, n + 1)
        prefill(lm, x, positions, None)
        lm.clear_cache()
    result = measure.compare(ours, lambda: ref(inputs_embeds=x, use_cache=True, logits_to_keep=1),
                             a.device, a.repeats)
    return [row(f"prefill, {n} tokens ({n - 64} visual + 64), to the first token's logits", "s",
                result)]


def reference_decoder(ref, x, n, device):
    """n decode steps of transformers after x, from its own cache (DynamicCache), cut back after
    each run."""
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
        # transformers 5.24 renamed it
        cache = {"cache" if state["cache_kw"] else "past_key_values": state["cache"]}
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
            ours = our_decoder(lm, x, n, mode, a.device)
            result = measure.compare(ours, theirs, a.device, a.repeats)
            lm.clear_cache()
            ctx["decode"][name, batch] = result
            rows.append(row(f"decode ({name}), batch {batch}, {n} steps after {ctx['context']} "
                            f"tokens", "tokens/s", result, batch * n))
    chosen = getattr(ctx["paths"].get("packed", [None])[0], "packed", {})   # pack_for_cpu's choice
    if not chosen:
        return rows
    packed = sorted(s for s, p in chosen.items() if p)
    plain = sorted(s for s, p in chosen.items() if not p)
    return rows + [value(f"packed path: {packed} packed, {plain} plain (at 8 rows)", "shapes",
                         sum(chosen.values()))]


def bench_roofline(ctx):
    """Bytes one batch-1 decode step must read (the weights, the KV cache) over its measured time,
    against the bandwidth of a large copy measured here; only from a steady measure."""
    a, m, n = ctx["args"], ctx["model"], ctx["new_tokens"]
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device=a.device)
    dst = torch.empty_like(src)
    copy_time = measure.compare(lambda: dst.copy_(src), None, a.device, max(a.repeats, 5))["ours"]
    bandwidth = 2 * src.numel() / copy_time["median"]   # bytes read + written
    c, size = m.config.text_config, torch.finfo(ctx["dtype"]).bits // 8
    named = m.language_model.named_parameters()
    weights = sum(p.numel() for name, p in named if "embed_tokens" not in name) * size
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * size   # K and V
    kv = per_token * (ctx["context"] + n / 2)   # the cache read, on average over the steps
    rows = [value("memory bandwidth (copy of 512 MB: bytes read + written / s)", "GB/s",
                  bandwidth / 1e9)]
    if not ctx["decode"]:
        bench_decode(ctx)
    for (name, batch), result in ctx["decode"].items():
        steps = result["ours"]
        if batch == 1 and steps["max"] / steps["min"] < measure.STEADY:
            share = 100 * (weights + kv) * n / steps["median"] / bandwidth
            rows.append(value(f"decode ({name}), batch 1: weights + KV cache read per second, "
                              f"share of the bandwidth", "%", share))
        elif batch == 1:
            rows.append(value(f"decode ({name}), batch 1: share of the bandwidth: noisy (max / min "
                              f"of the step timings {steps['max'] / steps['min']:.2f} > "
                              f"{measure.STEADY})", "%", None))
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
    return [row(f"16 frames from a {minutes:g}-minute 640x360 clip, vs decoding every frame",
                "s/video", result)]


def main(argv=None):
    args = parse_args(argv)
    try:
        import transformers  # noqa: F401  (the reference every row is measured against)
    except ImportError:
        sys.exit("error: bench.py measures against transformers: "
                 "pip install -r requirements-dev.txt")
    cli.run(lambda: bench(args))


def expected(args, sections):
    """The time these sections took on this project's CPU, said before they start (at --size
    small)."""
    if args.size != "small" or args.device.startswith("cuda"):
        return None
    took = measure.section_seconds()
    known = [took[s] for s in sections if s in took]
    return (f"sections {','.join(sections)}: about {sum(known) / 60:.0f} minutes on a 2-core CPU "
            f"(this project's machine, alone; more on a busy one)"
            f"{'' if args.all else '; --all runs every section'}")


def bench(args):
    measure.check_quiet(args.strict)
    os.makedirs(args.cache, exist_ok=True)
    cached = sum(os.path.getsize(os.path.join(d, f))
                 for d, _, files in os.walk(args.cache) for f in files)
    print(f"cache: {args.cache} ({cached / 2**20:.0f} MB; --cache to move it)", file=sys.stderr)
    dtype = torch.bfloat16 if args.size in ("7b", "13b") else torch.float32
    sections = args.only.split(",") if args.only else list(SECTIONS) if args.all else list(DEFAULT)
    if said := expected(args, sections):
        print(said, file=sys.stderr)
    if args.size == "tiny":
        print("size tiny: a check that every section runs; use --size small for numbers",
              file=sys.stderr)
    gpu = args.device.startswith("cuda")
    model = PLLaVA.from_config(Config.from_dict(SIZES[args.size]), dtype=dtype,
                               device=args.device).eval()
    context = args.decode_context or (model.config.num_visual_tokens + 64 if gpu else 256)
    new_tokens = args.new_tokens or (200 if gpu else 32)
    ctx = dict(args=args, model=model, dtype=dtype, new_tokens=new_tokens, context=context,
               decode={})
    env = measure.machine(args.device)
    if {"vision", "prefill", "decode", "roofline"} & set(sections):
        ctx["clip"], ctx["lm"] = reference_models(model.config, args.device, dtype, model)
        lm = model.language_model
        ctx["paths"] = {"plain": (lm, None)}   # (language model, compile mode)
        if can_pack(lm):   # what caption.py runs on a CPU
            ctx["paths"]["packed"] = (pack_for_cpu(copy.deepcopy(lm)), None)
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
                got = section(name)(ctx)
            except Exception as e:   # a failure (out of memory on a card, say) ends its section
                got = [value(f"{name}: failed ({type(e).__name__}: {str(e)[:200]})", "-", None)]
                if gpu:
                    torch.cuda.empty_cache()
            seconds[name] = round(time.monotonic() - t, 1)
            rows += got
            print("\n".join(map(format_row, got)), flush=True)
            print(f"[{name}: {seconds[name]:.0f} s]", file=sys.stderr, flush=True)
            if args.json:   # written after each section: a section that fails later loses nothing
                measure.save(args.json,
                             {"machine": {**env, "load_after": os.getloadavg()}, "size": args.size,
                              "section_seconds": seconds, "rows": rows})
        if name in ("vision", "roofline"):   # what later sections no longer need goes
            ctx.pop("clip", None)
            if name == "roofline":
                ctx.pop("lm", None)
            if gpu:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
