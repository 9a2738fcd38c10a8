"""bench.py's sections measured in processes of their own, ours against transformers (+ peft): a
LoRA training step (its time and peak memory) and loading a checkpoint (its time and peak RSS).
Each side runs in a fresh process (measure.alternate: A B A B ...), so neither pays for the
other's memory or warm caches. `python -m lab.bench_train --child JSON` is one such process.
"""

import argparse
import contextlib
import json
import os
import time

import torch

from config import Config
from lab import measure
from lab.measure import SIZES, PeakRSS, reference_models, row, value
from lora import add_lora
from model import PLLaVA


def train_step_child(k):
    """LoRA training steps of the LLM (q_proj, k_proj, r=128, alpha=32, AdamW), ours or
    transformers + peft, on the same embeddings; the loss on the last 64 positions. Returns each
    step's time and the peak memory."""
    device, dtype = k["device"], getattr(torch, k["dtype"])
    config = Config.from_dict(SIZES[k["size"]])
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
            logits = lm.lm_head(h[:, :-1][keep]).float()
            return torch.nn.functional.cross_entropy(logits, labels[:, 1:][keep])
        params = [p for p in lm.parameters() if p.requires_grad]
    else:
        from peft import LoraConfig, get_peft_model
        _, ref = reference_models(config, device, dtype)   # weights of its own: one model
        if k["checkpointing"]:
            ref.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        lora = LoraConfig(r=128, lora_alpha=32, target_modules=["q_proj", "k_proj"],
                          lora_dropout=0.0)
        ref = get_peft_model(ref, lora)

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
    gpu = device.startswith("cuda")
    peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else mem.peak - mem.start
    return {"times": times, "peak_mb": peak}


def load_child(k):
    """Load a checkpoint, ours or transformers', and touch every weight (a lazily mapped file counts
    in full): its time, and its peak RSS (sampled on a thread, in a run of its own: k["timed"]
    False)."""
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
    if a.device == "cpu":
        batch, length = 2, 640
    else:
        batch, length = 1 if big else 4, ctx["model"].config.num_visual_tokens + 128
    common = dict(size=a.size, device=a.device, dtype=str(ctx["dtype"]).split(".")[1], batch=batch,
                  length=length, repeats=a.repeats, checkpointing=big)
    result, got = measure.alternate("lab.bench_train", "train", common, rounds=2)
    peak = {impl: max(r["peak_mb"] for r in runs) for impl, runs in got.items()}
    return [row(f"LoRA training step, batch {batch} x {length} tokens", "samples/s", result, batch),
            value("LoRA training step: peak memory, ours / transformers + peft", "MB / MB",
                  peak["ours"] / peak["reference"]) | {"detail": peak}]


def bench_load(ctx):
    """A random checkpoint of about --load-gb (fp32), written once, loaded by each library in fresh
    processes."""
    gb, a = ctx["args"].load_gb, ctx["args"]
    folder = os.path.join(a.cache, f"load_{gb:g}gb")
    if not os.path.exists(os.path.join(folder, "config.json")):
        hidden = 1024
        layers = max(1, int(gb * 2**30 / 4 / (12 * hidden * hidden)))   # ~12 h^2 parameters a block
        text = dict(vocab_size=32064, hidden_size=hidden, intermediate_size=4 * hidden,
                    num_hidden_layers=layers, num_attention_heads=16)
        PLLaVA.from_config(Config.from_dict(dict(SIZES["tiny"], text_config=text))) \
            .save_pretrained(folder)
    size_mb = os.path.getsize(os.path.join(folder, "model.safetensors")) / 2**20
    timed = {"path": folder, "timed": True}
    result, _ = measure.alternate("lab.bench_train", "load", timed, rounds=a.repeats)
    mem = {impl: measure.child("lab.bench_train", "load",
                               {"impl": impl, "path": folder, "timed": False})
           for impl in ("ours", "reference")}
    peak = {i: m["peak_mb"] / size_mb for i, m in mem.items()}
    added = {i: (m["peak_mb"] - m["before_mb"]) / size_mb for i, m in mem.items()}
    return [row(f"load a {size_mb / 1024:.2f} GB checkpoint and read every weight", "s", result),
            value("load: peak RSS / checkpoint size, ours (transformers in detail)", "x",
                  peak["ours"]) | {"detail": peak},
            value("load: (peak RSS - RSS before loading) / checkpoint size, ours (transformers in "
                  "detail)", "x", added["ours"]) | {"detail": added}]


if __name__ == "__main__":   # one side of a measurement, in a process of its own (measure.child)
    p = argparse.ArgumentParser()
    p.add_argument("--child", required=True)
    k = json.loads(p.parse_args().child)
    torch.manual_seed(0)
    print(json.dumps({"train": train_step_child, "load": load_child}[k["name"]](k)))
