"""Post-train PLLaVA the report's way: LoRA on the LLM plus the projector, everything else frozen.

    python train.py --data labels.jsonl --model llava-hf/llava-v1.6-vicuna-7b-hf --out runs/anime
    torchrun --nproc_per_node=8 train.py ...                      one node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HEAD:29500 train.py ...

The model is sharded with FSDP2 over the processes (trainable.py; NCCL on GPUs, gloo on CPUs; one
process is a one-rank mesh, several nodes HSDP): each decoder block and the vision tower are their
own units, bf16 compute with fp32 weights and gradient reductions on GPUs. Rank 0 reads the
checkpoint (memory-mapped) and broadcasts it tensor by tensor; the others build on the meta device
and receive their shards only. Before that, the memory of each GPU is planned (plumbing/memory.py;
`--dry-run` prints it, and rehearses one step on fake tensors) and a run that cannot fit is
refused. Videos are decoded in worker processes under a time and memory limit each
(dataset.Batches), so one bad file never stalls a rank. Checkpoints (trainable weights, optimizer,
step, RNG) go to --out every --save-every steps; --resume continues from the newest
(trainstate.py). The loss is the mean over the answer tokens of the whole global batch, so one
process and N processes with the same global batch train the same weights.
"""

import datetime
import math
import os
import resource
import sys
import time

import torch
import torch.distributed as dist

from data import mean_std, normalize
from dataset import Batches, StepSampler, TrainSet, eval_keys, load_data
from plumbing import cli, hub, memory
from plumbing.jsonl import Appender, Busy
from plumbing.workers import cores_per_rank
from tokenizer import TEMPLATES, Tokenizer, prompt_for
from trainable import mesh_shape, preprocessing_folder, probe, recompute, setup_model
from trainstate import (barrier, check_out, check_resumable, check_shared_out, export, load_checkpoint, restarts,
                        sample_list, save_checkpoint, shared)
from weights import RELEASES, ModelFolderError


def train(args):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.init_from_config and not args.tokenizer:
        raise ValueError("--init-from-config needs --tokenizer FOLDER")
    restarted = restarts()
    if restarted and not args.resume and rank == 0:   # torchrun --max-restarts, or a Slurm requeue
        print(f"note: {restarted}: resuming from the newest checkpoint in {args.out}", file=sys.stderr, flush=True)
    args.resume = args.resume or bool(restarted)
    # everything a user can get wrong is found here, before the model loads
    resume_from = check_out(args.out, args.resume) if args.resume or rank == 0 else None
    if args.resume and not resume_from and rank == 0:
        print(f"note: --resume, but {args.out} holds no checkpoint: starting at step 0", file=sys.stderr, flush=True)
    per_step = args.batch_size * world * args.grad_accum
    if resume_from:
        check_resumable(resume_from, per_step, world)
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1:
        init_process_group(backend, collective_timeout(args))
        check_shared_out(args.out, rank, world)   # node-local disks would lose other nodes' checkpoint shards
    else:   # a one-rank group of its own, so that one process runs the same FSDP2 code as many
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    # the samples, listed once by rank 0 (each rank's own view of a network disk may differ) and kept in
    # --out, so that a resumed run sees the same list whatever has happened to the files since
    samples, dropped = shared(lambda: sample_list(args, resume_from), rank, world)
    eval_samples = shared(lambda: load_data(args.eval_data, args.video_root)[0], rank, world) \
        if args.eval_data else None
    if len(samples) < per_step:
        raise ValueError(f"{len(samples)} samples are fewer than one step takes ({per_step}: --batch-size x "
                         f"processes x --grad-accum)")
    total = args.max_steps or max(1, int(args.epochs * (len(samples) // per_step)))
    workers = args.workers or min(4, cores_per_rank())   # this rank's share of the node's cores
    folder = hub.resolve(RELEASES.get(args.model, args.model)) if args.model else None
    tok_folder = args.tokenizer or folder
    config, trainable = probe(args, folder)
    shards = mesh_shape(world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))[-1]   # HSDP: a node's GPUs
    checkpoints_on, need = memory.for_training(args, config, trainable, shards, device.type == "cuda")
    if rank == 0 and device.type == "cuda":
        print(f"memory per GPU: {need['total']:.1f} GB ({memory.describe(need)}), activation checkpointing "
              f"{'on' if checkpoints_on else 'off'}", file=sys.stderr, flush=True)
    if args.export and any(f and os.path.exists(args.export) and os.path.samefile(args.export, f)
                           for f in (folder, tok_folder)):
        raise ValueError(f"--export {args.export} is the folder training starts from: export somewhere else")
    tok = Tokenizer(tok_folder)
    prompt = prompt_for(folder, tok, args.prompt, args.system, args.template)   # the start folder's, unless flags
    if rank == 0:
        print(f"prompt: {prompt['source']}: {prompt['question'][:80]!r} ({prompt['template']})", file=sys.stderr,
              flush=True)
    model = setup_model(args, folder, rank, world, device)
    torch.manual_seed(args.seed + rank)   # LoRA dropout: each rank draws its own masks
    recompute(model, checkpoints_on)
    frames, size = args.frames or model.config.num_frames, model.config.vision_config.image_size
    optimizer = make_optimizer(model, args)
    start, stats = 0, {"skipped": 0}
    if resume_from:
        state = load_checkpoint(model, optimizer, resume_from, rank)
        start, stats = state["step"], {"skipped": state.get("skipped", 0)}
        if state.get("total_steps", total) != total:
            raise ValueError(f"this run's schedule has {state['total_steps']} steps, --max-steps / --epochs now "
                             f"give {total}: resume with the same, or train more as a new run from its --export")
    pad = tok.pad_id if tok.pad_id is not None else 0
    decode = dict(workers=workers, timeout=args.decode_timeout, memory_gb=args.decode_memory)
    trainset = TrainSet(samples, tok, prompt, frames, size, args.seed, "random", args.max_text_tokens)
    batches = iter(Batches(trainset, StepSampler(len(samples), args.batch_size, args.grad_accum, rank, world,
                                                 args.seed, start, total), pad, **decode))
    evaluation = None
    if eval_samples:
        evalset = TrainSet(eval_samples, tok, prompt, frames, size, args.seed, "middle", args.max_text_tokens)
        keys = eval_keys(len(eval_samples), rank, world)
        evaluation = Batches(evalset, [keys[i:i + args.batch_size] for i in range(0, len(keys), args.batch_size)],
                             pad, **{**decode, "workers": min(workers, 2)})
    pre = preprocessing_folder(folder, tok_folder)
    mean, std = mean_std(pre)   # and the export carries its preprocessor_config.json: caption.py normalizes alike
    if rank == 0:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        print(f"{len(samples)} samples ({dropped} rows left out), {world} process(es), global batch {per_step}, "
              f"steps {start}..{total}; training {n_train / 1e6:.2f}M of {n_all / 1e6:.2f}M parameters; "
              f"{workers} decoding processes per rank", flush=True, file=sys.stderr)
    if rank == 0:
        steps = f" and every {args.save_every} steps" if args.save_every else ""
        print(f"checkpoints every {args.save_minutes:g} minutes{steps}"
              f" and at the end, in {args.out}/checkpoints (--save-minutes, --save-every)", file=sys.stderr, flush=True)
    metrics = Appender(os.path.join(args.out, "metrics.jsonl"), truncate=not resume_from) if rank == 0 else None
    if metrics and resume_from:   # the rows of steps after the checkpoint are done again: they go
        metrics.resume(lambda r: (r.get("step"), "eval_loss" in r), lambda r: r.get("step", 0) <= start)
    model.train()
    began = saved = time.perf_counter()
    for step in range(start, total):
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(args.grad_accum)]
        n_tokens, = all_sum([sum((b["labels"][:, 1:] != -100).sum().item() for b in micro)], world, device)
        if n_tokens == 0 and rank == 0:
            print(f"warning: step {step + 1} has no answer tokens to learn from (is --max-text-tokens shorter "
                  f"than the prompt?)", flush=True, file=sys.stderr)
        lr = lr_at(step, args, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            model.set_requires_gradient_sync(i == len(micro) - 1)   # reduce once per step, after the last
            loss = run_micro(model, batch, device, mean, std)
            # FSDP averages gradients over ranks; scaled so, the sum is the global token mean
            (loss * world / max(n_tokens, 1)).backward()
            loss_sum += loss.item()
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                              args.clip if args.clip > 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        skipped = [r for b in micro for r in b["skipped"]]
        for reason in skipped:
            print(f"skipped: {reason}", flush=True, file=sys.stderr)
        due = rank == 0 and time.perf_counter() - saved >= 60 * args.save_minutes   # rank 0's clock decides
        loss_sum, n_skip, n_videos, n_seq, due = all_sum(
            [loss_sum, len(skipped), sum(len(b["ids"]) for b in micro),
             sum(b["ids"].numel() + len(b["ids"]) * (model.config.num_visual_tokens - 1) for b in micro),
             float(due)], world, device)
        stats["skipped"] += int(n_skip)
        dt = time.perf_counter() - t0
        if rank == 0 and (step % args.log_every == 0 or step == total - 1):
            row = {"step": step + 1, "loss": loss_sum / max(n_tokens, 1), "lr": lr, "grad_norm": float(norm),
                   "videos_per_s": n_videos / dt, "tokens_per_s": n_seq / dt, "step_s": dt,
                   "peak_mem_gb": peak_memory_gb(device), "skipped": stats["skipped"],
                   "eta_min": (total - step - 1) * (time.perf_counter() - began) / (step + 1 - start) / 60}
            metrics.write(row)
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  flush=True, file=sys.stderr)
        if evaluation and args.eval_every and ((step + 1) % args.eval_every == 0 or step == total - 1):
            eval_loss = evaluate(model, evaluation, device, world, mean, std)
            if rank == 0:
                metrics.write({"step": step + 1, "eval_loss": eval_loss})
                print(f"step {step + 1} eval_loss {eval_loss:.4f}", flush=True, file=sys.stderr)
        if (due or args.save_every and (step + 1) % args.save_every == 0) and step + 1 < total:
            save_checkpoint(model, optimizer, args, step + 1, {**stats, "total_steps": total,
                                                               "global_batch": per_step}, rank, world)
            saved = time.perf_counter()
    if total > start:
        save_checkpoint(model, optimizer, args, total, {**stats, "total_steps": total, "global_batch": per_step},
                        rank, world)
    if args.export:
        dtype = getattr(torch, args.export_dtype) if args.export_dtype else \
            (torch.bfloat16 if device.type == "cuda" else torch.float32)
        export(model, args, tok_folder, pre, rank, dtype, prompt)
    if metrics:
        metrics.close()
        print(f"done: checkpoint {args.out}/checkpoints/step_{total:08d}, metrics {metrics.path}"
              f"{', model ' + args.export if args.export else ''}", flush=True, file=sys.stderr)
    barrier(world)   # no rank leaves while another is still in a collective (rank 0 exporting)
    dist.destroy_process_group()


def init_process_group(backend, timeout):
    """torchrun's ranks joined, in a namespace of the store of their own attempt: after a restart,
    the ranks must not find the addresses that the ranks of the attempt before (one of them dead)
    left in torchrun's store, or gloo connects to a port nobody listens on any more."""
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"attempt_{attempt}/", store), rank=rank,
                            world_size=world, timeout=timeout)


def collective_timeout(args):
    """How long a rank waits for the others before the run is declared lost (a node that died
    without closing its sockets is found so): the longest wait a healthy run can have, a micro-batch
    step whose every sample runs into --decode-timeout on one decoding process, or 10 minutes for a
    checkpoint or an export, with 2 minutes to spare."""
    worst = args.decode_timeout * args.batch_size * args.grad_accum / max(1, args.workers or 4)
    return datetime.timedelta(seconds=max(600.0, worst) + 120)


def make_optimizer(model, args):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:   # biases and norm weights (1-D) are not decayed
            (decay if p.ndim >= 2 else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999))


def lr_at(step, args, total):
    """Linear warmup, then cosine from lr down to min_lr at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def run_micro(model, batch, device, mean, std):
    pixels = normalize(batch["frames"], mean, std, device)
    return model(batch["ids"].to(device), pixels, labels=batch["labels"].to(device), loss_reduction="sum")


def evaluate(model, batches, device, world, mean, std):
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for batch in batches:
            total += run_micro(model, batch, device, mean, std).item()
            count += (batch["labels"][:, 1:] != -100).sum().item()
    model.train()
    total, count = all_sum([total, count], world, device)
    return total / max(count, 1)


def all_sum(values, world, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux


def dry_run(args):
    """The plan of a release (pllava-7b/13b/34b or its hub id), a local model folder or
    --init-from-config on --gpus GPUs of --card-gb each, beside one training step rehearsed on fake
    tensors (plumbing/rehearse.py) with the FSDP2 wrapping at that world size: nothing is read,
    loaded, downloaded or started."""
    from plumbing import rehearse
    config, trainable = probe(args, args.model if args.model and os.path.isdir(args.model) else None)
    shards = mesh_shape(args.gpus, int(os.environ.get("LOCAL_WORLD_SIZE", args.gpus)))[-1]
    on, need = memory.for_training(args, config, trainable, shards, gpu=True)
    peak = rehearse.training(args, config, args.gpus, on)
    print(f"{args.model or args.init_from_config}: batch {args.batch_size} x {config.num_visual_tokens} visual + "
          f"{args.max_text_tokens} text tokens on {args.gpus} GPU(s), {trainable / 1e6:.1f}M trainable, activation "
          f"checkpointing {'on' if on else 'off'}: estimate {memory.describe(need)}, total {need['total']:.1f} GB "
          f"per GPU; rehearsed on fake tensors: peak {peak['peak_gb']:.1f} GB + context {memory.CONTEXT_GB} GB")
    return {**need, "rehearsed": peak["peak_gb"] + memory.CONTEXT_GB}


def parse_args(argv=None):
    p = cli.Parser(description="LoRA post-training of PLLaVA (FSDP2 under torchrun).")
    p.add_argument("--data", help="training JSONL file(s), comma-separated (required)")
    p.add_argument("--eval-data", help="JSONL file(s) for the eval loss")
    p.add_argument("--video-root", help="the folder the rows' video names (or relative paths) are inside on this "
                                        "machine")
    p.add_argument("--out", help="checkpoints, logs and metrics go here (required)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help=f"a release ({', '.join(RELEASES)}), a llava-v1.6 / PLLaVA folder or hub id")
    src.add_argument("--init-from-config", help="a config.json: random weights (for small models)")
    p.add_argument("--tokenizer", help="folder with the tokenizer files (default: the model folder)")
    p.add_argument("--full-finetune", action="store_true", help="train the whole LLM (and projector), no LoRA")
    p.add_argument("--train-all", action="store_true", help="train everything, vision tower too, no LoRA")
    p.add_argument("--freeze-projector", action="store_true",
                   help="LoRA alone learns: the projector stays as it was (alpha 0 is then the model started from)")
    p.add_argument("--lora-r", type=cli.positive_int, default=128, help="LoRA rank")
    p.add_argument("--lora-alpha", type=cli.non_negative, default=32.0, help="LoRA alpha (its share is alpha / r)")
    p.add_argument("--lora-dropout", type=cli.non_negative, default=0.05, help="dropout on the LoRA input")
    p.add_argument("--lora-targets", default="q_proj,k_proj", help="the linear layers that get LoRA, comma-separated")
    p.add_argument("--frames", type=cli.positive_int, help="frames per video (default: the model's num_frames)")
    p.add_argument("--prompt", help="the instruction paired with a plain caption (default: the model folder's "
                                    "prompt.json, which --export writes, else PLLaVA's detailed-caption question)")
    p.add_argument("--system", help="the system line of the prompt (default: prompt.json's, else PLLaVA's)")
    p.add_argument("--template", choices=sorted(TEMPLATES), help="default: prompt.json's, else from the tokenizer")
    p.add_argument("--max-text-tokens", type=cli.positive_int, default=1024,
                   help="text tokens per sample, longer ones cut (the visual ones apart)")
    p.add_argument("--batch-size", type=cli.positive_int, default=12, help="videos per GPU (or process) per micro-batch")
    p.add_argument("--grad-accum", type=cli.positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-steps", type=cli.positive_int, help="optimizer steps (default: --epochs' worth); "
                                                              "a resumed run keeps its own")
    p.add_argument("--epochs", type=cli.positive, default=1.0, help="used when --max-steps is not given")
    p.add_argument("--lr", type=cli.positive, default=2e-5, help="peak learning rate (cosine schedule)")
    p.add_argument("--min-lr", type=cli.non_negative, default=0.0, help="learning rate at the end of the schedule")
    p.add_argument("--warmup-steps", type=cli.count, default=0, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=cli.non_negative, default=0.02,
                   help="AdamW's, on weights of 2 dimensions or more")
    p.add_argument("--clip", type=cli.non_negative, default=1.0, help="gradient norm clip (0: none)")
    p.add_argument("--activation-checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="recompute each layer in the backward pass instead of keeping its activations; auto: "
                        "on when the run would not fit the GPU without it (memory.training), off on a CPU")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory each GPU needs (estimated, and one step rehearsed on fake tensors) "
                        "and stop")
    p.add_argument("--gpus", type=cli.positive_int, help="the GPUs a --dry-run plans for (default: $WORLD_SIZE, "
                                                         "else 1; $LOCAL_WORLD_SIZE: those of a node)")
    p.add_argument("--card-gb", type=cli.positive, help="a GPU's memory, for the plan (default: this GPU's, or 80)")
    p.add_argument("--workers", type=cli.positive_int,
                   help="video decoding processes per rank (default: this rank's share of the cores, at most 4)")
    p.add_argument("--decode-timeout", type=cli.positive, default=300.0,
                   help="seconds allowed to read one sample's frames (longer: a stand-in, reported)")
    p.add_argument("--decode-memory", type=cli.positive, default=8.0, help="GiB a decoding process may use")
    p.add_argument("--seed", type=int, default=0, help="of the LoRA weights, the data order and the frames sampled")
    p.add_argument("--log-every", type=cli.positive_int, default=10, help="steps between log lines")
    p.add_argument("--eval-every", type=cli.count, default=0, help="steps between eval losses (0: none)")
    p.add_argument("--save-every", type=cli.count, default=0, help="a checkpoint every this many steps too (0: none)")
    p.add_argument("--save-minutes", type=cli.positive, default=30.0,
                   help="a checkpoint every this many minutes (a lost node, a preemption loses at most that)")
    p.add_argument("--keep", type=cli.positive_int, default=3, help="checkpoints to keep")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--export", help="write a model folder that caption.py loads")
    p.add_argument("--export-dtype", choices=["float32", "bfloat16", "float16"],
                   help="the exported weights' dtype (default: bf16 after a GPU run, fp32 after a CPU one)")
    args = p.parse_args(argv)
    if not args.dry_run and not (args.data and args.out):
        p.error("--data and --out are required")
    if args.lora_dropout >= 1:
        p.error("--lora-dropout must be below 1")
    if args.freeze_projector and (args.full_finetune or args.train_all):
        p.error("--freeze-projector is for LoRA training: not with --full-finetune or --train-all")
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) < 1:
        p.error(f"WORLD_SIZE={world!r}: the number of processes, 1 or more (torchrun sets it)")
    args.gpus = args.gpus or int(world)
    return args


def main(argv=None):
    args = parse_args(argv)
    return cli.run(lambda: dry_run(args) if args.dry_run else train(args),
                   (OSError, ValueError, hub.HubError, ModelFolderError, Busy))


if __name__ == "__main__":
    main()
