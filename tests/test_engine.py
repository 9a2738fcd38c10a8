"""engine.py: continuous batching gives every video the tokens of captioning it alone, whatever its
neighbours, their lengths and the order they arrive in; it survives running out of memory."""

import copy
import gc
import itertools
import weakref

import pytest
import torch

import engine as engine_module
from engine import Engine, Item, OutOfMemory
from generate import Sampling, generate
from lora import add_lora, lora_layers
from model import PLLaVA
from tokenizer import prompt_ids

from conftest import tiny_model

QUESTIONS = ["describe the video", "what happens in this video in detail, step by step?", "hello"]


pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory, 5)[:2]


def videos(tok, n, mixed_prompts=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Item(i, prompt_ids(tok, QUESTIONS[i % 3] if mixed_prompts else QUESTIONS[0]),
                 torch.randn(4, 3, 28, 28, generator=g)) for i in range(n)]


def alone(model, item, sampling):
    return generate(model, torch.tensor([item.ids]), item.pixels[None], sampling=sampling)[0]


def stops_that_end_rows_early(model, items, n=24):
    """Stop tokens taken from the free-running captions, so that the videos end after different
    lengths."""
    free = [alone(model, it, Sampling(max_new_tokens=n, stop_ids=())) for it in items]
    return tuple({free[0][3], free[1][n // 2], free[2][n - 7]})


@pytest.mark.parametrize("slots, mixed_prompts, order",
                         [(3, False, "as is"), (2, True, "reversed"), (4, True, "shuffled"),
                          (1, False, "as is")])
def test_each_video_gets_the_tokens_it_gets_alone(tiny, slots, mixed_prompts, order):
    model, tok = tiny
    items = videos(tok, 7, mixed_prompts)
    sampling = Sampling(max_new_tokens=24, stop_ids=stops_that_end_rows_early(model, items))
    want = {it.key: alone(model, it, sampling) for it in items}
    # the lengths really are mixed
    assert len({len(t) for t in want.values()}) >= 3
    arrivals = items[::-1] if order == "reversed" else [items[i] for i in (3, 0, 6, 1, 5, 2, 4)] \
        if order == "shuffled" else items
    eng = Engine(model, slots, sampling)
    got = dict(eng.run(arrivals))
    assert got == want
    assert eng.stats["finished_row_steps"] == 0 and eng.stats["tokens"] == sum(
        map(len, want.values())
    )


def test_with_lora_and_a_repetition_penalty(tiny):
    model, tok = tiny
    model = copy.deepcopy(model)
    add_lora(model.language_model, targets=("q_proj", "v_proj"), r=4, alpha=3.0, dropout=0.0)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    items = videos(tok, 5, mixed_prompts=True, seed=1)
    sampling = Sampling(max_new_tokens=16, stop_ids=stops_that_end_rows_early(model, items, 16),
                        repetition_penalty=1.3)
    want = {it.key: alone(model, it, sampling) for it in items}
    assert dict(Engine(model, 3, sampling).run(items)) == want


def test_stops_read_every_few_steps_give_the_same_tokens(tiny):
    """On a GPU stops are read every few steps (no sync each step): rows run past their stop, then
    are cut."""
    model, tok = tiny
    items = videos(tok, 6, seed=2)
    sampling = Sampling(max_new_tokens=20, stop_ids=stops_that_end_rows_early(model, items, 20))
    want = {it.key: alone(model, it, sampling) for it in items}
    eng = Engine(model, 3, sampling, check_every=4)
    assert dict(eng.run(items)) == want and eng.stats["finished_row_steps"] > 0


@pytest.mark.parametrize("new", [10, 13])
def test_captions_cut_at_the_token_limit_keep_their_last_token_between_checks(tiny, new):
    """A row that reaches --max-new-tokens between two stop checks runs on: those steps must not
    touch its tokens (limits that are not a multiple of check_every)."""
    model, tok = tiny
    items = videos(tok, 6, seed=8)
    sampling = Sampling(max_new_tokens=new, stop_ids=())
    want = {it.key: alone(model, it, sampling) for it in items}
    assert dict(Engine(model, 3, sampling, check_every=4).run(items)) == want


def test_out_of_memory_halves_the_slots_and_they_grow_back_but_never_to_a_count_that_failed(
    tiny, monkeypatch
):
    """An OOM at 4 slots: every video still gets its tokens, the slots halve to 2, and once
    grow_after videos a slot end without another they grow again, to 3 (below the 4 that failed),
    never to 4."""
    model, tok = tiny
    items = videos(tok, 12, seed=9)
    sampling = Sampling(max_new_tokens=6, stop_ids=())
    want = {it.key: alone(model, it, sampling) for it in items}
    real, calls, slots = engine_module.prefill, itertools.count(), []

    def prefill(lm, x, positions, mask):
        slots.append(eng.slots)
        if next(calls) == 1:
            raise torch.OutOfMemoryError("simulated")
        return real(lm, x, positions, mask)
    monkeypatch.setattr(engine_module, "prefill", prefill)
    eng = Engine(model, 4, sampling, grow_after=1)
    got = dict(eng.run(items))
    assert got == want and slots[:2] == [4, 4] and 2 in slots and eng.slots == 3
    assert max(slots[2:]) == 3                                  # grown back, to below what failed
    # 5 decode steps a video (the first token comes from its prefill): the row steps before the OOM
    # count too
    assert eng.stats["row_steps"] >= 12 * 5


def test_running_out_of_memory_halves_the_slots_frees_the_attempt_and_finishes(tiny, monkeypatch):
    model, tok = tiny
    items = videos(tok, 5, seed=3)
    sampling = Sampling(max_new_tokens=12, stop_ids=())
    want = {it.key: alone(model, it, sampling) for it in items}
    real, failed, calls = engine_module.prefill, [], itertools.count()

    # out of memory at the second prefill, while rows are decoding
    def prefill(lm, x, positions, mask):
        if next(calls) == 1:
            # the arrival's row of the cache
            view = lm.model.layers[0].self_attn.cache.k
            failed.append(weakref.ref(view.untyped_storage()))
            raise torch.OutOfMemoryError("simulated")
        return real(lm, x, positions, mask)
    monkeypatch.setattr(engine_module, "prefill", prefill)
    eng = Engine(model, 4, sampling)
    got = dict(eng.run(items))
    gc.collect()
    # the failed attempt's cache is gone
    assert got == want and eng.slots == 2 and failed and failed[0]() is None


def test_a_video_that_does_not_fit_alone_gets_its_error_and_the_rest_go_on(tiny, monkeypatch):
    model, tok = tiny
    items = videos(tok, 3, seed=4)
    sampling = Sampling(max_new_tokens=8, stop_ids=())
    real = engine_module.prefill

    target = model.prepare(torch.tensor([items[1].ids]), items[1].pixels[None])[0][0]

    def prefill(lm, x, positions, mask):   # video 1 never fits, alone or not
        if any(torch.allclose(row, target, atol=1e-4) for row in x):
            raise torch.OutOfMemoryError("simulated")
        return real(lm, x, positions, mask)
    monkeypatch.setattr(engine_module, "prefill", prefill)
    got = dict(Engine(model, 2, sampling).run(items))
    assert isinstance(got[1], OutOfMemory) and got[0] == alone(model, items[0], sampling)
    assert got[2] == alone(model, items[2], sampling)


def test_decoding_reads_nothing_back_between_checks(tiny, monkeypatch):
    """On a GPU every read of a device tensor on the host (.tolist(), .item(), bool(), int()) waits
    for the queue: the steps and the loop around them make none; only the check every `check_every`
    steps does."""
    model, tok = tiny
    reads, counting = [], [False]
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            if counting[0]:
                reads.append(_name)
            return _real(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    # checks, refills, the end: allowed
    for method in ("_collect", "_prefill", "_seat", "_tally", "_grow_cache"):
        real = getattr(Engine, method)

        def paused(self, *a, _real=real, **kw):
            counting[0] = False
            try:
                result = _real(self, *a, **kw)
                if hasattr(result, "__next__"):
                    result = list(result)
                return iter(result) if isinstance(result, list) else result
            finally:
                counting[0] = True
        monkeypatch.setattr(Engine, method, paused)
    # a tensor made from host data is a copy to the GPU: a sync there
    for name in ("tensor", "as_tensor"):
        real = getattr(torch, name)

        def made(*a, _real=real, _name=name, **kw):
            if counting[0]:
                reads.append(_name)
            return _real(*a, **kw)
        monkeypatch.setattr(torch, name, made)
    masks, real_step = [], engine_module.decode_one_token

    def step(lm, token, positions, mask, input_pos, kv_len=None):
        masks.append(mask is None)
        return real_step(lm, token, positions, mask, input_pos, kv_len)
    monkeypatch.setattr(engine_module, "decode_one_token", step)
    items = videos(tok, 5, seed=6)
    sampling = Sampling(max_new_tokens=12, stop_ids=())
    eng = Engine(model, 2, sampling, check_every=4)
    counting[0] = True
    got = dict(eng.run(items))
    counting[0] = False
    assert reads == [] and eng.stats["steps"] > 20 and len(got) == 5
    # 5 videos of one prompt length, 12 tokens each, 2 slots: the first pair decodes in step, with
    # no mask (11 steps: its first tokens come from the prefill); the fifth, alone in a batch of
    # two, is masked
    assert all(masks[:11]) and not masks[-1]


def test_out_of_memory_at_cache_setup_too(tiny, monkeypatch):
    model, tok = tiny
    items = videos(tok, 4, seed=7)
    sampling = Sampling(max_new_tokens=6, stop_ids=())
    want = {it.key: alone(model, it, sampling) for it in items}
    calls, real = itertools.count(), engine_module.KVCache

    def cache(*a, **kw):
        if next(calls) == 0:
            raise torch.OutOfMemoryError("simulated")
        return real(*a, **kw)
    monkeypatch.setattr(engine_module, "KVCache", cache)
    eng = Engine(model, 4, sampling)
    assert dict(eng.run(items)) == want and eng.slots == 2


def test_a_model_built_for_bf16_never_holds_fp32_weights(monkeypatch):
    from helpers import TEXT, VISION
    seen = []
    import weights
    real = weights.init_weights

    def init_weights(model, *a, **kw):   # the weights as they are first made: already bf16
        seen.extend({p.dtype for p in model.parameters()})
        return real(model, *a, **kw)
    monkeypatch.setattr(weights, "init_weights", init_weights)
    model = PLLaVA.from_config(dict(vision_config=VISION, text_config=TEXT, image_token_index=110),
                               dtype=torch.bfloat16)
    assert set(seen) == {torch.bfloat16} and {p.dtype for p in model.parameters()} == {
        torch.bfloat16
    }


def test_the_loop_guard_ends_a_row_that_repeats_itself_and_leaves_the_others_alone(tiny):
    from generate import looping
    assert looping([9, 1] + [5] * 30) == 3 and looping([1, 2] + [7, 8] * 12) == 4
    # said twice: no loop
    assert looping(list(range(60))) == 0 and looping([3, 4, 5, 6, 7, 8, 9] * 2) == 0
    model, tok = tiny
    items = videos(tok, 6, mixed_prompts=True)
    free = dict(Engine(model, 3, Sampling(max_new_tokens=64, stop_ids=())).run(items))
    guarded = dict(Engine(model, 3,
                          Sampling(max_new_tokens=64, stop_ids=(), stop_loops=True)).run(items))
    # no loop: nothing changes
    assert not any(looping(t) for t in free.values()) and guarded == free
    stuck = copy.deepcopy(model)
    # every logit 0: token 0 for ever
    stuck.language_model.model.norm.weight.zero_()
    free = dict(Engine(stuck, 3, Sampling(max_new_tokens=64, stop_ids=())).run(items))
    guarded = dict(Engine(stuck, 3,
                          Sampling(max_new_tokens=64, stop_ids=(), stop_loops=True)).run(items))
    assert all(t == [0] * 64 for t in free.values())
    assert all(8 <= len(t) < 64 and t == [0] * len(t) and looping(t) == 1 for t in guarded.values())


def counting_compiles(monkeypatch, lm):
    """torch.compile with a backend that counts the graphs dynamo makes and runs them as they
    are."""
    from torch._dynamo.testing import CompileCounter
    counter, real = CompileCounter(), torch.compile
    torch._dynamo.reset()
    lm.__dict__.pop("compiled_decode", None)
    monkeypatch.setattr(torch, "compile",
                        lambda fn, mode=None, dynamic=None: real(fn, backend=counter,
                                                                 dynamic=dynamic))
    return counter


def test_compiled_steps_make_one_graph_per_slot_count_whatever_the_ooms_and_prompt_lengths(
    tiny, monkeypatch
):
    """Compiled, every (slots, cache length) is a graph compiled for minutes at 13B. A run of 24
    videos with two prompt lengths and two out-of-memory errors (8 slots -> 4, grown back to 6, ->
    3, grown back to 4) makes one graph per slot count it decoded at, each from the fixed set, none
    for a prompt length or a restart."""
    model, tok = tiny
    items = videos(tok, 24, mixed_prompts=True, seed=11)
    assert len({len(it.ids) for it in items}) >= 2
    sampling = Sampling(max_new_tokens=6, stop_ids=())
    want = {it.key: alone(model, it, sampling) for it in items}
    counter = counting_compiles(monkeypatch, model.language_model)
    real_prefill, real_mask, calls, widths = (
        engine_module.prefill,
        engine_module.length_mask,
        itertools.count(),
        [],
    )

    def prefill(lm, x, positions, mask):
        if next(calls) in (1, 9):
            raise torch.OutOfMemoryError("simulated")
        return real_prefill(lm, x, positions, mask)

    def length_mask(length, slots):   # once a step: the slots it decodes at
        widths.append(length.shape[0])
        return real_mask(length, slots)
    monkeypatch.setattr(engine_module, "prefill", prefill)
    monkeypatch.setattr(engine_module, "length_mask", length_mask)
    eng = Engine(model, 8, sampling, compile_mode="default", grow_after=1)
    got = dict(eng.run(items))
    model.language_model.__dict__.pop("compiled_decode", None)
    assert got == want
    assert eng.stats["slot_counts"][:3] == [8, 4, 6] and len(eng.stats["slot_counts"]) >= 4
    assert set(widths) <= {8, 6, 4, 3, 2, 1} and len(set(widths)) >= 3
    assert counter.frame_count == len(set(widths)), (counter.frame_count, eng.stats["slot_counts"])


def test_reaching_the_recompile_limit_is_an_error_that_says_so(tiny, monkeypatch):
    model, tok = tiny
    items = videos(tok, 6, seed=12)
    counting_compiles(monkeypatch, model.language_model)
    real, calls = engine_module.prefill, itertools.count()

    # out of memory once decoding at 4 slots has compiled: 2 slots next
    def prefill(lm, x, positions, mask):
        if next(calls) == 1:
            raise torch.OutOfMemoryError("simulated")
        return real(lm, x, positions, mask)
    monkeypatch.setattr(engine_module, "prefill", prefill)
    eng = Engine(
        model, 4, Sampling(max_new_tokens=6, stop_ids=()), compile_mode="default", check_every=4
    )
    with torch._dynamo.config.patch(recompile_limit=1), \
            pytest.raises(engine_module.CompileLimit, match="recompile limit.*without --compile"):
        dict(eng.run(items[:4] + [Item("late", items[4].ids, items[4].pixels)] + items[5:]))
    model.language_model.__dict__.pop("compiled_decode", None)


def test_the_engine_decodes_while_the_next_videos_frames_are_read_and_counts_the_steps_it_waited(
    tiny,
):
    """The decoders hand over two videos, then the next only once the engine has ended one: an
    engine that waits for frames while a slot has work never ends one (the old `next(items)` did),
    this one decodes on, counts the steps a slot stood empty, and still gives each video its own
    tokens."""
    import threading
    model, tok = tiny
    items = videos(tok, 5, seed=13)
    sampling = Sampling(max_new_tokens=8, stop_ids=())
    want = {it.key: alone(model, it, sampling) for it in items}
    first_ended, timed_out = threading.Event(), []

    def decoders():
        yield from items[:2]
        if not first_ended.wait(timeout=60):
            timed_out.append(True)
        yield from items[2:]
    eng = Engine(model, 3, sampling)
    got = {}
    for key, tokens in eng.run(decoders()):
        got[key] = tokens
        first_ended.set()
    assert got == want and not timed_out
    assert 0 < eng.stats["waited_steps"] < eng.stats["steps"]


def test_a_failure_in_the_decoders_reaches_the_caller_of_the_engine(tiny):
    model, tok = tiny
    items = videos(tok, 3, seed=14)

    def decoders():
        yield from items[:2]
        raise RuntimeError("decoder pool broke")
    with pytest.raises(RuntimeError, match="decoder pool broke"):
        list(Engine(model, 2, Sampling(max_new_tokens=4, stop_ids=())).run(decoders()))
