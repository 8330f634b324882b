"""Prompt and image preprocessing, as OpenVLA-OFT checkpoints expect them.

Prompt: ``In: What action should the robot take to {task.lower()}?\\nOut: `` tokenized by the checkpoint's
Llama-2 tokenizer, in RLinf's layout: BOS in column 0, then left padding, then the prompt (the model puts the
image patches right after BOS). If the tokenized prompt does not end with the empty token ``"▁"`` (id 29871 in
Llama-2), it is appended, as the reference does at training and test time.

Images: uint8 ``[N, H, W, 3]`` are resized to each backbone's size (bicubic, antialiased, on uint8 tensors as
RLinf does), scaled to [0, 1], normalized with each backbone's mean/std, and stacked on channels: DINOv2
channels first, SigLIP second (``[N, 6, 224, 224]``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision.transforms.functional as TVF
from einops import rearrange
from torchvision.transforms import InterpolationMode
from transformers import PreTrainedTokenizerBase

__all__ = ["PROMPT_TEMPLATE", "ImageProcessorConfig", "PromptTokenizer", "build_prompt", "preprocess_images"]

PROMPT_TEMPLATE = "In: What action should the robot take to {task}?\nOut: "
# sentencepiece's word-start marker, id 29871 in Llama-2
EMPTY_TOKEN = "▁"
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
_INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def build_prompt(task: str) -> str:
    """The OpenVLA prompt for one task description (lower-cased, as in training)."""
    return PROMPT_TEMPLATE.format(task=task.lower())


@dataclass(frozen=True)
class ImageProcessorConfig:
    """How images become pixel values; one entry per vision backbone (DINOv2 first, SigLIP second).

    Attributes:
        image_sizes: Square side per backbone (224 for OpenVLA-OFT).
        means: Per-channel RGB mean per backbone.
        stds: Per-channel RGB std per backbone.
        interpolations: Resize filter per backbone, "bicubic" or "bilinear".
        image_resize_strategy: Only "resize-naive" (stretch to a square), the strategy of every OpenVLA-OFT checkpoint.
    """

    image_sizes: tuple[int, ...]
    means: tuple[tuple[float, float, float], ...]
    stds: tuple[tuple[float, float, float], ...]
    interpolations: tuple[str, ...]
    image_resize_strategy: str = "resize-naive"

    def __post_init__(self) -> None:
        n = len(self.image_sizes)
        if n == 0 or not (len(self.means) == len(self.stds) == len(self.interpolations) == n):
            raise ValueError(
                f"image_sizes, means, stds and interpolations need one entry per backbone, got lengths "
                f"{n}, {len(self.means)}, {len(self.stds)}, {len(self.interpolations)}"
            )
        if any(size < 1 for size in self.image_sizes):
            raise ValueError(f"image_sizes must be positive, got {self.image_sizes}")
        if any(len(m) != 3 for m in self.means) or any(len(s) != 3 or min(s) <= 0 for s in self.stds):
            raise ValueError(f"means/stds must be 3 numbers per backbone (stds > 0), got {self.means}, {self.stds}")
        if any(i not in _INTERPOLATIONS for i in self.interpolations):
            raise ValueError(f"interpolations must be in {sorted(_INTERPOLATIONS)}, got {self.interpolations}")
        if self.image_resize_strategy != "resize-naive":
            raise ValueError(
                f'image_resize_strategy must be "resize-naive" (the OpenVLA-OFT checkpoints\' strategy), '
                f"got {self.image_resize_strategy!r}"
            )

    @classmethod
    def from_timm(cls, timm_model_ids: Sequence[str], image_sizes: Sequence[int]) -> ImageProcessorConfig:
        """Means, stds and filters from timm's pretrained configs of the backbones (no download)."""
        cfgs = [timm.get_pretrained_cfg(model_id) for model_id in timm_model_ids]
        if any(cfg is None for cfg in cfgs):
            raise ValueError(f"timm knows no pretrained config for some of {list(timm_model_ids)}")
        return cls(
            image_sizes=tuple(int(s) for s in image_sizes),
            means=tuple(tuple(float(x) for x in cfg.mean) for cfg in cfgs),
            stds=tuple(tuple(float(x) for x in cfg.std) for cfg in cfgs),
            interpolations=tuple(cfg.interpolation for cfg in cfgs),
        )

    @classmethod
    def from_json(cls, data: dict) -> ImageProcessorConfig:
        """From a checkpoint's ``preprocessor_config.json`` (PrismaticImageProcessor's fields)."""
        try:
            sizes = tuple(int(size[-1]) for size in data["input_sizes"])
            return cls(
                image_sizes=sizes,
                means=tuple(tuple(float(x) for x in m) for m in data["means"]),
                stds=tuple(tuple(float(x) for x in s) for s in data["stds"]),
                interpolations=tuple(data.get("interpolations") or ["bicubic"] * len(sizes)),
                image_resize_strategy=data.get("image_resize_strategy", "resize-naive"),
            )
        except KeyError as err:
            raise ValueError(
                f"{PREPROCESSOR_CONFIG_NAME} lacks {err}; expected PrismaticImageProcessor fields "
                "input_sizes, means, stds, interpolations, image_resize_strategy"
            ) from err

    def to_json(self) -> dict:
        """The PrismaticImageProcessor fields, so the reference can read the file too."""
        return {
            "image_processor_type": "PrismaticImageProcessor",
            "use_fused_vision_backbone": len(self.image_sizes) == 2,
            "image_resize_strategy": self.image_resize_strategy,
            "input_sizes": [[3, s, s] for s in self.image_sizes],
            "interpolations": list(self.interpolations),
            "means": [list(m) for m in self.means],
            "stds": [list(s) for s in self.stds],
        }

    @classmethod
    def load(cls, folder: Path) -> ImageProcessorConfig | None:
        """Read ``preprocessor_config.json`` from ``folder``; None when the file is absent."""
        path = Path(folder) / PREPROCESSOR_CONFIG_NAME
        if not path.is_file():
            return None
        return cls.from_json(json.loads(path.read_text()))

    def save(self, folder: Path) -> None:
        """Write ``preprocessor_config.json`` into ``folder``."""
        (Path(folder) / PREPROCESSOR_CONFIG_NAME).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def preprocess_images(images: torch.Tensor, config: ImageProcessorConfig) -> torch.Tensor:
    """uint8 images to the stacked, normalized pixel values of all backbones.

    Args:
        images: ``[N, H, W, 3]`` uint8.
        config: Sizes and normalization per backbone.

    Returns:
        ``[N, 3 * num_backbones, S, S]`` float32 on the images' device.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    if len(set(config.image_sizes)) != 1:
        raise ValueError(f"all backbones must take one image size to stack on channels, got {config.image_sizes}")
    chw = rearrange(images, "n h w c -> n c h w")
    stacked = []
    for size, mean, std, interp in zip(
        config.image_sizes, config.means, config.stds, config.interpolations, strict=True
    ):
        resized = TVF.resize(chw, [size, size], interpolation=_INTERPOLATIONS[interp], antialias=True)  # uint8
        pixels = resized.float() / 255.0  # [N, 3, S, S]
        stacked.append(TVF.normalize(pixels, mean=list(mean), std=list(std)))
    return torch.cat(stacked, dim=1)  # [N, 3 * num_backbones, S, S]


class PromptTokenizer:
    """Tokenizes task descriptions into RLinf's prompt layout: ``[BOS, padding..., prompt...]``.

    RLinf left-pads with the tokenizer, then moves BOS from the first real position to column 0 (where it
    leaves a padding id), so the padding sits between BOS and the prompt. The model reads the image patches
    right after column 0; padding is masked out and counts no position, so its amount changes no output.

    Args:
        tokenizer: The checkpoint's tokenizer (Llama-2's, or a tiny one in tests), loaded with AutoTokenizer.
        pad_token_id: Id written into padding positions (masked out; the checkpoint's ``pad_token_id``).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_token_id: int) -> None:
        empty_id = tokenizer.convert_tokens_to_ids(EMPTY_TOKEN)
        if empty_id is None or empty_id == tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer has no {EMPTY_TOKEN!r} token; expected a Llama-2 (sentencepiece) vocabulary"
            )
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer must define bos_token and eos_token (Llama-2's <s> and </s>)")
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id
        self.empty_token_id = int(empty_id)
        self.bos_token_id = int(tokenizer.bos_token_id)
        self.eos_token_id = int(tokenizer.eos_token_id)

    def __call__(self, tasks: Sequence[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize prompts for N tasks.

        Args:
            tasks: N task descriptions.
            max_length: Row length with BOS (RLinf pads every batch to its ``max_prompt_length``); None pads to
                the longest prompt, which gives the same model outputs with a shorter sequence.

        Returns:
            ``(input_ids, attention_mask)``, both int64 ``[N, L]``: column 0 is BOS (mask 1), then padding
            (``pad_token_id``, mask 0), then the prompt tokens (mask 1) ending with the empty token.
        """
        if len(tasks) == 0:
            raise ValueError("tasks must hold at least one task description")
        rows = []
        for task in tasks:
            ids = list(self.tokenizer(build_prompt(task), add_special_tokens=False)["input_ids"])
            if not ids or ids[-1] != self.empty_token_id:
                ids.append(self.empty_token_id)
            rows.append(ids)
        longest = 1 + max(len(r) for r in rows)  # BOS + prompt
        if max_length is not None and max_length < longest:
            raise ValueError(
                f"max_length must be at least {longest} (BOS + the longest prompt's tokens), got {max_length}"
            )
        length = longest if max_length is None else max_length
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.int64)
        input_ids[:, 0] = self.bos_token_id
        attention_mask[:, 0] = 1
        for i, ids in enumerate(rows):
            input_ids[i, length - len(ids) :] = torch.tensor(ids, dtype=torch.int64)
            attention_mask[i, length - len(ids) :] = 1
        return input_ids, attention_mask
