"""Where caption.py runs and with how much: the device and dtype of each rank, the engine's slots
(what the GPU's free memory holds, memory.py), the decoding processes and their threads; and
--dry-run, the plan of it all on a GPU, estimated and rehearsed on fake tensors at the real
sizes."""

import datetime
import os
import sys

import torch

import memory
import shots
from plumbing.workers import cores_per_rank
from weights import model_config


def placement(args):
    """(device, dtype, rank, world): a GPU per rank under torchrun, bf16 there, fp32 on a CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    gpu = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else None
    device = args.device or gpu or "cpu"
    if device.startswith("cuda"):   # before anything touches CUDA, or every context lands on GPU 0
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
    (memory.py: the KV cache and frames of each, a prefill pass; compiled, the cache's rounding and
    a margin), at most memory.MAX_SLOTS; said at start. A --batch-size that does not fit starts at
    what does: the engine starts where it fits instead of running out."""
    if not device.startswith("cuda"):
        return args.batch_size or CPU_SLOTS
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    nbytes = torch.finfo(dtype).bits // 8
    fit = max(1, memory.slots_that_fit(config, free / 1e9, args.max_new_tokens, nbytes,
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
    """--workers, or this rank's cores but one (the engine's), at most 32: 16 exact frames of a
    1080p video cost a core about a second, and 13B on an H100 takes a video every ~0.4 s."""
    return args.workers or max(1, min(32, cores_per_rank() - 1))


def decoder_threads(args):
    """Threads per decoder: this rank's cores shared by its decoding processes (twice as many with
    shots)."""
    return max(1, cores_per_rank() // (decode_workers(args) * (2 if shots.finder(args) else 1)))


def plan(args):
    """What the run needs on each GPU: memory.py's estimate, and the same run rehearsed on fake
    tensors at the real sizes (lab/rehearse.py), beside the card's memory. Nothing is loaded
    or downloaded."""
    from lab import rehearse
    config = model_config(args.model)
    config.recipe(args.frames, args.pooling_shape)
    gpu = bool(args.card_gb) or torch.cuda.is_available()   # a card named, or this machine's
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    card = args.card_gb or (memory.card_gb() if gpu else ram)
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    int8 = args.quantize == "int8"
    nbytes = torch.finfo(dtype).bits // 8
    slots = args.batch_size or CPU_SLOTS
    if gpu and not args.batch_size:
        slots = memory.default_slots(config, card, args.max_new_tokens, nbytes, int8, args.compile)
    need = memory.captioning(config, slots, args.max_new_tokens, nbytes, int8,
                             compiled=args.compile)
    peak = rehearse.captioning(config, slots, args.max_new_tokens, dtype, int8, args.compile)
    total = peak["peak_gb"] + memory.CONTEXT_GB
    estimate = ", ".join(f"{k} {v:.1f} GB" for k, v in need.items())
    where = f"card {card:.0f} GB" if gpu else \
        f"no GPU here: RAM {card:.0f} GB (--card-gb N plans for a GPU)"
    print(f"{args.model}: {slots} slots{'' if args.batch_size else ' (the default)'}, "
          f"{config.num_visual_tokens} visual tokens, {args.max_new_tokens} new tokens, "
          f"{'int8' if int8 else str(dtype).split('.')[1]}: estimate {estimate}; rehearsed on fake "
          f"tensors: peak {peak['peak_gb']:.1f} GB + context {memory.CONTEXT_GB} = {total:.1f} GB; "
          f"{where}")
    if max(total, need["total"]) > 0.95 * card:
        tips = ([] if int8 else ["--quantize int8"]) + \
            ([f"--batch-size {slots // 2}"] if slots > 1 else []) + \
            ["fewer tokens (--pooling-shape, --max-new-tokens)"]
        raise ValueError(f"{max(total, need['total']):.1f} GB does not fit in {card:.0f} GB: "
                         f"try {', '.join(tips)}")
    return {**need, "rehearsed": total, "slots": slots}
