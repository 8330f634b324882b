"""The PPO critic head on top of a policy's features (RLinf's layout: ``mlp.0``, ``mlp.2``, ``mlp.4``)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ValueHead"]


class ValueHead(nn.Module):
    """MLP ``input_dim -> 512 -> 128 -> output_dim`` with GELU, no bias on the last layer.

    Args:
        input_dim: Feature size (the LLM hidden size for OpenVLA-OFT).
        output_dim: 1 for one value per chunk, ``action_chunk`` for one value per step.
        hidden_sizes: Widths of the hidden layers.
    """

    def __init__(self, input_dim: int, output_dim: int = 1, hidden_sizes: tuple[int, ...] = (512, 128)) -> None:
        super().__init__()
        if input_dim < 1 or output_dim < 1 or any(h < 1 for h in hidden_sizes):
            raise ValueError(
                f"ValueHead sizes must be positive, got input_dim={input_dim}, output_dim={output_dim}, "
                f"hidden_sizes={hidden_sizes}"
            )
        layers: list[nn.Module] = []
        width = input_dim
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        layers.append(nn.Linear(width, output_dim, bias=False))
        self.mlp = nn.Sequential(*layers)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """RLinf's init: Kaiming-normal (fan_out, GELU treated as ReLU) hidden layers, N(0, 0.02) last layer."""
        linears = [m for m in self.mlp if isinstance(m, nn.Linear)]
        for layer in linears[:-1]:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            nn.init.zeros_(layer.bias)
        nn.init.normal_(linears[-1].weight, mean=0.0, std=0.02, generator=generator)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Args: features ``[N, input_dim]``. Returns: values ``[N, output_dim]``."""
        return self.mlp(features)
