"""Vision-language-action policies for RL: OpenVLA-OFT (parallel-decoded action tokens) and a small CNN."""

from vla_policies.tokenizer import ActionTokenizer, resolve_unnorm_key, unnormalize

__all__ = ["ActionTokenizer", "resolve_unnorm_key", "unnormalize"]
