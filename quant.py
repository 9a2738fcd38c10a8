"""Weight-only int8: the language model's linear layers (and its embedding) stored as int8 with a
scale per output channel (per token, for the embedding).

Decoding reads every weight once per step, so it is bound by memory traffic: int8 weights are a
quarter of fp32's bytes and half of bf16's (13B: 13.7 GB instead of 26.8, which fits a 24 GB card).
Each row of W is scaled so that its largest magnitude is 127 and rounded (gpt-fast's `quantize.py`
is the anchor); activations stay in the compute dtype. How the product runs depends on the device:
- on a CPU, torch's `_weight_int8pack_mm` (its CPU kernel reads the int8 weight as it multiplies);
- elsewhere (a GPU), the weight widened to the compute dtype, multiplied, and the product scaled:
  gpt-fast's and torchao's form, which inductor fuses into one kernel under `--compile` (the weight
  is read as int8 and widened in registers). torch's CUDA `_weight_int8pack_mm` is not used: it
  computes one output per thread in fp32, without tensor cores (~190 GB/s on an H20, a few % of its
  bandwidth). Eager, this form writes the widened weight to memory every step: more bytes than
  bf16, so on a GPU int8 without --compile saves memory, not time.
`reference` (the weight widened and scaled, then multiplied) is the plain path both are tested
against. LoRA is merged in first, at the alpha the model was loaded with. The vision tower is left
as it is.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import replace_linears


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor = None):
        super().__init__()
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127                 # (out,)
        q = torch.round(w / scales.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales.to(weight.dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x):
        if x.device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm"):
            flat = x.reshape(-1, x.shape[-1])
            y = torch._weight_int8pack_mm(flat, self.weight, self.scales.to(x.dtype))
            y = y.reshape(*x.shape[:-1], -1)
        else:   # widen, multiply, scale: one fused kernel under torch.compile
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def reference(self, x):
        return F.linear(x, self.weight.to(x.dtype) * self.scales[:, None].to(x.dtype), self.bias)


class Int8Embedding(nn.Module):
    """An embedding table as int8 rows with a scale each: the rows looked up are widened, nothing
    else."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q = Int8Linear(weight)   # the same per-row quantization
        self.register_buffer("weight", q.weight)
        self.register_buffer("scales", q.scales)

    def forward(self, ids):
        return F.embedding(ids, self.weight).to(self.scales.dtype) * self.scales[ids, None]


@torch.no_grad()
def quantize_int8(lm: nn.Module, device=None) -> nn.Module:
    """Every linear layer of the language model (LoRA merged in) becomes an Int8Linear, and its
    embedding an Int8Embedding, in place. With `device`, each weight is moved there one at a time
    and quantized there: a model loaded on the CPU reaches the device as int8, never whole in its
    compute dtype (13B in bf16 is 26 GB: more than a 24 GB card holds)."""
    def there(t):
        return None if t is None else t.to(device) if device is not None else t
    replace_linears(lm, lambda w, b: Int8Linear(there(w), there(b)))
    lm.model.embed_tokens = Int8Embedding(there(lm.model.embed_tokens.weight))
    return lm


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers of a module (what quantizing shrinks)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
