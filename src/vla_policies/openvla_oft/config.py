"""The OpenVLA-OFT checkpoint's ``config.json`` and the LoRA settings RLinf trains it with."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import peft
from transformers import LlamaConfig

__all__ = ["RLINF_LORA_TARGET_MODULES", "VALUE_TYPES", "LoraSettings", "OpenVLAOFTConfig"]

VALUE_TYPES = ("chunk_level", "action_level")
# What RLinf's LoRA wraps: vision (timm) blocks, the SigLIP attention pool, the projector and every LLM linear.
RLINF_LORA_TARGET_MODULES = (
    "proj",
    "qkv",
    "fc1",
    "fc2",
    "q",
    "kv",
    "fc3",
    "out_proj",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
)


@dataclass
class OpenVLAOFTConfig:
    """The checkpoint's ``config.json`` (OpenVLAConfig fields plus RLinf's RL fields).

    Defaults describe the released OpenVLA-OFT 7B model for LIBERO.

    Attributes:
        timm_model_ids: timm names of the two vision backbones (DINOv2 first, SigLIP second).
        image_sizes: Input side per backbone.
        timm_override_act_layers: Activation override per backbone (None keeps timm's).
        use_fused_vision_backbone: Must be true: only the fused DINOv2+SigLIP backbone is supported.
        text_config: Keyword arguments of `transformers.LlamaConfig` (the checkpoint's ``text_config``).
        norm_stats: Dataset name -> {"action": {"q01", "q99", "mask", ...}, ...}.
        n_action_bins: Bin edges per action dimension.
        pad_to_multiple_of: Vocabulary padding; the unpadded vocabulary is ``vocab_size - pad_to_multiple_of``.
        pad_token_id: Id of the padding token (Llama-2's added ``<PAD>``, 32000).
        timm_model_kwargs: When set, backbone i is ``timm VisionTransformer(**timm_model_kwargs[i])`` instead of
            ``timm.create_model(timm_model_ids[i])``: tiny test models of the same structure.
        action_dim: Numbers per action (7 in LIBERO).
        num_action_chunks: Actions per chunk (8 in LIBERO).
        add_value_head: Whether the model has a PPO value head (``value_head.*``).
        value_type: "chunk_level" (one value per chunk) or "action_level" (one per action of the chunk).
        unnorm_key: Dataset whose statistics un-normalize actions (None: the only one).
        extra: Every other key of ``config.json``, written back unchanged.
    """

    vision_backbone_id: str = "dinosiglip-vit-so-224px"
    llm_backbone_id: str = "llama2-7b-pure"
    timm_model_ids: tuple[str, ...] = ("vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224")
    image_sizes: tuple[int, ...] = (224, 224)
    timm_override_act_layers: tuple[str | None, ...] = (None, None)
    use_fused_vision_backbone: bool = True
    text_config: dict[str, Any] = field(
        default_factory=lambda: {"model_type": "llama", "pad_token_id": 32000, "vocab_size": 32064}
    )
    norm_stats: dict[str, Any] = field(default_factory=dict)
    n_action_bins: int = 256
    pad_to_multiple_of: int = 64
    pad_token_id: int = 32000
    timm_model_kwargs: tuple[dict[str, Any], ...] | None = None
    action_dim: int = 7
    num_action_chunks: int = 8
    add_value_head: bool = False
    value_type: str = "chunk_level"
    unnorm_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.timm_model_ids = tuple(self.timm_model_ids)
        self.image_sizes = tuple(int(s) for s in self.image_sizes)
        self.timm_override_act_layers = tuple(self.timm_override_act_layers)
        if self.timm_model_kwargs is not None:
            self.timm_model_kwargs = tuple(dict(k) for k in self.timm_model_kwargs)
        if not self.use_fused_vision_backbone or len(self.timm_model_ids) != 2:
            raise ValueError(
                "only the fused DINOv2 + SigLIP vision backbone of OpenVLA-OFT is supported: "
                f"use_fused_vision_backbone must be true with 2 timm_model_ids, got "
                f"{self.use_fused_vision_backbone} and {list(self.timm_model_ids)}"
            )
        if len(self.image_sizes) != 2 or len(self.timm_override_act_layers) != 2:
            raise ValueError(
                f"image_sizes and timm_override_act_layers need 2 entries, got {self.image_sizes} and "
                f"{self.timm_override_act_layers}"
            )
        if self.timm_model_kwargs is not None and len(self.timm_model_kwargs) != 2:
            raise ValueError(f"timm_model_kwargs needs 2 entries, got {len(self.timm_model_kwargs)}")
        if self.text_config.get("model_type", "llama") != "llama":
            raise ValueError(f'text_config.model_type must be "llama", got {self.text_config.get("model_type")!r}')
        if "vocab_size" not in self.text_config:
            raise ValueError("text_config must give vocab_size (the padded vocabulary, 32064 for Llama-2)")
        if self.text_config["vocab_size"] - self.pad_to_multiple_of < self.n_action_bins:
            raise ValueError(
                f"text_config.vocab_size - pad_to_multiple_of must be at least n_action_bins={self.n_action_bins}, got "
                f"{self.text_config['vocab_size']} - {self.pad_to_multiple_of}"
            )
        if self.n_action_bins < 2:
            raise ValueError(f"n_action_bins must be at least 2, got {self.n_action_bins}")
        if self.action_dim < 1 or self.num_action_chunks < 1:
            raise ValueError(
                f"action_dim and num_action_chunks must be positive, got {self.action_dim}, {self.num_action_chunks}"
            )
        if self.value_type not in VALUE_TYPES:
            raise ValueError(f"value_type must be one of {VALUE_TYPES}, got {self.value_type!r}")

    @property
    def vocab_size(self) -> int:
        """The unpadded text vocabulary (32000 for Llama-2): action ids are its last ``n_action_bins``."""
        return int(self.text_config["vocab_size"]) - self.pad_to_multiple_of

    def llama_config(self) -> LlamaConfig:
        """The language model's configuration, built from ``text_config`` like the reference does."""
        return LlamaConfig(**self.text_config)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OpenVLAOFTConfig:
        """From the dict of a ``config.json``; keys that are no field go to ``extra``."""
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    def to_json(self) -> dict[str, Any]:
        """The dict written to ``config.json`` (OpenVLAConfig-compatible)."""
        out: dict[str, Any] = {"model_type": "openvla", **self.extra}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name == "timm_model_kwargs" and value is None:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class LoraSettings:
    """LoRA through peft; defaults are RLinf's (rank 32, alpha = rank, no dropout, gaussian init).

    Attributes:
        rank: LoRA rank r.
        alpha: Scaling numerator (``alpha / rank`` multiplies the update).
        dropout: Dropout on the LoRA input.
        target_modules: Module-name suffixes to wrap.
        init_lora_weights: peft's init: "gaussian" (RLinf), True (zero B), or another peft value.
    """

    rank: int = 32
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = RLINF_LORA_TARGET_MODULES
    init_lora_weights: bool | str = "gaussian"

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError(f"rank must be >= 1 and alpha > 0, got rank={self.rank}, alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")

    def to_peft(self) -> peft.LoraConfig:
        """The equivalent `peft.LoraConfig`."""
        return peft.LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            init_lora_weights=self.init_lora_weights,
        )
