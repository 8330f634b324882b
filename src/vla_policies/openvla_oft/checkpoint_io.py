"""Reading and writing the OpenVLA-OFT checkpoint folder (the released and RLinf layouts).

A folder holds ``config.json``, the weights (``model.safetensors``, or shards listed in
``model.safetensors.index.json``, read through `opensora_gym.checkpoint`), the tokenizer files, optionally
``preprocessor_config.json`` and ``dataset_statistics.json``, and, for a LoRA-trained policy, peft's adapter files
(``adapter_config.json`` + ``adapter_model.safetensors``). Checkpoint key names are explained in
`vla_policies.openvla_oft.network`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file, save_file
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from opensora_gym.checkpoint import WEIGHTS_INDEX_NAME, read_tensors, weight_files
from vla_policies.openvla_oft.config import LoraSettings, OpenVLAOFTConfig
from vla_policies.openvla_oft.network import OpenVLAOFTModel, checkpoint_key_to_module_key

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "CONFIG_NAME",
    "LORA_ADAPTER_NAME",
    "checkpoint_shapes_match",
    "load_adapters",
    "materialize",
    "read_config",
    "read_lora_settings",
    "read_weights",
    "write_adapters",
    "write_config",
    "write_weights",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DATASET_STATISTICS_NAME = "dataset_statistics.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# peft's PeftModel.save_pretrained writes adapter keys under this prefix (RLinf adapters included).
ADAPTER_KEY_PREFIX = "base_model.model."
LORA_ADAPTER_NAME = "default"


def read_config(folder: Path, add_value_head: bool | None, value_type: str | None) -> OpenVLAOFTConfig:
    """``config.json`` with ``dataset_statistics.json`` merged into ``norm_stats`` (as RLinf does).

    Args:
        folder: The checkpoint folder.
        add_value_head: Override of the config's ``add_value_head`` (None keeps it).
        value_type: Override of the config's ``value_type`` (None keeps it).
    """
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
    return OpenVLAOFTConfig.from_json(data)


def write_config(config: OpenVLAOFTConfig, unnorm_key: str, folder: Path) -> None:
    """``config.json``, with the policy's ``unnorm_key``."""
    data = config.to_json()
    data["unnorm_key"] = unnorm_key
    (folder / CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor: the shards named by ``model.safetensors.index.json``, else ``model.safetensors``."""
    for name in (WEIGHTS_INDEX_NAME, WEIGHTS_NAME):
        if (folder / name).is_file():
            files = weight_files(folder / name)
            return read_tensors(files, list(files))
    raise FileNotFoundError(
        f"checkpoint folder {folder} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} (expected the OpenVLA-OFT "
        f"layout: {CONFIG_NAME}, safetensors weights, tokenizer files, preprocessor_config.json)"
    )


def write_weights(model: OpenVLAOFTModel, folder: Path) -> None:
    """The base weights under their checkpoint names, in one ``model.safetensors`` (LoRA weights excluded)."""
    weights = {k: v.detach().contiguous().cpu() for k, v in model.checkpoint_state_dict().items()}
    save_file(weights, folder / WEIGHTS_NAME, metadata={"format": "pt"})


def materialize(
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


def read_lora_settings(folder: Path) -> LoraSettings:
    """The LoRA settings of peft's ``adapter_config.json``."""
    lora = peft.LoraConfig.from_pretrained(folder)
    init = lora.init_lora_weights
    target = lora.target_modules
    return LoraSettings(
        rank=lora.r,
        alpha=lora.lora_alpha,
        dropout=lora.lora_dropout,
        target_modules=(target,) if isinstance(target, str) else tuple(sorted(target)),
        init_lora_weights=init,
    )


def load_adapters(model: OpenVLAOFTModel, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Fill the LoRA weights of a model with LoRA injected from ``adapter_model.safetensors`` (all keys, checked)."""
    state = model.state_dict()
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
    model.load_state_dict(loaded, strict=False)


def write_adapters(model: OpenVLAOFTModel, settings: LoraSettings, folder: Path) -> None:
    """The LoRA weights and settings in peft's layout (``adapter_model.safetensors``, ``adapter_config.json``)."""
    adapters = {}
    for key, tensor in model.state_dict().items():
        if ".lora_" in key:
            name = ADAPTER_KEY_PREFIX + key.replace(f".{LORA_ADAPTER_NAME}.", ".")
            adapters[name] = tensor.detach().contiguous().cpu()
    save_file(adapters, folder / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
    settings.to_peft().save_pretrained(folder)


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
