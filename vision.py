"""The vision tower: CLIP ViT-L/14-336, written out, up to the layer PLLaVA reads (-2).

Module and parameter names follow the llava-hf checkpoints (`vision_tower.vision_model.encoder.
layers.0.self_attn.q_proj`), so loading is a key lookup (weights.py).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as activations

from config import VisionConfig

ACT = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),   # what OpenAI's CLIP trained with
       "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def run_layers(module, layers, x, *args):
    """x through the layers; in training with module.recompute (activation checkpointing), each
    layer's activations are recomputed in the backward pass instead of kept."""
    for layer in layers:
        if module.recompute and module.training:
            x = activations.checkpoint(layer, x, *args, use_reentrant=False)
        else:
            x = layer(x, *args)
    return x


class CLIPEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size,
                                         c.patch_size, bias=False)
        n_patches = (c.image_size // c.patch_size) ** 2
        self.position_embedding = nn.Embedding(n_patches + 1, c.hidden_size)

    def forward(self, pixels):                                          # (N, 3, H, W)
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (N, D, g, g)
        x = x.flatten(2).transpose(1, 2)                                # (N, g*g, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (N, 1+g*g, D)


class CLIPAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.n_heads = c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(c.hidden_size, c.hidden_size) for _ in range(4))

    def forward(self, x):                                               # (N, S, D)
        N, S, D = x.shape
        q, k, v = (p(x).view(N, S, self.n_heads, -1).transpose(1, 2)   # (N, nh, S, hd)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)                     # no mask: all see all
        return self.out_proj(y.transpose(1, 2).reshape(N, S, D))


class CLIPMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.act = ACT[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPLayer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = CLIPAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPVision(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(c)
        # sic: the checkpoints spell it so
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        # a ModuleDict only so that the keys read `encoder.layers.N`, as in the checkpoints
        layers = nn.ModuleList(CLIPLayer(c) for _ in range(c.num_hidden_layers))
        self.encoder = nn.ModuleDict(dict(layers=layers))
        # in the checkpoints; llava never uses it
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.recompute = False

    def forward(self, pixels, feature_layer: int = -2):
        """(N, 3, H, W) -> (N, 1+g*g, D): hidden_states[feature_layer], where hidden_states[0] is
        the embedding output and hidden_states[i] the output of layer i. Later layers never run."""
        layers = self.encoder.layers
        x = self.pre_layrnorm(self.embeddings(pixels))
        return run_layers(self, layers[:feature_layer % (len(layers) + 1)], x)
