"""generate.py: batched == one at a time, cached == the uncached reference loop, and the sampling
knobs."""

import copy
import json
import time

import pytest
import torch

from generate import (PackedLinear, Sampling, Stopper, can_pack, generate, generate_reference,
                      pack_for_cpu, pick)
from lora import add_lora, lora_layers
from model import causal_mask, positions_of
from tokenizer import prompt_ids

from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory, 3)[:2]


def left_pad(rows, pad):
    L = max(map(len, rows))
    ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


QUESTIONS = ["describe the video", "what happens in this video in detail, step by step?", "hello"]


def test_batched_greedy_equals_one_video_at_a_time(tiny):
    model, tok = tiny
    rows = [prompt_ids(tok, q) for q in QUESTIONS]
    pixels = torch.randn(3, 4, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    ids, mask = left_pad(rows, tok.pad_id)
    batched = generate(model, ids, pixels, mask, sampling=Sampling(max_new_tokens=24, stop_ids=()))
    for b in range(3):
        single = generate(model, torch.tensor([rows[b]]), pixels[b : b + 1],
                          sampling=Sampling(max_new_tokens=24, stop_ids=()))
        assert batched[b] == single[0]
    # different prompts and videos, different captions
    assert len(set(map(tuple, batched))) == 3


def test_cached_generation_equals_uncached_reference(tiny):
    model, tok = tiny
    ids, mask = left_pad([prompt_ids(tok, q) for q in QUESTIONS[:2]], tok.pad_id)
    # 3 frames: repeated to 4
    pixels = torch.randn(2, 3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    fast = generate(model, ids, pixels, mask, sampling=Sampling(max_new_tokens=16, stop_ids=()))
    slow = generate_reference(model, ids, pixels, mask, max_new_tokens=16, stop_ids=())
    assert fast == slow and all(len(r) == 16 for r in fast)


def test_stop_token_ends_each_row_on_its_own(tiny):
    model, tok = tiny
    ids = torch.tensor([prompt_ids(tok, "hello")] * 2)
    pixels = torch.randn(2, 4, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    free = generate(model, ids, pixels, sampling=Sampling(max_new_tokens=12, stop_ids=()))
    stop = free[0][5]                                # make row 0's sixth token the stop token
    out = generate(model, ids, pixels, sampling=Sampling(max_new_tokens=12, stop_ids=(stop,)))
    for row, full in zip(out, free):
        cut = full.index(stop) if stop in full else len(full)
        assert row == full[:cut]


def test_pick_sampling_knobs():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]] * 2000)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    assert pick(logits, seen).tolist() == [0] * 2000
    assert pick(logits, seen, temperature=1.0, top_p=0.01, generator=g).unique().tolist() == [0]
    draws = pick(logits, seen, temperature=1.0, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / 2000
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.04)
    # p = .61 .22 .14 .03: the smallest set holding top_p of the mass
    assert set(pick(logits, seen, temperature=1.0, top_p=0.8,
                    generator=g).unique().tolist()) == {0, 1}
    assert set(pick(logits, seen, temperature=1.0, top_p=0.9,
                    generator=g).unique().tolist()) == {0, 1, 2}
    seen[:, 0] = True                                # penalize token 0: 2.0 / 3 < 1.0
    assert pick(logits, seen, repetition_penalty=3.0).unique().tolist() == [1]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(pick(logits, seen, 1.0, generator=g1), pick(logits, seen, 1.0, generator=g2))


def test_stop_strings():
    s = Stopper(2, stop_ids={9}, stop_strings=["STOP"],
                decode=lambda ids: "".join("STOP" if i == 7 else "a" for i in ids))
    assert not s.add(torch.tensor([1, 2]))
    assert not s.add(torch.tensor([7, 3]))          # row 0 hits the stop string
    assert s.done == [True, False]
    assert s.add(torch.tensor([4, 9]))              # row 1 the stop token: all done
    assert s.tokens == [[1, 7], [2, 3]]


@pytest.mark.slow
def test_static_cache_path_and_compiled_step_equal_the_plain_path(tiny, monkeypatch):
    """--compile attends to the whole cache through a mask (one shape for every step) and compiles
    the step; both must give the tokens of the plain path, padded rows included."""
    import generate as g
    model, tok = tiny
    ids, mask = left_pad([prompt_ids(tok, q) for q in QUESTIONS], tok.pad_id)
    pixels = torch.randn(3, 4, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    plain = generate(model, ids, pixels, mask, sampling=Sampling(max_new_tokens=12, stop_ids=()))
    # the static path, eager
    monkeypatch.setattr(g, "compiled_decode", lambda lm, mode: g.decode_one_token)
    assert (generate(model, ids, pixels, mask, sampling=Sampling(max_new_tokens=12, stop_ids=()),
                     compile_mode="default") == plain)
    monkeypatch.undo()
    # "default": a quick compile
    model.language_model.__dict__.pop("compiled_decode", None)
    assert (generate(model, ids, pixels, mask, sampling=Sampling(max_new_tokens=12, stop_ids=()),
                     compile_mode="default") == plain)
    assert (
        generate(
            model,
            ids,
            pixels,
            mask,
            sampling=Sampling(max_new_tokens=12, stop_ids=()),
            compile_mode="default",
        )
        == plain
    )  # reused
    model.language_model.__dict__.pop("compiled_decode", None)
    model.language_model.clear_cache()


def test_cpu_packed_weights_equal_the_plain_path(tiny, monkeypatch):
    """caption.py on a CPU multiplies by oneDNN-packed weights where they are faster, with LoRA
    merged in at its alpha: the same logits (fp32 tolerance) and the same tokens as the plain
    layers."""
    import generate as g
    monkeypatch.setattr(g, "packed_is_faster", lambda weight, rows: True)   # every layer packed
    model, tok = tiny
    model = copy.deepcopy(model)
    add_lora(
        model.language_model, targets=("q_proj", "v_proj", "down_proj"), r=4, alpha=3.0, dropout=0.0
    )
    for layer in lora_layers(model).values():
        # a LoRA that changes the output
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    ids, mask = left_pad([prompt_ids(tok, q) for q in QUESTIONS], tok.pad_id)
    pixels = torch.randn(3, 4, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    x, valid, _ = model.prepare(ids, pixels, mask)
    lm = model.language_model
    plain_logits = lm.lm_head(lm(x, positions_of(valid), causal_mask(valid)))
    plain = generate(model, ids, pixels, mask, sampling=Sampling(max_new_tokens=12, stop_ids=()))
    assert can_pack(lm)
    pack_for_cpu(lm)
    assert not lora_layers(model) and isinstance(lm.model.layers[0].self_attn.q_proj, PackedLinear)
    logits = lm.lm_head(lm(x, positions_of(valid), causal_mask(valid)))
    real = valid[:, :, None].expand_as(logits)
    assert ((logits - plain_logits)[real].abs().max() / plain_logits[real].abs().max()) <= 1e-5
    assert (generate(model, ids, pixels, mask,
                     sampling=Sampling(max_new_tokens=12, stop_ids=())) == plain)


def test_decode_steps_pass_no_mask_when_no_row_is_padded(tiny, monkeypatch):
    """Without a mask attention may use its fastest kernel; a mask appears only where a row is
    padded."""
    import generate as g
    model, tok = tiny
    masks, real = [], g.decode_one_token

    def step(lm, token, positions, mask, input_pos, kv_len=None):
        masks.append(mask)
        return real(lm, token, positions, mask, input_pos, kv_len)
    monkeypatch.setattr(g, "decode_one_token", step)
    pixels = torch.randn(2, 4, 3, 28, 28, generator=torch.Generator().manual_seed(6))
    same = torch.tensor([prompt_ids(tok, QUESTIONS[0])] * 2)
    generate(model, same, pixels, sampling=Sampling(max_new_tokens=5, stop_ids=()))
    assert len(masks) == 4 and all(m is None for m in masks)
    ids, mask = left_pad([prompt_ids(tok, q) for q in QUESTIONS[:2]], tok.pad_id)
    masks.clear()
    generate(model, ids, pixels, mask, sampling=Sampling(max_new_tokens=5, stop_ids=()))
    assert len(masks) == 4 and all(m is not None for m in masks)


def test_each_shape_is_packed_only_where_packing_measured_faster_and_the_choice_is_remembered(
    tiny, tmp_path, monkeypatch
):
    """On an Intel Xeon with AMX the packed lm_head decodes at 0.69x the plain one: pack_for_cpu
    times both per layer shape and keeps the faster. Here the packed head is made 5 ms slower: it
    stays plain, the logits are the plain model's, and a second load (another process, same machine)
    reads the choice instead of timing."""
    import generate as g
    monkeypatch.setenv("PLLAVA_CACHE", str(tmp_path))
    model, tok = tiny
    vocab = model.language_model.config.vocab_size
    real, slowed = g.PackedLinear.forward, []

    def forward(self, x):
        if self.out_features == vocab:
            slowed.append(1)
            time.sleep(0.005)
        return real(self, x)
    monkeypatch.setattr(g.PackedLinear, "forward", forward)
    ids = torch.tensor([prompt_ids(tok, QUESTIONS[0])])
    pixels = torch.randn(1, 4, 3, 28, 28, generator=torch.Generator().manual_seed(6))
    want = generate(model, ids, pixels, sampling=Sampling(max_new_tokens=8, stop_ids=()))
    first = copy.deepcopy(model)
    pack_for_cpu(first.language_model, rows=8)
    head = first.language_model.lm_head
    assert (
        slowed
        and not isinstance(head, PackedLinear)
        and first.language_model.packed[tuple(head.weight.shape)] is False
    )
    assert generate(first, ids, pixels, sampling=Sampling(max_new_tokens=8, stop_ids=())) == want
    remembered = json.load(open(tmp_path / g.CHOICES))
    assert len(remembered) == len(first.language_model.packed) and all(
        k.endswith("8 rows") for k in remembered
    )
    slowed.clear()
    second = copy.deepcopy(model)
    pack_for_cpu(second.language_model, rows=8)
    assert not slowed and second.language_model.packed == first.language_model.packed
    # a torn file: measured again
    (tmp_path / g.CHOICES).write_text("{torn")
    pack_for_cpu(copy.deepcopy(model).language_model, rows=8)
    again = json.load(open(tmp_path / g.CHOICES))
    assert (
        slowed
        and again.keys() == remembered.keys()
        and [v for k, v in again.items() if str(vocab) in k] == [False]
    )
