"""Vision-language-action policies for RL: OpenVLA-OFT (parallel-decoded action tokens) and a small CNN."""

from vla_policies.base import Policy, PolicyEvaluation, PolicyOutput, check_observation
from vla_policies.openvla_oft import (
    RLINF_LORA_TARGET_MODULES,
    LoraSettings,
    OpenVLAOFTConfig,
    OpenVLAOFTModel,
    OpenVLAOFTPolicy,
    checkpoint_shapes_match,
)
from vla_policies.processing import ImageProcessorConfig, PromptTokenizer, build_prompt, preprocess_images
from vla_policies.small import SmallCNNPolicy, SmallPolicyConfig
from vla_policies.tokenizer import ActionTokenizer, resolve_unnorm_key, unnormalize
from vla_policies.value_head import ValueHead

__all__ = [
    "RLINF_LORA_TARGET_MODULES",
    "ActionTokenizer",
    "ImageProcessorConfig",
    "LoraSettings",
    "OpenVLAOFTConfig",
    "OpenVLAOFTModel",
    "OpenVLAOFTPolicy",
    "Policy",
    "PolicyEvaluation",
    "PolicyOutput",
    "PromptTokenizer",
    "SmallCNNPolicy",
    "SmallPolicyConfig",
    "ValueHead",
    "build_prompt",
    "check_observation",
    "checkpoint_shapes_match",
    "preprocess_images",
    "resolve_unnorm_key",
    "unnormalize",
]
