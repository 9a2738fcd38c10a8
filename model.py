"""PLLaVA, written out: a video LLM in one file (its sizes are in config.py).

    video frames (B, T, 3, 336, 336)
      -> CLIP ViT-L/14-336, hidden state of layer -2, CLS dropped    (B*T, 576, 1024)
      -> projector: linear, exact GELU, linear                        (B*T, 576, D)
      -> 3-D adaptive average pooling (pool.py)                       (B, 16*12*12, D)
      -> the 2,304 visual tokens replace the one <image> token of each prompt row
      -> LLaMA decoder (Vicuna: multi-head; Yi-34B: grouped-query)    logits (B, L - 1 + 2304, vocab)

Module and parameter names follow the llava-hf checkpoints (`language_model.model.layers.0.self_attn.q_proj`),
so loading is a key lookup; weights.py reads and writes the files.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

from config import PRESETS, Config, TextConfig, VisionConfig
from pool import pool_tokens

ACT = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),   # what OpenAI's CLIP was trained with
    "silu": F.silu,
}

# -------------------------------------------------------------------------------- vision tower (CLIP)


class CLIPEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size, bias=False)
        self.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2 + 1, c.hidden_size)

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
        q, k, v = (p(x).view(N, S, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)                     # (N, nh, S, hd), no mask: all see all
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
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)   # sic: the checkpoints spell it so
        # a ModuleDict only so that the keys read `encoder.layers.N`, as in the checkpoints
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(CLIPLayer(c) for _ in range(c.num_hidden_layers))))
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # in the checkpoints; llava never uses it
        self.checkpointing = False

    def forward(self, pixels, feature_layer: int = -2):
        """(N, 3, H, W) -> (N, 1+g*g, D): hidden_states[feature_layer], where hidden_states[0] is the
        embedding output and hidden_states[i] the output of layer i. Layers after it are not run."""
        layers = self.encoder.layers
        n_run = feature_layer % (len(layers) + 1)
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in layers[:n_run]:
            x = checkpoint(layer, x, use_reentrant=False) if self.checkpointing and self.training else layer(x)
        return x

# ------------------------------------------------------------------------------------- LLaMA decoder


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()       # the mean of squares in fp32: bf16 loses it on 4096-wide rows
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(positions, c: TextConfig, dtype):
    """positions (B, L) -> cos, sin (B, 1, L, head_dim), computed in fp32 whatever the model's dtype."""
    inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, device=positions.device).float() / c.head_dim)
    pos = positions.float()
    if c.rope_scaling:   # linear scaling ("position interpolation") stretches the positions
        pos = pos / c.rope_scaling["factor"]
    freqs = pos[..., None] * inv_freq                                  # (B, L, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]                   # (B, 1, L, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i+hd/2}) pair by its angle: LLaMA's half-split layout, not interleaved."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache(nn.Module):
    """Keys and values of every position so far, preallocated once for the whole generation."""

    def __init__(self, batch, n_kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        """Write k, v (B, nkv, L, hd) at cache slots input_pos: (L,) the same slots for every row, or
        (B, L) each row its own (continuous batching: rows at different lengths)."""
        if input_pos.dim() == 1:
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[rows, :, input_pos] = k.transpose(1, 2)      # indexed: (B, L, nkv, hd)
            self.v[rows, :, input_pos] = v.transpose(1, 2)
        return self.k, self.v

    def rows(self, start, end):
        """A cache over rows start..end-1 of this one: a view, so what is written there lands here."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[start:end], persistent=False)
        view.register_buffer("v", self.v[start:end], persistent=False)
        return view


def attend(q, k, v, mask=None, kv_len=None):
    """q (B, nh, L, hd) against k, v (B, nkv, S, hd) -> (B, nh, L, hd). Which keys each query sees is
    chosen by the caller (generate.py, engine.py), one choice for every layer of a step:
      mask None, kv_len None: causal over the L inputs (training, a prefill from cache slot 0);
      kv_len n: all of the first n cache slots, no mask (one new token a row, every row at one length:
        SDPA may take its fastest kernel);
      mask (B, 1, L, S) bool: what each query may see of the first S slots (padded rows, or rows at
        their own lengths: the reference path);
      mask a FlexAttention BlockMask over the whole cache: rows at their own lengths, compiled; the
        blocks past a row's length are skipped and no dense mask is read."""
    B, nh, L, hd = q.shape
    n_kv = k.shape[1]
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=n_kv != nh)
    S = kv_len or (L if mask is None else mask.shape[-1])
    k, v = k[:, :, :S], v[:, :, :S]   # only the slots in use
    if L == 1 and n_kv != nh:
        # one new token with grouped-query attention: the nh / n_kv query heads that share a key / value
        # head become rows of one attention over it, so no head's K / V is copied nh / n_kv times
        y = F.scaled_dot_product_attention(q.reshape(B, n_kv, -1, hd), k, v, attn_mask=mask)
        return y.reshape(B, nh, 1, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and kv_len is None,
                                          enable_gqa=n_kv != nh)


class Attention(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=c.attention_bias)
        self.cache = None

    def forward(self, x, cos, sin, mask=None, input_pos=None, kv_len=None):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)   # (B, nh, L, hd)
        k = self.k_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)      # (B, nkv, L, hd)
        v = self.v_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            cached = self.cache.update(input_pos, k, v)
            if mask is not None or kv_len is not None:   # it looks back at earlier slots; else (a prefill
                k, v = cached                             # from slot 0) its own keys are all it needs
        y = attend(q, k, v, mask, kv_len)                                             # (B, nh, L, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):   # SwiGLU
    def __init__(self, c: TextConfig):
        super().__init__()
        self.act = ACT[c.hidden_act]
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask=None, input_pos=None, kv_len=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaMA(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.config = c
        self.model = nn.ModuleDict(dict(   # keys read `model.layers.N`, as in the checkpoints
            embed_tokens=nn.Embedding(c.vocab_size, c.hidden_size),
            layers=nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers)),
            norm=RMSNorm(c.hidden_size, c.rms_norm_eps)))
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.checkpointing = False

    def forward(self, x, positions, mask=None, input_pos=None, kv_len=None):
        """x (B, L, D) input embeddings, positions (B, L) RoPE positions -> final hidden states (B, L, D).

        mask: None for a plain causal pass over unpadded rows, else a boolean (B, 1, L, S) telling which
        of the first S cache slots (or of the L inputs, without a cache) each query may attend to.
        input_pos (L,) or (B, L): the cache slots these L tokens are written to, when a KV cache is set up.
        kv_len: with no mask, attend to all of the first kv_len slots (a decode step with nothing padded:
        no mask lets attention use its fastest kernel)."""
        cos, sin = rope_cos_sin(positions, self.config, x.dtype)
        for layer in self.model.layers:
            if self.checkpointing and self.training:   # recompute activations in backward, block by block
                x = checkpoint(layer, x, cos, sin, mask, input_pos, kv_len, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, input_pos, kv_len)
        return self.model.norm(x)

    def setup_cache(self, batch: int, max_len: int):
        w = self.model.norm.weight   # the compute dtype (the embedding may be int8)
        for layer in self.model.layers:
            a = layer.self_attn
            if a.cache is None or a.cache.k.shape != (batch, a.n_kv, max_len, a.head_dim) or a.cache.k.dtype != w.dtype:
                a.cache = KVCache(batch, a.n_kv, max_len, a.head_dim, w.dtype, w.device)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.cache = None

# ------------------------------------------------------------------------------------ PLLaVA glue


class Projector(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        bias = c.multimodal_projector_bias
        self.linear_1 = nn.Linear(c.vision_config.hidden_size, c.text_config.hidden_size, bias=bias)
        self.act = ACT[c.projector_hidden_act]    # exact GELU ("gelu"), not the tanh approximation
        self.linear_2 = nn.Linear(c.text_config.hidden_size, c.text_config.hidden_size, bias=bias)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


def splice(t, pos, insert):
    """Row b of the result is t[b, :pos[b]] + insert[b] + t[b, pos[b]+1:]: the one <image> slot of each
    row (pos, a list) replaced by that row's visual tokens (or by their mask or labels)."""
    return torch.stack([torch.cat([t[b, :p], insert[b], t[b, p + 1:]]) for b, p in enumerate(pos)])


def causal_mask(valid):
    """valid (B, S) -> (B, 1, S, S): attend to earlier, non-padding positions. Every position also sees
    itself, so that a padding row's attention is never empty (an empty softmax is NaN, and NaN spreads)."""
    S = valid.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=valid.device).tril()
    return (causal & valid[:, None, None, :]) | torch.eye(S, dtype=torch.bool, device=valid.device)


def positions_of(valid):
    """RoPE positions count only real tokens: a left-padded row starts at 0 where its text starts."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


class PLLaVA(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        # a ModuleDict only so that the keys read `vision_tower.vision_model.`, as in the checkpoints
        self.vision_tower = nn.ModuleDict(dict(vision_model=CLIPVision(config.vision_config)))
        self.multi_modal_projector = Projector(config)
        self.language_model = LLaMA(config.text_config)

    def visual_tokens(self, pixel_values):
        """(B, T, 3, H, W) normalized frames -> (B, N, D) visual tokens in the LLM's embedding space."""
        c, (B, T) = self.config, pixel_values.shape[:2]
        vision = self.vision_tower.vision_model
        learns = torch.is_grad_enabled() and any(p.requires_grad for p in vision.parameters())
        with torch.set_grad_enabled(learns):   # a frozen tower keeps no activations for backward
            x = vision(pixel_values.flatten(0, 1), c.vision_feature_layer)
        x = self.multi_modal_projector(x[:, 1:])                       # (B*T, g*g, D), CLS dropped
        x = x.view(B, T, c.grid, c.grid, -1)                           # (B, T, g, g, D)
        if T < c.num_frames:   # too few frames: repeat each, as PLLaVA does (3 frames -> 6+6+4 copies)
            x = x.repeat_interleave(c.num_frames // T + 1, dim=1)[:, :c.num_frames]
        return pool_tokens(x, c.pooling, c.pooling_shape)              # (B, N, D)

    def prepare(self, input_ids, pixel_values=None, attention_mask=None, labels=None, image_pos=None):
        """Token ids with one <image> per row -> (embeddings (B, L', D), valid (B, L') bool, labels or None)
        with L' = L - 1 + N: each row's <image> replaced by its N visual tokens. image_pos: each row's
        <image> index, when the caller knows it (then nothing is read back from the device)."""
        c = self.config
        is_image = input_ids == c.image_token_index
        embed = self.language_model.model.embed_tokens
        x = embed(input_ids.masked_fill(is_image, 0))   # the <image> id may lie past the vocab (Yi-34B)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if image_pos is None:   # read from the ids (on a GPU, a sync)
            counts = is_image.sum(1).tolist()
            if counts != [0 if pixel_values is None else 1] * len(counts):
                raise ValueError(f"each row needs exactly one <image> token (id {c.image_token_index}) with "
                                 f"pixel_values, none without; the rows hold {counts}")
            image_pos = is_image.int().argmax(1).tolist()
        if pixel_values is None:
            return x, valid, labels
        vis = self.visual_tokens(pixel_values).to(x.dtype)            # (B, N, D)
        B, N = vis.shape[:2]
        x = splice(x, image_pos, vis)
        valid = splice(valid, image_pos, valid.new_ones(B, N))
        if labels is not None:
            labels = splice(labels, image_pos, labels.new_full((B, N), -100))   # no loss on the video itself
        return x, valid, labels

    def hidden(self, input_ids, pixel_values=None, attention_mask=None, labels=None):
        """Final hidden states (B, L', D), the valid mask and the spliced labels."""
        x, valid, labels = self.prepare(input_ids, pixel_values, attention_mask, labels)
        mask = None if attention_mask is None else causal_mask(valid)   # None: plain causal, unpadded
        return self.language_model(x, positions_of(valid), mask), valid, labels

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None, loss_reduction="mean"):
        """input_ids (B, L) with one image_token_index per row, pixel_values (B, T, 3, H, W) normalized
        -> logits (B, L - 1 + N, vocab). attention_mask (B, L): 1 for real tokens, 0 for padding.

        With labels (B, L) (-100 where no loss is wanted) it returns the next-token cross-entropy instead
        (self.loss). Training goes through forward, not a method of its own, because FSDP gathers the
        root's weights in forward's hooks."""
        h, _, labels = self.hidden(input_ids, pixel_values, attention_mask, labels)
        if labels is None:
            return self.language_model.lm_head(h)
        return self.loss(h, labels, loss_reduction)

    def loss(self, h, labels, reduction="mean"):
        """The next-token cross-entropy of the labelled positions (their mean, or with reduction="sum" their
        sum: train.py divides by the token count of the whole step). Only those are projected onto the
        vocabulary: the (B, 2400, 32064) fp32 logits of a training batch would be ~4 GB at B=12."""
        targets = labels[:, 1:]
        keep = targets != -100
        logits = self.language_model.lm_head(h[:, :-1][keep])          # (n, vocab)
        return F.cross_entropy(logits.float(), targets[keep], reduction=reduction)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """Random weights for a model trained from scratch or benchmarked: N(0, std) matrices, zero
        biases, unit norms (PyTorch's own defaults give N(0, 1) embeddings, too large for a decoder)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            if hasattr(m, "reset_lora"):
                m.reset_lora()
        nn.init.normal_(self.vision_tower.vision_model.embeddings.class_embedding, std=std)

    @classmethod
    def from_config(cls, config, dtype=torch.float32, device="cpu", seed: int = 0) -> "PLLaVA":
        """A model with random weights, from a Config, a config dict or a preset name ("pllava-13b")."""
        if isinstance(config, str):
            config = Config.from_dict(PRESETS[config])
        elif isinstance(config, dict):
            config = Config.from_dict(config)
        with torch.device("meta"):
            model = cls(config).to(dtype)   # built in its dtype: a 13B model never exists in fp32 first
        model.to_empty(device=device)
        if config.text_config.tie_word_embeddings:   # to_empty gives the two names two tensors again
            model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.init_weights()
        return model

    @classmethod
    def from_pretrained(cls, path: str, lora_alpha: float = None, dtype=torch.float32, device="cpu") -> "PLLaVA":
        import weights
        return weights.load(cls, path, lora_alpha=lora_alpha, dtype=dtype, device=device)

    def save_pretrained(self, out_dir: str):
        import weights
        weights.save(self, out_dir)

