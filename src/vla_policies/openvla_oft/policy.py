"""`OpenVLAOFTPolicy`: the OpenVLA-OFT network behind the RL interface of `vla_policies.base.Policy`.

The policy adds the prompt tokenizer, the image preprocessing and the action un-normalization around the
network (`vla_policies.openvla_oft.network`), and LoRA training; its folders are read and written by
`vla_policies.openvla_oft.checkpoint_io`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import peft
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from vla_policies.base import Policy, check_observation
from vla_policies.openvla_oft.checkpoint_io import (
    ADAPTER_CONFIG_NAME,
    LORA_ADAPTER_NAME,
    load_adapters,
    materialize,
    read_config,
    read_lora_settings,
    read_weights,
    write_adapters,
    write_config,
    write_weights,
)
from vla_policies.openvla_oft.config import LoraSettings, OpenVLAOFTConfig
from vla_policies.openvla_oft.network import ActionHeadOutput, OpenVLAOFTModel
from vla_policies.processing import ImageProcessorConfig, PromptTokenizer, preprocess_images
from vla_policies.tokenizer import ActionTokenizer, resolve_unnorm_key, unnormalize

__all__ = ["OpenVLAOFTPolicy"]


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
        write_config(self.model.config, self.unnorm_key, folder)
        write_weights(self.model, folder)
        self.tokenizer.save_pretrained(folder)
        self.image_config.save(folder)
        if self.lora_settings is not None:
            write_adapters(self.model, self.lora_settings, folder)

    def _load_adapters(self, folder: Path) -> None:
        settings = read_lora_settings(folder)
        device, dtype = self.device, self.dtype
        self.enable_lora(settings)
        self.model.to(device)
        load_adapters(self.model, folder, device, dtype)

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
        config = read_config(folder, add_value_head, value_type)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        image_config = ImageProcessorConfig.load(folder) or ImageProcessorConfig.from_timm(
            config.timm_model_ids, config.image_sizes
        )
        with torch.device("meta"):
            model = OpenVLAOFTModel(config)
        materialize(model, read_weights(folder), dtype, torch.device(device), seed)
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
        materialize(model, weights, dtype, torch.device(device), seed)
        return cls(model, tokenizer, image_config)
