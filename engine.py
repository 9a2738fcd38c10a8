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
again, and the batch never shrinks below one: a video that does not fit alone gets its error. Once
`grow_after` videos a slot have ended without another, the slots double again, up to those asked for.
"""

import sys
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
                 compile_mode: str = None, grow_after: int = 64):
        self.model, self.slots, self.sampling, self.decode, self.generator = model, slots, sampling, decode, generator
        self.device = model.language_model.model.embed_tokens.weight.device
        self.check_every = check_every or (1 if self.device.type == "cpu" else 4)
        self.step_fn = compiled_decode(model.language_model, compile_mode) if compile_mode else decode_one_token
        self.compiled = bool(compile_mode)   # then every step attends over the whole cache: one shape
        self.most, self.grow_after, self.calm = slots, grow_after, 0   # slots asked for; videos ended since an OOM
        self.waiting = []   # the videos taken and not yet ended, in their order
        self.occupied = 0   # slots holding a video now
        self.counts = torch.zeros(2, dtype=torch.long, device=self.device)   # row steps on ended rows, all row steps
        self.stop_ids = torch.tensor(sorted(sampling.stop_ids) or [-1], device=self.device)
        self.stats = dict(steps=0, row_steps=0, finished_row_steps=0, tokens=0, prefills=0, prefill_s=0.0)

    def run(self, items):
        """Yield (key, tokens or OutOfMemory) for every Item, as each video ends (not in arrival order)."""
        items = iter(items)
        try:
            while True:
                try:
                    if not (yield from self._run(items)):
                        return
                    self.model.language_model.clear_cache()   # grown back: the old cache goes before a wider one
                    continue   # and the videos in flight start again in it
                except torch.OutOfMemoryError:
                    pass   # handled here, outside the except block, so that its traceback frees the tensors
                self.model.language_model.clear_cache()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.calm = 0
                if self.slots > 1:
                    self.slots //= 2
                    print(f"\nout of device memory: {self.slots} slots now", flush=True, file=sys.stderr)
                elif self.waiting:   # the video alone does not fit: its error, and the next
                    yield self.waiting.pop(0).key, OutOfMemory("out of device memory with this video alone")
                else:
                    raise OutOfMemory("out of device memory with no video in the batch")
        finally:
            self._tally()

    def _run(self, items):
        """The loop proper: False when every item has ended; True when it stopped to grow the batch back
        (`grow_after` videos per slot ended since the last out-of-memory error). After either, or an
        out-of-memory error, run() calls it again and the videos taken and not yet ended (self.waiting)
        start over, before new ones."""
        lm, B, new, dev = self.model.language_model, self.slots, self.sampling.max_new_tokens, self.device
        held, waiting = list(self.waiting), self.waiting   # they stay in waiting until they end
        slot_item = [None] * B
        max_len = 0
        length = torch.zeros(B, dtype=torch.long, device=dev)       # cache slots in use, per row
        count = torch.zeros(B, dtype=torch.long, device=dev)        # tokens generated, per row
        done = torch.ones(B, dtype=torch.bool, device=dev)          # an empty slot counts as done
        occupied = torch.zeros(B, dtype=torch.bool, device=dev)     # a video in the slot
        out = torch.zeros(B, new + 1, dtype=torch.long, device=dev) # the tokens, per row; a spare last column
        limit = torch.full((B,), new, dtype=torch.long, device=dev) # takes the steps of rows that have ended
        seen = logits = None
        host_len, step = [0] * B, 0
        while True:
            if self.slots < self.most and self.calm >= self.grow_after * self.slots:
                self.slots, self.calm = min(2 * self.slots, self.most), 0
                return True
            free = [b for b in range(B) if slot_item[b] is None]
            arrivals = []
            while len(arrivals) < len(free) and (held or (item := next(items, None)) is not None):
                if held:
                    arrivals.append(held.pop(0))
                else:
                    arrivals.append(item)
                    waiting.append(item)
            if arrivals:
                need = max(self._prompt_len(item) for item in arrivals) + new + 1
                if self.compiled:   # a compiled step has one shape per cache length: a few lengths, few compiles
                    need = -(-need // 256) * 256
                if need > max_len:   # the cache holds the longest prompt so far and its answer
                    max_len = self._grow_cache(B, max_len, need)
                if logits is None:
                    logits = torch.zeros(B, lm.config.vocab_size, device=dev)
                    if self.sampling.repetition_penalty != 1.0:
                        seen = torch.zeros(B, lm.config.vocab_size, dtype=torch.bool, device=dev)
                rows = free[:len(arrivals)]
                for b, item in zip(rows, arrivals):
                    slot_item[b] = item
                    host_len[b] = self._prompt_len(item)
                self._prefill(arrivals, rows, logits, seen, max_len)
                self._seat(rows, [host_len[b] for b in rows], [min(it.max_new_tokens or new, new) for it in arrivals],
                           length, count, done, limit, occupied)
            if all(it is None for it in slot_item):
                return False
            token = pick(logits, seen, self.sampling.temperature, self.sampling.top_p, self.sampling.repetition_penalty,
                         self.generator)
            live = occupied & ~done
            stop = torch.isin(token, self.stop_ids)
            out.scatter_(1, torch.where(live, count, new)[:, None], token[:, None])   # ended rows: the spare column
            count += live & ~stop
            done |= live & (stop | (count >= limit))
            if seen is not None:
                seen[torch.arange(B, device=dev), token] = True
            step += 1
            if step % self.check_every == 0 or max(host_len) + 1 >= max_len:
                yield from self._collect(slot_item, done, count, out, waiting, occupied)
            if all(it is None for it in slot_item):
                continue   # every row ended: refill before decoding anything
            lengths = [n for n, it in zip(host_len, slot_item) if it is not None]
            S = max_len if self.compiled else max(lengths) + 1
            if not self.compiled and len(set(lengths)) == 1 and len(lengths) == B:
                mask = None   # every row at one length: no padding, and SDPA may take its fastest kernel
            else:
                mask = (torch.arange(S, device=dev)[None, :] <= length[:, None])[:, None, None, :]   # (B, 1, 1, S)
            self.occupied = len(lengths)
            self.counts += torch.stack([(occupied & done).sum(), occupied.sum()])   # past their stop, unread; all
            logits = self.step_fn(lm, token, length[:, None], mask, length[:, None], S)
            self.stats["steps"] += 1
            length += occupied
            host_len = [n + (it is not None) for n, it in zip(host_len, slot_item)]

    def _seat(self, rows, lengths, limits, length, count, done, limit, occupied):
        """The arrivals' rows made ready to decode: host values copied to the device, once a refill."""
        index = torch.tensor(rows, device=self.device)
        length[index], count[index], done[index] = torch.tensor(lengths, device=self.device), 0, False
        limit[index], occupied[index] = torch.tensor(limits, device=self.device), True

    def _tally(self):
        """The step counts kept on the device, read once at the end."""
        wasted, used = self.counts.tolist()
        self.stats["finished_row_steps"], self.stats["row_steps"] = wasted, used

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

    def _collect(self, slot_item, done, count, out, waiting, occupied):
        """The rows that ended (a stop token, the token limit, a stop string): their tokens, their slots freed."""
        done_h, count_h = done.tolist(), count.tolist()
        rows = [b for b, it in enumerate(slot_item) if it is not None]
        tokens = {b: out[b, :count_h[b]].tolist() for b in rows} if rows else {}
        for b in rows:
            if not done_h[b] and self.sampling.stop_strings and self.decode and \
                    any(s in self.decode(tokens[b][-32:]) for s in self.sampling.stop_strings):
                done[b], done_h[b] = True, True
        ended = [b for b in rows if done_h[b]]
        if ended:
            occupied[torch.tensor(ended, device=occupied.device)] = False
        for b in ended:
            item, slot_item[b] = slot_item[b], None
            waiting.remove(item)
            self.stats["tokens"] += len(tokens[b])
            self.calm += 1
            yield item.key, tokens[b]
