"""lora.py held equal to peft: outputs, alpha changes, merging, adapter files both ways."""

import pytest
import torch

from config import Config
from lora import (LoRALinear, add_lora, load_adapter, lora_layers, merge_lora, save_adapter,
                  set_lora_alpha, unmerge_lora)
from model import LLaMA

from helpers import TEXT, randomize

pytestmark = pytest.mark.usefixtures("no_grad")


def pair(seed=0):
    """A transformers LlamaForCausalLM and our LLaMA with the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    ref = randomize(LlamaForCausalLM(LlamaConfig(**TEXT)), seed).eval()
    ours = LLaMA(Config.from_dict({"text_config": ref.config.to_dict()}).text_config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def logits(lm, ids):
    return lm.lm_head(lm(lm.model.embed_tokens(ids), torch.arange(ids.shape[1]).expand_as(ids)))


def peft_wrap(ref, r, alpha, targets=("q_proj", "k_proj")):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        ref, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    ).eval()


def copy_adapters(peft_model, ours):
    for name, layer in lora_layers(ours).items():
        src = peft_model.base_model.model.get_submodule(name)
        layer.lora_A.weight.copy_(src.lora_A["default"].weight)
        layer.lora_B.weight.copy_(src.lora_B["default"].weight)


def random_adapters(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        layer.lora_B.weight.copy_(0.2 * torch.randn(layer.lora_B.weight.shape, generator=g))


@pytest.mark.parametrize("alpha", [0.0, 4.0, 32.0, 64.0])
def test_lora_output_equals_peft(alpha):
    ref, ours = pair()
    ids = torch.randint(0, TEXT["vocab_size"], (2, 11))
    p = peft_wrap(ref, r=8, alpha=16.0)
    for m in p.modules():
        if hasattr(m, "lora_B") and isinstance(m.lora_B, torch.nn.ModuleDict):
            m.lora_B["default"].weight.normal_(0, 0.2)
    add_lora(ours, r=8, alpha=16.0, dropout=0.0)
    copy_adapters(p, ours)
    # change alpha on the loaded models: peft through its scaling dict, ours through set_lora_alpha
    for m in p.modules():
        if hasattr(m, "scaling") and isinstance(m.scaling, dict):
            m.scaling["default"] = alpha / 8
    set_lora_alpha(ours, alpha)
    want, got = p(ids).logits, logits(ours, ids)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    assert (alpha == 0.0) == torch.allclose(got, logits(pair()[1], ids), atol=1e-6)


def test_defaults_and_fresh_adapter_changes_nothing():
    _, ours = pair()
    ids = torch.randint(0, TEXT["vocab_size"], (1, 7))
    before = logits(ours, ids)
    names = add_lora(ours)
    assert sorted(n.rpartition(".")[2] for n in names) == ["k_proj"] * 2 + ["q_proj"] * 2
    layer = lora_layers(ours)[names[0]]
    assert (layer.r, layer.alpha, layer.lora_dropout.p) == (128, 32.0, 0.05)
    assert layer.lora_B.weight.abs().max() == 0 and layer.lora_A.weight.abs().max() > 0
    # kaiming-uniform with a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = (1 / layer.in_features) ** 0.5
    assert layer.lora_A.weight.abs().max() <= bound
    assert torch.equal(logits(ours, ids), before)


def test_merge_then_unmerge_restores_weights_and_keeps_outputs():
    _, ours = pair()
    add_lora(ours, r=8, alpha=16.0)
    random_adapters(ours)
    ids = torch.randint(0, TEXT["vocab_size"], (2, 9))
    base = {n: l.weight.clone() for n, l in lora_layers(ours).items()}
    unmerged = logits(ours, ids)
    merge_lora(ours)
    assert not torch.equal(next(iter(lora_layers(ours).values())).weight, next(iter(base.values())))
    assert torch.allclose(logits(ours, ids), unmerged, rtol=1e-5, atol=1e-5)
    set_lora_alpha(ours, 4.0)                      # changing alpha on a merged model re-merges
    merged_4 = logits(ours, ids)
    unmerge_lora(ours)
    assert torch.allclose(logits(ours, ids), merged_4, rtol=1e-5, atol=1e-5)
    for n, l in lora_layers(ours).items():
        assert torch.allclose(l.weight, base[n], rtol=0, atol=1e-6)


def test_our_adapter_loads_in_peft(tmp_path):
    from peft import PeftModel
    ref, ours = pair()
    add_lora(ours, targets=("q_proj", "v_proj", "down_proj"), r=4, alpha=12.0)
    random_adapters(ours)
    save_adapter(ours, str(tmp_path), base_model="tiny")
    ids = torch.randint(0, TEXT["vocab_size"], (2, 9))
    p = PeftModel.from_pretrained(ref, str(tmp_path)).eval()
    want = p(ids).logits
    assert ((logits(ours, ids) - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_peft_adapter_loads_in_ours(tmp_path):
    ref, ours = pair()
    p = peft_wrap(ref, r=4, alpha=10.0, targets=("q_proj", "o_proj", "up_proj"))
    for m in p.modules():
        if hasattr(m, "lora_B") and isinstance(m.lora_B, torch.nn.ModuleDict):
            m.lora_B["default"].weight.normal_(0, 0.2)
    p.save_pretrained(str(tmp_path))
    ids = torch.randint(0, TEXT["vocab_size"], (2, 9))
    load_adapter(ours, str(tmp_path))
    layers = lora_layers(ours)
    assert len(layers) == 6 and all(l.alpha == 10.0 and l.r == 4 for l in layers.values())
    want = p(ids).logits
    assert ((logits(ours, ids) - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_lora_linear_shares_the_frozen_weight():
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base, r=2, alpha=4)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias", "lora_A.weight",
                                                        "lora_B.weight"]
