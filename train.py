"""Post-train PLLaVA the report's way: LoRA on the LLM plus the projector, everything else frozen.

    python train.py --data labels.jsonl --model llava-hf/llava-v1.6-vicuna-7b-hf --out runs/anime
    torchrun --nproc_per_node=8 train.py ...        one node; on two, H is the first node's host:
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=H:29500 train.py ...

The model is sharded with FSDP2 over the processes (training/trainable.py; NCCL on GPUs, gloo on
CPUs; one process is a one-rank mesh, several nodes HSDP): each decoder block and the vision tower
are their own units, bf16 compute with fp32 weights and gradient reductions on GPUs. Rank 0 reads
the checkpoint (memory-mapped) and broadcasts it tensor by tensor; the others build on the meta
device and receive their shards only. Before that, the memory of each GPU is planned (memory.py;
`--dry-run` prints it, and rehearses one step on fake tensors) and a run that cannot fit is refused.
Videos are decoded in worker processes under a time and memory limit each (dataset.Batches), so one
bad file never stalls a rank. Checkpoints (the trained weights, optimizer, step, RNG) go to --out
every --save-every steps; --resume continues from the newest (training/trainstate.py). The loss is
the mean over the answer tokens of the global batch: 1 process or N, one global batch, one result.
"""

import math
import os
import sys
import time
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist

import lora
import memory
from data import mean_std, normalize
from lab.rehearse import training_plan
from plumbing import cli, hub
from plumbing.jsonl import Appender, Busy
from plumbing.workers import cores_per_rank
from tokenizer import TEMPLATES, Tokenizer, prompt_for
from training.dataset import Batches, StepSampler, TrainSet, eval_keys, load_data
from training.trainable import mesh_shape, preprocessing_folder, probe, recompute, setup_model
from training.steplog import all_sum, answer_tokens, log_step
from training.trainstate import (check_out, check_resumable, check_shared_out, collective_timeout,
                                 finish, init_process_group, load_checkpoint, restarts,
                                 sample_list, save_checkpoint, shared)
from weights import RELEASES, ModelFolderError


def flag(default=None, help="", **kw):
    """A setting and its command-line flag (--lora-r for lora_r): its help, type, choices."""
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class Settings:
    """Everything a run is told; the flags are made from these fields (parse_args)."""
    # what it learns from, and where it writes
    data: str = flag(help="training JSONL file(s), comma-separated (required)")
    eval_data: str = flag(help="JSONL file(s) for the eval loss")
    video_root: str = flag(
        help="the folder the rows' video names (or relative paths) are inside on this machine")
    out: str = flag(help="checkpoints, logs and metrics go here (required)")
    # the model it starts from, and what of it trains (the report's split: LoRA + projector)
    model: str = flag(
        help=f"a release ({', '.join(RELEASES)}), a llava-v1.6 / PLLaVA folder or hub id", source=1)
    init_from_config: str = flag(help="a config.json: random weights (for small models)", source=1)
    tokenizer: str = flag(help="folder with the tokenizer files (default: the model folder)")
    full_finetune: bool = flag(False, "train the whole LLM (and projector), no LoRA")
    train_all: bool = flag(False, "train everything, vision tower too, no LoRA")
    freeze_projector: bool = flag(
        False, "LoRA alone learns: the projector stays as it was (alpha 0 is then the model it "
               "started from)")
    lora_r: int = flag(
        help=f"LoRA rank (default: {lora.R}, or the model's adapter's)", type=cli.positive_int)
    lora_alpha: float = flag(
        help=f"LoRA alpha; its share is alpha / r (default: {lora.ALPHA:g}, or the adapter's)",
        type=cli.non_negative)
    lora_dropout: float = flag(lora.DROPOUT, "dropout on the LoRA input", type=cli.non_negative)
    lora_targets: str = flag(
        help=f"the language model's linear layers that get LoRA, comma-separated: a layer's last "
             f"name or its full name (default: {','.join(lora.TARGETS)})")
    # the samples
    frames: int = flag(
        help="frames per video (default: the model's num_frames)", type=cli.positive_int)
    prompt: str = flag(
        help="the instruction paired with a plain caption (default: the model folder's "
             "prompt.json, which --export writes, else PLLaVA's detailed-caption question)")
    system: str = flag(help="the system line of the prompt (default: prompt.json's, else PLLaVA's)")
    template: str = flag(
        help="default: prompt.json's, else from the tokenizer", choices=sorted(TEMPLATES))
    max_text_tokens: int = flag(
        1024, "text tokens per sample, longer ones cut (the visual ones apart)",
        type=cli.positive_int)
    # the optimization
    batch_size: int = flag(12, "videos per GPU (or process) per micro-batch", type=cli.positive_int)
    grad_accum: int = flag(1, "micro-batches per optimizer step", type=cli.positive_int)
    max_steps: int = flag(
        help="optimizer steps (default: --epochs' worth); a resumed run keeps its own",
        type=cli.positive_int)
    epochs: float = flag(1.0, "used when --max-steps is not given", type=cli.positive)
    lr: float = flag(2e-5, "peak learning rate (cosine schedule)", type=cli.positive)
    min_lr: float = flag(0.0, "learning rate at the end of the schedule", type=cli.non_negative)
    warmup_steps: int = flag(0, "linear warm-up steps", type=cli.count)
    weight_decay: float = flag(
        0.02, "AdamW's, on weights of 2 dimensions or more", type=cli.non_negative)
    clip: float = flag(1.0, "gradient norm clip (0: none)", type=cli.non_negative)
    seed: int = flag(0, "of the LoRA weights, the data order and the frames sampled", type=int)
    # memory, and the plan of it
    activation_checkpointing: str = flag(
        "auto", "recompute each layer in the backward pass instead of keeping its activations; "
                "auto: on when the run would not fit the GPU without it (memory.training), off on "
                "a CPU",
        choices=["auto", "on", "off"])
    dry_run: bool = flag(
        False, "print the memory each GPU needs (estimated, and one step rehearsed on fake "
               "tensors) and stop")
    gpus: int = flag(
        help="the GPUs a --dry-run plans for (default: $WORLD_SIZE, else 1; $LOCAL_WORLD_SIZE: "
             "those of a node)", type=cli.positive_int)
    card_gb: float = flag(
        help="a GPU's memory, for the plan (default: this GPU's, or 80)", type=cli.positive)
    # decoding the videos
    workers: int = flag(
        help="video decoding processes per rank (default: this rank's share of the cores, at "
             "most 4)",
        type=cli.positive_int)
    decode_timeout: float = flag(
        300.0, "seconds allowed to read one sample's frames (longer: a stand-in, reported)",
        type=cli.positive)
    decode_memory: float = flag(8.0, "GiB a decoding process may use", type=cli.positive)
    # logs, checkpoints, the result
    log_every: int = flag(10, "steps between log lines", type=cli.positive_int)
    eval_every: int = flag(0, "steps between eval losses (0: none)", type=cli.count)
    save_every: int = flag(0, "a checkpoint every this many steps too (0: none)", type=cli.count)
    save_minutes: float = flag(
        30.0, "a checkpoint every this many minutes (a lost node, a preemption loses at most that)",
        type=cli.positive)
    keep: int = flag(3, "checkpoints to keep", type=cli.positive_int)
    resume: bool = flag(False, "continue from the newest checkpoint in --out")
    export: str = flag(help="write a model folder that caption.py loads")
    export_dtype: str = flag(
        help="the exported weights' dtype (default: bf16 after a GPU run, fp32 after a CPU one)",
        choices=["float32", "bfloat16", "float16"])


def train(s: Settings):
    """The loop: a step is --grad-accum micro-batches, one optimizer step, a log line; an eval loss
    and a checkpoint when they are due."""
    r = set_up(s)
    model, optimizer = r.model, r.optimizer
    model.train()
    began = saved = time.perf_counter()
    for step in range(r.start, r.total):
        t0 = time.perf_counter()
        micro = [next(r.batches) for _ in range(s.grad_accum)]
        n_tokens = answer_tokens(micro, step, r)
        lr = lr_at(step, s, r.total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            model.set_requires_gradient_sync(i == len(micro) - 1)   # reduce after the last only
            loss = run_micro(model, batch, r.device, r.mean, r.std)
            # FSDP averages gradients over ranks; scaled so, the sum is the global token mean
            (loss * r.world / max(n_tokens, 1)).backward()
            loss_sum += loss.item()
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                              s.clip if s.clip > 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        due = r.rank == 0 and time.perf_counter() - saved >= 60 * s.save_minutes   # rank 0 decides
        due = log_step(r, s, step, micro, loss_sum, n_tokens, lr, float(norm), due, t0, began)
        eval_due = s.eval_every and ((step + 1) % s.eval_every == 0 or step + 1 == r.total)
        if r.evaluation and eval_due:
            eval_loss = evaluate(model, r.evaluation, r.device, r.world, r.mean, r.std)
            if r.metrics:
                r.metrics.write({"step": step + 1, "eval_loss": eval_loss})
                print(f"step {step + 1} eval_loss {eval_loss:.4f}", flush=True, file=sys.stderr)
        if (due or s.save_every and (step + 1) % s.save_every == 0) and step + 1 < r.total:
            save_checkpoint(model, optimizer, s, step + 1, r.state(), r.rank, r.world)
            saved = time.perf_counter()
    finish(r, s)


@dataclass
class Run:   # what set_up makes ready for the loop
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: object          # the micro-batches of this rank, from the step it starts at
    evaluation: object       # the eval set's batches, or None
    metrics: Appender        # metrics.jsonl (rank 0), or None
    device: torch.device
    rank: int
    world: int
    start: int               # the step it starts at (0, or a checkpoint's)
    total: int
    per_step: int            # the global batch: --batch-size x processes x --grad-accum
    stats: dict
    mean: tuple              # the normalization the model was trained with
    std: tuple
    tok_folder: str
    pre: str                 # the folder of its preprocessor_config.json, which the export carries
    prompt: dict

    def state(self):   # what a checkpoint records besides the weights and the optimizer
        return {**self.stats, "total_steps": self.total, "global_batch": self.per_step}


def set_up(s: Settings) -> Run:
    """Everything before the first step: what a user can get wrong checked before the model loads,
    the process group, the samples, the memory plan, the model sharded over the ranks, the
    optimizer, a checkpoint to resume from, the decoding processes."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if s.init_from_config and not s.tokenizer:
        raise ValueError("--init-from-config needs --tokenizer FOLDER")
    restarted = restarts()
    if restarted and not s.resume and rank == 0:   # torchrun --max-restarts, or a Slurm requeue
        print(f"note: {restarted}: resuming from the newest checkpoint in {s.out}",
              file=sys.stderr, flush=True)
    s.resume = s.resume or bool(restarted)
    resume_from = check_out(s.out, s.resume) if s.resume or rank == 0 else None
    if s.resume and not resume_from and rank == 0:
        print(f"note: --resume, but {s.out} holds no checkpoint: starting at step 0",
              file=sys.stderr, flush=True)
    per_step = s.batch_size * world * s.grad_accum
    if resume_from:
        check_resumable(resume_from, per_step, world)
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1:
        init_process_group(backend, collective_timeout(s))
        check_shared_out(s.out, rank, world)   # a node-local --out would lose other nodes' shards
    else:   # a one-rank group of its own, so that one process runs the same FSDP2 code as many
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    # the samples listed once by rank 0 and kept in --out: a resume sees the same list, whatever
    # the disk holds then
    samples, dropped = shared(lambda: sample_list(s, resume_from), rank, world)
    eval_samples = None
    if s.eval_data:
        eval_samples = shared(lambda: load_data(s.eval_data, s.video_root)[0], rank, world)
    if len(samples) < per_step:
        raise ValueError(f"{len(samples)} samples are fewer than one step takes "
                         f"({per_step}: --batch-size x processes x --grad-accum)")
    total = s.max_steps or max(1, int(s.epochs * (len(samples) // per_step)))
    workers = s.workers or min(4, cores_per_rank())   # this rank's share of the node's cores
    folder = hub.resolve(RELEASES.get(s.model, s.model)) if s.model else None
    tok_folder = s.tokenizer or folder
    config, trainable = probe(s, folder)
    node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    shards = mesh_shape(world, node)[-1]   # HSDP: each shards over a node's GPUs
    checkpoints_on, need = memory.for_training(s, config, trainable, shards, device.type == "cuda")
    if rank == 0 and device.type == "cuda":
        print(f"memory per GPU: {need['total']:.1f} GB ({memory.describe(need)}), activation "
              f"checkpointing {'on' if checkpoints_on else 'off'}", file=sys.stderr, flush=True)
    starts = [f for f in (folder, tok_folder) if f]
    if s.export and os.path.exists(s.export) and any(os.path.samefile(s.export, f) for f in starts):
        raise ValueError(f"--export {s.export} is the folder training starts from: "
                         f"export somewhere else")
    tok = Tokenizer(tok_folder)
    prompt = prompt_for(folder, tok, s.prompt, s.system, s.template)   # the folder's, or the flags'
    if rank == 0:
        print(f"prompt: {prompt['source']}: {prompt['question'][:80]!r} ({prompt['template']})",
              file=sys.stderr, flush=True)
    model = setup_model(s, folder, rank, world, device)
    torch.manual_seed(s.seed + rank)   # LoRA dropout: each rank draws its own masks
    recompute(model, checkpoints_on)
    frames, size = s.frames or model.config.num_frames, model.config.vision_config.image_size
    optimizer = make_optimizer(model, s)
    start, stats = 0, {"skipped": 0}
    if resume_from:
        state = load_checkpoint(model, optimizer, resume_from, rank)
        start, stats = state["step"], {"skipped": state.get("skipped", 0)}
        if state.get("total_steps", total) != total:
            raise ValueError(f"this run's schedule has {state['total_steps']} steps, --max-steps / "
                             f"--epochs now give {total}: resume with the same, or train more as "
                             f"a new run from its --export")
    pad = tok.pad_id if tok.pad_id is not None else 0
    decode = dict(workers=workers, timeout=s.decode_timeout, memory_gb=s.decode_memory)
    trainset = TrainSet(samples, tok, prompt, frames, size, s.seed, "random", s.max_text_tokens)
    order = StepSampler(len(samples), s.batch_size, s.grad_accum, rank, world, s.seed, start, total)
    batches = iter(Batches(trainset, order, pad, **decode))
    evaluation = None
    if eval_samples:
        evalset = TrainSet(eval_samples, tok, prompt, frames, size, s.seed, "middle",
                           s.max_text_tokens)
        keys = eval_keys(len(eval_samples), rank, world)
        chunks = [keys[i:i + s.batch_size] for i in range(0, len(keys), s.batch_size)]
        evaluation = Batches(evalset, chunks, pad, **{**decode, "workers": min(workers, 2)})
    pre = preprocessing_folder(folder, tok_folder)   # the export carries it: caption.py reads it
    mean, std = mean_std(pre)
    if rank == 0:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        print(f"{len(samples)} samples ({dropped} rows left out), {world} process(es), "
              f"global batch {per_step}, steps {start}..{total}; training {n_train / 1e6:.2f}M "
              f"of {n_all / 1e6:.2f}M parameters; {workers} decoding processes per rank",
              flush=True, file=sys.stderr)
        steps = f" and every {s.save_every} steps" if s.save_every else ""
        print(f"checkpoints every {s.save_minutes:g} minutes{steps}"
              f" and at the end, in {s.out}/checkpoints (--save-minutes, --save-every)",
              file=sys.stderr, flush=True)
    metrics = None
    if rank == 0:
        metrics = Appender(os.path.join(s.out, "metrics.jsonl"), truncate=not resume_from)
    if metrics and resume_from:   # the rows of steps after the checkpoint are done again: they go
        metrics.resume(lambda row: (row.get("step"), "eval_loss" in row),
                       lambda row: row.get("step", 0) <= start)
    return Run(model, optimizer, batches, evaluation, metrics, device, rank, world, start, total,
               per_step, stats, mean, std, tok_folder, pre, prompt)


def make_optimizer(model, args):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:   # biases and norm weights (1-D) are not decayed
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999))


def lr_at(step, args, total):
    """Linear warmup, then cosine from lr down to min_lr at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))   # 1 at the start, 0 at the end
    return args.min_lr + (args.lr - args.min_lr) * cosine


def run_micro(model, batch, device, mean, std):
    pixels = normalize(batch["frames"], mean, std, device)
    labels = batch["labels"].to(device)
    return model(batch["ids"].to(device), pixels, labels=labels, loss_reduction="sum")


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


def parse_args(argv=None) -> Settings:
    p = cli.Parser(description="LoRA post-training of PLLaVA (FSDP2 under torchrun).")
    source = p.add_mutually_exclusive_group(required=True)   # --model or --init-from-config
    for f in fields(Settings):
        meta = dict(f.metadata)
        group = source if meta.pop("source", None) else p
        name = "--" + f.name.replace("_", "-")
        kind = dict(action="store_true") if f.type is bool else dict(default=f.default)
        group.add_argument(name, **kind, **meta)
    s = Settings(**vars(p.parse_args(argv)))
    if not s.dry_run and not (s.data and s.out):
        p.error("--data and --out are required")
    if s.lora_dropout >= 1:
        p.error("--lora-dropout must be below 1")
    if s.freeze_projector and (s.full_finetune or s.train_all):
        p.error("--freeze-projector is for LoRA training: not with --full-finetune or --train-all")
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) < 1:
        p.error(f"WORLD_SIZE={world!r}: the number of processes, 1 or more (torchrun sets it)")
    s.gpus = s.gpus or int(world)
    return s


def main(argv=None):
    s = parse_args(argv)
    try:   # a run that stops early leaves no process group behind (main called again in-process)
        return cli.run(lambda: training_plan(s) if s.dry_run else train(s),
                       (OSError, ValueError, hub.HubError, ModelFolderError, Busy))
    finally:
        dist.destroy_process_group() if dist.is_initialized() else None


if __name__ == "__main__":
    main()
