"""The ResNet success classifier that scores world-model frames (``resnet_rm.pth`` in RLinf-OpenSora).

The checkpoint is a ResNet-18 in the d2l.ai layout: convolutions carry biases, the whole network is one
``nn.Sequential`` named ``net`` (stem, four stages of two residual blocks, average pool, flatten, a
``Linear(512, 1)`` and a sigmoid), and a frame is a success when the rounded probability is 1.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from opensora_gym.checkpoint import REWARD_WEIGHTS_NAME
from opensora_gym.safe_loading import load_torch_state_dict

__all__ = ["REWARD_WEIGHTS_NAME", "ResNetRewardModel", "ResidualBlock"]


_NUM_STAGES = 4
_BLOCKS_PER_STAGE = 2
_MAX_LISTED_MISMATCHES = 8


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a skip connection (1x1 convolution when the shape changes).

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: stride of the first convolution and of the shortcut.
        project: whether the shortcut is a 1x1 convolution ``conv3`` (required when the shape changes).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, project: bool = False) -> None:
        super().__init__()
        if not project and (stride != 1 or in_channels != out_channels):
            raise ValueError(
                f"an identity shortcut needs stride 1 and in_channels == out_channels, got stride {stride}, "
                f"{in_channels} -> {out_channels}; pass project=True"
            )
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride) if project else None
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the block.

        Args:
            x: features ``[N, C_in, H, W]``.

        Returns:
            Features ``[N, C_out, H / stride, W / stride]``.
        """
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.conv3 is None else self.conv3(x)
        return F.relu(y + shortcut)


class ResNetRewardModel(nn.Module):
    """Success classifier on single frames: probability that the task is done in the frame.

    Attribute names reproduce the checkpoint keys (``net.0.0.weight``, ``net.1.0.conv1.weight``, ...,
    ``net.7.weight``), BatchNorm buffers included.

    Args:
        widths: output channels of the four stages; the stem has ``widths[0]`` channels. The released
            checkpoint uses ``(64, 128, 256, 512)``; smaller widths give a model of the same layout for tests.

    Example:
        >>> model = ResNetRewardModel(widths=(4, 8, 8, 16)).eval()
        >>> prob, reward = model.predict(torch.zeros(2, 3, 32, 32))
        >>> prob.shape, reward.shape
        (torch.Size([2]), torch.Size([2]))
    """

    def __init__(self, widths: tuple[int, int, int, int] = (64, 128, 256, 512)) -> None:
        super().__init__()
        widths = tuple(widths)
        if len(widths) != _NUM_STAGES or not all(isinstance(w, int) and w > 0 for w in widths):
            raise ValueError(f"widths must be {_NUM_STAGES} positive ints, got {widths}")
        self.widths: tuple[int, int, int, int] = widths
        stem = nn.Sequential(
            nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        stages = []
        in_channels = widths[0]
        for stage_index, out_channels in enumerate(widths):
            # The stem already halved the resolution twice, so the first stage keeps shape and needs no
            # projection; every later stage downsamples in its first block.
            downsample = stage_index > 0
            blocks = [ResidualBlock(in_channels, out_channels, stride=2 if downsample else 1, project=downsample)]
            blocks += [ResidualBlock(out_channels, out_channels) for _ in range(_BLOCKS_PER_STAGE - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = out_channels
        self.net = nn.Sequential(
            stem,
            *stages,
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Flatten(),
            nn.Linear(widths[-1], 1),
            nn.Sigmoid(),
        )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Success probability of each frame.

        Args:
            frames: RGB frames ``[N, 3, H, W]`` scaled to about [-1, 1], any float dtype; values outside
                [-1, 1] are clamped, as the checkpoint was trained on clamped frames.

        Returns:
            Probabilities ``[N]``, float32.
        """
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must have shape [N, 3, H, W], got {tuple(frames.shape)}")
        if not frames.is_floating_point():
            raise ValueError(f"frames must be a float tensor scaled to [-1, 1], got dtype {frames.dtype}")
        # The checkpoint was trained in float32: computing in bf16 would shift probabilities near 0.5.
        x = frames.to(torch.float32).clamp(-1.0, 1.0)
        prob = self.net(x)  # [N, 1]
        return prob.squeeze(1)  # [N]

    @torch.no_grad()
    def predict(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probability and 0/1 reward of each frame, with inference (eval-mode) batch norm.

        Args:
            frames: RGB frames ``[N, 3, H, W]`` scaled to about [-1, 1], any float dtype.

        Returns:
            ``(prob, reward)``: probabilities ``[N]`` float32 and rewards ``[N]`` float32 in {0, 1}
            (the probability rounded half to even, as ``torch.round`` does in the reference).
        """
        was_training = self.training
        self.eval()
        try:
            prob = self(frames)
        finally:
            self.train(was_training)
        return prob, torch.round(prob)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> ResNetRewardModel:
        """Builds a model whose widths match ``state_dict`` and loads it.

        Args:
            state_dict: parameters and buffers in the checkpoint layout, any float dtype.

        Returns:
            The model in eval mode, float32.

        Raises:
            ValueError: keys or shapes do not match the layout; the message lists the first mismatches.
        """
        model = cls(widths=_infer_widths(state_dict))
        expected = model.state_dict()
        missing = [key for key in expected if key not in state_dict]
        unexpected = [key for key in state_dict if key not in expected]
        wrong_shape = [
            f"{key}: checkpoint {tuple(state_dict[key].shape)}, model {tuple(value.shape)}"
            for key, value in expected.items()
            if key in state_dict and state_dict[key].shape != value.shape
        ]
        if missing or unexpected or wrong_shape:
            problems = [
                f"{label} ({len(keys)}): {', '.join(keys[:_MAX_LISTED_MISMATCHES])}"
                for label, keys in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("wrong shape", wrong_shape),
                )
                if keys
            ]
            raise ValueError(
                f"state dict does not match ResNetRewardModel(widths={model.widths}): "
                + "; ".join(problems)
                + " (expected the RLinf-OpenSora resnet_rm.pth layout: net.0 stem, net.1-net.4 stages, net.7 linear)"
            )
        model.load_state_dict(state_dict)
        return model.to(torch.float32).eval()

    @classmethod
    def from_pretrained(cls, path: str | PathLike[str], map_location: str | torch.device = "cpu") -> ResNetRewardModel:
        """Loads a reward checkpoint without running code from it.

        Args:
            path: the ``resnet_rm.pth`` file, or a folder that contains it.
            map_location: device of the returned model.

        Returns:
            The model in eval mode, float32, on ``map_location``.

        Raises:
            FileNotFoundError: no checkpoint at ``path``.
            ValueError: the checkpoint does not match the layout (see :meth:`from_state_dict`).
            opensora_gym.safe_loading.UnsafeFileError: the file carries anything but tensors.
        """
        path = Path(path)
        weights_path = path / REWARD_WEIGHTS_NAME if path.is_dir() else path
        if not weights_path.is_file():
            raise FileNotFoundError(
                f"no reward checkpoint at {weights_path} (expected the RLinf-OpenSora layout: a folder with "
                f"{REWARD_WEIGHTS_NAME}, a torch state dict of the ResNet classifier, plain or under "
                '"model_state_dict")'
            )
        state_dict = load_torch_state_dict(weights_path, map_location=map_location)
        try:
            model = cls.from_state_dict(state_dict)
        except ValueError as error:
            raise ValueError(f"{weights_path}: {error}") from error
        return model.to(map_location)

    def save_pretrained(self, folder: str | PathLike[str]) -> Path:
        """Writes ``folder/resnet_rm.pth`` as a plain state dict (readable with ``weights_only=True``).

        Args:
            folder: destination folder, created if needed.

        Returns:
            The path of the written file.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights_path = folder / REWARD_WEIGHTS_NAME
        state_dict = {key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()}
        torch.save(state_dict, weights_path)
        return weights_path


def _infer_widths(state_dict: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
    """Reads the stage widths from the first convolution of each stage."""
    keys = [f"net.{stage + 1}.0.conv1.weight" for stage in range(_NUM_STAGES)]
    missing = [key for key in keys if key not in state_dict]
    if missing:
        raise ValueError(
            f"state dict has no {', '.join(missing)}, so the stage widths cannot be read (expected the "
            f"RLinf-OpenSora resnet_rm.pth layout: keys net.0.0.weight, net.1.0.conv1.weight, ...; "
            f"got keys starting {sorted(state_dict)[:_MAX_LISTED_MISMATCHES]})"
        )
    return tuple(int(state_dict[key].shape[0]) for key in keys)
