"""What each training step reports, summed over the ranks: the answer tokens its loss is the mean
over, the samples skipped, the figures logged to metrics.jsonl and stderr, the peak memory."""

import resource
import sys
import time

import torch
import torch.distributed as dist


def answer_tokens(micro, step, r):
    """The answer tokens of the whole global batch: the loss is their mean."""
    mine = sum((b["labels"][:, 1:] != -100).sum().item() for b in micro)
    n_tokens, = all_sum([mine], r.world, r.device)
    if n_tokens == 0 and r.rank == 0:
        print(f"warning: step {step + 1} has no answer tokens to learn from "
              f"(is --max-text-tokens shorter than the prompt?)", flush=True, file=sys.stderr)
    return n_tokens


def log_step(r, s, step, micro, loss_sum, n_tokens, lr, norm, due, t0, began):
    """The skipped samples said, the step's figures summed over the ranks and logged (rank 0, every
    --log-every steps and the last); whether a checkpoint is due, as rank 0 says."""
    skipped = [reason for b in micro for reason in b["skipped"]]
    for reason in skipped:
        print(f"skipped: {reason}", flush=True, file=sys.stderr)
    visual = r.model.config.num_visual_tokens - 1   # the <image> token stands for them all
    seq = sum(b["ids"].numel() + len(b["ids"]) * visual for b in micro)
    videos = sum(len(b["ids"]) for b in micro)
    loss_sum, n_skip, n_videos, n_seq, due = all_sum(
        [loss_sum, len(skipped), videos, seq, float(due)], r.world, r.device)
    r.stats["skipped"] += int(n_skip)
    dt = time.perf_counter() - t0
    if r.rank == 0 and (step % s.log_every == 0 or step == r.total - 1):
        row = {"step": step + 1, "loss": loss_sum / max(n_tokens, 1), "lr": lr, "grad_norm": norm,
               "videos_per_s": n_videos / dt, "tokens_per_s": n_seq / dt, "step_s": dt,
               "peak_mem_gb": peak_memory_gb(r.device), "skipped": r.stats["skipped"],
               "eta_min": (r.total - step - 1) * (time.perf_counter() - began)
               / (step + 1 - r.start) / 60}
        r.metrics.write(row)
        said = (f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        print(" ".join(said), flush=True, file=sys.stderr)
    return bool(due)


def all_sum(values, world, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux
