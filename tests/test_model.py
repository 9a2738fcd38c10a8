"""model.py held equal to transformers on random tiny configs (fp32, CPU)."""

import pytest
import torch

from config import Config, VisionConfig
from model import LLaMA, PLLaVA, causal_mask, positions_of
from vision import CLIPVision

from helpers import (IMAGE_ID, TEXT, VISION, causal_lm, max_rel_err, randomize, reference_logits,
                     sample_inputs, tiny_llava)

pytestmark = pytest.mark.usefixtures("no_grad")


def load_into(module, hf_state, prefix_map=()):
    sd = {}
    for k, v in hf_state.items():
        for a, b in prefix_map:
            if k.startswith(a):
                k = b + k[len(a):]
        sd[k] = v
    module.load_state_dict(sd, strict=True)
    return module


@pytest.mark.parametrize("layer", [-2, -1, 1])
def test_vision_tower_equals_clip(layer):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    ref = randomize(CLIPVisionModel(CLIPVisionConfig(**VISION)), seed=3).eval()
    ours = CLIPVision(VisionConfig(**VISION))
    load_into(ours, {k: v for k, v in ref.state_dict().items()}, [("vision_model.", "")])
    pixels = torch.randn(5, 3, 28, 28)
    want = ref(pixels, output_hidden_states=True).hidden_states[layer]
    got = ours(pixels, layer)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5


LLAMA_CASES = {"vicuna-mha": dict(num_key_value_heads=4),
               "yi-gqa-theta5e6": dict(num_key_value_heads=2, rope_theta=5e6),
               "gqa-4to1-tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
               "linear-rope-scaling": dict(num_key_value_heads=4,
                                           rope_scaling={"rope_type": "linear", "factor": 2.0})}


def tiny_llama(case):
    from transformers import LlamaConfig, LlamaForCausalLM
    kw = {**TEXT, **LLAMA_CASES[case]}
    ref = randomize(LlamaForCausalLM(LlamaConfig(**kw)), seed=4).eval()
    if kw.get("tie_word_embeddings"):
        ref.tie_weights()
    ours = LLaMA(Config.from_dict({"text_config": ref.config.to_dict()}).text_config)
    sd = dict(ref.state_dict())
    if kw.get("tie_word_embeddings"):
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ours.load_state_dict(sd, strict=True)
    return ref, ours


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_logits_equal_transformers(case):
    ref, ours = tiny_llama(case)
    ids = torch.randint(0, TEXT["vocab_size"], (2, 23))
    want = ref(ids).logits
    x = ours.model.embed_tokens(ids)
    got = ours.lm_head(ours(x, torch.arange(23).expand(2, 23)))
    assert max_rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("case", ["vicuna-mha", "yi-gqa-theta5e6"])
def test_kv_cache_decoding_equals_full_forward(case):
    _, lm = tiny_llama(case)
    ids = torch.randint(0, TEXT["vocab_size"], (2, 20))
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :3] = False                      # row 1 is left-padded
    pos = positions_of(valid)
    full = lm.lm_head(lm(lm.model.embed_tokens(ids), pos, causal_mask(valid)))
    lm.setup_cache(2, 32)
    mask = causal_mask(torch.cat([valid, valid.new_ones(2, 12)], 1))   # (B, 1, 32, 32)
    P = 12                                    # prefill 12 tokens, then one token at a time
    steps = [lm(lm.model.embed_tokens(ids[:, :P]), pos[:, :P], mask[:, :, :P, :P], torch.arange(P))]
    for t in range(P, 20):
        steps.append(lm(lm.model.embed_tokens(ids[:, t : t + 1]), pos[:, t : t + 1],
                        mask[:, :, t : t + 1, : t + 1], torch.tensor([t])))
    lm.clear_cache()
    cached = lm.lm_head(torch.cat(steps, 1))
    real = valid[:, :, None].expand_as(full)
    assert max_rel_err(cached[real], full[real]) <= 1e-5


def pllava_from(hf, config):
    from weights import our_name

    from helpers import hub_layout
    m = PLLaVA(Config.from_dict(config)).eval()
    sd = {our_name(k): v for k, v in hub_layout(hf.state_dict()).items()}
    m.load_state_dict(sd, strict=True)
    return m


@pytest.mark.parametrize("frames", [4, 3, 1])
def test_whole_model_equals_transformers_parts(frames):
    hf, config = tiny_llava(seed=5)
    ours = pllava_from(hf, config)
    lm = causal_lm(hf)
    # text before and after <image>, row 0 padded
    ids, pixels, mask = sample_inputs(seed=6, frames=frames)
    want, valid = reference_logits(hf, lm, ids, pixels, mask)
    got = ours(ids, pixels, mask)
    assert got.shape == (2, ids.shape[1] - 1 + 16, TEXT["vocab_size"])
    real = valid.bool()[:, :, None].expand_as(want)
    assert max_rel_err(got[real], want[real]) <= 1e-5
    # an unpadded single row takes the plain causal path and agrees too
    one = ours(ids[1:], pixels[1:])
    assert max_rel_err(one, want[1:]) <= 1e-5


def test_prompt_must_hold_one_image_token():
    hf, config = tiny_llava()
    ours = pllava_from(hf, config)
    ids, pixels, _ = sample_inputs(batch=1)
    with pytest.raises(ValueError, match="needs one <image>"):
        ours(ids.masked_fill(ids == IMAGE_ID, 5), pixels)
    with pytest.raises(ValueError, match="none without"):
        ours(ids)


def test_presets_have_the_released_shapes():
    from config import PRESETS
    c = Config.from_dict(PRESETS["pllava-34b"])
    assert (c.text_config.num_key_value_heads, c.text_config.head_dim,
            c.text_config.rope_theta) == (8, 128, 5e6)
    assert c.num_visual_tokens == 2304 and c.grid == 24 and c.vision_config.num_hidden_layers == 24
    with torch.device("meta"):
        n = sum(
            p.numel()
            for p in PLLaVA(Config.from_dict(PRESETS["pllava-13b"])).language_model.parameters()
        )
    assert 13.0e9 < n < 13.1e9


def test_config_defaults_follow_transformers():
    """A sub-config naming only what differs from transformers' defaults (as real ones do)."""
    from transformers import LlavaConfig

    ref = LlavaConfig(text_config={"model_type": "llama", "rms_norm_eps": 1e-5,
                                   "vocab_size": 32064})
    ours = Config.from_dict({"text_config": {"rms_norm_eps": 1e-5, "vocab_size": 32064}})
    t, r = ours.text_config, ref.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.intermediate_size, t.num_key_value_heads,
            t.max_position_embeddings) == (r.hidden_size, r.num_hidden_layers, r.intermediate_size,
                                           r.num_key_value_heads, r.max_position_embeddings)
    v, rv = ours.vision_config, ref.vision_config
    assert (v.hidden_size, v.num_hidden_layers, v.image_size, v.patch_size) == \
        (rv.hidden_size, rv.num_hidden_layers, rv.image_size, rv.patch_size)
    assert (
        Config.from_dict(
            {"text_config": {"rope_parameters": {"rope_theta": 5e6, "rope_type": "default"}}}
        ).text_config.rope_theta
        == 5e6
    )
