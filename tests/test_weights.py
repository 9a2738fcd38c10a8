"""Every layout of model folder (weights.py) loads and gives the reference logits; bad files fail
clearly."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from model import PLLaVA
from weights import ModelFolderError

from helpers import (causal_lm, hub_layout, max_rel_err, peft_release, reference_logits,
                     sample_inputs, tiny_llava, write_checkpoint)

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module")
def tiny():
    hf, config = tiny_llava(seed=11)
    ids, pixels, mask = sample_inputs(seed=12)
    return hf, config, ids, pixels, mask


def check_logits(model, ref_lm, tiny):
    hf, _, ids, pixels, mask = tiny
    want, valid = reference_logits(hf, ref_lm, ids, pixels, mask)
    got = model(ids, pixels, mask)
    real = valid.bool()[:, :, None].expand_as(want)
    assert max_rel_err(got[real], want[real]) <= 1e-5


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("layout", ["hub", "transformers5-save", "transformers5-state-dict"])
def test_llava_layouts_load(tiny, tmp_path, layout, shards):
    hf, config = tiny[:2]
    if layout == "hub":
        write_checkpoint(tmp_path, hub_layout(hf.state_dict()), config, shards)
    elif layout == "transformers5-state-dict":
        write_checkpoint(tmp_path, hf.state_dict(), config, shards)
    else:
        hf.save_pretrained(tmp_path, max_shard_size="60KB" if shards > 1 else "1GB")
        assert os.path.exists(tmp_path / "model.safetensors.index.json") == (shards > 1)
        saved = json.load(open(tmp_path / "config.json"))
        json.dump({**saved, "pooling_shape": [4, 2, 2], "num_frames": 4},
                  open(tmp_path / "config.json", "w"))
    check_logits(PLLaVA.from_pretrained(str(tmp_path)), causal_lm(hf), tiny)


@pytest.mark.parametrize("shards", [1, 2])
def test_pllava_release_layout_loads_with_lora_unmerged(tiny, tmp_path, shards):
    hf, config = tiny[:2]
    tensors, peft_lm = peft_release(hf, targets=("q_proj", "v_proj"), r=8, alpha=4.0)
    assert any(".base_layer." in k for k in tensors) and any(
        ".lora_A.default." in k for k in tensors
    )
    write_checkpoint(tmp_path, tensors, config, shards)
    # no alpha recorded: PLLaVA's inference alpha, 4
    m = PLLaVA.from_pretrained(str(tmp_path))
    check_logits(m, peft_lm, tiny)
    layers = {n: l for n, l in m.named_modules() if hasattr(l, "lora_A")}
    assert len(layers) == 4 and all(l.r == 8 and l.alpha == 4.0 for l in layers.values())
    assert all(n.endswith(("q_proj", "v_proj")) for n in layers)


def test_pllava_release_alpha_set_at_load(tiny, tmp_path):
    hf, config = tiny[:2]
    tensors, _ = peft_release(hf, r=8, alpha=4.0)
    write_checkpoint(tmp_path, tensors, config)
    _, peft_16 = peft_release(hf, r=8, alpha=16.0)        # same weights (same seed), alpha 16
    check_logits(PLLaVA.from_pretrained(str(tmp_path), lora_alpha=16), peft_16, tiny)


def test_save_pretrained_round_trips_and_transformers_reads_it(tiny, tmp_path):
    from transformers import LlavaForConditionalGeneration
    hf, config, ids, pixels, mask = tiny
    write_checkpoint(tmp_path / "a", hub_layout(hf.state_dict()), config)
    m = PLLaVA.from_pretrained(str(tmp_path / "a"))
    m.save_pretrained(str(tmp_path / "b"))
    again = PLLaVA.from_pretrained(str(tmp_path / "b"))
    assert torch.equal(again(ids, pixels, mask), m(ids, pixels, mask))
    ref = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "b")).eval()
    for k, v in hf.state_dict().items():
        assert torch.equal(ref.state_dict()[k], v), k


def test_saving_into_the_folder_it_was_loaded_from(tiny, tmp_path):
    """The weights are memory-mapped; overwriting the file in place would corrupt the live model."""
    hf, config, ids, pixels, mask = tiny
    write_checkpoint(tmp_path, hub_layout(hf.state_dict()), config)
    m = PLLaVA.from_pretrained(str(tmp_path))
    before = m(ids, pixels, mask)
    m.save_pretrained(str(tmp_path))
    assert torch.equal(m(ids, pixels, mask), before)
    assert torch.equal(PLLaVA.from_pretrained(str(tmp_path))(ids, pixels, mask), before)


def test_lora_model_saves_adapter_beside_weights(tiny, tmp_path):
    from peft import PeftModel
    hf, config, ids, pixels, mask = tiny
    tensors, peft_lm = peft_release(hf, r=8, alpha=4.0)
    write_checkpoint(tmp_path / "rel", tensors, config)
    m = PLLaVA.from_pretrained(str(tmp_path / "rel"), lora_alpha=6.0)
    m.save_pretrained(str(tmp_path / "out"))
    assert {"config.json", "model.safetensors", "adapter_config.json",
            "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "out"))
    assert not any("lora" in k for k in load_file(str(tmp_path / "out" / "model.safetensors")))
    # alpha 6 recorded in adapter_config.json
    again = PLLaVA.from_pretrained(str(tmp_path / "out"))
    assert torch.allclose(again(ids, pixels, mask), m(ids, pixels, mask), rtol=0, atol=1e-6)
    # and peft reads the adapter onto the transformers model built from our base weights
    from transformers import LlavaForConditionalGeneration
    base = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
    peft = PeftModel.from_pretrained(causal_lm(base), str(tmp_path / "out")).eval()
    check_logits(m, peft, (base, config, ids, pixels, mask))


def damaged(tiny, tmp_path, edit):
    hf, config = tiny[0], copy.deepcopy(tiny[1])
    tensors = hub_layout(hf.state_dict())
    edit(tensors, config)
    return write_checkpoint(tmp_path, tensors, config)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t, c: t.pop("language_model.model.layers.1.mlp.up_proj.weight"),
            "missing keys.*layers.1.mlp.up_proj",
        ),
        (
            lambda t, c: t.update({"language_model.model.extra.weight": torch.zeros(2)}),
            "unexpected keys.*extra.weight",
        ),
        (
            lambda t, c: t.update({"multi_modal_projector.linear_1.weight": torch.zeros(64, 33)}),
            r"multi_modal_projector.linear_1.weight has shape \[64, 33\]",
        ),
        (lambda t, c: c["text_config"].update(num_hidden_layers=3), "missing keys.*layers.2"),
    ],
)
def test_mismatched_checkpoint_names_the_key(tiny, tmp_path, edit, message):
    path = damaged(tiny, tmp_path, edit)
    with pytest.raises(ModelFolderError, match=message):
        PLLaVA.from_pretrained(str(path))


def test_corrupt_or_absent_files_fail_clearly(tiny, tmp_path):
    hf, config = tiny[:2]
    with pytest.raises(ModelFolderError, match="no config.json"):
        PLLaVA.from_pretrained(str(tmp_path / "nowhere"))
    path = write_checkpoint(tmp_path / "c", hub_layout(hf.state_dict()), config)
    with open(os.path.join(path, "model.safetensors"), "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(ModelFolderError, match="not a readable safetensors"):
        PLLaVA.from_pretrained(str(path))
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(ModelFolderError, match="model.safetensors is missing"):
        PLLaVA.from_pretrained(str(path))


def test_bf16_load_casts(tiny, tmp_path):
    hf, config = tiny[:2]
    path = write_checkpoint(
        tmp_path, {k: v.bfloat16() for k, v in hub_layout(hf.state_dict()).items()}, config
    )
    m = PLLaVA.from_pretrained(str(path), dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    m16 = PLLaVA.from_pretrained(str(path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())


def test_bf16_greedy_tokens_equal_transformers_in_bf16(tiny, tmp_path):
    """The decode path (static cache, the one-token GQA fold, no mask when nothing is padded) in
    bf16 gives transformers' greedy tokens in bf16, from the same embeddings."""
    from generate import Sampling, generate_from_embeddings
    hf, config = tiny[:2]
    path = write_checkpoint(
        tmp_path, {k: v.bfloat16() for k, v in hub_layout(hf.state_dict()).items()}, config
    )
    ours = PLLaVA.from_pretrained(str(path), dtype=torch.bfloat16).language_model
    theirs = causal_lm(hf).to(torch.bfloat16)
    x = (0.5 * torch.randn(2, 12, ours.config.hidden_size,
                           generator=torch.Generator().manual_seed(0))).bfloat16()
    want = theirs.generate(inputs_embeds=x, attention_mask=torch.ones(2, 12, dtype=torch.long),
                           max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0,
                           eos_token_id=None).tolist()
    got = generate_from_embeddings(ours, x, torch.ones(2, 12, dtype=torch.bool),
                                   sampling=Sampling(max_new_tokens=10, stop_ids=()))
    assert got == want


def test_a_llava_next_model_saved_by_transformers_loads_leaving_out_image_newline(tmp_path, capfd):
    """llava-hf/llava-v1.6-* (what PLLaVA was trained from) as transformers saves a LlavaNext model:
    it loads, leaving out image_newline alone (named in one line), and its language model and vision
    tower give transformers' outputs."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig,
                              LlavaNextForConditionalGeneration)

    from helpers import IMAGE_ID, TEXT, VISION, randomize

    config = LlavaNextConfig(vision_config=CLIPVisionConfig(**VISION),
                             text_config=LlamaConfig(**TEXT), image_token_index=IMAGE_ID,
                             image_grid_pinpoints=[[28, 28]])
    hf = randomize(LlavaNextForConditionalGeneration(config), seed=3).eval()
    hf.save_pretrained(str(tmp_path))
    ours = PLLaVA.from_pretrained(str(tmp_path))
    note = [line for line in capfd.readouterr().err.splitlines() if "left out" in line]
    assert len(note) == 1 and "image_newline" in note[0]
    x = torch.randn(2, 9, TEXT["hidden_size"], generator=torch.Generator().manual_seed(0))
    want = hf.lm_head(hf.model.language_model(inputs_embeds=x).last_hidden_state)
    got = ours.language_model.lm_head(ours.language_model(x, torch.arange(9)[None].expand(2, -1)))
    assert max_rel_err(got, want) <= 1e-5
    pixels = torch.randn(3, 3, VISION["image_size"], VISION["image_size"],
                         generator=torch.Generator().manual_seed(1))
    want = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
    assert max_rel_err(ours.vision_tower.vision_model(pixels), want) <= 1e-5
    projected = hf.model.multi_modal_projector(want[:, 1:])
    assert max_rel_err(ours.multi_modal_projector(want[:, 1:]), projected) <= 1e-5


def test_only_the_weights_pllava_has_no_use_for_are_left_out(tmp_path):
    """Any other key that no part of the model takes is still an error that names it."""
    hf, config = tiny_llava(seed=4)
    tensors = hub_layout(hf.state_dict())
    tensors["image_newline"] = torch.zeros(TEXT_HIDDEN)
    tensors["language_model.model.extra_newline"] = torch.zeros(TEXT_HIDDEN)
    write_checkpoint(tmp_path, tensors, config)
    with pytest.raises(ModelFolderError, match="extra_newline"):
        PLLaVA.from_pretrained(str(tmp_path))


TEXT_HIDDEN = 64
