"""PLLaVA, written out: the LLaMA decoder and the glue of a video LLM (its sizes: config.py).

    video frames (B, T, 3, 336, 336)
      -> CLIP ViT-L/14-336 (vision.py), layer -2's output, CLS dropped (B*T, 576, 1024)
      -> projector: linear, exact GELU, linear                        (B*T, 576, D)
      -> 3-D adaptive average pooling (pool.py)                       (B, 16*12*12, D)
      -> the 2,304 visual tokens replace the one <image> token of each prompt row
      -> LLaMA decoder (Vicuna: multi-head; Yi-34B: grouped-query)    logits (B, L-1+2304, vocab)

Module and parameter names follow the llava-hf checkpoints (`language_model.model.layers.0.
self_attn.q_proj`), so loading is a key lookup; weights.py reads and writes the files.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from config import Config, TextConfig
from pool import pool_tokens
from vision import CLIPVision, run_layers

ACT = {"silu": F.silu, "gelu": F.gelu,
       "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


# ----------------------------------------------------------------------------- LLaMA decoder


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()       # the mean of squares in fp32: bf16 loses it on 4096-wide rows
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(positions, c: TextConfig, dtype):
    """positions (B, L) -> cos, sin (B, 1, L, head_dim), in fp32 whatever the model's dtype."""
    dims = torch.arange(0, c.head_dim, 2, device=positions.device).float()
    inv_freq = 1.0 / c.rope_theta ** (dims / c.head_dim)
    pos = positions.float()
    if c.rope_scaling:   # linear scaling ("position interpolation") stretches the positions
        pos = pos / c.rope_scaling["factor"]
    freqs = pos[..., None] * inv_freq                                  # (B, L, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]                   # (B, 1, L, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i+hd/2}) pair by its angle: LLaMA's half-split layout."""
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
        """Write k, v (B, nkv, L, hd) at cache slots input_pos: (L,) the same slots for every row,
        or (B, L) each row its own (continuous batching: rows at different lengths)."""
        if input_pos.dim() == 1 and self.index is None:
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
        else:
            rows = self.index if self.index is not None else \
                torch.arange(k.shape[0], device=k.device)
            slots = input_pos if input_pos.dim() == 2 else input_pos[None]
            self.k[rows[:, None], :, slots] = k.transpose(1, 2)      # indexed: (B, L, nkv, hd)
            self.v[rows[:, None], :, slots] = v.transpose(1, 2)
        return self.k, self.v

    index = None   # a view's rows of the cache it writes into

    def rows(self, index):
        """A cache whose row i is row index[i] of this one (a prefill of the videos that arrived
        together, into their slots): what is written there is written here."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.k, view.v, view.index = self.k, self.v, index
        return view


def attend(q, k, v, mask=None, kv_len=None):
    """q (B, nh, L, hd) against k, v (B, nkv, S, hd) -> (B, nh, L, hd). Which keys each query sees
    is chosen by the caller (generate.py, engine.py), one choice for every layer of a step:
      mask None, kv_len None: causal over the L inputs (training, a prefill from cache slot 0);
      kv_len n: all of the first n cache slots, no mask (one new token a row, every row at one
        length: SDPA may take its fastest kernel);
      mask (B, 1, L, S) bool: what each query may see of the first S slots (padded rows, or rows at
        their own lengths: the reference path);
      mask a FlexAttention BlockMask over the whole cache: rows at their own lengths, compiled;
        the blocks past a row's length are skipped and no dense mask is read."""
    B, nh, L, hd = q.shape
    n_kv = k.shape[1]
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=n_kv != nh)
    S = kv_len or (L if mask is None else mask.shape[-1])
    k, v = k[:, :, :S], v[:, :, :S]   # only the slots in use
    if L == 1 and n_kv != nh:
        # one new token with grouped-query attention: the nh / n_kv query heads that share a key /
        # value head become rows of one attention over it (no head's K / V copied nh / n_kv times)
        y = F.scaled_dot_product_attention(q.reshape(B, n_kv, -1, hd), k, v, attn_mask=mask)
        return y.reshape(B, nh, 1, hd)
    causal = mask is None and kv_len is None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=n_kv != nh)


class Attention(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (c.num_attention_heads, c.num_key_value_heads,
                                                  c.head_dim)
        D, bias = c.hidden_size, c.attention_bias
        self.q_proj = nn.Linear(D, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, D, bias=bias)
        self.cache = None

    def forward(self, x, cos, sin, mask=None, input_pos=None, kv_len=None):
        B, L, _ = x.shape
        hd = self.head_dim
        q = self.q_proj(x).view(B, L, self.n_heads, hd).transpose(1, 2)    # (B, nh, L, hd)
        k = self.k_proj(x).view(B, L, self.n_kv, hd).transpose(1, 2)       # (B, nkv, L, hd)
        v = self.v_proj(x).view(B, L, self.n_kv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            cached = self.cache.update(input_pos, k, v)
            if mask is not None or kv_len is not None:   # it looks back at earlier slots (a
                k, v = cached                             # prefill from slot 0 needs its own only)
        y = attend(q, k, v, mask, kv_len)                                   # (B, nh, L, hd)
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
        self.recompute = False

    def forward(self, x, positions, mask=None, input_pos=None, kv_len=None):
        """x (B, L, D) input embeddings, positions (B, L) RoPE positions -> final hidden states.
        mask and kv_len: what each query attends to (attend()); input_pos (L,) or (B, L): the cache
        slots these L tokens are written to, when a KV cache is set up."""
        cos, sin = rope_cos_sin(positions, self.config, x.dtype)
        x = run_layers(self, self.model.layers, x, cos, sin, mask, input_pos, kv_len)
        return self.model.norm(x)

    def setup_cache(self, batch: int, max_len: int):
        w = self.model.norm.weight   # the compute dtype (the embedding may be int8)
        for layer in self.model.layers:
            a = layer.self_attn
            shape = (batch, a.n_kv, max_len, a.head_dim)
            if a.cache is None or a.cache.k.shape != shape or a.cache.k.dtype != w.dtype:
                a.cache = KVCache(batch, a.n_kv, max_len, a.head_dim, w.dtype, w.device)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.cache = None

# ------------------------------------------------------------------------------- PLLaVA glue


class Projector(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        bias, D = c.multimodal_projector_bias, c.text_config.hidden_size
        self.linear_1 = nn.Linear(c.vision_config.hidden_size, D, bias=bias)
        self.act = ACT[c.projector_hidden_act]    # exact GELU ("gelu"), not the tanh approximation
        self.linear_2 = nn.Linear(D, D, bias=bias)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


# Config.projector_type -> its module: a new projector is added here
PROJECTORS = {"mlp2x_gelu": Projector}


def splice(t, pos, insert):
    """Row b of the result is t[b, :pos[b]] + insert[b] + t[b, pos[b]+1:]: the one <image> slot of
    each row (pos, a list) replaced by that row's visual tokens (or by their mask or labels)."""
    return torch.stack([torch.cat([t[b, :p], insert[b], t[b, p + 1:]]) for b, p in enumerate(pos)])


def causal_mask(valid):
    """valid (B, S) -> (B, 1, S, S): attend to earlier, non-padding positions. Every position also
    sees itself, so that a padding row's attention is never empty (an empty softmax is NaN)."""
    S = valid.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=valid.device).tril()
    return (causal & valid[:, None, None, :]) | torch.eye(S, dtype=torch.bool, device=valid.device)


def positions_of(valid):
    """RoPE positions count real tokens only: a left-padded row's text starts at position 0."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


class PLLaVA(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        # a ModuleDict only so that the keys read `vision_tower.vision_model.` (the checkpoints')
        self.vision_tower = nn.ModuleDict(dict(vision_model=CLIPVision(config.vision_config)))
        if config.projector_type not in PROJECTORS:
            raise ValueError(f"projector_type {config.projector_type!r}: not one of "
                             f"{tuple(PROJECTORS)}")
        self.multi_modal_projector = PROJECTORS[config.projector_type](config)
        self.language_model = LLaMA(config.text_config)

    def parameter_names(self, part: nn.Module) -> set:
        """The full names of one part's parameters (self.multi_modal_projector, self.vision_tower):
        what trains, and what a checkpoint keeps, is chosen by them (training/trainable.py,
        training/trainstate.py)."""
        prefix = next(name for name, child in self.named_children() if child is part)
        return {f"{prefix}.{n}" for n, _ in part.named_parameters()}

    def visual_tokens(self, pixel_values):
        """(B, T, 3, H, W) normalized frames -> (B, N, D) visual tokens in the LLM's embeddings."""
        c, (B, T) = self.config, pixel_values.shape[:2]
        vision = self.vision_tower.vision_model
        learns = torch.is_grad_enabled() and any(p.requires_grad for p in vision.parameters())
        with torch.set_grad_enabled(learns):   # a frozen tower keeps no activations for backward
            x = vision(pixel_values.flatten(0, 1), c.vision_feature_layer)
        x = self.multi_modal_projector(x[:, 1:])                       # (B*T, g*g, D), CLS dropped
        x = x.view(B, T, c.grid, c.grid, -1)                           # (B, T, g, g, D)
        if T < c.num_frames:   # too few frames: repeat each, as PLLaVA does (3 -> 6+6+4 copies)
            x = x.repeat_interleave(c.num_frames // T + 1, dim=1)[:, :c.num_frames]
        return pool_tokens(x, c.pooling, c.pooling_shape)              # (B, N, D)

    def prepare(self, input_ids, pixel_values=None, attention_mask=None, labels=None,
                image_pos=None):
        """Token ids with one <image> per row -> (embeddings (B, L', D), valid (B, L') bool, labels
        or None), L' = L - 1 + N: each row's <image> replaced by its N visual tokens. image_pos:
        each row's <image> index when the caller knows it (nothing read back from the device)."""
        c = self.config
        is_image = input_ids == c.image_token_index
        embed = self.language_model.model.embed_tokens
        x = embed(input_ids.masked_fill(is_image, 0))   # the <image> id may be past the vocab (Yi)
        valid = attention_mask.bool() if attention_mask is not None else \
            torch.ones_like(input_ids, dtype=torch.bool)
        if image_pos is None:   # read from the ids (on a GPU, a sync)
            counts = is_image.sum(1).tolist()
            if counts != [0 if pixel_values is None else 1] * len(counts):
                raise ValueError(f"each row needs one <image> token (id {c.image_token_index}) "
                                 f"with pixel_values, none without; the rows hold {counts}")
            image_pos = is_image.int().argmax(1).tolist()
        if pixel_values is None:
            return x, valid, labels
        vis = self.visual_tokens(pixel_values).to(x.dtype)            # (B, N, D)
        B, N = vis.shape[:2]
        x = splice(x, image_pos, vis)
        valid = splice(valid, image_pos, valid.new_ones(B, N))
        if labels is not None:   # no loss on the video itself
            labels = splice(labels, image_pos, labels.new_full((B, N), -100))
        return x, valid, labels

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None,
                loss_reduction="mean"):
        """input_ids (B, L) with one image_token_index per row, pixel_values (B, T, 3, H, W)
        normalized -> logits (B, L - 1 + N, vocab). attention_mask (B, L): 1 for real tokens, 0 for
        padding. With labels (B, L) (-100 where no loss is wanted): the loss instead (self.loss).
        Training goes through forward, because FSDP gathers the root's weights in its hooks."""
        x, valid, labels = self.prepare(input_ids, pixel_values, attention_mask, labels)
        mask = None if attention_mask is None else causal_mask(valid)   # None: causal, unpadded
        h = self.language_model(x, positions_of(valid), mask)
        if labels is None:
            return self.language_model.lm_head(h)
        return self.loss(h, labels, loss_reduction)

    def loss(self, h, labels, reduction="mean"):
        """The next-token cross-entropy of the labelled positions: their mean, or with "sum" their
        sum (train.py divides by the token count of the whole step). Only those are projected onto
        the vocabulary: the (B, 2400, 32064) fp32 logits of a batch would be ~4 GB at B=12."""
        targets = labels[:, 1:]
        keep = targets != -100
        logits = self.language_model.lm_head(h[:, :-1][keep])          # (n, vocab)
        return F.cross_entropy(logits.float(), targets[keep], reduction=reduction)

    @classmethod
    def from_config(cls, config, dtype=torch.float32, device="cpu", seed: int = 0) -> "PLLaVA":
        """Random weights, from a Config, a config dict or a preset name ("pllava-13b")."""
        import weights
        return weights.random(cls, config, dtype=dtype, device=device, seed=seed)

    @classmethod
    def from_pretrained(cls, path: str, lora_alpha: float = None, dtype=torch.float32,
                        device="cpu") -> "PLLaVA":
        import weights
        return weights.load(cls, path, lora_alpha=lora_alpha, dtype=dtype, device=device)

    def save_pretrained(self, out_dir: str):
        import weights
        weights.save(self, out_dir)
