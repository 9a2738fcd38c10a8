"""Memory plans: what a run needs on each device, in GB, from the model's config alone, before any weight
is loaded (`caption.py --dry-run`, `train.py --dry-run`, and train.py's check before it starts on a GPU:
for_training).
Estimates, meant to say no before a long load, not to the last megabyte.
"""

import os

import torch

CONTEXT_GB = 1.5   # the CUDA context and what the allocator holds back


def _total(**parts):
    gb = {k: v / 1e9 for k, v in parts.items()} | {"context": CONTEXT_GB}
    return {**gb, "total": sum(gb.values())}


def _llm_linear(t):
    """Parameters of the LLaMA's linear layers (attention, MLP) and its lm_head."""
    return t.num_hidden_layers * (2 * t.hidden_size * (t.num_attention_heads + t.num_key_value_heads) * t.head_dim
                                  + 3 * t.hidden_size * t.intermediate_size) + t.vocab_size * t.hidden_size


def _vision(config):
    """Parameters of the vision tower and the projector."""
    t, v = config.text_config, config.vision_config
    return v.num_hidden_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size) \
        + 2 * t.hidden_size * (v.hidden_size + t.hidden_size)


def captioning(config, slots: int, new_tokens: int, dtype_bytes: int, int8: bool = False, prompt_tokens: int = 100) -> dict:
    """GB the captioning engine (engine.py) needs on the device: the weights (int8: the LLM's linear
    layers and embedding), the KV cache of every slot at its longest plus the cache its arrivals are
    prefilled in before they are copied over (every slot at once, at the start), and the activations of the
    largest step (a prefill of every slot at once: hidden states and the MLP's intermediates, in the LLM
    and in the vision tower over every frame)."""
    t, v = config.text_config, config.vision_config
    weights = (_llm_linear(t) + t.vocab_size * t.hidden_size) * (1 if int8 else dtype_bytes) + _vision(config) * dtype_bytes
    length = prompt_tokens + config.num_visual_tokens + new_tokens + 1
    per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * dtype_bytes
    kv = per_token * length * slots + per_token * (length - new_tokens) * slots   # and the arrivals' own, at a refill
    patches = (v.image_size // v.patch_size) ** 2 + 1
    activations = slots * dtype_bytes * ((length - new_tokens) * (4 * t.hidden_size + 3 * t.intermediate_size)
                                         + config.num_frames * patches * (4 * v.hidden_size + 2 * v.intermediate_size))
    return _total(weights=weights, kv_cache=kv, activations=activations)


def training(config, batch: int, text_tokens: int, world: int, trainable: int, checkpointing: bool) -> dict:
    """GB train.py needs on each of `world` GPUs: fp32 weights sharded by FSDP2 (and two decoder blocks
    gathered in bf16, the one computing and the next), fp32 gradients and AdamW's two moments for the
    `trainable` parameters, sharded too; and the activations kept for the backward pass of `batch` samples
    of visual + text tokens: per decoder layer and token its inputs, q, k, v, the attention output and the
    MLP's three intermediates in bf16, or with activation checkpointing each layer's input alone plus one
    layer's worth while it is recomputed. The frozen vision tower keeps nothing for the backward pass."""
    t = config.text_config
    params = _llm_linear(t) + t.vocab_size * t.hidden_size + _vision(config)
    block = (_llm_linear(t) - t.vocab_size * t.hidden_size) // t.num_hidden_layers
    weights = 4 * params / world + 2 * 2 * block
    optimizer = 12 * trainable / world
    tokens = batch * (config.num_visual_tokens + text_tokens)
    layer = tokens * 2 * (6 * t.hidden_size + 4 * t.intermediate_size)
    activations = tokens * 2 * t.hidden_size * t.num_hidden_layers + layer if checkpointing else layer * t.num_hidden_layers
    return _total(weights=weights, optimizer=optimizer, activations=activations)


def card_gb(device=0) -> float:
    """This GPU's memory, or 80 (an H100's) when there is none."""
    return torch.cuda.get_device_properties(device).total_memory / 1e9 if torch.cuda.is_available() else 80.0


def for_training(args, config, trainable, world, gpu):
    """Whether to checkpoint activations (--activation-checkpointing auto: when the run does not fit the GPU
    without it), and the plan; a run that fits the GPU in neither way is refused, with the numbers."""
    card = (args.card_gb or card_gb(int(os.environ.get("LOCAL_RANK", 0)))) if gpu else None
    need = {on: training(config, args.batch_size, args.max_text_tokens, world, trainable, on) for on in (False, True)}
    on = args.activation_checkpointing == "on" or (args.activation_checkpointing == "auto" and card is not None
                                                  and need[False]["total"] > 0.9 * card)
    if card is not None and need[on]["total"] > 0.95 * card:
        raise ValueError(f"training needs {need[on]['total']:.1f} GB on each GPU ({describe(need[on])}), more than "
                         f"its {card:.0f} GB: a smaller --batch-size (and --grad-accum for the same step), fewer "
                         f"--max-text-tokens, {'' if on else '--activation-checkpointing on, '}or more GPUs")
    return on, need[on]


def describe(need):
    return ", ".join(f"{k} {v:.1f} GB" for k, v in need.items() if k != "total")
