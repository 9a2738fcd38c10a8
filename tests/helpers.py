"""Tiny random reference models (transformers / peft) and checkpoint writers shared by the tests."""

import copy
import json
import os

import torch
from safetensors.torch import save_file

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=28, patch_size=7)                       # a 4x4 patch grid
TEXT = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
IMAGE_ID = 110
PLLAVA = dict(pooling_shape=[4, 2, 2], num_frames=4)


def max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def randomize(module, seed=0, std=0.15):
    """Weights large enough that a wrong detail shows in the outputs (init std 0.02 hides a lot)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return module


def tiny_llava(seed=0, **text):
    """(transformers LlavaForConditionalGeneration, its config.json dict with PLLaVA's fields)."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION),
                         text_config=LlamaConfig(**{**TEXT, **text}), image_token_index=IMAGE_ID)
    hf = randomize(LlavaForConditionalGeneration(config), seed).eval()
    return hf, {**config.to_dict(), **PLLAVA}


def causal_lm(hf):
    """A transformers LlamaForCausalLM that shares the llava's language model and lm head."""
    from transformers import LlamaForCausalLM
    lm = LlamaForCausalLM(hf.config.text_config)
    lm.model, lm.lm_head = hf.model.language_model, hf.lm_head
    return lm.eval()


def reference_logits(hf, lm, input_ids, pixel_values, attention_mask=None,
                     pooling_shape=PLLAVA["pooling_shape"], num_frames=PLLAVA["num_frames"]):
    """PLLaVA assembled from transformers parts: CLIPVisionModel hidden_states[-2] without CLS, the
    llava projector, nn.AdaptiveAvgPool3d, the visual tokens put in place of <image>, then `lm` (a
    causal LM)."""
    B, T = pixel_values.shape[:2]
    feats = hf.model.vision_tower(pixel_values.flatten(0, 1),
                                  output_hidden_states=True).hidden_states[-2][:, 1:]
    feats = hf.model.multi_modal_projector(feats)                         # (B*T, P, D)
    g = int(feats.shape[1] ** 0.5)
    feats = feats.view(B, T, g, g, -1)
    if T < num_frames:
        feats = feats.repeat_interleave(num_frames // T + 1, dim=1)[:, :num_frames]
    # (B, D, t, h, w)
    pooled = torch.nn.AdaptiveAvgPool3d(pooling_shape)(feats.permute(0, 4, 1, 2, 3))
    vis = pooled.flatten(2).transpose(1, 2)                                # (B, N, D)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    embeds, masks = [], []
    for b in range(B):
        row, mask = [], []
        for i, tok in enumerate(input_ids[b].tolist()):
            if tok == IMAGE_ID:
                row += list(vis[b])
                mask += [1] * vis.shape[1]
            else:
                row.append(lm.get_input_embeddings().weight[tok])
                mask.append(int(attention_mask[b, i]))
        embeds.append(torch.stack(row))
        masks.append(mask)
    embeds, mask = torch.stack(embeds), torch.tensor(masks)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).logits, mask


def write_checkpoint(out_dir, tensors, config, shards=1):
    """config.json + safetensors in `shards` files (with model.safetensors.index.json when > 1)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, os.path.join(out_dir, "model.safetensors"))
        return out_dir
    keys = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s::shards]
        save_file({k: tensors[k] for k in part}, os.path.join(out_dir, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return out_dir


def hub_layout(state_dict):
    """transformers 5 in-memory keys -> the llava-hf hub layout of transformers 4."""
    renames = [("model.vision_tower.", "vision_tower.vision_model."),
               ("model.multi_modal_projector.", "multi_modal_projector."),
               ("model.language_model.", "language_model.model."),
               ("lm_head.", "language_model.lm_head.")]
    out = {}
    for k, v in state_dict.items():
        for a, b in renames:
            if k.startswith(a):
                out[b + k[len(a):]] = v
                break
    return out


def peft_release(hf, targets=("q_proj", "v_proj"), r=8, alpha=4.0, seed=1):
    """The PLLaVA release layout: the causal LM wrapped by peft, LoRA not merged. Returns (tensors,
    peft LM)."""
    from peft import LoraConfig, get_peft_model
    lm = copy.deepcopy(causal_lm(hf))
    peft_lm = get_peft_model(
        lm, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_lm.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    tensors = {k: v for k,
               v in hub_layout(hf.state_dict()).items() if not k.startswith("language_model.")}
    tensors.update({"language_model." + k: v for k, v in peft_lm.state_dict().items()})
    return tensors, peft_lm.eval()


def sample_inputs(seed=0, batch=2, frames=4, pad_first=2):
    """Token ids with text before and after <image>; row 0 left-padded by `pad_first` when batch >
    1."""
    g = torch.Generator().manual_seed(seed)
    L = 9
    ids = torch.randint(3, 100, (batch, L), generator=g)
    mask = torch.ones(batch, L, dtype=torch.long)
    for b in range(batch):
        ids[b, 3 + b] = IMAGE_ID
    if batch > 1 and pad_first:
        ids[0, :pad_first] = 0
        mask[0, :pad_first] = 0
    pixels = torch.randn(batch, frames, 3, VISION["image_size"], VISION["image_size"], generator=g)
    return ids, pixels, mask


CORPUS = ["a red circle moves left then down on a blue background",
          "USER: describe the video in detail",
          "ASSISTANT: the video shows a green square sliding to the right",
          "The quick brown fox jumps over the lazy dog.", "hello world\n new line here",
          "system prompt you are a helpful assistant", "Video-ChatGPT large vision-language"]


def make_tokenizer(folder, kind="vicuna", legacy=False, vocab_size=400):
    """A SentencePiece model trained here on a few sentences, with a Vicuna or a ChatML checkpoint's
    files."""
    from tokenizer import train_tokenizer
    return train_tokenizer(folder, CORPUS * 20, vocab_size, chatml=kind == "chatml", legacy=legacy)


def tiny_checkpoint(folder, seed=0, num_frames=4, pooling_shape=(4, 2, 2), **text):
    """A model folder as a release ships it: config.json, model.safetensors, tokenizer files; random
    weights."""
    from config import Config
    from model import PLLaVA
    make_tokenizer(folder)
    config = Config.from_dict(dict(vision_config=VISION,
                                   text_config={**TEXT, "vocab_size": 402, **text},
                                   image_token_index=400, pooling_shape=list(pooling_shape),
                                   num_frames=num_frames, pad_token_id=401))
    model = PLLaVA.from_config(config, seed=seed)
    randomize(model, seed)
    model.save_pretrained(folder)
    return folder
