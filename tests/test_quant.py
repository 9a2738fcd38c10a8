"""quant.py: int8 weights give the fp32 model's logits within a measured tolerance, the fast product
equals its plain reference, LoRA is merged first; and the inference-time recipe flags and the memory
plan."""

import copy
import types

import pytest
import torch

from generate import Sampling, generate
from lora import add_lora, lora_layers
from model import positions_of
from plumbing.jsonl import read_rows
from quant import Int8Linear, quantize_int8, weight_bytes
from tokenizer import prompt_ids

from conftest import tiny_model
from tools import run_main, run_tool
from videos import write_video

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory, 7)


def test_int8_linear_fast_path_equals_its_reference_and_the_weights_closely():
    g = torch.Generator().manual_seed(0)
    w, b, x = (
        torch.randn(48, 64, generator=g),
        torch.randn(48, generator=g),
        torch.randn(5, 3, 64, generator=g),
    )
    q = Int8Linear(w, b)
    assert q.weight.dtype == torch.int8 and q.scales.shape == (48,)
    assert torch.allclose(q(x), q.reference(x), rtol=1e-5, atol=1e-5)
    exact = torch.nn.functional.linear(x, w, b)
    # a 1/254 step per row at most
    assert ((q(x) - exact).abs().max() / exact.abs().max()) < 0.01


def test_a_quantized_model_keeps_its_logits_and_its_captions(tiny):
    model, tok, _ = tiny
    model = copy.deepcopy(model)
    add_lora(model.language_model, targets=("q_proj", "v_proj"), r=4, alpha=3.0, dropout=0.0)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    ids = torch.tensor([prompt_ids(tok, "describe the video")] * 3)
    pixels = torch.randn(3, 4, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    x, valid, _ = model.prepare(ids, pixels)
    lm = model.language_model
    want = lm.lm_head(lm(x, positions_of(valid)))
    embedding = weight_bytes(lm.model.embed_tokens)                        # stays in fp32
    before = weight_bytes(lm) - embedding
    quantize_int8(lm)
    assert not lora_layers(model) and weight_bytes(lm) - embedding < 0.3 * before
    got = lm.lm_head(lm(x, positions_of(valid)))
    err = ((got - want).abs().max() / want.abs().max()).item()
    # measured: 0.057 of the largest logit (2 layers of N(0, 0.15) weights, LoRA merged)
    assert err < 0.1, err
    greedy = generate(model, ids, pixels, sampling=Sampling(max_new_tokens=8, stop_ids=()))
    assert all(len(row) == 8 for row in greedy)


def test_caption_with_int8_fewer_frames_and_tokens(tiny, tmp_path):
    _, _, folder = tiny
    video = write_video(str(tmp_path / "a.mp4"), n_frames=12)
    out = tmp_path / "c.jsonl"
    r = run_tool("caption.py",
                 [video, "--model", folder, "--out", out, "--max-new-tokens", "4", "--quantize",
                  "int8", "--frames", "2", "--pooling-shape", "2,1,1"])
    assert r.returncode == 0, r.stderr
    row = read_rows(str(out))[0]
    assert row["frames"] == 2 and row["tokens"] == 4


@pytest.mark.parametrize("args, says",
                         [(["--pooling-shape", "2,9,9"], "at most 4 a side"),
                          (["--pooling-shape", "2,0,1"], "three whole numbers above 0"),
                          (["--pooling-shape", "2x2x2"], "three whole numbers above 0"),
                          (["--quantize", "int4"], "invalid choice")])
def test_recipe_flags_that_cannot_work_say_so_in_one_line(tiny, tmp_path, args, says):
    _, _, folder = tiny
    write_video(str(tmp_path / "v.mp4"), n_frames=8)
    with torch.enable_grad():  # as a user's process starts: not under this file's no_grad
        r = run_main("caption.py",
                     [tmp_path, "--model", folder, "--out", tmp_path / "c.jsonl", *args])
    lines = r.stderr.strip().splitlines()
    assert (
        r.returncode != 0
        and len(lines) == 1
        and lines[0].startswith("error: ")
        and says in lines[0]
    ), r.stderr
    assert not (tmp_path / "c.jsonl").exists() or not read_rows(str(tmp_path / "c.jsonl"))


RECIPE = ["--frames", "4", "--pooling-shape", "4,12,12"]   # Open-Sora's: 576 visual tokens


@pytest.mark.slow
@pytest.mark.parametrize("model, card, quantize, recipe, batch, fits", [
    ("pllava-13b", "80", "none", [], 8, True), ("pllava-13b", "24", "none", RECIPE, 4, False),
    ("pllava-13b", "24", "int8", RECIPE, 12, False), ("pllava-13b", "24", "int8", RECIPE, 8, True),
    ("pllava-34b", "80", "none", [], 8, False), ("pllava-34b", "80", "int8", [], 8, True)])
def test_a_dry_run_plans_13b_and_34b_on_a_card_before_loading_anything(
    tmp_path, model, card, quantize, recipe, batch, fits
):
    """13B bf16 is 26.8 GB of weights: never on a 24 GB card; int8 is 13.8 GB, and with Open-Sora's
    576 tokens 8 slots fit (12 do not: their KV cache is 9.2 GB). The rehearsal on fake tensors
    agrees."""
    with torch.enable_grad():  # as a user's process starts: not under this file's no_grad
        r = run_main("caption.py",
                     [tmp_path, "--model", model, "--dry-run", "--card-gb", card, "--batch-size",
                      str(batch), "--quantize", quantize, *recipe])
    assert (r.returncode == 0) == fits, r.stdout + r.stderr
    assert (
        ("weights" in r.stdout and "kv_cache" in r.stdout) if fits else "does not fit" in r.stderr
    )


def test_a_dry_run_needs_no_source_and_plans_for_the_machine_it_runs_on(ckpt):
    r = run_main("caption.py", ["--model", ckpt, "--dry-run"])
    assert r.returncode == 0 and "float32" in r.stdout and "no GPU here: RAM" in r.stdout, (
        r.stdout + r.stderr
    )
    gpu = run_main("caption.py", ["--model", ckpt, "--dry-run", "--card-gb", "80"])
    assert gpu.returncode == 0 and "bfloat16" in gpu.stdout and "card 80 GB" in gpu.stdout
    none = run_main("caption.py", ["--model", ckpt])
    assert none.returncode == 2 and "the videos to caption" in none.stderr


def test_the_fused_widening_check_tells_a_widened_copy_from_a_kernel_that_reads_int8():
    """int8 on a GPU is faster than bf16 only if inductor fuses the widening into the matmul;
    gpu_check and the bench read that from the generated code. The check itself: the GPU's form
    compiled on this CPU writes a widened copy of the weight (inductor's CPU backend does not fuse
    it), and a layer whose weight already is in the compute dtype has no such copy to find."""
    from lab.bench_caption import widening_fused
    from quant import Int8Linear
    layer = Int8Linear(torch.randn(96, 64))
    assert widening_fused(layer, 8, torch.float32, "cpu", mode="default") is False
    # .to(fp32) is no copy
    plain = types.SimpleNamespace(weight=torch.randn(96, 64), scales=torch.ones(96))
    assert widening_fused(plain, 8, torch.float32, "cpu", mode="default") is True
