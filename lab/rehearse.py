"""A GPU run rehearsed on this CPU: the real code at the real sizes on fake tensors, with memory
counted.

Fake tensors (torch's FakeTensorMode) have shapes, dtypes and devices but no data: a 13B PLLaVA
built on the meta device and made fake costs nothing, and every operation a real run would do is
dispatched and checked without computing anything. A dispatch mode counts the bytes of every tensor
that is alive, as the device's allocator would hold them (LiveBytes), and keeps the peak. So
`caption.py --dry-run` runs the engine of a real run (ready_for_inference, then the Engine over a
few videos with arrivals, refills and rows at different lengths) and `train.py --dry-run` one
training step of FSDP2 at the given world size (a fake process group), and both print the measured
peak beside memory.py's estimate. A fake tensor cannot be read on the host, so the engine's one host
read (Engine._read, every few steps) is answered here: each video ends after the number of tokens it
was given. No other host read can happen without failing.
"""

import collections
import contextlib
import os
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from engine import Engine, Item
from generate import Sampling, ready_for_inference
from model import PLLaVA


def fake_model(config, dtype, fake, int8=False):
    """A PLLaVA of this config as fake tensors (of the FakeTensorMode `fake`) on the CPU, made ready
    to caption (int8: quantized). Built on the meta device first, outside the fake mode."""
    with torch.device("meta"):
        model = PLLaVA(config).to(dtype)
    with fake:
        model.to_empty(device="cpu")
        if config.text_config.tie_word_embeddings:
            model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
        return ready_for_inference(model.eval(), int8, "cpu", compiled=True)


class RehearsedEngine(Engine):
    """The Engine, its host read answered from what it was told: row b ends `tokens` steps after it
    was seated (its Item's max_new_tokens). Every step's attention choice is recorded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ends, self.dense_masks, self.steps_seen = {}, 0, 0

    def _seat(self, rows, lengths, limits, *tensors):
        super()._seat(rows, lengths, limits, *tensors)
        for b, n in zip(rows, limits):
            self.ends[b] = [0, n]

    def _read(self, done, count, out):
        rows = []
        for b in range(self.slots):
            steps, limit = self.ends.get(b, [0, 0])
            finished = steps + 1 >= limit   # the prefill gave the first token
            rows.append([int(finished), min(steps + 1, limit)] + [0] * out.shape[1])
        for b in self.ends:
            self.ends[b][0] += self.check_every
        return rows

    def _attention(self, length, lengths, max_len):
        mask, kv_len = super()._attention(length, lengths, max_len)
        self.dense_masks += isinstance(mask, torch.Tensor)
        self.steps_seen += 1
        return mask, kv_len

    def _tally(self):
        pass   # the step counts are fake too


def videos(config, n, dtype, prompt_tokens=100, lengths=(3, 5, 8, 4)):
    """n videos of the config's frames with prompts of `prompt_tokens` tokens (the <image> among
    them), each ending after its own few tokens: arrivals, refills and rows at different lengths, in
    few steps. Made as the engine takes them, as caption.py's decoders give them."""
    half = prompt_tokens // 2
    ids = [1] * half + [config.image_token_index] + [2] * (prompt_tokens - half - 1)
    size = config.vision_config.image_size
    for i in range(n):
        yield Item(i, ids, torch.empty(config.num_frames, 3, size, size, dtype=dtype),
                   lengths[i % len(lengths)])


def captioning(config, slots, new_tokens, dtype=torch.bfloat16, int8=False, compiled=False,
               prompt_tokens=100, n_videos=None) -> dict:
    """The peak memory (GB) of the captioning engine at this config and these flags, measured on
    fake tensors, with what each decode step does: aten operations, host reads and dense masks.
    One video more than the slots (n_videos): every slot seated, rows ending at different steps,
    then a refill. Twice as many gave the same peak to the byte (7B-34B, 8-32 slots, int8 and
    bf16, eager and compiled) at twice the time."""
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    model = fake_model(config, dtype, fake, int8)
    with fake:
        sampling = Sampling(max_new_tokens=new_tokens, stop_ids=())
        engine = RehearsedEngine(model, slots, sampling, check_every=4)
        engine.compiled = compiled   # the compiled step's attention (its block mask), run eagerly
        items = videos(config, n_videos or slots + 1, dtype, prompt_tokens)
        held = list(model.parameters()) + list(model.buffers())
        with fused_flex_attention(), LiveBytes(held) as live:
            for _ in engine.run(items):
                pass
    return {"peak_gb": live.peak / 1e9, "weights_gb": live.start / 1e9,
            "steps": engine.stats["steps"], "prefills": engine.stats["prefills"],
            "dense_masks": engine.dense_masks}


@contextlib.contextmanager
def fused_flex_attention():
    """FlexAttention stood in for by what its fused kernel makes (its output): a real run compiles
    it (the engine's block mask is only used compiled), and eager it would both materialize the
    scores and call torch.compile itself, which cannot trace under the modes here. The block mask is
    still built."""
    import model
    real = model.flex_attention
    model.flex_attention = lambda q, k, v, block_mask=None, enable_gqa=False: torch.empty_like(q)
    try:
        yield
    finally:
        model.flex_attention = real


class LiveBytes(TorchDispatchMode):
    """The bytes of the tensors alive, as a device's allocator holds them: those given at the start
    (the weights), and every storage an operation makes, until it is freed or resized (FSDP2 frees a
    gathered block by resizing its storage to 0, and gathers into it again); `peak` is the most at
    any time."""

    def __init__(self, tensors=()):
        super().__init__()
        self.alive, self.size, self.now, self.peak = {}, {}, 0, 0
        for t in tensors:
            self._count(t)
        self.start = self.now

    def _count(self, t):
        try:
            holder, n = t.untyped_storage(), t.untyped_storage().nbytes()
        except NotImplementedError:   # a layout with no storage to see (oneDNN's packed weights)
            holder, n = t, t.numel() * t.element_size()
        key = id(holder)
        if key in self.alive:
            return
        self.alive[key] = weakref.ref(holder, lambda _, key=key: self._free(key))
        self._set(key, n)

    def _set(self, key, n):
        self.now += n - self.size.get(key, 0)
        self.size[key] = n
        self.peak = max(self.peak, self.now)

    def _free(self, key):
        if self.alive.pop(key, None) is not None:
            self.now -= self.size.pop(key)

    def __enter__(self):
        real, live = torch.UntypedStorage.resize_, self

        def resize_(storage, n):
            out = real(storage, n)
            if id(storage) in live.alive:
                live._set(id(storage), n)
            return out
        self._real_resize, torch.UntypedStorage.resize_ = real, resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._real_resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._count(t)
        return out


class _Ops(TorchDispatchMode):
    """Counts the aten operations dispatched that compute (each a kernel launch on a GPU, eager),
    and apart the views (a new shape or stride over the same memory: no kernel)."""

    def __init__(self):
        super().__init__()
        self.n, self.views, self.names = 0, 0, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = any(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0])
        if func.namespace != "aten" or not tensors:
            return out   # a question about a tensor (its device, its size), not work
        if func.is_view or func in (torch.ops.aten.detach.default,
                                    torch.ops.aten._unsafe_view.default):
            self.views += 1
        else:
            self.n += 1
            self.names[func.__name__] += 1
        return out


def decode_step(config, slots, context, dtype=torch.bfloat16, int8=False, compiled=True,
                bandwidth=3.35e12):
    """One steady-state decode step of the engine at this config: `slots` rows at lengths spread
    around `context` tokens. Its aten operations, host reads, dense masks, the bytes it must read
    (the language model's weights once, each row's own keys and values) and the time those bytes
    take at `bandwidth`."""
    from generate import decode_one_token
    reads = [0]
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    model = fake_model(config, dtype, fake, int8)
    with fake, counting_reads(reads), fused_flex_attention():
        lm, c = model.language_model, config.text_config
        engine = RehearsedEngine(model, slots, Sampling(max_new_tokens=256, stop_ids=()),
                                 compile_mode=None)
        engine.compiled = compiled
        max_len = context + 256 + 1
        engine._grow_cache(slots, 0, max_len)
        host = [context - slots // 2 + b for b in range(slots)]   # rows at their own lengths
        length = torch.tensor(host)
        mask, kv_len = engine._attention(length, host, max_len)
        token = torch.zeros(slots, dtype=torch.long)
        ops = _Ops()
        with ops:
            decode_one_token(lm, token, length[:, None], mask, length[:, None], kv_len)
    per_token = (2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim
                 * torch.finfo(dtype).bits // 8)
    named = list(lm.named_parameters()) + list(lm.named_buffers())
    weights = sum(t.numel() * t.element_size() for n, t in named
                  if "embed_tokens" not in n and ".cache." not in n)
    kv = per_token * (sum(host) + slots if compiled else slots * (max(host) + 1))
    return {"aten_ops": ops.n, "views": ops.views, "top_ops": dict(ops.names.most_common(8)),
            "host_reads": reads[0], "dense_masks": engine.dense_masks, "weights_gb": weights / 1e9,
            "kv_gb": kv / 1e9, "bound_ms": 1e3 * (weights + kv) / bandwidth}


@contextlib.contextmanager
def counting_reads(reads):
    """Every read of a tensor on the host (.tolist(), .item(), bool(), int()...) counted: each is a
    sync on a GPU (on fake tensors it would fail anyway)."""
    names = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")
    real = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name):
        def read(self, *a, **kw):
            reads[0] += 1
            return real[name](self, *a, **kw)
        return read
    try:
        for name in names:
            setattr(torch.Tensor, name, counting(name))
        yield
    finally:
        for name in names:
            setattr(torch.Tensor, name, real[name])


def training(args, config, world, checkpointing, batch=None, text_tokens=None) -> dict:
    """The peak memory (GB) of one rank in one training step at `world` ranks, as train.py runs it
    on GPUs (its trainable parameters, FSDP2 over a fake process group with the GPU precision
    policy, activation checkpointing as planned), on fake tensors: forward, backward and the
    optimizer's step."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from training import trainable
    B, L = batch or args.batch_size, text_tokens or args.max_text_tokens
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        with torch.device("meta"):
            model = _Trained(config)
        trainable.add_lora(model, args)
        trainable.set_trainable(model, args)
        # on meta, as train.py does
        trainable.shard(model, torch.device("cpu"), world, gpu_precision=True)
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        with fake:
            model.to_empty(device="cpu")
            trainable.recompute(model, checkpointing)
            model.train()
            learn = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(learn, lr=1e-5, foreach=True)
            ids = torch.ones(B, L, dtype=torch.long)
            ids[:, 1] = config.image_token_index
            size = config.vision_config.image_size
            pixels = torch.empty(B, config.num_frames, 3, size, size)
            held = [_local(t) for t in list(model.parameters()) + list(model.buffers())]
            with LiveBytes(held) as live:
                model(ids, pixels, labels=ids, loss_reduction="sum").backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        dist.destroy_process_group()
    return {"peak_gb": live.peak / 1e9, "weights_gb": live.start / 1e9}


class _Trained(PLLaVA):
    """PLLaVA with the two reads a fake tensor cannot answer told instead: where the <image> sits
    (position 1 of every row here), and which positions learn (every text one: a bound, as a real
    batch learns from its answers only)."""

    def prepare(self, input_ids, pixel_values=None, attention_mask=None, labels=None,
                image_pos=None):
        return super().prepare(input_ids, pixel_values, attention_mask, labels,
                               [1] * input_ids.shape[0])

    def loss(self, h, labels, reduction="mean"):
        text = labels.shape[1] - self.config.num_visual_tokens   # the positions after the video
        logits = self.language_model.lm_head(h[:, -text:-1].flatten(0, 1))
        return torch.nn.functional.cross_entropy(logits.float(), labels[:, -text + 1:].flatten(),
                                                 reduction=reduction)


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def training_plan(args):
    """The plan of a release (pllava-7b/13b/34b or its hub id), a local model folder or
    --init-from-config on --gpus GPUs of --card-gb each, beside one training step rehearsed on fake
    tensors (training, above) with the FSDP2 wrapping at that world size: nothing is read,
    loaded, downloaded or started."""
    import memory
    from training.trainable import mesh_shape, probe

    config, trainable = probe(
        args, args.model if args.model and os.path.isdir(args.model) else None
    )
    shards = mesh_shape(args.gpus, int(os.environ.get("LOCAL_WORLD_SIZE", args.gpus)))[-1]
    on, need = memory.for_training(args, config, trainable, shards, gpu=True)
    peak = training(args, config, args.gpus, on)
    print(
        f"{args.model or args.init_from_config}: batch {args.batch_size} x "
        f"{config.num_visual_tokens} visual + {args.max_text_tokens} text tokens on {args.gpus} "
        f"GPU(s), {trainable / 1e6:.1f}M trainable, activation checkpointing "
        f"{'on' if on else 'off'}: estimate {memory.describe(need)}, total {need['total']:.1f} GB "
        f"per GPU; rehearsed on fake tensors: peak {peak['peak_gb']:.1f} GB + context "
        f"{memory.CONTEXT_GB} GB"
    )
    return {**need, "rehearsed": peak["peak_gb"] + memory.CONTEXT_GB}


def main():
    """python -m lab.rehearse [--json FILE]: the captioning engine's peak at 7B / 13B / 34B,
    bf16 and int8, 1 / 8 / 16 slots, beside memory.py's estimate; and one 13B decode step."""
    import argparse
    import json

    from config import PRESETS, Config
    import memory
    p = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args()
    rows = []
    print(f"{'model':<11} {'weights':<6} {'slots':>5} {'rehearsed GB':>13} {'estimate GB':>12} "
          f"{'diff':>7}")
    for name in ("pllava-7b", "pllava-13b", "pllava-34b"):
        config = Config.from_dict(PRESETS[name])
        for int8 in (False, True):
            for slots in (1, 8, 16):
                peak = captioning(config, slots, 256, int8=int8)["peak_gb"] + memory.CONTEXT_GB
                plan = memory.captioning(config, slots, 256, 2, int8)["total"]
                rows.append({"model": name, "weights": "int8" if int8 else "bf16", "slots": slots,
                             "rehearsed_gb": round(peak, 2), "estimate_gb": round(plan, 2)})
                print(f"{name:<11} {rows[-1]['weights']:<6} {slots:>5} {peak:>13.1f} {plan:>12.1f} "
                      f"{100 * (plan / peak - 1):>+6.1f}%", flush=True)
    steps = {how: decode_step(Config.from_dict(PRESETS["pllava-13b"]), 16, 2403,
                              compiled=how == "compiled") for how in ("eager", "compiled")}
    for how, s in steps.items():
        print(f"13B decode step, 16 rows near 2,403 tokens, {how}: {s['aten_ops']} kernel launches "
              f"(eager), {s['host_reads']} host reads, {s['dense_masks']} dense masks, "
              f"{s['weights_gb'] + s['kv_gb']:.1f} GB to read, {s['bound_ms']:.1f} ms at 3.35 TB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"captioning": rows, "decode_step_13b": steps,
                       "context_gb": memory.CONTEXT_GB, "new_tokens": 256, "prompt_tokens": 100},
                      f, indent=2)


if __name__ == "__main__":
    main()
