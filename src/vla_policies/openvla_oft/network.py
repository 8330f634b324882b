"""The OpenVLA-OFT network: discrete action tokens decoded in parallel.

`OpenVLAOFTModel` is the released layout: a fused DINOv2-L/14 (registers) + SigLIP-So400m/14 vision backbone
(features of the second-to-last block, concatenated per patch), a 3-layer GELU projector and a Llama-2 language
model whose vocabulary is padded to a multiple of 64. One forward pass reads

    [BOS] [image patches] [padding] [prompt tokens] [56 zero embeddings] ([stop token])

with bidirectional attention (OpenVLA-OFT was trained with non-causal attention), and the logits that predict
the 56 action positions (read one position earlier, as a causal LM predicts the next token: from the prompt's
last token to the 55th action position) restricted to the last ``n_action_bins`` ids of the unpadded
vocabulary. RLinf's RL model ends the sequence at the action positions; OpenVLA-OFT's ``predict_action`` (and
its supervised training) appends the stop token, which changes every logit through bidirectional attention:
``append_stop_token`` picks the layout. Padding is masked out and position ids count only real tokens, so a
padded row computes what it would compute alone.

Checkpoint key names: the network's module names equal the checkpoint keys, with one exception, handled only
in `module_key_to_checkpoint_key` / `checkpoint_key_to_module_key`: timm's LayerScale parameter ``gamma`` is
stored as ``scale_factor`` (the reference renamed it because transformers used to rewrite parameter names
containing ``gamma``). LoRA layers injected by peft add ``.base_layer`` to the wrapped weights' names; that is
stripped on save, and the LoRA weights go to the adapter files in peft's layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import LlamaForCausalLM

from vla_policies.openvla_oft.config import OpenVLAOFTConfig
from vla_policies.value_head import ValueHead

__all__ = [
    "ActionHeadOutput",
    "OpenVLAOFTModel",
    "Projector",
    "VisionBackbone",
    "checkpoint_key_to_module_key",
    "module_key_to_checkpoint_key",
]


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
