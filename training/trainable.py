"""What trains, and where, for train.py: the model a run starts from (a checkpoint, or random
weights), its LoRA, which parameters learn, and FSDP2 over the ranks (one rank too).
"""

import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

import lora
from model import PLLaVA
from weights import model_config, read_config


def build_source(args, folder):
    """The starting model, whole, on the CPU: the checkpoint memory-mapped in its stored dtype, or
    random weights; LoRA added with seeded weights. Only rank 0 builds this; the others get a meta
    copy."""
    if folder:
        model = PLLaVA.from_pretrained(folder, dtype=None)
    else:
        model = PLLaVA.from_config(read_config(args.init_from_config), seed=args.seed)
    add_lora(model, args)
    return model


def preprocessing_folder(folder, tok_folder):
    """Where the model's preprocessor_config.json is: its own folder, else the tokenizer's (a model
    made from --init-from-config); when neither has one, the tokenizer's folder, where
    data.mean_std finds none and gives CLIP's mean and std."""
    for f in (folder, tok_folder):
        if f and os.path.isfile(os.path.join(f, "preprocessor_config.json")):
            return f
    return tok_folder


def probe(args, folder):
    """(config, trainable parameters) of the run, from a copy on the meta device (no memory): the
    LoRA targets that name no linear layer of the model fail here, before it loads."""
    config = (
        model_config(folder or args.model) if args.model else read_config(args.init_from_config)
    )
    with torch.device("meta"):
        model = PLLaVA(config)
    lora_targets(args)
    try:
        add_lora(model, args)
    except ValueError:
        raise ValueError(
            f"--lora-targets {args.lora_targets}: no linear layer of the language model has that "
            f"name (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
        ) from None
    set_trainable(model, args)
    return config, sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_targets(args) -> list:
    """--lora-targets as names inside the language model: a layer's last name (q_proj, as peft reads
    it) or its full name (language_model.model.layers.0.self_attn.q_proj, or without
    language_model.); a name in the vision tower or the projector is refused, before anything loads:
    adapters are saved and exported in peft's format, for the language model."""
    targets = args.lora_targets.split(",") if args.lora_targets else list(lora.TARGETS)
    elsewhere = [t for t in targets if t.split(".")[0] in ("vision_tower", "multi_modal_projector")]
    if elsewhere:
        raise ValueError(
            f"--lora-targets {','.join(elsewhere)}: LoRA trains inside the language model only "
            f"(language_model.*, or a layer's last name such as q_proj); the vision tower and the "
            f"projector train whole (--train-all) or not at all"
        )
    return [t.removeprefix("language_model.") for t in targets]


def add_lora(model, args):
    """A new adapter: the report's (r 128, alpha 32 on q_proj and k_proj) unless the flags say
    otherwise. A model that has one already (a release, an export) trains it on (same_lora)."""
    if args.full_finetune or args.train_all:
        return
    if lora.lora_layers(model):
        return same_lora(model, args)
    torch.manual_seed(args.seed)
    alpha = lora.ALPHA if args.lora_alpha is None else args.lora_alpha
    lora.add_lora(model.language_model, targets=lora_targets(args), r=args.lora_r or lora.R,
                  alpha=alpha, dropout=args.lora_dropout)


def same_lora(model, args):
    """A model's own adapter trains on: --lora-alpha sets its share (a knob, as at inference: 32 is
    the report's for training, a release loads at 4); a rank or layers other than its own are
    refused, not ignored."""
    lm = model.language_model
    if args.lora_alpha is not None:
        lora.set_lora_alpha(lm, args.lora_alpha)
    shape = lora.lora_shape(lm)   # {name: (r, alpha)}
    other = []
    if args.lora_r is not None and {r for r, _ in shape.values()} != {args.lora_r}:
        other.append("--lora-r")
    if args.lora_targets:
        linears = [n for n, m in lm.named_modules()
                   if isinstance(m, torch.nn.Linear) and not n.endswith(("lora_A", "lora_B"))]
        if {n for n in linears if lora.matches(n, lora_targets(args))} != set(shape):
            other.append("--lora-targets")
    if other:
        r, a = next(iter(shape.values()))
        kinds = sorted({n.rsplit(".", 1)[-1] for n in shape})
        raise ValueError(f"the model already has a LoRA adapter (r {r} on {','.join(kinds)} in "
                         f"{len(shape)} layers), which trains on: {' and '.join(other)} ask for "
                         f"another; leave them out, or start from a model without one")


def set_trainable(model, args):
    """The report's split: projector + LoRA learn (LoRA alone with --freeze-projector);
    --full-finetune adds the whole LLM; --train-all all."""
    vision, projector = (
        model.parameter_names(model.vision_tower),
        model.parameter_names(model.multi_modal_projector),
    )
    for name, p in model.named_parameters():
        if args.train_all:
            p.requires_grad = True
        elif args.full_finetune:
            p.requires_grad = name not in vision
        else:
            p.requires_grad = ".lora_" in name or (name in projector and not args.freeze_projector)
    for layer in lora.lora_layers(model).values():  # a LoRA loaded from a release trains on
        layer.lora_dropout = (
            torch.nn.Dropout(args.lora_dropout) if args.lora_dropout > 0 else torch.nn.Identity()
        )


def mesh_shape(world: int, per_node: int) -> tuple:
    """(world,): shard over every rank; over several nodes (replicas, ranks a node): HSDP, each
    node holding a whole copy sharded over its own GPUs, so the frozen weights are gathered over
    NVLink, not over the network between nodes (which carries only the trainable gradients'
    reduction)."""
    if 1 < per_node < world and world % per_node == 0:
        return world // per_node, per_node
    return (world,)


def shard(model, device, world, gpu_precision=None):
    """FSDP2: every decoder block and the vision tower a unit of its own, then the root; bf16
    compute with fp32 weights and reductions on GPUs (gpu_precision: that policy whatever the
    device, for a rehearsal)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    shape = mesh_shape(world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    names = ("replicate", "shard") if len(shape) == 2 else ("shard",)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    gpu = device.type == "cuda" if gpu_precision is None else gpu_precision
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if gpu \
        else MixedPrecisionPolicy()
    for block in model.language_model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model.vision_tower.vision_model, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def setup_model(args, folder, rank, world, device):
    """The model sharded with FSDP2 over every rank, one process too (a one-rank mesh, as
    torchtitan): one path, one precision policy. Rank 0 reads the weights and broadcasts them; the
    others build on meta."""
    source = build_source(args, folder) if rank == 0 else None
    box = [(source.config, lora.lora_shape(source.language_model)) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    config, lora_shape = box[0]
    with torch.device("meta"):
        model = PLLaVA(config)
        if lora_shape:
            lora.add_lora_like(model.language_model, lora_shape)
    set_trainable(model, args)
    shard(model, device, world)
    model.to_empty(device=device)
    # tensor by tensor, in the checkpoint's own dtype: each widened to fp32 only in its shard (a
    # whole fp32 copy would be 28 GB on rank 0 for 7B, 136 GB for 34B)
    state = source.state_dict() if rank == 0 else {}
    set_model_state_dict(model, state,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del source, state
    return model


def recompute(model, on):
    """Activation checkpointing: each layer's activations recomputed in the backward pass."""
    model.language_model.recompute = on
    model.vision_tower.vision_model.recompute = on
