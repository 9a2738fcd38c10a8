"""bench.py's rows for one decode step, counted rather than timed: the aten operations it runs
(each a kernel launch on a GPU) and the host reads it makes (each a sync on a GPU), before this
engine and now; and, with no GPU needed, the step at 13B's shape rehearsed on fake tensors
(lab/rehearse.py): its operations, reads, the bytes it must read and their bound on an H100, and
the peak memory of captioning against memory.py's estimate.
"""

import copy

import torch

import memory
from config import PRESETS, Config
from engine import Engine, Item
from generate import Sampling, generate
from lab import measure, rehearse
from lab.bench_caption import videos
from lab.measure import row, value
from lab.rehearse import counting_reads
from lora import add_lora, merge_lora


def count_ops(fn):
    """The aten operations fn() runs (each a kernel launch on a GPU: what bounds an eager decode
    step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))
    with Count():
        fn()
    return Count.n


def host_reads(fn):
    """How many times fn() reads a tensor back on the host (.tolist(), .item(), bool(), int()): each
    one a sync on a GPU."""
    reads = [0]
    with counting_reads(reads):
        fn()
    return reads[0]


def bench_steps(ctx):
    """A decode step before this engine (LoRA unmerged, the static loop reading its stops every
    step) and now (LoRA merged at load, stops read every 4th step as on a GPU): operations and host
    reads per step."""
    model, n = copy.deepcopy(ctx["model"]), 16
    add_lora(model.language_model, r=128, alpha=32, dropout=0.0)   # the report's, as released
    item = videos(model, 1, model.config.num_frames)[0]
    ids, pixels = torch.tensor([item.ids], device=item.pixels.device), item.pixels[None]

    def static(k):   # the loop before the engine: k tokens
        return generate(model, ids, pixels, sampling=Sampling(max_new_tokens=k, stop_ids=()))

    def engine(k):   # the engine, its stops read every 4th step
        sampling = Sampling(max_new_tokens=k, stop_ids=())
        return list(Engine(model, 1, sampling, check_every=4).run([Item(0, item.ids, item.pixels)]))

    def per_step(count, run):   # n tokens less 1 token: n - 1 decode steps, the prefill cancelled
        return (count(lambda: run(n)) - count(lambda: run(1))) / (n - 1)
    with torch.no_grad():
        before_ops, before_reads = per_step(count_ops, static), per_step(host_reads, static)
        merge_lora(model.language_model)
        after_ops, after_reads = per_step(count_ops, engine), per_step(host_reads, engine)

    def before_now(before, now):   # as times: ratio = before / now
        return {"ours": measure.spread([now]), "reference": measure.spread([before]),
                "pair_ratios": [before / now]}
    return [row("decode step: aten operations, now (LoRA merged, engine) vs before (unmerged, "
                "static loop)", "ops", before_now(before_ops, after_ops)),
            row("decode step: host reads (syncs on a GPU), now (stops read every 4th step) vs "
                "before", "reads", before_now(before_reads, after_reads))]


def bench_rehearsal(ctx):
    """No GPU needed: the engine at 13B's shape (or the 7b / 13b size asked for) rehearsed on fake
    tensors (lab/rehearse.py): one steady-state decode step of 16 rows around 2,400 tokens,
    eager and as compiled, and the peak memory of captioning at 16 slots against memory.py's
    estimate."""
    size = ctx["args"].size if ctx["args"].size in ("7b", "13b") else "13b"
    config, rows = Config.from_dict(PRESETS[f"pllava-{size}"]), []
    context = config.num_visual_tokens + 99
    for compiled in (False, True):
        step = rehearse.decode_step(config, 16, context, compiled=compiled)
        how = "compiled (block mask)" if compiled else "eager"
        said = f"rehearsed {size} decode step"
        rows += [value(f"{said}, 16 rows near {context} tokens, {how}: aten operations", "ops",
                       step["aten_ops"]),
                 value(f"{said}, {how}: host reads (syncs), dense masks", "reads",
                       step["host_reads"]) | {"detail": {"dense_masks": step["dense_masks"]}},
                 value(f"{said}, {how}: bytes to read (weights + each row's KV)", "GB",
                       step["weights_gb"] + step["kv_gb"]) | {"detail": step},
                 value(f"{said}, {how}: its bound at 3.35 TB/s (H100 SXM)", "ms",
                       step["bound_ms"])]
    peak = rehearse.captioning(config, 16, 256)
    plan = memory.captioning(config, 16, 256, 2)
    rows.append(value(f"rehearsed {size} captioning, 16 slots, bf16: peak memory (memory.py's "
                      f"estimate in detail)", "GB", peak["peak_gb"] + memory.CONTEXT_GB)
                | {"detail": {"estimate_gb": plan["total"], **peak}})
    return rows
