"""A small convolutional policy with the OpenVLA-OFT interface, for fast RL experiments on the CPU.

Same contract as `OpenVLAOFTPolicy`: chunks of ``action_chunk x action_dim`` discrete tokens (``n_bins`` per
number, decoded with `ActionTokenizer` over a vocabulary of exactly ``n_bins`` ids), the same sampling math,
and an optional value head. The image goes through a strided CNN; the task string through a mean of learned
byte embeddings (UTF-8 of the lower-cased text).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import nn

from vla_policies.base import Policy, check_observation
from vla_policies.tokenizer import ActionTokenizer, unnormalize
from vla_policies.value_head import ValueHead

__all__ = ["SmallCNNPolicy", "SmallPolicyConfig"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
POOLINGS = ("mean", "spatial_softmax")


@dataclass
class SmallPolicyConfig:
    """Architecture of `SmallCNNPolicy`.

    Attributes:
        image_size: Images are resized to this square side.
        channels: Output channels of the stride-2 convolutions.
        task_embed_dim: Width of the byte embeddings of the task text.
        hidden_size: Width of the trunk MLP (and the value head input).
        action_chunk: Actions per chunk.
        action_dim: Numbers per action.
        n_bins: Tokens per number.
        add_value_head: Whether to build a value head.
        pooling: How the image features become a vector: "mean" (average over positions) or "spatial_softmax"
            (per channel the average and the expected x and y under a softmax over positions: what is seen and
            where, which a manipulation policy needs).
        value_type: "chunk_level" (one value per chunk) or "action_level" (one per action).
        action_stats: BOUNDS_Q99 statistics (``q01``, ``q99``, optional ``mask``); None keeps actions in [-1, 1].
    """

    image_size: int = 64
    channels: tuple[int, ...] = (16, 32, 64)
    task_embed_dim: int = 32
    hidden_size: int = 128
    action_chunk: int = 8
    action_dim: int = 7
    n_bins: int = 256
    add_value_head: bool = True
    pooling: str = "mean"
    value_type: str = "chunk_level"
    action_stats: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        sizes = {
            "image_size": self.image_size,
            "task_embed_dim": self.task_embed_dim,
            "hidden_size": self.hidden_size,
            "action_chunk": self.action_chunk,
            "action_dim": self.action_dim,
        }
        bad = {k: v for k, v in sizes.items() if v < 1}
        if bad or not self.channels or min(self.channels) < 1:
            raise ValueError(f"sizes must be positive, got {bad or {'channels': self.channels}}")
        if self.n_bins < 2:
            raise ValueError(f"n_bins must be at least 2, got {self.n_bins}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.value_type not in ("chunk_level", "action_level"):
            raise ValueError(f'value_type must be "chunk_level" or "action_level", got {self.value_type!r}')


class SmallCNNPolicy(Policy):
    """Strided CNN + task byte embeddings -> logits for every action token, plus an optional critic.

    Args:
        config: Architecture.
        generator: Source of the initial weights (the global RNG is never used).
    """

    def __init__(self, config: SmallPolicyConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        self.action_chunk = config.action_chunk
        self.action_dim = config.action_dim
        self.action_tokenizer = ActionTokenizer(vocab_size=config.n_bins, n_bins=config.n_bins)
        with torch.device("meta"):
            layers: list[nn.Module] = []
            width = 3
            for channels in config.channels:
                layers += [nn.Conv2d(width, channels, kernel_size=3, stride=2, padding=1), nn.ReLU()]
                width = channels
            self.encoder = nn.Sequential(*layers)
            self.task_embedding = nn.Embedding(256, config.task_embed_dim)
            features = width if config.pooling == "mean" else 3 * width
            self.trunk = nn.Sequential(
                nn.Linear(features + config.task_embed_dim, config.hidden_size),
                nn.ReLU(),
                nn.Linear(config.hidden_size, config.hidden_size),
                nn.ReLU(),
            )
            self.action_head = nn.Linear(config.hidden_size, self.num_action_tokens * config.n_bins)
            output_dim = 1 if config.value_type == "chunk_level" else config.action_chunk
            self.value_head = ValueHead(config.hidden_size, output_dim) if config.add_value_head else None
        self.to_empty(device="cpu")
        self.reset_parameters(generator if generator is not None else torch.Generator().manual_seed(0))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Kaiming-uniform weights and zero biases from ``generator``; N(0, 1) byte embeddings."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu", generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.task_embedding.weight, generator=generator)
        self.action_head.weight.mul_(0.1)  # start close to uniform over the bins
        if self.value_head is not None:
            self.value_head.reset_parameters(generator)

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.action_head.weight.device

    def _encode_tasks(self, tasks: list[str]) -> torch.Tensor:
        codes = [list(t.lower().encode("utf-8")) or [0] for t in tasks]
        length = max(len(c) for c in codes)
        ids = torch.zeros(len(codes), length, dtype=torch.int64)
        mask = torch.zeros(len(codes), length)
        for i, c in enumerate(codes):
            ids[i, : len(c)] = torch.tensor(c)
            mask[i, : len(c)] = 1.0
        ids, mask = ids.to(self.device), mask.to(self.device)
        embedded = self.task_embedding(ids) * mask[..., None]  # [N, L, E]
        return embedded.sum(1) / mask.sum(1, keepdim=True)  # [N, E]

    def _pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        """[N, C, h, w] -> [N, C] averages, then for "spatial_softmax" [N, 3C]: also expected x and y in [-1, 1]."""
        average = feature_map.mean(dim=(2, 3))
        if self.config.pooling == "mean":
            return average
        n, c, h, w = feature_map.shape
        attention = feature_map.flatten(2).softmax(dim=-1).view(n, c, h, w)
        ys = torch.linspace(-1.0, 1.0, h, device=feature_map.device, dtype=feature_map.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=feature_map.device, dtype=feature_map.dtype)
        expected_x = (attention.sum(dim=2) * xs).sum(dim=-1)  # [N, C]
        expected_y = (attention.sum(dim=3) * ys).sum(dim=-1)  # [N, C]
        return torch.cat([average, expected_x, expected_y], dim=1)

    def _forward(self, obs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        images, tasks = check_observation(obs)
        pixels = rearrange(images.to(self.device), "n h w c -> n c h w").float() / 255.0
        size = self.config.image_size
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        features = self._pool(self.encoder(pixels * 2.0 - 1.0))  # [N, C] or [N, 3C]
        hidden = self.trunk(torch.cat([features, self._encode_tasks(tasks)], dim=1))  # [N, H]
        logits = self.action_head(hidden)
        logits = rearrange(logits, "n (t k) -> n t k", k=self.config.n_bins)  # [N, T, n_bins]
        return logits.float(), hidden

    @property
    def token_range(self) -> tuple[int, int]:
        """Tokens are the bins themselves: ids ``[0, n_bins)``."""
        return 0, self.config.n_bins

    def action_logits(self, obs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, hidden = self._forward(obs)
        return logits, None if self.value_head is None else self.value_head(hidden).float()

    def tokens_to_actions(self, tokens: torch.Tensor) -> torch.Tensor:
        normalized = self.action_tokenizer.decode(tokens.cpu())
        chunks = normalized.reshape(-1, self.action_chunk, self.action_dim)  # [N, chunk, dim]
        stats = self.config.action_stats
        return (unnormalize(chunks, stats) if stats is not None else chunks).float()

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = asdict(self.config)
        data["channels"] = list(self.config.channels)
        (folder / CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n")
        weights = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(weights, folder / WEIGHTS_NAME, metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        device: str | torch.device = "cpu",
        add_value_head: bool | None = None,
        value_type: str | None = None,
        seed: int = 0,
    ) -> SmallCNNPolicy:
        """Load what `save_pretrained` wrote; every key must match, except a value head the folder lacks.

        Args:
            folder: Holds ``config.json`` and ``model.safetensors``.
            device: Where the parameters go.
            add_value_head: Override the saved ``add_value_head`` (None keeps it). A value head asked for that the
                weights lack (a behaviour-cloned policy about to be trained with PPO) is newly initialized from
                ``seed``, as ``ValueHead.reset_parameters`` initializes one.
            value_type: Override the saved ``value_type`` (None keeps it); only for a newly initialized value head.
            seed: Seed of a newly initialized value head.
        """
        folder = Path(folder)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} has no {name} (expected a SmallCNNPolicy folder)")
        saved = json.loads((folder / CONFIG_NAME).read_text())
        state = load_file(folder / WEIGHTS_NAME)
        has_value_head = any(key.startswith("value_head.") for key in state)
        overrides = {k: v for k, v in (("add_value_head", add_value_head), ("value_type", value_type)) if v is not None}
        if "value_type" in overrides and has_value_head and overrides["value_type"] != saved.get("value_type"):
            raise ValueError(
                f"value_type {overrides['value_type']!r} differs from the saved value head's "
                f"{saved.get('value_type')!r}; only a value head the weights lack can take another value_type"
            )
        policy = cls(SmallPolicyConfig(**{**saved, **overrides}))
        fresh_value_head = policy.value_head is not None and not has_value_head
        expected = {key for key in policy.state_dict() if not (fresh_value_head and key.startswith("value_head."))}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise KeyError(f"weights do not match the config: missing {missing}, unexpected {unexpected}")
        policy.load_state_dict(state, strict=not fresh_value_head)
        if fresh_value_head:
            policy.value_head.reset_parameters(torch.Generator().manual_seed(seed))
        return policy.to(device)
