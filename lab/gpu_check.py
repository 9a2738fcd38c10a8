"""The first run on a GPU, as one script: python -m lab.gpu_check [--out results/gpu-check.json] [--budget 540]

The README's commands as a user starts them, on random weights: caption.py and train.py at a tiny size
(eager, --compile, --quantize int8; torchrun over two GPUs when there are two), caption.py at 13B with 16
slots (the run that would have run out of memory), and bench.py's 13B decode, int8 and engine rows. Each
stage is a process of its own with a time limit; what the budget leaves no time for is skipped and said
so. It prints one table (stage, result, seconds, peak GPU memory) and writes it as JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from lab.measure import ROOT

PEAK = "import atexit, torch; atexit.register(lambda: print('peak_gb', torch.cuda.max_memory_allocated() / 1e9))"


def stage(name, cmd, timeout, env=None, rows=None):
    """Run one command; its result: rc, seconds, the peak GPU memory it printed, the rows it wrote."""
    t = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})
        rc, out, err = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", e.stdout or "", e.stderr or ""
        out, err = out if isinstance(out, str) else out.decode(), err if isinstance(err, str) else err.decode()
    peak = [float(line.split()[1]) for line in out.splitlines() if line.startswith("peak_gb ")]
    written = sum(1 for _ in open(rows)) if rows and os.path.exists(rows) else None
    return {"stage": name, "rc": rc, "seconds": round(time.monotonic() - t, 1), "peak_gb": peak[-1] if peak else None,
            "rows": written, "tail": (err or out).strip().splitlines()[-3:]}


def python(code):
    return [sys.executable, "-c", f"{PEAK}\n{code}"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "results", "gpu-check.json"))
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole check")
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        sys.exit("error: no GPU: this is the check a GPU machine runs")
    gpus, card = torch.cuda.device_count(), torch.cuda.get_device_name(0)
    work = tempfile.mkdtemp(prefix="gpu-check-")
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from helpers import make_tokenizer, tiny_checkpoint
    from videos import write_video
    tiny = tiny_checkpoint(os.path.join(work, "tiny"))
    videos = os.path.join(work, "videos")
    os.makedirs(videos)
    for i in range(16):
        write_video(os.path.join(videos, f"v{i:02d}.mp4"), n_frames=20 + i)
    labels = os.path.join(work, "labels.jsonl")
    with open(labels, "w") as f:
        f.writelines(json.dumps({"video": os.path.join(videos, f"v{i:02d}.mp4"), "caption": f"clip {i}"}) + "\n"
                     for i in range(16))
    tok = make_tokenizer(os.path.join(work, "tok"))

    def captioned(name, model, *flags, timeout=180):
        out = os.path.join(work, f"{name}.jsonl")
        args = [videos, "--model", model, "--out", out, "--max-new-tokens", "32", *flags]
        return stage(name, python(f"import caption; caption.main({args!r})"), timeout, rows=out)

    train = [os.path.join(ROOT, "train.py"), "--data", labels, "--init-from-config", os.path.join(tiny, "config.json"),
             "--tokenizer", tok, "--max-steps", "5", "--batch-size", "2"]
    plan = [
        lambda: captioned("caption tiny, eager", tiny, "--batch-size", "4"),
        lambda: captioned("caption tiny, --compile", tiny, "--batch-size", "4", "--compile", timeout=300),
        lambda: captioned("caption tiny, --quantize int8 --compile", tiny, "--quantize", "int8", "--compile",
                          timeout=300),
        lambda: stage("train tiny, 5 steps", [sys.executable, *train, "--out", os.path.join(work, "t1")], 180),
        lambda: stage("train tiny, torchrun 2 GPUs", [sys.executable, "-m", "torch.distributed.run",
                                                      "--nproc_per_node=2", *train, "--out", os.path.join(work, "t2")],
                      240) if gpus > 1 else {"stage": "train tiny, torchrun 2 GPUs", "rc": "skipped (one GPU)"},
        lambda: stage("caption 13B random weights, 16 slots", python(
            "import os, sys, torch\n"
            "from lab.bench_caption import caption_world\n"
            "from lab.bench import SIZES\n"
            "from config import Config\n"
            "from model import PLLaVA\n"
            f"import types; a = types.SimpleNamespace(cache={work!r}, size='13b')\n"
            "m = PLLaVA.from_config(Config.from_dict(SIZES['13b']), dtype=torch.bfloat16, device='meta')\n"
            "folder, ckpt = caption_world({'args': a, 'model': m, 'dtype': torch.bfloat16}, 16)\n"
            "import caption\n"
            f"caption.main([folder, '--model', ckpt, '--out', {os.path.join(work, 'c13b.jsonl')!r}, "
            "'--batch-size', '16', '--max-new-tokens', '64'])"), 420, rows=os.path.join(work, "c13b.jsonl")),
        lambda: stage("bench 13b: decode, int8, engine, rehearsal", [sys.executable, "-m", "lab.bench", "--size",
                                                                    "13b", "--only", "decode,int8,engine,rehearsal",
                                                                    "--repeats", "2", "--json",
                                                                    os.path.join(work, "bench.json")], 420),
    ]
    results, start = [], time.monotonic()
    for run in plan:
        if time.monotonic() - start > args.budget:
            results.append({"stage": "(the rest)", "rc": f"skipped: past the {args.budget:.0f} s budget"})
            break
        results.append(run())
        r = results[-1]
        print(f"{r['stage']:<45} rc {str(r['rc']):<8} {r.get('seconds', '-'):>7} s  peak {r.get('peak_gb') or '-'} GB"
              f"  rows {r.get('rows') if r.get('rows') is not None else '-'}", flush=True)
    report = {"card": card, "gpus": gpus, "torch": torch.__version__, "stages": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"{card} x {gpus}: {sum(r['rc'] == 0 for r in results)} of {len(results)} stages passed; {args.out}")


if __name__ == "__main__":
    main()
