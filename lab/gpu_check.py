"""The first run on a GPU, as one script: python -m lab.gpu_check [--budget 600] [--out
results/gpu-check.json]

What nobody has measured comes first: the project's own recipe, 13B in bf16 with 16 frames (2,304
visual tokens and a ~100-token prompt) and 200 new tokens, through the captioning engine with the
slots the memory plan gives (memory.py), eager and --compile, bf16 and int8. The model is built and
initialised on the card (seconds; filling 13.3B weights on a CPU took ~330 s) and nothing is written
to disk for it. Then caption.py and train.py as a user starts them, at a tiny size (torchrun over
two GPUs where there are two; on one the stage says it needs two).

Each stage is a process of its own, with its expected time on one H100 written beside it (STAGES): a
stage starts only if that time fits in what the budget has left, and is stopped at twice it. Every
file goes under one work folder, removed at the end. One table: tokens/s, videos per GPU-hour, peak
memory, compiled graphs, the share of the bytes-per-step bound a decode step reaches, and for int8
whether inductor fused the widening of the weights into the matmul (a bf16 copy of a weight in the
generated code: not fused).

--size tiny --device cpu runs the same stages at a tiny size on a CPU (tests/test_gpu_check.py).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from lab.measure import ROOT

NEW_TOKENS = 200
# HBM, GB/s
BANDWIDTH_GBS = {"H200": 4800, "H100 PCIe": 2000, "H100": 3350, "A100": 2039, "L40S": 864}


@dataclass
class Stage:
    name: str
    expected_s: float   # on one H100 (at --size tiny on a CPU, a few seconds but the compiles)
    kind: str           # "engine", "caption", "train"
    flags: tuple = ()
    gpus: int = 1


STAGES = [
    Stage("engine bf16, eager", 45, "engine"),
    Stage("engine bf16, --compile", 200, "engine", ("compile",)),
    Stage("engine int8, eager", 45, "engine", ("int8",)),
    Stage("engine int8, --compile", 200, "engine", ("int8", "compile")),
    Stage("caption.py tiny, eager", 25, "caption"),
    Stage(
        "caption.py tiny, --compile --quantize int8",
        60,
        "caption",
        ("--compile", "--quantize", "int8"),
    ),
    Stage("train.py tiny, 5 steps", 30, "train"),
    Stage("train.py tiny, torchrun 2 GPUs", 45, "train", gpus=2),
]


def engine_stage(size, device, int8, compiled):
    """One engine stage, in its own process: the model built on `device`, the engine over 2 x slots
    videos after a warm-up of one batch (where --compile compiles), and what it measured."""
    import torch

    import engine as engine_module
    from config import Config
    from engine import Engine, Item
    from generate import Sampling, ready_for_inference
    from lab.measure import SIZES
    from model import PLLaVA
    import memory
    gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    t0 = time.monotonic()
    model = PLLaVA.from_config(Config.from_dict(SIZES[size]), dtype=dtype, device=device)
    ready_for_inference(model, int8, device, compiled)
    built_s, config, nbytes = time.monotonic() - t0, model.config, torch.finfo(dtype).bits // 8
    new = NEW_TOKENS if gpu else 16
    free = torch.cuda.mem_get_info()[0] / 1e9 if gpu else None
    slots = (min(memory.slots_that_fit(config, free, new, nbytes, compiled=compiled),
                 memory.MAX_SLOTS) if gpu else 4)
    # a 100-token prompt
    ids = [1] + [5] * 40 + [config.image_token_index] + [7] * 58
    v = config.vision_config
    pixels = torch.randn(
        config.num_frames, 3, v.image_size, v.image_size, dtype=dtype, device=device
    )
    items = [Item(i, ids, pixels) for i in range(3 * slots)]
    real, spent = engine_module.prefill, [0.0]

    def prefill(*args):   # timed to its end (the engine's own timer sees the launches only)
        t = time.perf_counter()
        out = real(*args)
        if gpu:
            torch.cuda.synchronize()
        spent[0] += time.perf_counter() - t
        return out
    engine_module.prefill = prefill
    eng = Engine(model, slots, Sampling(max_new_tokens=new, stop_ids=()),
                 compile_mode="auto" if compiled else None)
    t = time.monotonic()
    # the warm-up: compiles, if compiled
    list(eng.run(items[:slots]))
    warm_s = time.monotonic() - t
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    steps0, spent[0], t = eng.stats["steps"], 0.0, time.monotonic()
    tokens = sum(len(x) for _, x in eng.run(items[slots:]))
    if gpu:
        torch.cuda.synchronize()
    wall, steps = time.monotonic() - t, eng.stats["steps"] - steps0
    t_cfg = config.text_config
    prompt = len(ids) - 1 + config.num_visual_tokens
    weights = (memory.captioning(config, 1, new, nbytes,
                                 int8)["weights"] - memory._vision(config) * nbytes / 1e9)
    # the mean step's cache
    kv = memory._kv_per_token(t_cfg, nbytes) * slots * (prompt + new / 2) / 1e9
    card = torch.cuda.get_device_name() if gpu else ""
    bandwidth = next((b for k, b in BANDWIDTH_GBS.items() if k in card), None)
    step_ms = 1e3 * (wall - spent[0]) / max(steps, 1)
    result = dict(slots=slots, built_s=round(built_s, 1), warm_s=round(warm_s, 1),
                  videos=len(items) - slots, tokens=tokens, tokens_per_s=round(tokens / wall, 1),
                  videos_per_gpu_hour=round(3600 * (len(items) - slots) / wall),
                  peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 1) if gpu else None,
                  graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"],
                  prefill_share=round(spent[0] / wall, 3), step_ms=round(step_ms, 2),
                  bound_share=round(1e3 * (weights + kv) / bandwidth / step_ms,
                                    2) if bandwidth else None)
    if int8 and compiled:
        from lab.bench_caption import widening_fused
        layer = model.language_model.model.layers[0].mlp.gate_proj
        result["widening_fused"] = widening_fused(layer, slots, dtype, device)
    print("result " + json.dumps(result), flush=True)


def run_stage(stage, args, work, timeout):
    """A stage's process; its row: rc, seconds, and what it printed after "result "."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    if stage.kind == "engine":
        spec = json.dumps(dict(size=args.size, device=args.device, int8="int8" in stage.flags,
                               compiled="compile" in stage.flags))
        cmd = [sys.executable, "-m", "lab.gpu_check", "--engine-stage", spec]
    elif stage.kind == "caption":
        out = os.path.join(work, f"caption-{len(os.listdir(work))}.jsonl")
        cmd = [sys.executable, os.path.join(ROOT, "caption.py"), os.path.join(work, "videos"),
               "--model", os.path.join(work, "tiny"), "--out", out, "--max-new-tokens", "32",
               "--device", args.device, *stage.flags]
    else:
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data",
               os.path.join(work, "labels.jsonl"), "--init-from-config",
               os.path.join(work, "tiny", "config.json"), "--tokenizer", os.path.join(work, "tok"),
               "--max-steps", "5", "--batch-size", "2", "--out",
               os.path.join(work, f"train-{stage.gpus}")]
        if stage.gpus > 1:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc_per_node={stage.gpus}",
                *cmd[1:],
            ]
    t = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        rc, text = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = (
            f"timeout at {timeout:.0f} s",
            "".join(x.decode() if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr)),
        )
    found = [json.loads(line[7:]) for line in text.splitlines() if line.startswith("result ")]
    row = {"stage": stage.name, "expected_s": stage.expected_s, "rc": rc,
           "seconds": round(time.monotonic() - t, 1)}
    if stage.kind == "caption" and os.path.exists(out):
        row["rows"] = sum(1 for _ in open(out))
    return {**row, **(found[-1] if found else {}),
            **({} if rc == 0 else {"tail": text.strip().splitlines()[-3:]})}


def prepare(work):
    """The tiny model, tokenizer, videos and labels the caption.py and train.py stages read."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from helpers import make_tokenizer, tiny_checkpoint
    from videos import write_video
    tiny_checkpoint(os.path.join(work, "tiny"))
    os.makedirs(os.path.join(work, "videos"))
    names = [os.path.join(work, "videos", f"v{i:02d}.mp4") for i in range(8)]
    for i, name in enumerate(names):
        write_video(name, n_frames=20 + i)
    with open(os.path.join(work, "labels.jsonl"), "w") as f:
        f.writelines(json.dumps({"video": name, "caption": f"clip {i}"}) + "\n" for i,
                     name in enumerate(names))
    make_tokenizer(os.path.join(work, "tok"))


def plan(stages, gpus, budget, elapsed):
    """Why a stage does not start ("" when it does): it needs more GPUs, or its expected time does
    not fit."""
    def why(stage):
        if stage.gpus > max(gpus, 1):   # a CPU counts as one
            return f"skipped: needs {stage.gpus} GPUs, this machine has {gpus}"
        if elapsed() + stage.expected_s > budget:
            return (f"skipped: expected {stage.expected_s:.0f} s, "
                    f"{max(budget - elapsed(), 0):.0f} s of the budget left")
        return ""
    return why


COLUMNS = ("rc", "seconds", "expected_s", "slots", "tokens_per_s", "videos_per_gpu_hour",
           "peak_gb", "graphs", "bound_share", "prefill_share", "widening_fused", "rows")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "results", "gpu-check.json"))
    p.add_argument("--budget", type=float, default=600.0, help="seconds for the whole check")
    p.add_argument("--size", default="13b", help="the engine stages' model (lab/bench.py SIZES)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--work",
                   help="the folder the work folder goes under (default: the system's temp)")
    p.add_argument("--engine-stage", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.engine_stage:
        return engine_stage(**json.loads(args.engine_stage))
    import torch
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    if args.device.startswith("cuda") and not gpus:
        sys.exit(
            "error: no GPU: this is the check a GPU machine runs (--size tiny --device cpu "
            "rehearses it)"
        )
    card = torch.cuda.get_device_name(0) if gpus else f"CPU, --size {args.size}"
    start, work = time.monotonic(), tempfile.mkdtemp(prefix="gpu-check-", dir=args.work)
    results = []
    try:
        prepare(work)
        why = plan(STAGES, gpus, args.budget, lambda: time.monotonic() - start)
        for stage in STAGES:
            skip = why(stage)
            left = args.budget - (time.monotonic() - start)
            r = {"stage": stage.name, "expected_s": stage.expected_s, "rc": skip} if skip else \
                run_stage(stage, args, work, min(2 * stage.expected_s, max(left, 1)))
            results.append(r)
            print(
                f"{r['stage']:<44}"
                + "  ".join(f"{c} {r[c]}" for c in COLUMNS if r.get(c) is not None),
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"card": card, "gpus": gpus, "torch": torch.__version__, "budget_s": args.budget,
              "seconds": round(time.monotonic() - start, 1), "stages": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(
        f"{card} x {gpus}: {sum(r['rc'] == 0 for r in results)} of {len(results)} stages passed in "
        f"{report['seconds']:.0f} s; {args.out}"
    )
    return report


if __name__ == "__main__":
    main()
