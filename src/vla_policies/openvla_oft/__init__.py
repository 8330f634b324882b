"""OpenVLA-OFT as RLinf trains it with RL: discrete action tokens decoded in parallel.

- `config`: the checkpoint's ``config.json`` (`OpenVLAOFTConfig`) and RLinf's LoRA settings (`LoraSettings`).
- `network`: the network (`OpenVLAOFTModel`: fused DINOv2 + SigLIP backbone, projector, Llama-2) and the
  mapping between its parameter names and the checkpoint keys.
- `checkpoint_io`: reading and writing the checkpoint folder (config, sharded safetensors, LoRA adapters).
- `policy`: `OpenVLAOFTPolicy`, the network behind the RL interface of `vla_policies.base.Policy`.
"""

from vla_policies.openvla_oft.checkpoint_io import checkpoint_shapes_match
from vla_policies.openvla_oft.config import RLINF_LORA_TARGET_MODULES, LoraSettings, OpenVLAOFTConfig
from vla_policies.openvla_oft.network import OpenVLAOFTModel, checkpoint_key_to_module_key, module_key_to_checkpoint_key
from vla_policies.openvla_oft.policy import OpenVLAOFTPolicy

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
