"""Model folders: read the layouts LLaVA, LLaVA-NeXT and PLLaVA weights ship in, write llava-hf's.

A folder holds config.json and safetensors weights, one file or shards listed in
model.safetensors.index.json, and optionally a peft adapter (adapter_config.json +
adapter_model.safetensors). The key layouts seen in the wild:

  llava-hf on the hub         vision_tower.vision_model.*  language_model.model.*  ...lm_head.*
  llava-hf LLaVA-NeXT (v1.6)  as above, and image_newline (left out, and said so: UNUSED)
  transformers 5 save         vision_tower.*               language_model.model.*  ...lm_head.*
  transformers 5 state_dict   model.vision_tower.*         model.language_model.*  lm_head.*
  PLLaVA release              vision_tower.vision_model.*  language_model.base_model.model.model.*
                              (peft-wrapped, LoRA not merged: ...q_proj.base_layer.weight and
                              ...q_proj.lora_A.default.weight)

Every key is renamed to ours (the first layout), every tensor is checked against the model built
from config.json, and anything missing, left over or misshapen is an error that names it. The model
is built on the meta device and each tensor is assigned as it is read (memory-mapped, cast, moved),
so the weights never sit in memory twice.
"""

import json
import os
import re
import sys
import tempfile

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import lora
from config import PRESETS, Config
from plumbing.jsonl import ModelFolderError, safe_name

RENAMES = [   # (prefix in the file, our prefix); the first that matches wins
    ("language_model.base_model.model.", "language_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
]
# buffers that older checkpoints saved though they are derived, never learned
DERIVED = re.compile(r".*(\.rotary_emb\.inv_freq|embeddings\.position_ids)$")
# weights of the image-LLMs PLLaVA starts from that it has no use for: left out by name, and said
# so
UNUSED = {"image_newline": "LLaVA-NeXT's end-of-row embedding for its image tiles (PLLaVA pools "
                            "frames instead)"}
RELEASES = {f"pllava-{size}": f"ermu2001/pllava-{size}" for size in ("7b", "13b", "34b")}
RELEASE_LORA_ALPHA = 4.0   # PLLaVA records none; its demo and evals load r=128 adapters at alpha 4


def our_name(key: str) -> str:
    for theirs, ours in RENAMES:
        if key.startswith(theirs):
            key = ours + key[len(theirs):]
            break
    # peft's wrapping: the frozen weight sits under base_layer, adapters under the name "default"
    key = key.replace(".base_layer.", ".")
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def read_config(path: str) -> Config:
    """A model folder's config.json (or a config file itself, as train.py --init-from-config
    names)."""
    file = path if os.path.isfile(path) else os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ModelFolderError(f"{path}: no config.json (is this a model folder?)")
    try:
        with open(file) as f:
            return Config.from_dict(json.load(f))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ModelFolderError(f"{file}: not a valid llava config ({e})") from None


def model_config(name: str) -> Config:
    """The config of a model named as every tool names one: a folder, or a release (pllava-13b, or
    its hub id ermu2001/pllava-13b), whose sizes are known without a download (config.PRESETS)."""
    if os.path.isdir(name):
        return read_config(name)
    short = next((k for k, hub_id in RELEASES.items() if name in (k, hub_id)), None)
    if short is None:
        names = ", ".join(RELEASES)
        raise ModelFolderError(f"{name}: not a model folder nor a release ({names}): the plan "
                               f"needs one of those (a hub id is read by downloading it)")
    return Config.from_dict(PRESETS[short])


def weight_files(path: str) -> list:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelFolderError(f"{index}: not a safetensors index (a weight_map of tensor -> "
                                   f"file)") from None
        files = [os.path.join(path, safe_name(s)) for s in shards]
    else:
        files = [os.path.join(path, "model.safetensors")]
    for file in files:
        if not os.path.isfile(file):
            raise ModelFolderError(f"{path}: weight file {os.path.basename(file)} is missing")
    return files


def tensor_index(path: str) -> dict:
    """{our name: (file, key in the file, shape)} over all shards; the UNUSED weights left out and
    named."""
    index, unused = {}, set()
    for file in weight_files(path):
        try:
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    name = key.removeprefix("model.")
                    if name in UNUSED:
                        unused.add(name)
                    elif not DERIVED.match(key):
                        index[our_name(key)] = (file, key, tuple(f.get_slice(key).get_shape()))
        except Exception as e:   # safetensors raises its own error types for a corrupt header
            raise ModelFolderError(f"{file}: not a readable safetensors file ({e})") from None
    for name in sorted(unused):
        print(f"note: {path}: {name} left out: {UNUSED[name]}", file=sys.stderr)
    return index


def _assign(model: nn.Module, name: str, tensor: torch.Tensor):
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    learns = module._parameters[leaf].requires_grad
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=learns)


def _check_keys(path, expected, found):
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    problems = [f"{len(missing)} missing keys, e.g. {missing[:3]}"] if missing else []
    problems += [f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}"] if unexpected else []
    if problems:
        raise ModelFolderError(f"{path}: the weights do not match config.json: "
                               + "; ".join(problems))


def load(cls, path: str, lora_alpha: float = None, dtype=torch.float32, device="cpu"):
    config = read_config(path)
    index = tensor_index(path)
    lm_head = "language_model.lm_head.weight"
    if config.text_config.tie_word_embeddings:
        index.pop(lm_head, None)   # some files repeat the tied matrix: it is the embedding anyway
    # LoRA inside the weights (the PLLaVA release): targets and ranks from lora_A's shapes (r, in)
    ranks = {n[len("language_model."):-len(".lora_A.weight")]: shape[0]
             for n, (_, _, shape) in index.items() if n.endswith(".lora_A.weight")}
    has_adapter = os.path.isfile(os.path.join(path, "adapter_config.json"))
    if ranks and has_adapter:
        raise ModelFolderError(f"{path}: LoRA weights both in the model files and in an adapter; "
                               f"keep one")
    with torch.device("meta"):
        model = cls(config)
    if ranks:
        alpha = RELEASE_LORA_ALPHA if lora_alpha is None else lora_alpha
        lora.add_lora_like(model.language_model, {n: (r, alpha) for n, r in ranks.items()})
    params = dict(model.named_parameters())   # a tied lm_head appears once, as the embedding
    _check_keys(path, set(params), set(index))
    with torch.no_grad():
        for file in weight_files(path):
            with safe_open(file, "pt") as f:
                for name, (_, key, shape) in ((n, v) for n, v in index.items() if v[0] == file):
                    want = list(params[name].shape)
                    if list(shape) != want:
                        raise ModelFolderError(f"{path}: {key} has shape {list(shape)}, "
                                               f"config.json implies {want}")
                    t = f.get_tensor(key)
                    cast = dtype if t.is_floating_point() else t.dtype
                    _assign(model, name, t.to(device=device, dtype=cast))
    lm = model.language_model
    if config.text_config.tie_word_embeddings:
        lm.lm_head.weight = lm.model.embed_tokens.weight
    if has_adapter:
        lora.load_adapter(lm, path, alpha=lora_alpha)
    return model.eval()


def _write_atomic(write, file: str):
    """Write to a temporary file of its own beside `file` (created exclusively: nothing planted
    there is followed), then rename: a reader never sees half a file, and a model memory-mapped
    from the old file (save_pretrained into the folder it was loaded from) keeps its own copy."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(file), prefix=os.path.basename(file) + ".",
                               suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _readable(tmp)
        os.replace(tmp, file)
    except BaseException:
        os.unlink(tmp)
        raise


def _readable(path):
    """The mode a new file gets from the umask: safetensors writes 0600, readable by its owner
    only."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_json(obj, file: str):
    with open(file, "w") as f:
        json.dump(obj, f, indent=2)


def save(model, out_dir: str):
    """config.json + model.safetensors in the llava-hf layout; LoRA, if any, beside it as a peft
    adapter."""
    os.makedirs(out_dir, exist_ok=True)
    layers = lora.lora_layers(model.language_model)
    merged = [layer for layer in layers.values() if layer.merged]
    for layer in merged:   # the files hold the frozen weight and the adapter apart
        layer.unmerge()
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                   if ".lora_A." not in k and ".lora_B." not in k}
        if model.config.text_config.tie_word_embeddings:
            tensors.pop("language_model.lm_head.weight")
        _write_atomic(lambda f: save_file(tensors, f, metadata={"format": "pt"}),
                      os.path.join(out_dir, "model.safetensors"))
        _write_atomic(lambda f: _write_json(model.config.to_dict(), f),
                      os.path.join(out_dir, "config.json"))
        for stale in ("model.safetensors.index.json", "adapter_config.json",
                      "adapter_model.safetensors"):
            if os.path.exists(os.path.join(out_dir, stale)):
                os.remove(os.path.join(out_dir, stale))
        if layers:
            lora.save_adapter(model.language_model, out_dir)
            _readable(os.path.join(out_dir, "adapter_model.safetensors"))
    finally:
        for layer in merged:
            layer.merge()


def random(cls, config, dtype=torch.float32, device="cpu", seed: int = 0):
    """A model of `cls` with random weights, from a Config, a config dict or a preset name: built
    on the meta device in its dtype (13B never exists in fp32 first), then filled
    (init_weights)."""
    if not isinstance(config, Config):
        config = Config.from_dict(PRESETS[config] if isinstance(config, str) else config)
    with torch.device("meta"):
        model = cls(config).to(dtype)
    model.to_empty(device=device)
    lm = model.language_model
    if config.text_config.tie_word_embeddings:   # to_empty gives the two names two tensors again
        lm.lm_head.weight = lm.model.embed_tokens.weight
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init_weights(model)
    return model


@torch.no_grad()
def init_weights(model, std: float = 0.02):
    """Random weights to train from scratch or to benchmark: N(0, std) matrices, zero biases, unit
    norms (PyTorch's defaults give N(0, 1) embeddings, too large for a decoder)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm) or type(m).__name__ == "RMSNorm":
            nn.init.ones_(m.weight)
        if isinstance(getattr(m, "bias", None), torch.Tensor):
            nn.init.zeros_(m.bias)
        if hasattr(m, "reset_lora"):
            m.reset_lora()
    nn.init.normal_(model.vision_tower.vision_model.embeddings.class_embedding, std=std)
