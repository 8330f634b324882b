"""OpenVLA-OFT as RLinf trains it with RL: discrete action tokens decoded in parallel.

The network (`OpenVLAOFTModel`) is the released layout: a fused DINOv2-L/14 (registers) + SigLIP-So400m/14
vision backbone (features of the second-to-last block, concatenated per patch), a 3-layer GELU projector and
a Llama-2 language model whose vocabulary is padded to a multiple of 64. One forward pass reads

    [BOS] [image patches] [padding] [prompt tokens] [56 zero embeddings] ([stop token])

with bidirectional attention (OpenVLA-OFT was trained with non-causal attention), and the logits that predict
the 56 action positions (read one position earlier, as a causal LM predicts the next token: from the prompt's
last token to the 55th action position) restricted to the last ``n_action_bins`` ids of the unpadded
vocabulary. RLinf's RL model ends the sequence at the action positions; OpenVLA-OFT's ``predict_action`` (and
its supervised training) appends the stop token, which changes every logit through bidirectional attention:
``append_stop_token`` picks the layout. Padding is masked out and position ids count only real tokens, so a
padded row computes what it would compute alone.

The policy (`OpenVLAOFTPolicy`) adds the prompt tokenizer, the image preprocessing and the action
un-normalization around the network, and implements the RL interface of `vla_policies.base.Policy`.

Checkpoint key names: the network's module names equal the checkpoint keys, with one exception, handled only
in `module_key_to_checkpoint_key` / `checkpoint_key_to_module_key`: timm's LayerScale parameter ``gamma`` is
stored as ``scale_factor`` (the reference renamed it because transformers used to rewrite parameter names
containing ``gamma``). LoRA layers injected by peft add ``.base_layer`` to the wrapped weights' names; that is
stripped on save, and the LoRA weights go to the adapter files in peft's layout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import peft
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from vla_policies.base import Policy, check_observation
from vla_policies.processing import ImageProcessorConfig, PromptTokenizer, preprocess_images
from vla_policies.tokenizer import ActionTokenizer, resolve_unnorm_key, unnormalize
from vla_policies.value_head import ValueHead

__all__ = [
    "RLINF_LORA_TARGET_MODULES",
    "LoraSettings",
    "OpenVLAOFTConfig",
    "OpenVLAOFTModel",
    "OpenVLAOFTPolicy",
    "checkpoint_key_to_module_key",
    "checkpoint_shapes_match",
    "module_key_to_checkpoint_key",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DATASET_STATISTICS_NAME = "dataset_statistics.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# peft's PeftModel.save_pretrained writes adapter keys under this prefix (RLinf adapters included).
ADAPTER_KEY_PREFIX = "base_model.model."
LORA_ADAPTER_NAME = "default"
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


def module_key_to_checkpoint_key(key: str) -> str | None:
    """A state-dict key of `OpenVLAOFTModel` to its name in checkpoints; None for LoRA weights (adapter files)."""
    if ".lora_" in key:
        return None
    key = key.replace(".base_layer.", ".")
    if key.startswith("vision_backbone.") and key.endswith(".gamma"):
        key = key[: -len("gamma")] + "scale_factor"
    return key


def checkpoint_key_to_module_key(key: str) -> str:
    """The inverse of `module_key_to_checkpoint_key` for base weights (before LoRA is injected)."""
    if key.startswith("vision_backbone.") and key.endswith(".scale_factor"):
        return key[: -len("scale_factor")] + "gamma"
    return key


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


def _build_featurizer(model_id: str, img_size: int, act_layer: str | None, kwargs: dict | None) -> VisionTransformer:
    if kwargs is not None:
        return VisionTransformer(**kwargs)
    overrides = {"act_layer": act_layer} if act_layer is not None else {}
    return timm.create_model(model_id, pretrained=False, num_classes=0, img_size=img_size, **overrides)


class VisionBackbone(nn.Module):
    """DINOv2 (``featurizer``) and SigLIP (``fused_featurizer``) patch features, concatenated per patch."""

    def __init__(self, config: OpenVLAOFTConfig) -> None:
        super().__init__()
        kwargs = config.timm_model_kwargs or (None, None)
        self.featurizer = _build_featurizer(
            config.timm_model_ids[0], config.image_sizes[0], config.timm_override_act_layers[0], kwargs[0]
        )
        self.fused_featurizer = _build_featurizer(
            config.timm_model_ids[1], config.image_sizes[1], config.timm_override_act_layers[1], kwargs[1]
        )
        if self.featurizer.patch_embed.num_patches != self.fused_featurizer.patch_embed.num_patches:
            raise ValueError("both vision backbones must give the same number of patches")
        self.embed_dim = self.featurizer.embed_dim + self.fused_featurizer.embed_dim

    @property
    def num_patches(self) -> int:
        """Patches per image (256 at 224 px with 14 px patches)."""
        return self.featurizer.patch_embed.num_patches

    @staticmethod
    def _second_to_last_block(featurizer: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
        # The reference takes the output of block depth-2, without the final norm and without prefix tokens.
        (features,) = featurizer.forward_intermediates(
            pixels,
            indices=[len(featurizer.blocks) - 2],
            norm=False,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        return features  # [N, P, D_i]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Args: pixel_values ``[N, 6, S, S]`` (DINOv2 channels, then SigLIP). Returns: ``[N, P, D1 + D2]``."""
        dino_pixels, siglip_pixels = torch.split(pixel_values, [3, 3], dim=1)
        dino = self._second_to_last_block(self.featurizer, dino_pixels)
        siglip = self._second_to_last_block(self.fused_featurizer, siglip_pixels)
        return torch.cat([dino, siglip], dim=2)


class Projector(nn.Module):
    """The fused-backbone projector: ``fc1 (D -> 4D) -> GELU -> fc2 (-> llm) -> GELU -> fc3 (llm -> llm)``."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)
        self.act_fn1 = nn.GELU()
        self.act_fn2 = nn.GELU()

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """Args: patches ``[N, P, vision_dim]``. Returns: ``[N, P, llm_dim]``."""
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(patches)))))


@dataclass(frozen=True)
class ActionHeadOutput:
    """What `OpenVLAOFTModel.forward` returns.

    Attributes:
        action_logits: ``[N, T, n_action_bins]`` float32 logits over the action ids, T = chunks * action_dim.
        value_features: ``[N, hidden]`` the last hidden state of the position that predicts the first action
            token (the prompt's last token): RLinf's value-head input.
    """

    action_logits: torch.Tensor
    value_features: torch.Tensor


class OpenVLAOFTModel(nn.Module):
    """The OpenVLA-OFT network; its state-dict keys are the checkpoint keys (see the module docstring).

    Args:
        config: Architecture and RL settings.
    """

    def __init__(self, config: OpenVLAOFTConfig) -> None:
        super().__init__()
        self.config = config
        llama_config = config.llama_config()
        self.vision_backbone = VisionBackbone(config)
        self.projector = Projector(self.vision_backbone.embed_dim, llama_config.hidden_size)
        self.language_model = LlamaForCausalLM(llama_config)
        if config.add_value_head:
            output_dim = 1 if config.value_type == "chunk_level" else config.num_action_chunks
            self.value_head = ValueHead(llama_config.hidden_size, output_dim)
        else:
            self.value_head = None
        self.bos_token_id = int(llama_config.bos_token_id)
        self.stop_token_id = int(llama_config.eos_token_id)

    @property
    def num_action_tokens(self) -> int:
        """Tokens decoded per forward pass (56 in LIBERO)."""
        return self.config.num_action_chunks * self.config.action_dim

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        append_stop_token: bool = False,
    ) -> ActionHeadOutput:
        """One parallel-decoding pass.

        Args:
            pixel_values: ``[N, 6, S, S]`` from `preprocess_images`.
            input_ids: ``[N, L]`` prompt ids in RLinf's layout (`PromptTokenizer`): BOS in column 0, then left
                padding, then the prompt.
            attention_mask: ``[N, L]`` 1 for BOS and prompt tokens, 0 for padding.
            append_stop_token: Put the stop token after the action positions, as OpenVLA-OFT's
                ``predict_action`` and its training do; RLinf's RL model (the default) leaves it out.

        Returns:
            Action logits and value features (`ActionHeadOutput`).
        """
        n = input_ids.shape[0]
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be [N, L], got {tuple(input_ids.shape)} and "
                f"{tuple(attention_mask.shape)}"
            )
        expected = (n, 6, self.config.image_sizes[0], self.config.image_sizes[0])
        if tuple(pixel_values.shape) != expected:
            raise ValueError(f"pixel_values must have shape {expected}, got {tuple(pixel_values.shape)}")
        if not ((input_ids[:, 0] == self.bos_token_id) & (attention_mask[:, 0] == 1)).all():
            raise ValueError(
                f"input_ids must start with BOS (id {self.bos_token_id}, attention 1) in column 0 (RLinf's layout, "
                f"as PromptTokenizer returns it), got ids {input_ids[:, 0].tolist()}"
            )
        embed = self.language_model.get_input_embeddings()
        device = input_ids.device
        patches = self.projector(self.vision_backbone(pixel_values))  # [N, P, D]
        tokens = embed(input_ids)  # [N, L, D]
        # The reference zeroes the action placeholders' embeddings; position embeddings are added by RoPE.
        actions = torch.zeros(n, self.num_action_tokens, patches.shape[-1], dtype=tokens.dtype, device=device)
        parts = [tokens[:, :1], patches.to(tokens.dtype), tokens[:, 1:], actions]
        if append_stop_token:
            parts.append(embed(torch.full((n, 1), self.stop_token_id, device=device)))
        embeddings = torch.cat(parts, dim=1)  # [N, 1 + P + (L - 1) + tail, D]
        tail = self.num_action_tokens + int(append_stop_token)
        ones = torch.ones(n, patches.shape[1], dtype=attention_mask.dtype, device=device)
        mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:], ones.new_ones(n, tail)], dim=1)  # [N, S]
        position_ids = mask.cumsum(dim=1) - 1  # [N, S]; column 0 is BOS, so every real token counts from 0
        # Bidirectional attention: every query sees every real key. An explicit 4-D additive mask is used as is
        # by transformers (no causal mask is added), for sdpa and eager alike.
        key_is_real = mask.bool()[:, None, None, :]  # [N, 1, 1, S]
        bias = torch.zeros(key_is_real.shape, dtype=embeddings.dtype, device=device)
        bias = bias.masked_fill(~key_is_real, torch.finfo(embeddings.dtype).min)
        bias = bias.expand(n, 1, embeddings.shape[1], embeddings.shape[1])  # [N, 1, S, S]
        hidden = self.language_model.model(
            inputs_embeds=embeddings, attention_mask=bias, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # [N, S, D]
        start = embeddings.shape[1] - tail - 1  # the prompt's last token predicts the first action token
        action_hidden = hidden[:, start : start + self.num_action_tokens]  # [N, T, D]
        logits = self.language_model.lm_head(action_hidden)  # [N, T, V + pad]
        vocab = self.config.vocab_size
        action_logits = logits[..., vocab - self.config.n_action_bins : vocab].float()  # [N, T, n_bins]
        return ActionHeadOutput(action_logits=action_logits, value_features=hidden[:, start])

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """Base weights under their checkpoint names (LoRA weights excluded)."""
        out = {}
        for key, tensor in self.state_dict().items():
            name = module_key_to_checkpoint_key(key)
            if name is not None:
                out[name] = tensor
        return out

    def expected_checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint key -> shape that `load_checkpoint` requires (works on the meta device)."""
        return {k: tuple(v.shape) for k, v in self.checkpoint_state_dict().items()}


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


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(load_file(folder / shard))
        return tensors
    if (folder / WEIGHTS_NAME).is_file():
        return load_file(folder / WEIGHTS_NAME)
    raise FileNotFoundError(
        f"checkpoint folder {folder} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} (expected the OpenVLA-OFT "
        f"layout: {CONFIG_NAME}, safetensors weights, tokenizer files, preprocessor_config.json)"
    )


def _materialize(
    model: OpenVLAOFTModel, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, device: torch.device, seed: int
) -> None:
    """Fill a meta-device model from checkpoint tensors; a value head absent from them is initialized from ``seed``."""
    expected = model.expected_checkpoint_shapes()
    fresh_value_head = model.value_head is not None and not any(k.startswith("value_head.") for k in tensors)
    required = {k for k in expected if not (fresh_value_head and k.startswith("value_head."))}
    missing = sorted(required - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"checkpoint does not match the model: {len(missing)} missing keys {missing[:20]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:20]} (value_head.* appears only with add_value_head)"
        )
    wrong = [(k, tuple(tensors[k].shape), expected[k]) for k in required if tuple(tensors[k].shape) != expected[k]]
    if wrong:
        raise ValueError(f"checkpoint tensors have the wrong shape (key, got, expected): {sorted(wrong)[:20]}")
    state = {
        checkpoint_key_to_module_key(k): t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        for k, t in tensors.items()
    }
    model.load_state_dict(state, strict=False, assign=True)
    if fresh_value_head:
        model.value_head.to_empty(device=device)
        # The reference's from_pretrained skips the head's own Kaiming init and fills the weights it did not find
        # with PrismaticPreTrainedModel._init_weights: N(0, text_config.initializer_range), zero biases.
        std = model.language_model.config.initializer_range
        model.value_head.reset_parameters(torch.Generator(device=device).manual_seed(seed), std=std)
        model.value_head.to(dtype)
    # RoPE frequencies are a non-persistent buffer: recompute them on the target device (kept in float32).
    llama = model.language_model.model
    with device:
        llama.rotary_emb = LlamaRotaryEmbedding(config=llama.config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left uninitialized after loading: {left[:20]}")


class OpenVLAOFTPolicy(Policy):
    """OpenVLA-OFT behind the RL interface: env observations in, action chunks in robot units out.

    Args:
        model: The network.
        tokenizer: The checkpoint's tokenizer (AutoTokenizer from the folder).
        image_config: Image preprocessing of the checkpoint.
        unnorm_key: Dataset of the un-normalization statistics (None: the config's, else the only one).
        append_stop_token: See `OpenVLAOFTModel.forward`.

    Example:
        >>> policy = OpenVLAOFTPolicy.from_pretrained(folder, dtype=torch.bfloat16, device="cuda")  # doctest: +SKIP
        >>> out = policy.act(obs, generator=torch.Generator("cuda").manual_seed(0))  # doctest: +SKIP
        >>> out.actions.shape, out.action_tokens.shape  # doctest: +SKIP
        (torch.Size([N, 8, 7]), torch.Size([N, 56]))
    """

    def __init__(
        self,
        model: OpenVLAOFTModel,
        tokenizer: PreTrainedTokenizerBase,
        image_config: ImageProcessorConfig,
        unnorm_key: str | None = None,
        append_stop_token: bool = False,
    ) -> None:
        super().__init__()
        config = model.config
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_tokenizer = PromptTokenizer(tokenizer, pad_token_id=config.pad_token_id)
        if (self.prompt_tokenizer.bos_token_id, self.prompt_tokenizer.eos_token_id) != (
            model.bos_token_id,
            model.stop_token_id,
        ):
            raise ValueError(
                f"tokenizer BOS/EOS ids ({self.prompt_tokenizer.bos_token_id}, {self.prompt_tokenizer.eos_token_id}) "
                f"differ from text_config's ({model.bos_token_id}, {model.stop_token_id})"
            )
        if tuple(image_config.image_sizes) != tuple(config.image_sizes):
            raise ValueError(
                f"preprocessing image sizes {image_config.image_sizes} differ from the model's {config.image_sizes}"
            )
        self.image_config = image_config
        self.append_stop_token = append_stop_token
        self.action_chunk = config.num_action_chunks
        self.action_dim = config.action_dim
        self.action_tokenizer = ActionTokenizer(config.vocab_size, config.n_action_bins)
        self.unnorm_key = resolve_unnorm_key(config.norm_stats, unnorm_key or config.unnorm_key)
        self.action_stats = config.norm_stats[self.unnorm_key]["action"]
        self.lora_settings: LoraSettings | None = None

    @property
    def device(self) -> torch.device:
        """Device of the network's parameters."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the network's parameters."""
        return self.model.projector.fc1.weight.dtype

    def _action_head(self, obs: Mapping[str, Any]) -> ActionHeadOutput:
        images, tasks = check_observation(obs)
        pixel_values = preprocess_images(images.to(self.device), self.image_config).to(self.dtype)
        input_ids, attention_mask = self.prompt_tokenizer(tasks)
        return self.model(
            pixel_values,
            input_ids.to(self.device),
            attention_mask.to(self.device),
            append_stop_token=self.append_stop_token,
        )

    @property
    def token_range(self) -> tuple[int, int]:
        """The last ``n_bins`` ids of the (padded) vocabulary are the action tokens."""
        return self.action_tokenizer.action_token_begin, self.model.config.vocab_size

    def action_logits(self, obs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the 56 action positions over the action ids, and the value head's output (see `Policy`)."""
        head = self._action_head(obs)
        values = None if self.model.value_head is None else self.model.value_head(head.value_features).float()
        return head.action_logits, values  # [N, T, n_bins], [N, 1] or [N, action_chunk]

    def tokens_to_actions(self, tokens: torch.Tensor) -> torch.Tensor:
        normalized = self.action_tokenizer.decode(tokens.cpu())  # [N, T]
        chunks = normalized.reshape(-1, self.action_chunk, self.action_dim)  # [N, chunk, dim]
        return unnormalize(chunks, self.action_stats).float()

    @contextmanager
    def lora_disabled(self) -> Iterator[None]:
        """Runs the base model, the LoRA adapters switched off: the policy LoRA training started from.

        A reference policy for a KL penalty at no memory cost (LoRA's B matrices start at zero, so the base model
        is the initial policy). The adapters' trainable flags are restored on exit.
        """
        if self.lora_settings is None:
            raise RuntimeError("lora_disabled() needs LoRA: call enable_lora() first")
        layers = [m for m in self.model.modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    def enable_lora(self, settings: LoraSettings | None = None) -> None:
        """Inject LoRA layers and make only them (and the value head) trainable.

        Args:
            settings: LoRA settings; RLinf's when None.
        """
        if self.lora_settings is not None:
            raise RuntimeError("LoRA is already enabled on this policy")
        settings = settings or LoraSettings()
        peft.inject_adapter_in_model(settings.to_peft(), self.model, adapter_name=LORA_ADAPTER_NAME)
        for name, param in self.model.named_parameters():
            param.requires_grad = ".lora_" in name or name.startswith("value_head.")
        self.lora_settings = settings

    def gradient_checkpointing_enable(self) -> None:
        """Recompute activations in the backward pass (LLM layers and ViT blocks), non-reentrant."""
        self.model.language_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
        self.model.vision_backbone.featurizer.set_grad_checkpointing(True)
        self.model.vision_backbone.fused_featurizer.set_grad_checkpointing(True)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the checkpoint folder: config, weights, tokenizer, preprocessing, and LoRA adapters if enabled."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = self.model.config.to_json()
        config["unnorm_key"] = self.unnorm_key
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        weights = {k: v.detach().contiguous().cpu() for k, v in self.model.checkpoint_state_dict().items()}
        save_file(weights, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        self.tokenizer.save_pretrained(folder)
        self.image_config.save(folder)
        if self.lora_settings is not None:
            adapters = {}
            for key, tensor in self.model.state_dict().items():
                if ".lora_" in key:
                    name = ADAPTER_KEY_PREFIX + key.replace(f".{LORA_ADAPTER_NAME}.", ".")
                    adapters[name] = tensor.detach().contiguous().cpu()
            save_file(adapters, folder / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
            self.lora_settings.to_peft().save_pretrained(folder)

    def _load_adapters(self, folder: Path) -> None:
        lora = peft.LoraConfig.from_pretrained(folder)
        init = lora.init_lora_weights
        target = lora.target_modules
        settings = LoraSettings(
            rank=lora.r,
            alpha=lora.lora_alpha,
            dropout=lora.lora_dropout,
            target_modules=(target,) if isinstance(target, str) else tuple(sorted(target)),
            init_lora_weights=init,
        )
        device, dtype = self.device, self.dtype
        self.enable_lora(settings)
        self.model.to(device)
        state = self.model.state_dict()
        expected = {k for k in state if ".lora_" in k}
        loaded = {}
        for name, tensor in load_file(folder / ADAPTER_WEIGHTS_NAME).items():
            key = name.removeprefix(ADAPTER_KEY_PREFIX)
            for part in (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B."):
                key = key.replace(part, f"{part}{LORA_ADAPTER_NAME}.")
            loaded[key] = tensor.to(device=device, dtype=dtype)
        missing, unexpected = sorted(expected - set(loaded)), sorted(set(loaded) - expected)
        if missing or unexpected:
            raise KeyError(
                f"{ADAPTER_WEIGHTS_NAME} does not match {ADAPTER_CONFIG_NAME}: {len(missing)} missing "
                f"{missing[:20]}, {len(unexpected)} unexpected {unexpected[:20]}"
            )
        self.model.load_state_dict(loaded, strict=False)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        unnorm_key: str | None = None,
        add_value_head: bool | None = None,
        value_type: str | None = None,
        append_stop_token: bool = False,
        seed: int = 0,
    ) -> OpenVLAOFTPolicy:
        """Load a checkpoint folder (OpenVLA-OFT / RLinf layout), offline.

        Args:
            folder: Holds ``config.json``, safetensors weights (one file or an index with shards), the tokenizer
                files, optionally ``preprocessor_config.json`` (else timm's normalization of the backbones),
                ``dataset_statistics.json`` (merged into ``norm_stats``, as RLinf does) and LoRA adapter files
                (``adapter_config.json`` + ``adapter_model.safetensors``).
            dtype: Parameter dtype (float32 or bfloat16); log-probs are float32 either way.
            device: Where the parameters go.
            unnorm_key: Dataset for un-normalization (``_no_noops`` fallback).
            add_value_head: Override the config's ``add_value_head``; a value head absent from the weights is
                newly initialized from ``seed``.
            value_type: Override the config's ``value_type``.
            append_stop_token: See `OpenVLAOFTModel.forward`.
            seed: Seed of the generator for newly initialized parameters.
        """
        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"checkpoint folder {folder} has no {CONFIG_NAME}")
        data = json.loads((folder / CONFIG_NAME).read_text())
        if (folder / DATASET_STATISTICS_NAME).is_file():
            norm_stats = dict(data.get("norm_stats") or {})
            norm_stats.update(json.loads((folder / DATASET_STATISTICS_NAME).read_text()))
            data["norm_stats"] = norm_stats
        if add_value_head is not None:
            data["add_value_head"] = add_value_head
        if value_type is not None:
            data["value_type"] = value_type
        config = OpenVLAOFTConfig.from_json(data)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        image_config = ImageProcessorConfig.load(folder) or ImageProcessorConfig.from_timm(
            config.timm_model_ids, config.image_sizes
        )
        with torch.device("meta"):
            model = OpenVLAOFTModel(config)
        _materialize(model, _read_weights(folder), dtype, torch.device(device), seed)
        policy = cls(model, tokenizer, image_config, unnorm_key=unnorm_key, append_stop_token=append_stop_token)
        if (folder / ADAPTER_CONFIG_NAME).is_file():
            policy._load_adapters(folder)
        return policy

    @classmethod
    def from_config(
        cls,
        config: OpenVLAOFTConfig,
        tokenizer: PreTrainedTokenizerBase,
        image_config: ImageProcessorConfig,
        weights: Mapping[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> OpenVLAOFTPolicy:
        """Build from parts in memory: ``weights`` are checkpoint-named tensors (all keys, checked)."""
        with torch.device("meta"):
            model = OpenVLAOFTModel(config)
        _materialize(model, weights, dtype, torch.device(device), seed)
        return cls(model, tokenizer, image_config)


def checkpoint_shapes_match(model: OpenVLAOFTModel, manifest: Mapping[str, Sequence[int]]) -> list[str]:
    """Differences between the model's checkpoint keys/shapes and a manifest (empty when they match)."""
    expected = model.expected_checkpoint_shapes()
    problems = [f"missing in model: {k}" for k in sorted(set(manifest) - set(expected))]
    problems += [f"not in manifest: {k}" for k in sorted(set(expected) - set(manifest))]
    problems += [
        f"shape of {k}: model {expected[k]}, manifest {tuple(manifest[k])}"
        for k in sorted(set(manifest) & set(expected))
        if expected[k] != tuple(manifest[k])
    ]
    return problems
