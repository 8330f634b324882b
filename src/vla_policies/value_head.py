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
    def reset_parameters(self, generator: torch.Generator, std: float = 0.02) -> None:
        """The initialization a new head gets in RLinf: every weight ``N(0, std)``, every bias zero.

        RLinf's head asks for Kaiming-normal hidden layers, but it is built inside transformers'
        ``from_pretrained``, which skips that init and fills the weights missing from the checkpoint with the
        model's ``_init_weights``: ``N(0, initializer_range)`` (0.02 for Llama-2) and zero biases.

        Args:
            generator: The only randomness source; on the parameters' device.
            std: Standard deviation of the weights (the language model's ``initializer_range``).
        """
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, mean=0.0, std=std, generator=generator)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Args: features ``[N, input_dim]``. Returns: values ``[N, output_dim]``."""
        return self.mlp(features)
