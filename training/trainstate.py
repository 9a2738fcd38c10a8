"""What a training run leaves in --out and starts again from: checkpoints, resume, the exported
model; and the ranks joined, for each attempt of a run (a restart, a requeue).

out/checkpoints/step_N holds the trainable weights and the optimizer (sharded,
torch.distributed.checkpoint), each rank's RNG state (safetensors), the step (state.json), and for
LoRA runs the adapter + projector as safetensors. A checkpoint is written under a temporary name
and renamed when complete, so a kill mid-save leaves the previous one intact. Nothing here
unpickles, except the metadata file of torch's DCP format, which torch itself pickles: checkpoints,
like code, should come from people you trust.
"""

import datetime
import json
import os
import re
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)

import lora
from model import PLLaVA
from tokenizer import save_prompt

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "added_tokens.json",
                   "special_tokens_map.json")


def barrier(world):
    if world > 1:
        dist.barrier()


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def newest_checkpoint(out):
    root = os.path.join(out, "checkpoints")
    done = (sorted(d for d in os.listdir(root) if re.fullmatch(r"step_\d+",
                                                               d)) if os.path.isdir(root) else [])
    return os.path.join(root, done[-1]) if done else None


def check_out(out, resume):
    """Before anything slow: --out can be written, and holds checkpoints exactly when --resume asks
    for them (a rerun without --resume would train for hours and then fail to save beside them)."""
    found = newest_checkpoint(out)
    if found and not resume:
        raise ValueError(
            f"{out} already holds checkpoints (newest: {os.path.basename(found)}): add --resume to "
            f"continue from it, or choose another --out"
        )
    os.makedirs(out, exist_ok=True)
    probe = os.path.join(out, f".write-test-{os.getpid()}")
    open(probe, "w").close()
    os.remove(probe)
    return found


def check_shared_out(out, rank, world):
    """Every rank must see the same --out: each writes its shards of a checkpoint there and rank 0
    renames the folder, so on disks of each node's own another node's shards would vanish. Rank 0
    leaves a token; a rank that does not find it stops the run (all of them) at start, in one
    line."""
    token = os.path.join(out, ".shared-check")
    mine = f"{os.getpid()}-{time.time_ns()}" if rank == 0 else None
    if rank == 0:
        with open(token, "w") as f:
            f.write(mine)
    box = [mine]
    dist.broadcast_object_list(box, src=0)
    dist.barrier()
    try:
        with open(token) as f:
            seen = f.read() == box[0]
    except OSError:
        seen = False
    everyone = [None] * world
    dist.all_gather_object(everyone, seen)
    if rank == 0:
        os.remove(token)
    if not all(everyone):
        raise ValueError(
            f"--out {out} is not the same folder on every node ({everyone.count(False)} of {world} "
            f"ranks do not see what rank 0 wrote there): use a shared file system for --out"
        )


def _rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def save_checkpoint(model, optimizer, args, step, stats, rank, world):
    root = os.path.join(args.out, "checkpoints")
    final, tmp = os.path.join(root, f"step_{step:08d}"), os.path.join(root, f"step_{step:08d}.tmp")
    if rank == 0:   # a save killed half-way left its .tmp folder: those go, this one starts clean
        for old in os.listdir(root) if os.path.isdir(root) else []:
            if re.fullmatch(r"step_\d+\.tmp", old):
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        os.makedirs(tmp)
    barrier(world)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    keep = trainable_names(model)
    dcp.save({"model": {k: v for k, v in model_sd.items() if k in keep}, "optim": optim_sd},
             checkpoint_id=tmp)
    save_file(_rng_state(), os.path.join(tmp, f"rng_{rank}.safetensors"))
    small = ({n: p for n,
              p in model.named_parameters() if p.requires_grad} if lora.lora_layers(model) else {})
    small = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu() for n,
             p in small.items()}
    barrier(world)
    if rank == 0:
        if small:
            projector = model.parameter_names(model.multi_modal_projector)
            save_file({n: t for n, t in small.items() if n in projector},
                      os.path.join(tmp, "projector.safetensors"))
            lora.save_adapter(model.language_model, tmp,
                              weights={n[len("language_model.") :]: t for n,
                                       t in small.items() if ".lora_" in n})
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, "world_size": world, **stats}, f)
        os.replace(tmp, final)
        done = sorted(d for d in os.listdir(root) if re.fullmatch(r"step_\d+", d))
        for old in done[:-args.keep]:
            shutil.rmtree(os.path.join(root, old))
    barrier(world)


def load_checkpoint(model, optimizer, path, rank):
    model_sd, optim_sd = get_state_dict(model, optimizer)
    keep = trainable_names(model)
    state = {"model": {k: v for k, v in model_sd.items() if k in keep}, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)   # fails on any requested key the checkpoint lacks
    # a checkpoint holds the trainable weights only: the frozen ones are set to what they already
    # are, so that the load stays strict (a key the model has and nothing gives is an error)
    set_state_dict(model, optimizer, model_state_dict={**model_sd, **state["model"]},
                   optim_state_dict=state["optim"])
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    rng_file = os.path.join(path, f"rng_{rank}.safetensors")
    # resumed on more processes than saved it: this rank's dropout anew
    if not os.path.exists(rng_file):
        torch.manual_seed(1_000_003 * state["step"] + rank)
        return state
    rng = load_file(rng_file)
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and "cuda_0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda_{i}"] for i in range(torch.cuda.device_count())])
    return state


# ------------------------------------------------------------------ on a cluster: restarts, resume


def restarts():
    """Why this process is a restart of a run ("" when it is not): torchrun --max-restarts starting
    the ranks again after one failed (TORCHELASTIC_RESTART_COUNT), or Slurm requeueing the job
    (SLURM_RESTART_COUNT). Either way the run goes on from its newest checkpoint by itself."""
    for var, what in (
        ("TORCHELASTIC_RESTART_COUNT", "torchrun restart"),
        ("SLURM_RESTART_COUNT", "Slurm requeue"),
    ):
        if os.environ.get(var, "0").isdigit() and int(os.environ.get(var, "0")) > 0:
            return f"{what} {os.environ[var]}"
    return ""


def check_resumable(path, per_step, world):
    """A checkpoint resumes on any number of processes that make the same global batch (the data
    order is a function of the step and the global batch: dataset.StepSampler); another global batch
    is refused here, at start."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    before = state.get("global_batch")
    # a checkpoint from before global_batch
    if before is None and state.get("world_size", world) != world:
        raise ValueError(
            f"{path} was saved by {state['world_size']} processes: resume it on as many"
        )
    if before is not None and before != per_step:
        raise ValueError(
            f"{path} was saved with a global batch of {before} videos a step, this run makes "
            f"{per_step} (--batch-size x processes x --grad-accum): resume with {before}"
        )


def shared(make, rank, world):
    """make() run on rank 0 alone and its result given to every rank (its error too, as a ValueError
    each rank raises: every rank stops at start in one line)."""
    box = [None]
    if rank == 0:
        try:
            box = [(True, make())]
        except (OSError, ValueError) as e:
            box = [(False, str(e))]
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise ValueError(value)
    return value


def sample_list(args, resume_from):
    """(samples, rows left out) of --data, listed once when the run begins and kept in
    --out/samples.json: a resumed run (a restart, a requeue) reads the same list again, whatever has
    happened to the files since, so that its steps are the ones it would have run."""
    from training.dataset import load_data
    from plumbing.jsonl import replace_atomic
    kept = os.path.join(args.out, "samples.json")
    if resume_from and os.path.exists(kept):
        with open(kept, encoding="utf-8") as f:
            listed = json.load(f)
        print(f"resuming with the {len(listed['samples'])} samples the run began with ({kept})",
              file=sys.stderr, flush=True)
        return [tuple(s) for s in listed["samples"]], listed["dropped"]
    samples, dropped = load_data(args.data, args.video_root)
    # ASCII: any file name
    text = json.dumps({"data": args.data, "samples": samples, "dropped": dropped})
    replace_atomic(kept, lambda f: f.write(text.encode()))
    return samples, dropped


def export(model, args, tokenizer_folder, preprocessing_folder, rank, dtype, prompt):
    """A folder caption.py loads: config.json, model.safetensors, the adapter, the tokenizer files,
    the preprocessor_config.json training normalized with, and prompt.json: the question, system
    line and template it was trained with, which caption.py uses."""
    full = get_model_state_dict(model,
                                options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    with torch.device("meta"):
        out = PLLaVA(model.config)
        shape = lora.lora_shape(model.language_model)
        if shape:
            lora.add_lora_like(out.language_model, shape)
    out.load_state_dict({k: v.to(dtype) for k, v in full.items()}, assign=True, strict=True)
    out.save_pretrained(args.export)
    for folder, name in [(tokenizer_folder, n) for n in TOKENIZER_FILES] + [
        (preprocessing_folder, "preprocessor_config.json")
    ]:
        if os.path.exists(os.path.join(folder, name)):
            shutil.copy(os.path.join(folder, name), os.path.join(args.export, name))
    save_prompt(args.export, prompt["question"], prompt["system"], prompt["template"])


def finish(r, s):
    """The last checkpoint, the export, and the process group closed once every rank is done."""
    if r.total > r.start:
        save_checkpoint(r.model, r.optimizer, s, r.total, r.state(), r.rank, r.world)
    if s.export:
        dtype = getattr(torch, s.export_dtype) if s.export_dtype else \
            (torch.bfloat16 if r.device.type == "cuda" else torch.float32)
        export(r.model, s, r.tok_folder, r.pre, r.rank, dtype, r.prompt)
    if r.metrics:
        r.metrics.close()
        print(f"done: checkpoint {s.out}/checkpoints/step_{r.total:08d}, metrics {r.metrics.path}"
              f"{', model ' + s.export if s.export else ''}", flush=True, file=sys.stderr)
    barrier(r.world)   # no rank leaves while another is still in a collective (rank 0 exporting)
    dist.destroy_process_group()


def init_process_group(backend, timeout):
    """torchrun's ranks joined, in a namespace of the store of their own attempt: after a restart,
    the ranks must not find the addresses that the ranks of the attempt before (one of them dead)
    left in torchrun's store, or gloo connects to a port nobody listens on any more."""
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"attempt_{attempt}/", store),
                            rank=rank, world_size=world, timeout=timeout)


def collective_timeout(args):
    """How long a rank waits for the others before the run is declared lost (a node that died
    without closing its sockets is found so): the longest wait a healthy run can have, a micro-batch
    step whose every sample runs into --decode-timeout on one decoding process, or 10 minutes for a
    checkpoint or an export, with 2 minutes to spare."""
    worst = args.decode_timeout * args.batch_size * args.grad_accum / max(1, args.workers or 4)
    return datetime.timedelta(seconds=max(600.0, worst) + 120)
