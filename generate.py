"""Batched generation: one prefill over every row's prompt and visual tokens, then one token per
step from a static KV cache.

Rows are left-padded to one length. Padding never counts: it is masked out of attention, and each
row's RoPE positions start at 0 where its text starts, so a row's tokens do not depend on which
other rows share its batch. `generate_reference` is the plain loop (a full forward pass for every
new token) that the fast path is tested against.
"""

import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from lora import merge_lora, replace_linears
from model import causal_mask, positions_of
from quant import quantize_int8


@dataclass
class Sampling:
    """How each next token is chosen, and when a row ends."""
    max_new_tokens: int = 256
    temperature: float = 0.0              # 0: greedy
    top_p: float = 1.0                    # nucleus sampling: the fewest tokens holding this mass
    repetition_penalty: float = 1.0       # as transformers: >1 makes tokens seen less likely
    stop_ids: tuple = (2,)                # a row ends at one of these tokens (not returned)
    stop_strings: tuple = ()              # ... or once its text holds one (needs `decode`)
    stop_loops: bool = False              # ... or once it repeats itself (looping)


LOOP = 6   # tokens: a row whose last LOOP tokens came LOOP_TIMES times before is looping
LOOP_TIMES = 3


def looping(tokens) -> int:
    """Where a row that loops ("a forest forest forest ...", "starts square starts square ...")
    should have ended: after the loop's first round (its last LOOP tokens said LOOP_TIMES times or
    more); 0 when it does not loop."""
    tail, n = tuple(tokens[-LOOP:]), len(tokens)
    if n < LOOP + LOOP_TIMES - 1:
        return 0
    seen = [i for i in range(n - LOOP + 1) if tuple(tokens[i:i + LOOP]) == tail]
    return seen[0] + (seen[1] - seen[0]) if len(seen) >= LOOP_TIMES else 0


def pick(logits, seen, temperature=0.0, top_p=1.0, repetition_penalty=1.0, generator=None):
    """(B, V) logits -> (B,) next tokens. seen (B, V) bool: the tokens a repetition penalty applies
    to."""
    logits = logits.float()
    if repetition_penalty != 1.0:   # as transformers: divide positive logits, multiply negatives
        p = repetition_penalty
        penalized = torch.where(logits > 0, logits / p, logits * p)
        logits = torch.where(seen, penalized, logits)
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:   # nucleus: the likeliest tokens until their mass reaches top_p (one at least)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class Stopper:
    """Tracks which rows are finished: at a stop token, or once their text contains a stop
    string."""

    def __init__(self, batch: int, stop_ids, stop_strings=(), decode=None):
        self.tokens = [[] for _ in range(batch)]
        self.done = [False] * batch
        self.stop_ids, self.stop_strings, self.decode = set(stop_ids), tuple(stop_strings), decode

    def add(self, tokens: torch.Tensor) -> bool:
        """Take one new token per row; True when every row is finished."""
        for b, t in enumerate(tokens.tolist()):
            if self.done[b]:
                continue
            if t in self.stop_ids:
                self.done[b] = True
                continue
            self.tokens[b].append(t)
            if self.stop_strings:
                tail = self.decode(self.tokens[b][-32:])
                self.done[b] = any(s in tail for s in self.stop_strings)
        return all(self.done)


def _seen(input_ids, attention_mask, vocab):
    seen = torch.zeros(input_ids.shape[0], vocab, dtype=torch.bool, device=input_ids.device)
    ids = input_ids.clamp(0, vocab - 1)   # the <image> id may lie past the vocabulary
    keep = input_ids < vocab
    if attention_mask is not None:
        keep &= attention_mask.bool()
    return seen.scatter_(1, ids, keep)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, pixel_values: torch.Tensor,
             attention_mask: torch.Tensor = None, *, sampling: Sampling = Sampling(), decode=None,
             generator: torch.Generator = None, compile_mode: str = None) -> list:
    """input_ids (B, L) left-padded prompts, one <image> each; pixel_values (B, T, 3, H, W).
    Returns the new tokens of each row, without the stop token."""
    x, valid, _ = model.prepare(input_ids, pixel_values, attention_mask)     # (B, P, D), (B, P)
    seen = _seen(input_ids, attention_mask, model.language_model.config.vocab_size)
    return generate_from_embeddings(model.language_model, x, valid, sampling=sampling,
                                    decode=decode, generator=generator, seen=seen,
                                    compile_mode=compile_mode)


def prefill(lm, x: torch.Tensor, positions: torch.Tensor, mask) -> torch.Tensor:
    """The prompts: (B, P, D) embeddings -> (B, vocab) logits of their last position, their keys
    and values written to cache slots 0 .. P-1. Only the last position is projected onto the
    vocabulary."""
    h = lm(x, positions, mask, torch.arange(x.shape[1], device=x.device))
    return lm.lm_head(h[:, -1])


def decode_one_token(lm, token: torch.Tensor, positions: torch.Tensor, mask,
                     input_pos: torch.Tensor, kv_len: int = None) -> torch.Tensor:
    """One new token per row: (B,) tokens -> (B, vocab) logits, its keys and values written at
    input_pos; it attends where mask says, or (no mask) to the first kv_len cache slots."""
    x = lm.model.embed_tokens(token)[:, None]                          # (B, 1, D)
    return lm.lm_head(lm(x, positions, mask, input_pos, kv_len)[:, -1])


KV_BLOCK = 128   # cache slots per block of a block mask (FlexAttention's default)


def length_mask(length: torch.Tensor, slots: int) -> BlockMask:
    """A FlexAttention block mask for one new token a row over a cache of `slots` slots: row b sees
    slots 0 .. length[b] (its own new token included), made on the device from `length` (B,). The
    blocks before a row's last one are seen whole (no mask is evaluated there), its last one
    through the mask, and the blocks past it are never read."""
    B, n = length.shape[0], -(-slots // KV_BLOCK)
    whole = (length + 1) // KV_BLOCK                 # blocks every slot of which the row sees
    last = ((length + 1) % KV_BLOCK != 0).int()      # the block the row ends inside, if any
    blocks = torch.arange(n, device=length.device, dtype=torch.int32)
    last_at = (whole[:, None] + blocks).clamp(max=n - 1).int()
    every = blocks.expand(B, n)[:, None, None].contiguous()
    return BlockMask.from_kv_blocks(last[:, None, None], last_at[:, None, None],
                                    whole.int()[:, None, None], every, BLOCK_SIZE=KV_BLOCK,
                                    mask_mod=lambda b, h, q, kv: kv <= length[b],
                                    seq_lengths=(1, slots), compute_q_blocks=False)


def compiled_decode(lm, mode: str = "auto"):
    """decode_one_token compiled once per model and mode. mode "auto": on a GPU with CUDA graphs
    ("max-autotune"), on a CPU with inductor's GEMM kernels (there the packed layers of
    pack_for_cpu are faster, and cannot be compiled); any other value is torch.compile's mode
    ("default" compiles fastest). Each new shape is a graph of its own; past torch's recompile
    limit the call raises (engine.CompileLimit says what to do) instead of running uncompiled."""
    if mode == "auto":
        gpu = lm.model.embed_tokens.weight.is_cuda
        mode = "max-autotune" if gpu else "max-autotune-no-cudagraphs"
    compiled = lm.__dict__.setdefault("compiled_decode", {})   # not a submodule: a plain attribute
    if mode not in compiled:
        step = torch.compile(decode_one_token, mode=mode, dynamic=False)

        def strict(*args):   # past the recompile limit an error, never a silent fall to eager
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                return step(*args)
        compiled[mode] = strict
    return compiled[mode]


@torch.no_grad()
def generate_from_embeddings(lm, x: torch.Tensor, valid: torch.Tensor, *,
                             sampling: Sampling = Sampling(), decode=None,
                             generator: torch.Generator = None, seen: torch.Tensor = None,
                             compile_mode: str = None) -> list:
    """The decoding loop proper, from input embeddings x (B, P, D) and their valid mask (B, P).

    compile_mode (None: eager): every step attends to the whole cache through a mask, so all steps
    have one shape and the step compiles once (the cache is kept for the next call of the same
    shape). Without it, each step attends to the slots in use only: the plain path, which the
    compiled one is tested against."""
    B, P = valid.shape
    new, padded = sampling.max_new_tokens, not bool(valid.all())
    valid = torch.cat([valid, valid.new_ones(B, new)], dim=1)                 # (B, P + new)
    positions = positions_of(valid)
    slots = torch.arange(P + new, device=x.device)
    cache_slots = slots + 0                                 # input_pos of each step, on the device
    penalty = sampling.repetition_penalty
    penalize = penalty != 1.0
    if seen is None and penalize:
        seen = torch.zeros(B, lm.config.vocab_size, dtype=torch.bool, device=x.device)
    stopper = Stopper(B, sampling.stop_ids, sampling.stop_strings, decode)
    step = compiled_decode(lm, compile_mode) if compile_mode else decode_one_token
    lm.setup_cache(B, P + new)
    try:
        mask = causal_mask(valid[:, :P]) if padded else None    # None: plain causal, fastest
        logits = prefill(lm, x, positions[:, :P], mask)
        for i in range(new):
            token = pick(logits, seen, sampling.temperature, sampling.top_p, penalty, generator)
            if stopper.add(token) or i == new - 1:
                break
            if penalize:
                seen[torch.arange(B, device=x.device), token] = True
            s = P + i                                                 # the cache slot it goes to
            if compile_mode:   # one shape for every step: the whole cache, masked
                whole = (valid & (slots <= s))[:, None, None, :]
                logits = step(lm, token, positions[:, s:s + 1], whole, cache_slots[s:s + 1])
            else:              # the slots in use; a mask only where rows are padded
                mask = valid[:, None, None, :s + 1] if padded else None
                logits = step(lm, token, positions[:, s:s + 1], mask, cache_slots[s:s + 1], s + 1)
    finally:
        if not compile_mode:
            lm.clear_cache()
    return stopper.tokens


class PackedLinear(nn.Module):
    """A linear layer for CPU inference whose weight lives in oneDNN's blocked layout: the same
    numbers, multiplied by oneDNN's kernels. Whether that beats MKL's sgemm on the plain layout
    depends on the CPU and the shape (AMD EPYC: decoding 1.8-2.6x faster packed; an Intel Xeon with
    AMX: 0.69-0.83x at one row, 1.52x at 8): pack_for_cpu measures it."""

    def __init__(self, weight, bias):
        super().__init__()
        # 8: a hint of the rows a product will have
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 8)
        self.bias = None if bias is None else bias.detach()
        self.out_features = weight.shape[0]

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class PlainLinear(nn.Module):
    """A linear layer for inference only (LoRA merged): the weight in the plain layout."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def can_pack(lm):
    """fp32 on a CPU, with oneDNN in this build of torch (its linear ops are internal ones: checked
    too)."""
    w = lm.model.embed_tokens.weight
    ops = torch.ops.mkldnn
    return (w.device.type == "cpu" and w.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


CHOICES = "packed-or-plain.json"   # in the cache folder (jsonl.cache_dir): measured once a machine


def packed_is_faster(weight, rows: int, rounds: int = 5) -> bool:
    """Whether the packed product of `weight` beats the plain one at `rows` rows on this CPU: timed
    in turns (plain, packed, plain, ...), the medians compared; remembered in CHOICES by shape,
    rows, CPU, threads and torch (a file in the cache folder). A few milliseconds a shape (the
    lm_head's, tens)."""
    import json
    import statistics
    from plumbing.jsonl import cache_dir, replace_atomic
    path = os.path.join(cache_dir(), CHOICES)
    key = f"{cpu_model()}|{torch.__version__}|{torch.get_num_threads()} threads|" \
          f"{tuple(weight.shape)}|{rows} rows"
    try:
        with open(path) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict) or not isinstance(known.get(key), bool):
        layers = PlainLinear(weight, None), PackedLinear(weight, None)
        x, times = torch.randn(rows, weight.shape[1]), ([], [])
        for i in range(2 * rounds + 2):   # the first of each warms up
            t = time.perf_counter()
            layers[i % 2](x)
            times[i % 2].append(time.perf_counter() - t)
        known = {**(known if isinstance(known, dict) else {}),
                 key: statistics.median(times[1][1:]) < statistics.median(times[0][1:])}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        replace_atomic(path, lambda f: f.write(json.dumps(known, indent=1).encode()))
    return known[key]


def cpu_model() -> str:
    """The CPU's name (/proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            return next(names, "cpu")
    except OSError:
        return "cpu"


def pack_for_cpu(lm, rows: int = 8):
    """Every linear layer of the language model becomes a PackedLinear where that is faster for its
    shape at `rows` rows a product on this CPU (packed_is_faster; the engine decodes all its slots
    each step), else a PlainLinear; LoRA merged in at its current alpha, the old weights dropped (a
    tied lm_head gets its own copy). lm.packed: {shape: packed or not}. For inference only: a packed
    model cannot be trained, saved or have its LoRA alpha changed."""
    chosen = {}

    def make(weight, bias):
        shape = tuple(weight.shape)
        if shape not in chosen:
            chosen[shape] = packed_is_faster(weight, rows)
        return (PackedLinear if chosen[shape] else PlainLinear)(weight, bias)
    replace_linears(lm, make)
    lm.__dict__["packed"] = chosen   # a plain attribute
    return lm


@torch.no_grad()
def generate_reference(model, input_ids, pixel_values, attention_mask=None, max_new_tokens=20,
                       stop_ids=(2,)):
    """Greedy decoding the slow, obvious way: the whole sequence through the model for every new
    token."""
    lm = model.language_model
    x, valid, _ = model.prepare(input_ids, pixel_values, attention_mask)
    stopper = Stopper(x.shape[0], stop_ids)
    for _ in range(max_new_tokens):
        h = lm(x, positions_of(valid), causal_mask(valid))
        token = lm.lm_head(h[:, -1]).argmax(-1)
        if stopper.add(token):
            break
        x = torch.cat([x, lm.model.embed_tokens(token)[:, None]], dim=1)
        valid = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1)
    return stopper.tokens


def ready_for_inference(model, int8: bool = False, device=None, compiled: bool = False,
                        rows: int = 8):
    """A loaded model made ready to generate, in place: nothing requires gradients; with int8 the
    language model quantized (quant.py; each weight moved to `device` and quantized there, one at a
    time) and the rest moved there; else on a CPU in fp32 (not compiled) each linear layer in the
    layout that multiplies faster at `rows` rows (pack_for_cpu); else LoRA merged into the weights
    (one product per layer instead of three)."""
    model.requires_grad_(False)
    lm = model.language_model
    if int8:
        quantize_int8(lm, device)
        if any(p.device != torch.device(device) for p in model.parameters()):
            model.to(device)   # the vision tower, projector and norms, in the compute dtype
    elif can_pack(lm) and not compiled:
        pack_for_cpu(lm, rows)
    else:
        merge_lora(lm)
    return model
