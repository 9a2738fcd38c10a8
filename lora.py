"""LoRA: a trainable low-rank update beside a frozen linear layer.

    y = W0 x + b + (alpha / r) * B(A(dropout(x)))

A starts kaiming-uniform and B at zero (as peft does), so a fresh adapter changes nothing. The
report's post-training trains A and B (r=128, alpha=32, on q_proj and k_proj) and then, at
inference, *lowers* alpha: alpha/r is the share of the learned update in the output, a knob that
needs no retraining (PLLaVA's own inference uses alpha=4 with r=128).

LoRALinear subclasses nn.Linear and keeps the frozen weight under its usual name, so a checkpoint
written without LoRA loads into a model with LoRA unchanged. Adapters are saved and loaded in
peft's format (adapter_model.safetensors + adapter_config.json) for a LLaMA causal LM, so peft can
load ours (`PeftModel.from_pretrained(LlamaForCausalLM, dir)`) and we can load peft's.
"""

import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

PEFT_PREFIX = "base_model.model."   # peft wraps the causal LM, so its keys start with this

# the report's adapter: its defaults here, and train.py's flags take them from here
TARGETS, R, ALPHA, DROPOUT = ("q_proj", "k_proj"), 128, 32.0, 0.05


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)   # not nn.Linear's: that would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias    # shared with `base`, never copied
        self.r, self.alpha, self.merged = r, float(alpha), False
        kw = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if self.weight.device.type != "meta":
            self.reset_lora()

    def reset_lora(self):
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def scaling(self):
        return self.alpha / self.r

    def delta_weight(self):
        """(alpha/r) * B @ A, computed in fp32 so that merging bf16 weights loses as little as
        possible."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self):
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def lora_layers(model: nn.Module):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def matches(name: str, targets) -> bool:
    """peft's rule: a list matches the last name component(s); a string is a regex on the full
    name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(model: nn.Module, targets=TARGETS, r=R, alpha=ALPHA, dropout=DROPOUT, ranks=None,
             alphas=None):
    """Replace every nn.Linear whose name matches `targets` with a LoRALinear; returns the names.

    `ranks` and `alphas` ({module name: value}) override r and alpha per module, as when they are
    read from a checkpoint."""
    names = []
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and matches(name, targets):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            rank, share = (ranks or {}).get(name, r), (alphas or {}).get(name, alpha)
            layer = LoRALinear(module, rank, share, dropout)
            setattr(parent, child, layer.train(module.training))   # no dropout in a model in eval
            names.append(name)
    if not names:
        raise ValueError(f"no linear layer matches LoRA targets {targets}")
    return names


def lora_shape(model: nn.Module) -> dict:
    """{module name: (r, alpha)} of a model's adapters: what add_lora_like needs to make them
    again."""
    return {n: (layer.r, layer.alpha) for n, layer in lora_layers(model).items()}


def add_lora_like(model: nn.Module, shape: dict, dropout: float = 0.0):
    """Adapters on exactly the modules that `shape` ({name: (r, alpha)}) names, each with its rank
    and alpha."""
    return add_lora(model, targets="|".join(map(re.escape, shape)), dropout=dropout,
                    ranks={n: r for n, (r, _) in shape.items()},
                    alphas={n: a for n, (_, a) in shape.items()})


def set_lora_alpha(model: nn.Module, alpha: float):
    """Change the LoRA share alpha/r of every adapter (re-merging those that are merged)."""
    for layer in lora_layers(model).values():
        was_merged = layer.merged
        layer.unmerge()
        layer.alpha = float(alpha)
        if was_merged:
            layer.merge()


def merge_lora(model: nn.Module):
    for layer in lora_layers(model).values():
        layer.merge()


@torch.no_grad()
def replace_linears(lm: nn.Module, make):
    """Every linear layer of `lm` replaced by make(weight, bias), its adapter merged into the
    weight at its current alpha first (generate.pack_for_cpu, quant.quantize_int8: layers for
    inference only)."""
    for name, m in list(lm.named_modules()):
        if isinstance(m, nn.Linear) and not name.endswith(("lora_A", "lora_B")):
            w = m.weight
            if isinstance(m, LoRALinear) and not m.merged:
                w = (w.float() + m.delta_weight()).to(w.dtype)
            parent, _, child = name.rpartition(".")
            setattr(lm.get_submodule(parent) if parent else lm, child, make(w, m.bias))
    return lm


def unmerge_lora(model: nn.Module):
    for layer in lora_layers(model).values():
        layer.unmerge()


def save_adapter(lm: nn.Module, out_dir: str, base_model: str = None, weights: dict = None):
    """Write `lm`'s adapters (lm is the LLaMA causal LM) in peft's format. `weights` ({name in lm:
    tensor}) gives the LoRA tensors when lm holds only shards of them (FSDP: the gathered full
    tensors)."""
    layers = lora_layers(lm)
    if not layers:
        raise ValueError("the model holds no LoRA layers")
    os.makedirs(out_dir, exist_ok=True)
    if weights is None:
        weights = {f"{name}.lora_{ab}.weight": getattr(layer, f"lora_{ab}").weight
                   for name, layer in layers.items() for ab in "AB"}
    tensors = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in weights.items()}
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    first = next(iter(layers.values()))
    ranks = {n: l.r for n, l in layers.items() if l.r != first.r}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": first.r, "lora_alpha": first.alpha, "lora_dropout": _dropout_p(first),
              "target_modules": sorted({n.rpartition(".")[2] for n in layers}),
              "rank_pattern": {re.escape(n) + "$": r for n, r in ranks.items()},
              "alpha_pattern": {}, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "use_dora": False, "modules_to_save": None, "inference_mode": True,
              "init_lora_weights": True}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _dropout_p(layer: LoRALinear) -> float:
    return layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0


def read_adapter_config(adapter_dir: str) -> dict:
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if config.get(flag):
            raise ValueError(f"{adapter_dir}: adapters with {flag}=true are not supported")
    if config.get("peft_type", "LORA") != "LORA" or config.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir}: only plain LoRA adapters (no alpha_pattern) are read")
    return config


def load_adapter(lm: nn.Module, adapter_dir: str, alpha: float = None):
    """Add the peft adapter in `adapter_dir` to `lm` (our LLaMA causal LM) and load its weights.

    The targets and ranks come from the weights themselves; alpha from adapter_config.json unless
    given."""
    config = read_adapter_config(adapter_dir)
    weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    ranks = {}
    for key, t in weights.items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith(("lora_A.weight", "lora_B.weight")):
            raise ValueError(f"{adapter_dir}: unexpected adapter key {key}")
        if key.endswith(".lora_A.weight"):
            ranks[key[len(PEFT_PREFIX):-len(".lora_A.weight")]] = t.shape[0]
    alpha = config["lora_alpha"] if alpha is None else alpha
    existing = lora_layers(lm)
    new = [n for n in ranks if n not in existing]
    if new:
        add_lora(lm, targets="|".join(map(re.escape, new)), alpha=alpha, dropout=0.0, ranks=ranks)
    layers = lora_layers(lm)
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            key = f"{PEFT_PREFIX}{name}.{part}.weight"
            if key not in weights:
                raise ValueError(f"{adapter_dir}: missing adapter key {key}")
            param = getattr(layer, part).weight
            if weights[key].shape != param.shape:
                raise ValueError(f"{adapter_dir}: {key} has shape {tuple(weights[key].shape)}, "
                                 f"the model expects {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(weights[key])
    set_lora_alpha(lm, alpha)
    return layers
