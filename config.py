"""What a PLLaVA model is made of: the sizes of its vision tower, its LLaMA decoder and its
pooling.

The field names and defaults are transformers' (CLIPVisionConfig, LlamaConfig, LlavaConfig),
because a real config.json writes its sub-configs as differences from those defaults:
llava-v1.6-vicuna-7b's text_config names only a handful of fields, the 4096 / 32 layers / 11008
being LlamaConfig's defaults. PLLaVA adds pooling_shape and num_frames; `pooling` (ours) picks the
strategy of pool.py.
"""

from dataclasses import asdict, dataclass, field, fields

from pool import STRATEGIES, num_tokens


def _positive(obj, *names):
    """A config value that can never work (0 heads, "16" frames) is refused when read, naming the
    field."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a whole number above 0, not {value!r}")


@dataclass
class VisionConfig:   # CLIPVisionConfig's names and defaults (transformers'): config.json as-is
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self):
        _positive(self, "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "image_size", "patch_size", "num_channels")
        if self.hidden_size % self.num_attention_heads or self.image_size % self.patch_size:
            raise ValueError("the vision hidden_size must divide by its heads, image_size by "
                             "patch_size")


@dataclass
class TextConfig:      # names and defaults of transformers' LlamaConfig
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = None      # None: as many as query heads (Vicuna); Yi-34B: 8 for 56
    head_dim: int = None                 # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = None            # None, or {"rope_type": "linear", "factor": f}
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"

    def __post_init__(self):
        _positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads")
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        _positive(self, "num_key_value_heads", "head_dim", "max_position_embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")


# llava's vision tower when config.json names none
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14)


@dataclass
class Config:
    vision_config: VisionConfig = field(default_factory=lambda: VisionConfig(**CLIP_L_336))
    text_config: TextConfig = field(default_factory=TextConfig)
    image_token_index: int = 32000
    vision_feature_layer: int = -2       # hidden_states[-2]: the penultimate layer's output
    vision_feature_select_strategy: str = "default"   # "default" drops the CLS token
    projector_type: str = "mlp2x_gelu"   # model.PROJECTORS: linear, GELU, linear (LLaVA's name)
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    pooling: str = "pllava"              # one of pool.STRATEGIES
    pooling_shape: tuple = (16, 12, 12)  # (T', H', W')
    num_frames: int = 16                 # fewer frames are repeated up to this many
    pad_token_id: int = None

    def __post_init__(self):
        _positive(self, "num_frames")
        shape = self.pooling_shape
        if not isinstance(shape, list | tuple) or len(shape) != 3 or any(
                isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in shape):
            raise ValueError(f"pooling_shape must be three whole numbers above 0, not {shape!r}")
        self.pooling_shape = tuple(self.pooling_shape)
        if self.pooling not in STRATEGIES:
            raise ValueError(f"pooling must be one of {tuple(STRATEGIES)}, not {self.pooling!r}")
        if self.vision_feature_select_strategy != "default" or \
                not isinstance(self.vision_feature_layer, int):
            raise ValueError("only vision_feature_select_strategy 'default' with one "
                             "vision_feature_layer is supported")

    @property
    def grid(self) -> int:               # patches per side: 336 / 14 = 24
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def num_visual_tokens(self) -> int:
        return num_tokens(self.pooling, self.pooling_shape, self.num_frames, self.grid)

    def recipe(self, frames: int = None, pooling_shape: tuple = None) -> "Config":
        """Fewer frames and visual tokens at inference (caption.py --frames / --pooling-shape):
        PLLaVA's pooling has no weights, so they need no retraining (Open-Sora captioned with 4
        frames pooled to 4x12x12: 576 visual tokens, not 2,304). Frames are taken as they are, not
        repeated up to num_frames."""
        if frames:
            self.num_frames = frames
        if pooling_shape:
            t, h, w = pooling_shape
            if max(h, w) > self.grid:
                g = self.grid
                raise ValueError(f"--pooling-shape {t},{h},{w}: a frame holds {g}x{g} patches, "
                                 f"so at most {g} a side")
            self.pooling_shape = (t, h, w)
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Read a llava-hf or PLLaVA config.json; sub-configs list only what differs from the
        defaults."""
        subs = ("text_config", "vision_config")
        if not isinstance(d, dict) or not all(isinstance(d.get(k) or {}, dict) for k in subs):
            raise ValueError("not a model config (an object, with text_config and vision_config "
                             "objects)")
        text = dict(d.get("text_config") or {})
        if not isinstance(text.get("rope_parameters") or text.get("rope_scaling") or {}, dict):
            raise ValueError("not a model config (rope_parameters / rope_scaling: not an object)")
        if text.get("model_type", "llama") not in ("llama", "mistral") or \
                text.get("sliding_window"):
            raise ValueError(f"text model {text.get('model_type')!r} is not a LLaMA-style decoder")
        rope = text.pop("rope_parameters", None) or text.get("rope_scaling") or {}
        text["rope_theta"] = rope.get("rope_theta", text.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "linear"):
            raise ValueError(f"rope type {kind!r} is not supported (default and linear are)")
        linear = {"rope_type": "linear", "factor": rope["factor"]} if kind == "linear" else None
        text["rope_scaling"] = linear
        vision = d["vision_config"] if d.get("vision_config") else CLIP_L_336
        top = {k: v for k, v in d.items() if k in _names(cls) and k not in subs}
        if top.get("pad_token_id") is None:
            top["pad_token_id"] = text.get("pad_token_id")
        return cls(vision_config=VisionConfig(**_known(VisionConfig, vision)),
                   text_config=TextConfig(**_known(TextConfig, text)), **top)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pooling_shape"] = list(self.pooling_shape)
        d["vision_config"]["model_type"] = "clip_vision_model"
        d["text_config"]["model_type"] = "llama"
        return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", **d}


def _names(cls):
    return {f.name for f in fields(cls)}


def _known(cls, d: dict) -> dict:
    return {k: v for k, v in d.items() if k in _names(cls)}


# the released PLLaVA models (7b: Vicuna-7B, 13b: Vicuna-13B, 34b: Yi-34B), their config.json's
# differences from the defaults; with random weights, for benchmarks and rehearsals
_LLAMA2 = dict(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0)
PRESETS = {"pllava-7b": dict(text_config=_LLAMA2),
           "pllava-13b": dict(text_config=dict(_LLAMA2, hidden_size=5120, intermediate_size=13824,
                                               num_hidden_layers=40, num_attention_heads=40)),
           "pllava-34b": dict(image_token_index=64000,
                              text_config=dict(_LLAMA2, vocab_size=64064, hidden_size=7168,
                                               intermediate_size=20480, num_hidden_layers=60,
                                               num_attention_heads=56, num_key_value_heads=8,
                                               rope_theta=5e6))}
