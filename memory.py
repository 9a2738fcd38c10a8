"""Memory plans: what a run needs on each device, in GB, from the model's config alone, before any
weight is loaded (`caption.py --dry-run`, `train.py --dry-run`, and train.py's check before it
starts on a GPU: for_training). Estimates, meant to say no before a long load, not to the last
megabyte.
"""

import os

import torch

CONTEXT_GB = 1.5   # the CUDA context and what the allocator holds back
# compiled: max-autotune's trial buffers and the CUDA graphs' memory pool, a margin
COMPILED_GB = 2.0
MAX_SLOTS = 32     # the most slots caption.py starts with on its own (--batch-size: any)


def _total(**parts):
    gb = {k: v / 1e9 for k, v in parts.items()} | {"context": CONTEXT_GB}
    return {**gb, "total": sum(gb.values())}


def _llm_linear(t):
    """Parameters of the LLaMA's linear layers (attention, MLP) and its lm_head."""
    return (
        t.num_hidden_layers
        * (
            2 * t.hidden_size * (t.num_attention_heads + t.num_key_value_heads) * t.head_dim
            + 3 * t.hidden_size * t.intermediate_size
        )
        + t.vocab_size * t.hidden_size
    )


def _vision(config):
    """Parameters of the vision tower and the projector."""
    t, v = config.text_config, config.vision_config
    return v.num_hidden_layers * (
        4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    ) + 2 * t.hidden_size * (v.hidden_size + t.hidden_size)


def captioning(config, slots: int, new_tokens: int, dtype_bytes: int, int8: bool = False,
               prompt_tokens: int = 100, compiled: bool = False) -> dict:
    """GB the captioning engine (engine.py) needs on the device: the weights (int8: the LLM's linear
    layers and embedding, with a scale per row); the KV cache, every slot at its longest (compiled:
    in steps of 256 slots); and the activations: those of one prefill pass (engine.prefill_videos
    videos), the larger of its vision tower and projector (every frame's patches: the tower's hidden
    states and the projector's three outputs) and of its LLM prefill (hidden states and the MLP's
    three intermediates), plus the frames of every slot's video, kept until it ends. Held within 10%
    of a rehearsal on fake tensors (tests/test_rehearse.py)."""
    from engine import prefill_videos
    t, v = config.text_config, config.vision_config
    llm = _llm_linear(t) + t.vocab_size * t.hidden_size
    weights = llm * (1 if int8 else dtype_bytes) + _vision(config) * dtype_bytes
    if int8:  # a scale per output row of every linear layer, and per token of the embedding
        weights += (
            t.num_hidden_layers
            * (
                t.hidden_size * 3
                + (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
                + 2 * t.intermediate_size
            )
            + 2 * t.vocab_size
        ) * dtype_bytes
    prompt = prompt_tokens - 1 + config.num_visual_tokens
    length = prompt + new_tokens + 1
    if compiled:
        length = -(-length // 256) * 256
    kv = _kv_per_token(t, dtype_bytes) * length * slots
    patches = config.num_frames * (v.image_size // v.patch_size) ** 2
    vision = patches * (3 * t.hidden_size + 3 * v.hidden_size) * dtype_bytes
    prefill = prompt * (2 * t.hidden_size + 3 * t.intermediate_size) * dtype_bytes
    frames = config.num_frames * 3 * v.image_size ** 2 * dtype_bytes
    a_pass = min(slots, prefill_videos(prompt))
    return _total(weights=weights, kv_cache=kv,
                  activations=max(vision, prefill) * a_pass + slots * frames)


def slots_that_fit(config, free_gb: float, new_tokens: int, dtype_bytes: int,
                   prompt_tokens: int = 100, compiled: bool = False) -> int:
    """How many slots `free_gb` of device memory holds once the weights are loaded: the KV cache
    (compiled: rounded up as the engine rounds it) and frames of each, beside one prefill pass, a
    margin of 5% and, compiled, COMPILED_GB."""
    def need(slots):
        n = captioning(config, slots, new_tokens, dtype_bytes, prompt_tokens=prompt_tokens,
                       compiled=compiled)
        return n["kv_cache"] + n["activations"]
    usable = 0.95 * free_gb - (COMPILED_GB if compiled else 0)
    slots = 0
    while slots < 4096 and need(slots + 1) <= usable:
        slots += 1
    return slots


def default_slots(config, card: float, new_tokens: int, dtype_bytes: int, int8: bool = False,
                  compiled: bool = False) -> int:
    """The slots a card of `card` GB holds beside the weights and the context, at most MAX_SLOTS."""
    weights = captioning(config, 1, new_tokens, dtype_bytes, int8)["weights"]
    fit = slots_that_fit(config, card - weights - CONTEXT_GB, new_tokens, dtype_bytes,
                         compiled=compiled)
    return max(1, min(fit, MAX_SLOTS))


def _kv_per_token(t, dtype_bytes):
    return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * dtype_bytes


def training(config, batch: int, text_tokens: int, world: int, trainable: int,
             checkpointing: bool) -> dict:
    """GB train.py needs on each of `world` GPUs: fp32 weights sharded by FSDP2, with two decoder
    blocks gathered in bf16 (the one computing and the next) and the root's own (embedding, lm_head,
    projector) gathered throughout; fp32 gradients and AdamW's two moments for the `trainable`
    parameters, sharded too; and the activations kept for the backward pass of `batch` samples of
    visual + text tokens: per decoder layer and token its inputs, q, k, v, the attention output and
    the MLP's intermediates in bf16, or with activation checkpointing each layer's input alone plus
    the layer being recomputed and its gradients; and the projector's, over every frame's patches.
    The frozen vision tower keeps nothing for the backward pass. Held within 10% of one step
    rehearsed on fake tensors (tests/test_rehearse.py)."""
    t, v = config.text_config, config.vision_config
    D, F = t.hidden_size, t.intermediate_size
    params = _llm_linear(t) + t.vocab_size * D + _vision(config)
    block = (_llm_linear(t) - t.vocab_size * D) // t.num_hidden_layers
    root = 2 * t.vocab_size * D + 2 * D * (v.hidden_size + D)
    weights = 4 * params / world + 2 * 2 * block + 2 * root
    optimizer = 12 * trainable / world
    tokens = batch * (config.num_visual_tokens + text_tokens)
    patches = batch * config.num_frames * (v.image_size // v.patch_size) ** 2
    projector = patches * 2 * (v.hidden_size + 3 * D)
    if checkpointing:
        activations = tokens * 2 * D * t.num_hidden_layers + tokens * 2 * (8 * D + 6 * F)
    else:
        activations = tokens * 2 * (7 * D + 4 * F) * t.num_hidden_layers
    return _total(weights=weights, optimizer=optimizer, activations=activations + projector)


def card_gb(device=0) -> float:
    """This GPU's memory, or 80 (an H100's) when there is none."""
    return (
        torch.cuda.get_device_properties(device).total_memory / 1e9
        if torch.cuda.is_available()
        else 80.0
    )


def for_training(args, config, trainable, world, gpu):
    """Whether to checkpoint activations (--activation-checkpointing auto: when the run does not fit
    the GPU without it), and the plan; a run that fits the GPU in neither way is refused, with the
    numbers."""
    card = (args.card_gb or card_gb(int(os.environ.get("LOCAL_RANK", 0)))) if gpu else None
    need = {on: training(config, args.batch_size, args.max_text_tokens, world, trainable,
                         on) for on in (False, True)}
    on = args.activation_checkpointing == "on" or (
        args.activation_checkpointing == "auto"
        and card is not None
        and need[False]["total"] > 0.9 * card
    )
    if card is not None and need[on]["total"] > 0.95 * card:
        raise ValueError(
            f"training needs {need[on]['total']:.1f} GB on each GPU ({describe(need[on])}), more "
            f"than its {card:.0f} GB: a smaller --batch-size (and --grad-accum for the same step), "
            f"fewer --max-text-tokens, {'' if on else '--activation-checkpointing on, '}or more "
            f"GPUs"
        )
    return on, need[on]


def describe(need):
    return ", ".join(f"{k} {v:.1f} GB" for k, v in need.items() if k != "total")
