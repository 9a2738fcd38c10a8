"""Continuous batching: `slots` videos decode together, and a video that ends hands its slot to the
next.

A static batch (generate.generate) decodes until its longest caption ends: with captions of 30 to
256+ tokens, a third of its steps go to rows that are done. Here each row of the KV cache is a slot
holding one video at a time, at its own length: a step writes each row's new key and value at that
row's own position and attends to that row's own slots. The videos that arrive together are
prefilled together (those with prompts of one length, up to PREFILL_TOKENS a pass) straight into
their rows of the cache (no second cache: at 13B and 16 slots it would not fit beside the first),
while the others wait. Each video's greedy output equals captioning it alone (tests/test_engine.py).

The videos come from a Feed: a list is ready as it is; an iterator (caption.py's decoders) is read
by a thread, and the engine takes what is ready without waiting while any slot has work. The steps
taken with a slot empty for want of frames are counted ("waited"): decoding that cannot keep up.

How a step attends (model.attend): every row at one length, no mask (SDPA's fastest kernel); rows
at different lengths, a boolean mask over the slots in use (eager, the reference); compiled, a
FlexAttention block mask built on the device from the rows' lengths, so each row reads its own
blocks of the cache (a row that has ended, none past its first).

Stops are read on the host every `check_every` steps, all rows in one copy. On a CPU that is every
step; on a GPU each read is a sync, so a few steps pass between reads, and a row may run that many
steps past its stop (the extra tokens are dropped). Nothing else is read on the host between two
checks.

Compiled, every (slots, cache length) is a graph of its own, compiled for minutes at 13B: the slot
counts come from a small set (SLOT_COUNTS: powers of two and their halfway points, and the count
the run started with), the cache length grows in steps of 256 and never shrinks, and a run that
reaches torch's recompile limit stops with CompileLimit instead of running on uncompiled.

Running out of device memory moves the slots down to the largest count of the set at most half
of them; the videos in flight start again, and the batch never shrinks below one: a video that
does not fit alone gets its error. Once `grow_after` videos a slot have ended without another
error, the slots double again, but never to a count that failed. Everything runs under
torch.inference_mode(): no autograd graph hangs off the cache.
"""

import sys
import time
from dataclasses import dataclass

import torch

from generate import (Sampling, compiled_decode, decode_one_token, length_mask, looping, pick,
                      prefill)
from model import KVCache
from plumbing.feed import Feed


@dataclass
class Item:
    key: object                 # what the caller knows the video by
    ids: list                   # its prompt's token ids, one <image> among them
    pixels: torch.Tensor        # (T, 3, H, W), normalized, on the model's device
    max_new_tokens: int = None  # its own limit, at most the sampling's (bench.py mixes lengths)


class OutOfMemory(Exception):
    """One video does not fit on the device even alone."""


class CompileLimit(RuntimeError):
    """The compiled step reached torch's recompile limit: every video after would run uncompiled."""


PREFILL_TOKENS = 8192   # the most prompt tokens prefilled in one pass (13B: 3 videos of 2,403)


def prefill_videos(prompt_len: int) -> int:
    """How many videos of this prompt length one prefill pass takes."""
    return max(1, PREFILL_TOKENS // prompt_len)


def slot_counts(below: int):
    """The slot counts a run moves between (one compiled graph each): 1, 2, 3, 4, 6, 8, 12, 16, 24,
    ... (powers of two and their halfway points) strictly below `below`, the largest first."""
    counts = sorted({c for k in range(16) for c in (2 ** k, 3 * 2 ** k // 2) if 0 < c < below})
    return counts[::-1]


class Engine:
    def __init__(self, model, slots: int, sampling: Sampling, to_text=None, generator=None,
                 check_every: int = None, compile_mode: str = None, grow_after: int = 64):
        self.model, self.slots, self.sampling = model, slots, sampling
        self.to_text, self.generator = to_text, generator   # to_text(ids): for the stop strings
        self.device = model.language_model.model.embed_tokens.weight.device
        self.check_every = check_every or (1 if self.device.type == "cpu" else 4)
        self.compiled = bool(compile_mode)   # every step attends over the whole cache: one shape
        lm = model.language_model
        self.step_fn = compiled_decode(lm, compile_mode) if compile_mode else decode_one_token
        self.ceiling = slots          # the most slots to grow back to: below any count that failed
        self.grow_after = grow_after
        self.ended_since_oom = 0      # videos ended since the last out-of-memory error
        self.waiting = []             # the videos taken and not yet ended, in their order
        self.occupied = 0             # slots holding a video now
        self.max_len = 0              # compiled: the cache's length, kept from batch to batch
        # steps of rows that had ended (read late), and all row steps: kept on the device
        self.counts = torch.zeros(2, dtype=torch.long, device=self.device)
        self.stop_ids = torch.tensor(sorted(sampling.stop_ids) or [-1], device=self.device)
        self.stats = dict(steps=0, row_steps=0, finished_row_steps=0, tokens=0, prefills=0,
                          prefill_passes=0, prefill_s=0.0, waited_steps=0, wait_s=0.0,
                          slot_counts=[slots])

    @torch.inference_mode()
    def run(self, items):
        """Yield (key, tokens or OutOfMemory) for every Item, as each video ends (not in arrival
        order)."""
        feed = Feed(items, ahead=self.slots)
        try:
            while True:
                try:
                    if not (yield from self._run(feed)):
                        return
                    self._free()   # grown back: the old cache goes before a wider one
                    continue       # and the videos in flight start again in it
                except torch.OutOfMemoryError:
                    pass   # handled below, outside the except: its traceback frees the tensors
                except torch._dynamo.exc.FailOnRecompileLimitHit as e:
                    raise CompileLimit(
                        f"the compiled decoding step reached torch's recompile limit "
                        f"({torch._dynamo.config.recompile_limit} graphs; slots "
                        f"{self.stats['slot_counts']}): the videos after would run uncompiled; "
                        f"run without --compile") from e
                self._free()
                self.ended_since_oom = 0
                below = slot_counts(self.slots)[0] if self.slots > 1 else 1
                self.ceiling = min(self.ceiling, below)
                if self.slots > 1:
                    self.slots = next(c for c in slot_counts(self.slots) if c <= self.slots // 2)
                    self.stats["slot_counts"].append(self.slots)
                    print(f"\nout of device memory: {self.slots} slots now", flush=True,
                          file=sys.stderr)
                elif self.waiting:   # the video alone does not fit: its error, and the next
                    error = OutOfMemory("out of device memory with this video alone")
                    yield self.waiting.pop(0).key, error
                else:
                    raise OutOfMemory("out of device memory with no video in the batch")
        finally:
            feed.close()
            self._free()
            self._tally()

    def _run(self, feed):
        """The loop proper: False when every item has ended; True when it stopped to grow the batch
        back (`grow_after` videos per slot ended since the last out-of-memory error). After either,
        or an out-of-memory error, run() calls it again and the videos taken and not yet ended
        (self.waiting) start over, before new ones."""
        lm, B, dev = self.model.language_model, self.slots, self.device
        new = self.sampling.max_new_tokens
        held, waiting = list(self.waiting), self.waiting   # they stay in waiting until they end
        slot_item = [None] * B
        max_len = 0
        length = torch.zeros(B, dtype=torch.long, device=dev)       # cache slots in use, per row
        count = torch.zeros(B, dtype=torch.long, device=dev)        # tokens generated, per row
        done = torch.ones(B, dtype=torch.bool, device=dev)          # an empty slot counts as done
        occupied = torch.zeros(B, dtype=torch.bool, device=dev)     # a video in the slot
        out = torch.zeros(B, new + 1, dtype=torch.long, device=dev) # tokens; a spare last column
        limit = torch.full((B,), new, dtype=torch.long, device=dev) # takes the steps of ended rows
        seen = logits = None
        host_len, step = [0] * B, 0
        while True:
            if self.slots < self.ceiling and self.ended_since_oom >= self.grow_after * self.slots:
                self.slots, self.ended_since_oom = min(2 * self.slots, self.ceiling), 0
                self.stats["slot_counts"].append(self.slots)
                return True
            free = [b for b in range(B) if slot_item[b] is None]
            arrivals, held = held[:len(free)], held[len(free):]
            starved = False
            if len(arrivals) < len(free):   # wait for frames only when no slot has work
                idle = not arrivals and len(free) == B
                t = time.perf_counter()
                taken = feed.take(len(free) - len(arrivals), wait=idle)
                if idle:
                    self.stats["wait_s"] += time.perf_counter() - t
                waiting += taken
                arrivals += taken
                starved = len(arrivals) < len(free) and not feed.ended   # frames not ready
            if arrivals:
                need = max(self._prompt_len(item) for item in arrivals) + new + 1
                if self.compiled:   # one shape per cache length: a few lengths, few compiles
                    need = max(-(-need // 256) * 256, self.max_len)
                    self.max_len = need
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
                self._prefill_all(arrivals, rows, logits, seen)
                self._seat(rows, [host_len[b] for b in rows],
                           [min(it.max_new_tokens or new, new) for it in arrivals],
                           length, count, done, limit, occupied)
            if all(it is None for it in slot_item):
                return False
            s = self.sampling
            token = pick(logits, seen, s.temperature, s.top_p, s.repetition_penalty,
                         self.generator)
            live = occupied & ~done
            stop = torch.isin(token, self.stop_ids)
            # ended rows write to the spare column
            out.scatter_(1, torch.where(live, count, new)[:, None], token[:, None])
            count += live & ~stop
            done |= live & (stop | (count >= limit))
            if seen is not None:
                seen[torch.arange(B, device=dev), token] = True
            step += 1
            if step % self.check_every == 0 or max(host_len) + 1 >= max_len:
                yield from self._collect(slot_item, done, count, out, waiting, occupied, length)
            if all(it is None for it in slot_item):
                continue   # every row ended: refill before decoding anything
            lengths = [n for n, it in zip(host_len, slot_item) if it is not None]
            self.stats["waited_steps"] += starved   # a slot empty while its next video decodes
            mask, kv_len = self._attention(length, lengths, max_len)
            self.occupied = len(lengths)
            self.counts += torch.stack([(occupied & done).sum(), occupied.sum()])   # unread; all
            logits = self.step_fn(lm, token, length[:, None], mask, length[:, None], kv_len)
            self.stats["steps"] += 1
            length += occupied & ~done   # an ended row stays where it ended, reading no further
            host_len = [n + (it is not None) for n, it in zip(host_len, slot_item)]

    def _attention(self, length, lengths, max_len):
        """(mask, kv_len) for the next step: what each row attends to (the choices of
        model.attend). Compiled: a block mask over the whole cache (one shape for every step), from
        the rows' lengths on the device. Eager: every row full and at one length, no mask over the
        slots in use (SDPA's fastest kernel); else a boolean mask over the slots up to the longest
        row, the reference path."""
        if self.compiled:
            return length_mask(length, max_len), None
        S = max(lengths) + 1
        if len(set(lengths)) == 1 and len(lengths) == self.slots:
            return None, S
        seen = torch.arange(S, device=self.device)[None, :] <= length[:, None]     # (B, S)
        return seen[:, None, None, :], S

    def _seat(self, rows, lengths, limits, length, count, done, limit, occupied):
        """The arrivals' rows made ready to decode: host values copied to the device, once a
        refill."""
        index = torch.tensor(rows, device=self.device)
        length[index] = torch.tensor(lengths, device=self.device)
        count[index], done[index] = 0, False
        limit[index], occupied[index] = torch.tensor(limits, device=self.device), True

    def _tally(self):
        """The step counts kept on the device, read once at the end."""
        wasted, used = self.counts.tolist()
        self.stats["finished_row_steps"], self.stats["row_steps"] = wasted, used

    def _prompt_len(self, item):
        return len(item.ids) - 1 + self.model.config.num_visual_tokens

    def _free(self):
        self.model.language_model.clear_cache()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _grow_cache(self, B, old, need):
        """A cache of `need` slots per row, what the old one held copied in (a longer prompt
        arrived): layer by layer, so that at most one layer's cache exists twice."""
        for layer in self.model.language_model.model.layers:
            a, before = layer.self_attn, layer.self_attn.cache
            a.cache = None   # the old one freed once copied: twice the memory of a layer, not all
            a.cache = KVCache(B, a.n_kv, need, a.head_dim, self.dtype, self.device)
            if before is not None and old:
                a.cache.k[:, :, :old] = before.k[:, :, :old]
                a.cache.v[:, :, :old] = before.v[:, :, :old]
        return need

    @property
    def dtype(self):
        return self.model.language_model.model.norm.weight.dtype   # the embedding may be int8

    def _prefill_all(self, items, rows, logits, seen):
        """The arrivals prefilled into their rows: those whose prompts have one length together, up
        to PREFILL_TOKENS a pass (a pass at 13B is compute-bound from one video on: batching saves
        the weight reads and the launches of the passes it replaces, not arithmetic)."""
        by_length = {}
        for item, b in zip(items, rows):
            by_length.setdefault(self._prompt_len(item), []).append((item, b))
        for P, group in by_length.items():
            n = prefill_videos(P)
            for i in range(0, len(group), n):
                part = group[i:i + n]
                self._prefill([it for it, _ in part], [b for _, b in part], logits, seen)

    def _prefill(self, items, rows, logits, seen):
        """Videos whose prompts have one length prefilled in one pass into their rows of the cache
        (a view of it: nothing copied), their first logits into logits[rows]."""
        lm, dev, t0 = self.model.language_model, self.device, time.perf_counter()
        main = [layer.self_attn.cache for layer in lm.model.layers]
        ids = torch.tensor([item.ids for item in items], device=dev)
        image = self.model.config.image_token_index
        where = [item.ids.index(image) for item in items]   # no host read
        pixels = torch.stack([item.pixels for item in items])
        x, _, _ = self.model.prepare(ids, pixels, image_pos=where)     # (n, P, D)
        n, P = x.shape[:2]
        index = torch.tensor(rows, device=dev)
        try:
            for layer, cache in zip(lm.model.layers, main):
                layer.self_attn.cache = cache.rows(index)
            first = prefill(lm, x, torch.arange(P, device=dev).expand(n, P), None)
            logits[index] = first.to(logits.dtype)
        finally:
            for layer, cache in zip(lm.model.layers, main):
                layer.self_attn.cache = cache
        if seen is not None:
            seen[index] = False
            seen[index[:, None], ids.clamp(0, seen.shape[1] - 1)] = ids < seen.shape[1]
        self.stats["prefills"] += n
        self.stats["prefill_passes"] += 1
        self.stats["prefill_s"] += time.perf_counter() - t0

    def _read(self, done, count, out):
        """The one host read of the loop: every row's (done, count, tokens), in one copy."""
        return torch.cat([done[:, None].long(), count[:, None], out], dim=1).tolist()

    def _collect(self, slot_item, done, count, out, waiting, occupied, length):
        """The rows that ended (a stop token, the token limit, a stop string): their tokens, their
        slots freed."""
        rows = {b: r for b, r in enumerate(self._read(done, count, out))
                if slot_item[b] is not None}
        tokens = {b: r[2:2 + r[1]] for b, r in rows.items()}
        ended = [b for b, r in rows.items() if r[0] or self._stop_string(tokens[b])]
        if ended:
            index = torch.tensor(ended, device=occupied.device)
            occupied[index], done[index], length[index] = False, True, 0   # its cache unread
        for b in ended:
            item, slot_item[b] = slot_item[b], None
            waiting.remove(item)
            self.stats["tokens"] += len(tokens[b])
            self.ended_since_oom += 1
            yield item.key, tokens[b]

    def _stop_string(self, tokens):
        """A stop string in the row's text, or (sampling.stop_loops) the row repeating itself."""
        if self.sampling.stop_loops and looping(tokens):
            return True
        stops = self.sampling.stop_strings
        return bool(stops and self.to_text) and any(s in self.to_text(tokens[-32:]) for s in stops)
