"""Continuous batching: `slots` videos decode together, and a video that ends hands its slot to the next.

A static batch (generate.generate) decodes until its longest caption ends: with captions of 30 to 256+
tokens, a third of its steps go to rows that are done. Here each row of the KV cache is a slot holding
one video at a time, at its own length: a step writes each row's new key and value at that row's own
position and masks each row to its own slots. When rows end, the next videos are prefilled together
(those with prompts of one length in one pass) into a cache of their own and copied into the free
rows, while the others wait. Each video's greedy output equals captioning it alone (tests/test_engine.py).

Stops are read on the host every `check_every` steps. On a CPU that is every step; on a GPU each read is
a sync, so a few steps pass between reads, and a row may run that many steps past its stop (the extra
tokens are dropped). When the GPU runs out of memory the slots are halved, the videos in flight start
again, and the batch never shrinks below one: a video that does not fit alone gets its error.
"""

import time
from dataclasses import dataclass

import torch

from generate import Sampling, compiled_decode, decode_one_token, pick, prefill


@dataclass
class Item:
    key: object                 # what the caller knows the video by
    ids: list                   # its prompt's token ids, one <image> among them
    pixels: torch.Tensor        # (T, 3, H, W), normalized, on the model's device
    max_new_tokens: int = None  # its own limit, at most the sampling's (bench.py forces a mix of lengths)


class OutOfMemory(Exception):
    """One video does not fit on the device even alone."""


class Engine:
    def __init__(self, model, slots: int, sampling: Sampling, decode=None, generator=None, check_every: int = None,
                 compile_mode: str = None):
        self.model, self.slots, self.sampling, self.decode, self.generator = model, slots, sampling, decode, generator
        self.device = model.language_model.model.embed_tokens.weight.device
        self.check_every = check_every or (1 if self.device.type == "cpu" else 4)
        self.step_fn = compiled_decode(model.language_model, compile_mode) if compile_mode else decode_one_token
        self.compiled = bool(compile_mode)   # then every step attends over the whole cache: one shape
        self.waiting = []   # the videos taken and not yet ended, in their order
        self.occupied = 0   # slots holding a video now
        self.stats = dict(steps=0, row_steps=0, finished_row_steps=0, tokens=0, prefills=0, prefill_s=0.0)

    def run(self, items):
        """Yield (key, tokens or OutOfMemory) for every Item, as each video ends (not in arrival order)."""
        items = iter(items)
        while True:
            try:
                yield from self._run(items)
                return
            except torch.OutOfMemoryError:
                pass   # handled here, outside the except block, so that its traceback frees the tensors
            self.model.language_model.clear_cache()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if self.slots == 1:   # the video alone does not fit: its error, and the next
                yield self.waiting.pop(0).key, OutOfMemory("out of device memory with this video alone")
            else:
                self.slots //= 2
                print(f"\nout of device memory: {self.slots} slots now", flush=True)

    def _run(self, items):
        """The loop proper. After an out-of-memory error run() calls it again, and the videos taken and not
        yet ended (self.waiting) start over."""
        lm, B, new, dev = self.model.language_model, self.slots, self.sampling.max_new_tokens, self.device
        held, waiting = list(self.waiting), self.waiting   # started over, before new ones from `items`
        waiting.clear()
        slot_item = [None] * B
        max_len = 0
        length = torch.zeros(B, dtype=torch.long, device=dev)       # cache slots in use, per row
        count = torch.zeros(B, dtype=torch.long, device=dev)        # tokens generated, per row
        done = torch.ones(B, dtype=torch.bool, device=dev)          # an empty slot counts as done
        out = torch.zeros(B, new, dtype=torch.long, device=dev)     # the tokens, per row
        limit = torch.full((B,), new, dtype=torch.long, device=dev)
        stop_ids = torch.tensor(sorted(self.sampling.stop_ids) or [-1], device=dev)
        seen = logits = None
        host_len, step = [0] * B, 0
        while True:
            free = [b for b in range(B) if slot_item[b] is None]
            arrivals = []
            while len(arrivals) < len(free) and (held or (item := next(items, None)) is not None):
                arrivals.append(held.pop(0) if held else item)
            waiting.extend(arrivals)
            if arrivals:
                need = max(self._prompt_len(item) for item in arrivals) + new + 1
                if need > max_len:   # the cache holds the longest prompt so far and its answer
                    max_len = self._grow_cache(B, max_len, need)
                if logits is None:
                    logits = torch.zeros(B, lm.config.vocab_size, device=dev)
                    wasted = torch.zeros((), dtype=torch.long, device=dev)   # counted on the device: no syncs
                    used = torch.zeros((), dtype=torch.long, device=dev)
                    if self.sampling.repetition_penalty != 1.0:
                        seen = torch.zeros(B, lm.config.vocab_size, dtype=torch.bool, device=dev)
                rows = free[:len(arrivals)]
                for b, item in zip(rows, arrivals):
                    slot_item[b] = item
                    host_len[b] = self._prompt_len(item)
                self._prefill(arrivals, rows, logits, seen, max_len)
                index = torch.tensor(rows, device=dev)
                length[index], count[index], done[index] = torch.tensor(host_len, device=dev)[index], 0, False
                limit[index] = torch.tensor([min(it.max_new_tokens or new, new) for it in arrivals], device=dev)
            if all(it is None for it in slot_item):
                if logits is not None:
                    self._tally(wasted, used)
                return
            occupied = torch.tensor([it is not None for it in slot_item], device=dev)
            token = pick(logits, seen, self.sampling.temperature, self.sampling.top_p, self.sampling.repetition_penalty,
                         self.generator)
            live = occupied & ~done
            stop = torch.isin(token, stop_ids)
            out.scatter_(1, count.clamp(max=new - 1)[:, None], token[:, None])
            count += live & ~stop
            done |= live & (stop | (count >= limit))
            if seen is not None:
                seen[torch.arange(B, device=dev), token] = True
            step += 1
            if step % self.check_every == 0 or max(host_len) + 1 >= max_len:
                yield from self._collect(slot_item, done, count, out, waiting)
            if all(it is None for it in slot_item):
                continue   # every row ended: refill before decoding anything
            S = max_len if self.compiled else max(host_len) + 1
            slots = torch.arange(S, device=dev)
            mask = (slots[None, :] <= length[:, None])[:, None, None, :]   # (B, 1, 1, S): each row its own slots
            occupied = torch.tensor([it is not None for it in slot_item], device=dev)
            self.occupied = sum(it is not None for it in slot_item)
            wasted += (occupied & done).sum()   # rows past their stop, not yet read (check_every > 1)
            used += occupied.sum()
            logits = self.step_fn(lm, token, length[:, None], mask, length[:, None])
            self.stats["steps"] += 1
            length += occupied
            host_len = [n + (it is not None) for n, it in zip(host_len, slot_item)]

    def _tally(self, wasted, used):
        """The step counts kept on the device, read once at the end."""
        self.stats["finished_row_steps"] += int(wasted)
        self.stats["row_steps"] += int(used)

    def _prompt_len(self, item):
        return len(item.ids) - 1 + self.model.config.num_visual_tokens

    def _grow_cache(self, B, old, need):
        """A cache of `need` slots per row, what the old one held copied in (a longer prompt arrived)."""
        lm = self.model.language_model
        before = [layer.self_attn.cache for layer in lm.model.layers]
        lm.setup_cache(B, need)
        for layer, cache in zip(lm.model.layers, before):
            if cache is not None and old:
                layer.self_attn.cache.k[:, :, :old] = cache.k[:, :, :old]
                layer.self_attn.cache.v[:, :, :old] = cache.v[:, :, :old]
        return need

    def _prefill(self, arrivals, rows, logits, seen, max_len):
        """Arrivals prefilled together, those of one prompt length per pass, in a cache of their own;
        their keys and values copied into their rows of the batch's cache, their first logits into `logits`."""
        lm, dev, t0 = self.model.language_model, self.device, time.perf_counter()
        main = [layer.self_attn.cache for layer in lm.model.layers]
        by_len = {}
        for b, item in zip(rows, arrivals):
            by_len.setdefault(len(item.ids), []).append((b, item))
        try:
            for group in by_len.values():
                ids = torch.tensor([item.ids for _, item in group], device=dev)
                pixels = torch.stack([item.pixels for _, item in group])
                x, valid, _ = self.model.prepare(ids, pixels)                    # (k, P, D)
                P = x.shape[1]
                for layer in lm.model.layers:
                    layer.self_attn.cache = None
                lm.setup_cache(len(group), P)
                first = prefill(lm, x, torch.arange(P, device=dev)[None].expand(len(group), -1), None)
                index = torch.tensor([b for b, _ in group], device=dev)
                for layer, cache in zip(lm.model.layers, main):
                    cache.k[index, :, :P] = layer.self_attn.cache.k
                    cache.v[index, :, :P] = layer.self_attn.cache.v
                logits[index] = first.to(logits.dtype)
                if seen is not None:
                    seen[index] = False
                    seen[index[:, None], ids.clamp(0, seen.shape[1] - 1)] = ids < seen.shape[1]
                self.stats["prefills"] += 1
        finally:
            for layer, cache in zip(lm.model.layers, main):
                layer.self_attn.cache = cache
        if dev.type == "cuda":   # a sync, but only once per refill
            torch.cuda.synchronize()
        self.stats["prefill_s"] += time.perf_counter() - t0

    def _collect(self, slot_item, done, count, out, waiting):
        """The rows that ended (a stop token, the token limit, a stop string): their tokens, their slots freed."""
        done_h, count_h = done.tolist(), count.tolist()
        rows = [b for b, it in enumerate(slot_item) if it is not None]
        tokens = {b: out[b, :count_h[b]].tolist() for b in rows} if rows else {}
        for b in rows:
            if not done_h[b] and self.sampling.stop_strings and self.decode and \
                    any(s in self.decode(tokens[b][-32:]) for s in self.sampling.stop_strings):
                done[b], done_h[b] = True, True
        for b in rows:
            if done_h[b]:
                item, slot_item[b] = slot_item[b], None
                waiting.remove(item)
                self.stats["tokens"] += len(tokens[b])
                yield item.key, tokens[b]


def plan(config, slots: int, new_tokens: int, dtype_bytes: int, int8: bool = False, prompt_tokens: int = 100) -> dict:
    """GB the engine needs on the device, before any weight is loaded: the weights, the KV cache of every
    slot at its longest, and the activations of the largest step (a prefill of every slot at once: hidden
    states and the MLP's intermediates, in the LLM and in the vision tower over every frame), plus about
    1.5 GB for the CUDA context and the allocator. An estimate, meant to say no before a long load."""
    t, v = config.text_config, config.vision_config
    linear = t.num_hidden_layers * (2 * t.hidden_size * (t.num_attention_heads + t.num_key_value_heads) * t.head_dim
                                    + 3 * t.hidden_size * t.intermediate_size) + t.vocab_size * t.hidden_size
    vision = v.num_hidden_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size) \
        + 2 * t.hidden_size * (v.hidden_size + t.hidden_size)                                 # tower + projector
    weights = linear * (1 if int8 else dtype_bytes) + (t.vocab_size * t.hidden_size + vision) * dtype_bytes
    length = prompt_tokens + config.num_visual_tokens + new_tokens + 1
    kv = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * length * slots * dtype_bytes
    patches = (v.image_size // v.patch_size) ** 2 + 1
    activations = slots * dtype_bytes * ((length - new_tokens) * (4 * t.hidden_size + 3 * t.intermediate_size)
                                         + config.num_frames * patches * (4 * v.hidden_size + 2 * v.intermediate_size))
    gb = {"weights": weights / 1e9, "kv_cache": kv / 1e9, "activations": activations / 1e9, "context": 1.5}
    return {**gb, "total": sum(gb.values())}
