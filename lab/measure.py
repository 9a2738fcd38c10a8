"""How bench.py measures: timing that holds on a shared machine, memory, the rows it reports,
and transformers' models of our weights to measure against.

`compare` runs ours and the reference one after the other (A B A B ...), so a slow drift of the
machine hits both, and reports each side's min / median / max and the ratio of medians with the
range of the ratios of the pairs. `decode_steps` times the single-token steps of decoding alone: the
prefill runs once, before, outside the clock. Memory is sampled from /proc in child processes that
start clean. `machine` records what a number depends on (versions, threads, the CPU, the load before
and after).
"""

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict

import torch

from config import PRESETS
from generate import compiled_decode, cpu_model, decode_one_token, prefill
from plumbing.jsonl import replace_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository

# a timing whose max / min is past this is "noisy": no share of the bandwidth is derived from it
STEADY = 1.25
TOO_SMALL = 2e-5   # seconds: below this, one timing is mostly the clock's own overhead


# the model sizes measured (random weights): --size in bench.py, pipeline.py and gpu_check.py
SIZES = {
    "tiny": dict(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, image_size=112, patch_size=14),
        text_config=dict(vocab_size=2048, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4),
        pooling_shape=[16, 4, 4],
    ),
    "small": dict(
        vision_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                           num_attention_heads=6, image_size=336, patch_size=14),
        text_config=dict(vocab_size=32064, hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=4096),
        pooling_shape=[16, 12, 12],
    ),
    "7b": PRESETS["pllava-7b"],
    "13b": PRESETS["pllava-13b"],
}


def reference_models(config, device, dtype, weights=None):
    """transformers' CLIPVisionModel and LlamaForCausalLM of our `config` in `dtype`, sharing the
    tensors of `weights` (our model) when given: one copy of 13B on the card, not two; else built on
    the device with weights of their own (never an fp32 copy first: 13B is 52 GB in fp32)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    text = {k: v for k, v in asdict(config.text_config).items() if v is not None}
    with torch.device("meta" if weights is not None else device):
        vision = CLIPVisionConfig(**asdict(config.vision_config))
        clip = CLIPVisionModel._from_config(vision, dtype=dtype).eval()
        lm = LlamaForCausalLM._from_config(LlamaConfig(**text), dtype=dtype).eval()
    if weights is not None:   # transformers 5: no vision_model level; assign: the very same tensors
        clip.load_state_dict(weights.vision_tower.vision_model.state_dict(), assign=True)
        lm.load_state_dict(weights.language_model.state_dict(), assign=True)
        # the buffers transformers derives, made again on the device
        positions = clip.embeddings.num_positions
        clip.embeddings.position_ids = torch.arange(positions, device=device)[None]
        with torch.device(device):
            lm.model.rotary_emb = type(lm.model.rotary_emb)(lm.config)
        left = [name for module in (clip, lm)
                for name, t in module.state_dict(keep_vars=True).items() if t.is_meta]
        if left:
            raise RuntimeError(f"transformers' {left[:3]} were not set from our weights")
    return clip, lm


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    """Seconds that fn() takes, the device's queue drained before and after. fn may return its own
    time (a float: the part of its work that counts, e.g. its steps without their setup)."""
    sync(device)
    t = time.perf_counter()
    own = fn()
    sync(device)
    return own if isinstance(own, float) else time.perf_counter() - t


def spread(times) -> dict:
    return {"min": min(times), "median": statistics.median(times), "max": max(times),
            "n": len(times)}


def compare(ours, reference, device, repeats=5, warmup=1) -> dict:
    """Times of ours() and reference() taken in turns after `warmup` untimed turns; reference may be
    None (nothing to compare with). Returns {"ours": spread, "reference": spread or None,
    "pair_ratios": [...]}: each pair's reference / ours time (> 1: ours is faster)."""
    for _ in range(warmup):
        ours()
        if reference:
            reference()
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(ours, device))
        if reference:
            b.append(timed(reference, device))
    return {"ours": spread(a), "reference": spread(b) if b else None,
            "pair_ratios": [y / x for x, y in zip(a, b)] if b else []}


def decode_steps(prefill, step, n, device, reset=None):
    """A function that runs n decode steps and returns the seconds the steps alone took; prefill()
    runs once now. step(i) does the i-th step; reset() (untimed, before each run) puts the cache
    back where the prefill left it, so every call of the returned function does the same work."""
    prefill()
    sync(device)

    def run():
        if reset:
            reset()
        total = 0.0
        for i in range(n):
            total += timed(lambda: step(i), device)
        return total
    return run


def embeddings(ctx, batch, length):
    D = ctx["model"].config.text_config.hidden_size
    g = torch.Generator(device=ctx["args"].device).manual_seed(0)
    return 0.02 * torch.randn(
        batch, length, D, device=ctx["args"].device, dtype=ctx["dtype"], generator=g
    )


def our_decoder(lm, x, n, mode, device):
    """n decode steps of ours after x (B, P, D): generate's own steps."""
    B, P = x.shape[:2]
    positions = torch.arange(P + n, device=device)[None].expand(B, -1)
    ones, slots, state = (
        torch.ones(B, P + n, dtype=torch.bool, device=device),
        torch.arange(P + n, device=device),
        {},
    )
    step_fn = compiled_decode(lm, mode) if mode else decode_one_token
    lm.setup_cache(B, P + n)

    def first():
        state["logits"] = prefill(lm, x, positions[:, :P], None)

    # as generate's steps with nothing padded: no mask (compiled: the whole cache, masked)
    def step(i):
        s = P + i
        mask = (ones & (slots <= s))[:, None, None, :] if mode else None
        state["logits"] = step_fn(lm, state["logits"].argmax(-1), positions[:, s : s + 1], mask,
                                  slots[s : s + 1], None if mode else s + 1)
    return decode_steps(first, step, n, device)


def cpu_flags() -> list:
    """The vector instruction sets the CPU has that change which kernels torch runs, and so the last
    bits of every float sum (a toy trained on AVX2 and on AVX-512 ends with other numbers)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(
                (line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []
            )
    except OSError:
        flags = []
    return [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]


def busy() -> float:
    """The 1-minute load average over the cores this process may use (> 1: the machine is busy)."""
    return os.getloadavg()[0] / len(os.sched_getaffinity(0))


def check_quiet(strict):
    """A line on stderr when the machine is busy; with strict, no run at all then."""
    if busy() > 1:
        print(
            f"warning: the machine is busy (load {os.getloadavg()[0]:.1f} on "
            f"{len(os.sched_getaffinity(0))} cores): ratios will be "
            f"noisy{'; --strict: not running' if strict else ''}",
            file=sys.stderr,
        )
        if strict:
            sys.exit(1)


def save(path, report):
    replace_atomic(path, lambda f: f.write(json.dumps(report, indent=2).encode()))


RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


def section_seconds(folder=RESULTS) -> dict:
    """The seconds each bench section last took at --size small on a CPU, as the results/ files
    record them (the newest file's figure for each, by the date in its name)."""
    seconds = {}
    names = [n for n in os.listdir(folder) if re.fullmatch(r"bench-.*\d{4}-\d\d-\d\d.*\.json", n)]
    for name in sorted(names, key=lambda n: (re.search(r"\d{4}-\d\d-\d\d", n).group(), n)):
        try:
            with open(os.path.join(folder, name)) as f:
                report = json.load(f)
        except (OSError, ValueError):
            continue
        cpu = str(report.get("machine", {}).get("device", "CPU")).startswith("CPU")
        if isinstance(report, dict) and report.get("size") == "small" and cpu:
            seconds.update(report.get("section_seconds") or {})
    return seconds


def machine(device) -> dict:
    """What every number depends on."""
    import av
    import numpy
    try:
        import transformers
        tf = transformers.__version__
    except ImportError:
        tf = None
    return {
        "device": torch.cuda.get_device_name()
        if str(device).startswith("cuda")
        else f"CPU: {cpu_model()}",
        "cpu_flags": cpu_flags(),
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": tf,
        "av": av.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "load_before": os.getloadavg(),
    }


def row(name, unit, result, work=None):
    """A table row from compare()'s result: times (seconds, lower is better), or with `work` (units
    done per call) rates (units/s). ratio > 1: ours better, either way; ratio_range: the pairs'
    ratios."""
    def side(s):
        if s is None or work is None:
            return s
        # a time found by subtraction, below zero: the noise is larger than the work
        if s["min"] <= 0:
            return {"min": None, "median": None, "max": None, "n": s["n"]}
        return {
            "min": work / s["max"],
            "median": work / s["median"],
            "max": work / s["min"],
            "n": s["n"],
        }
    ours, ref = side(result["ours"]), side(result.get("reference"))
    small = result["ours"]["median"] < TOO_SMALL or any(
        s and s["median"] is None for s in (ours, ref)
    )
    ratio = result["reference"]["median"] / result["ours"]["median"] if ref and not small else None
    pairs = result.get("pair_ratios") or []
    return {"name": name, "unit": unit, "ours": ours, "reference": ref, "ratio": ratio,
            "ratio_range": [min(pairs), max(pairs)] if pairs else None, "too_small_to_time": small}


def value(name, unit, x):
    return {"name": name, "unit": unit, "ours": {"min": x, "median": x, "max": x, "n": 1},
            "reference": None, "ratio": None, "ratio_range": None, "too_small_to_time": False}


def format_row(r):
    def num(s):
        return (
            "-"
            if s is None or s["median"] is None
            else f"{s['median']:.3g} [{s['min']:.3g}-{s['max']:.3g}]"
            if s["n"] > 1
            else f"{s['median']:.3g}"
        )
    ratio = "too small to time" if r["too_small_to_time"] else "-" if r["ratio"] is None else \
        f"{r['ratio']:.3g} [{r['ratio_range'][0]:.3g}-{r['ratio_range'][1]:.3g}]"
    return (f"{r['name']:<90} {r['unit']:>9}  ours {num(r['ours']):>24}  "
            f"ref {num(r['reference']):>24}  ratio {ratio}")


def child(module, name, kwargs):
    """Run a measurement in a fresh process (`python -m module --child JSON`); it prints one JSON
    line."""
    r = subprocess.run(
        [sys.executable, "-m", module, "--child", json.dumps({"name": name, **kwargs})],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"child {name} failed: {r.stderr[-2000:]}")
    return json.loads(lines[-1])


def alternate(module, name, kwargs, rounds):
    """Children of ours and the reference in turns, `rounds` times: their times paired as compare()
    pairs."""
    got = {impl: [] for impl in ("ours", "reference")}
    for _ in range(rounds):
        for impl in got:
            got[impl].append(child(module, name, {**kwargs, "impl": impl}))
    times = {impl: [t for r in runs for t in r["times"]] for impl, runs in got.items()}
    result = {"ours": spread(times["ours"]), "reference": spread(times["reference"]),
              "pair_ratios": [b / a for a, b in zip(times["ours"], times["reference"])]}
    return result, got


def rss_mb():
    """Resident memory now, from /proc (file-backed pages of memory-mapped weights included)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """The highest resident memory seen while the block runs, sampled every millisecond on a
    thread."""

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
