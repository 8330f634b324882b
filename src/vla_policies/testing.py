"""A tiny OpenVLA-OFT checkpoint folder in the released layout, with random weights, for tests.

Same classes and key layout as the 7B model: a DINOv2-like ViT (class token, 4 registers, LayerScale) and a
SigLIP-like ViT (no class token, attention-pool head) on 28 px images with 14 px patches (4 patches), a
2-layer Llama, and a real (character-level) tokenizer built with the ``tokenizers`` library whose special ids
match Llama-2's (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2) and which has the ``"▁"`` token. Everything is loaded back
through `OpenVLAOFTPolicy.from_pretrained`, the same path as a real checkpoint.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vla_policies.openvla_oft import OpenVLAOFTConfig, OpenVLAOFTModel, OpenVLAOFTPolicy
from vla_policies.processing import ImageProcessorConfig

__all__ = ["TINY_NORM_STATS", "tiny_config", "tiny_tokenizer", "write_tiny_checkpoint"]

TINY_BASE_VOCAB = 384  # action ids are the last 256: [128, 384)
TINY_PAD_ID = TINY_BASE_VOCAB  # like Llama-2's <PAD> = 32000, the first id after the base vocabulary
TINY_NORM_STATS = {
    "libero_spatial_no_noops": {
        "action": {
            "q01": [-0.75, -0.8, -0.9, -0.1, -0.2, -0.3, -1.0],
            "q99": [0.9, 0.85, 0.95, 0.15, 0.2, 0.35, 1.0],
            "mask": [True, True, True, True, True, True, False],
        }
    }
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level BPE tokenizer with Llama-2's special ids and a ``<PAD>`` token at id 384."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3}
    for char in string.ascii_letters + string.digits + string.punctuation + "\n":
        vocab[char] = len(vocab)
    while len(vocab) < TINY_BASE_VOCAB:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<PAD>"
    )


def tiny_config(add_value_head: bool = False, value_type: str = "chunk_level") -> OpenVLAOFTConfig:
    """The tiny architecture: same classes and key layout as OpenVLA-OFT 7B."""
    dino = dict(
        img_size=28, patch_size=14, embed_dim=24, depth=3, num_heads=2, init_values=1e-5, reg_tokens=4,
        no_embed_class=True, num_classes=0,
    )  # fmt: skip
    siglip = dict(
        img_size=28, patch_size=14, embed_dim=16, depth=3, num_heads=2, mlp_ratio=3.7362, class_token=False,
        global_pool="map", num_classes=0,
    )  # fmt: skip
    return OpenVLAOFTConfig(
        image_sizes=(28, 28),
        timm_model_kwargs=(dino, siglip),
        text_config={
            "model_type": "llama",
            "vocab_size": TINY_BASE_VOCAB + 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 256,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": TINY_PAD_ID,
        },
        norm_stats=TINY_NORM_STATS,
        pad_token_id=TINY_PAD_ID,
        add_value_head=add_value_head,
        value_type=value_type,
    )


def random_checkpoint_weights(config: OpenVLAOFTConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Checkpoint-named random float32 tensors: ``N(0, 1/fan_in)`` matrices, ``1 + N(0, 0.1)`` norm scales."""
    with torch.device("meta"):
        shapes = OpenVLAOFTModel(config).expected_checkpoint_shapes()
    weights = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if len(shape) >= 2:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            weights[key] = noise / fan_in**0.5
        elif "norm" in key and key.endswith("weight"):
            weights[key] = 1.0 + 0.1 * noise
        else:
            weights[key] = 0.1 * noise
    return weights


def write_tiny_checkpoint(
    folder: str | Path, seed: int = 0, add_value_head: bool = False, value_type: str = "chunk_level"
) -> Path:
    """Write a tiny random OpenVLA-OFT checkpoint folder and return its path.

    Args:
        folder: Destination (created).
        seed: Seed of the weights.
        add_value_head: Whether the saved model has ``value_head.*``.
        value_type: "chunk_level" or "action_level".
    """
    config = tiny_config(add_value_head=add_value_head, value_type=value_type)
    image_config = ImageProcessorConfig(
        image_sizes=(28, 28),
        means=((0.485, 0.456, 0.406), (0.5, 0.5, 0.5)),
        stds=((0.229, 0.224, 0.225), (0.5, 0.5, 0.5)),
        interpolations=("bicubic", "bicubic"),
    )
    weights = random_checkpoint_weights(config, torch.Generator().manual_seed(seed))
    policy = OpenVLAOFTPolicy.from_config(config, tiny_tokenizer(), image_config, weights)
    policy.save_pretrained(folder)
    return Path(folder)
