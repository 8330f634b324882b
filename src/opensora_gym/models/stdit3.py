"""STDiT3 with action conditioning: the DiT that predicts the velocity of the next latent frames.

The layout (module and parameter names) is the one of RLinf's OpenSora fork, so the released
`RLinf-OpenSora-LIBERO-*` weights load by name. Each block pair is a spatial block (attention among the
patches of one frame) and a temporal block (causal attention over frames, with rotary position embeddings).

Conditioning, per frame: the timestep embedding plus the embedding of that frame's action. The first
`condition_frames` frames carry clean context latents; they get a learned "no action" embedding and are modulated
with the embedding of timestep 15 instead of the current timestep (`x_mask` marks which frames are generated).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from opensora_gym.checkpoint import (
    CONFIG_NAME,
    check_state_dict_shapes,
    read_tensors,
    save_sharded,
    stored_shapes,
    weight_files,
)
from opensora_gym.models.float8 import Float8Linear, check_fp8_device
from opensora_gym.models.inductor_heuristics import one_pass_short_rows

try:  # Triton comes with torch's Linux builds; without it only the "triton" temporal attention kernel is missing
    from opensora_gym.models.temporal_attention import fused_temporal_attention, kernel_available
except ImportError:
    fused_temporal_attention = kernel_available = None

# The reference modulates the condition frames with the embedding of this timestep.
CONDITION_TIMESTEP = 15.0

KeyValue = tuple[torch.Tensor, torch.Tensor]

# Tensors of the released checkpoints that the action-conditioned forward pass never uses: the text
# cross-attention, the caption embedder and the fps embedder of text-to-video OpenSora. They are dropped when
# loading and never allocated.
UNUSED_CHECKPOINT_KEYS = ("*.cross_attn.*", "y_embedder.*", "fps_embedder.*")


def is_unused_checkpoint_key(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in UNUSED_CHECKPOINT_KEYS)


@dataclass(frozen=True)
class STDiT3Config:
    """Architecture of STDiT3. Field names follow the reference `config.json` except `condition_frames`.

    Attributes:
        depth: number of spatial/temporal block pairs.
        hidden_size: token width.
        num_heads: attention heads (the head width is `hidden_size // num_heads`).
        patch_size: (t, h, w) patch of the latent video.
        in_channels: latent channels.
        pred_sigma: the output has `2 * in_channels` channels (velocity, then an unused sigma half).
        mlp_ratio: MLP width over `hidden_size`.
        qk_norm: RMS-normalize queries and keys per head.
        input_sq_size: the image side the position embedding was trained at (scales the grid).
        action_dim: width of one action.
        condition_frames: latent frames of clean context before the predicted ones (`pad_action_num` in the
            reference config): they get the "no action" embedding.
    """

    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 4
    pred_sigma: bool = True
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    input_sq_size: int = 512
    action_dim: int = 7
    condition_frames: int = 4

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        for name in ("depth", "hidden_size", "num_heads", "in_channels", "input_sq_size", "action_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"STDiT3Config.{name} must be a positive integer, got {getattr(self, name)}")
        if self.condition_frames < 0:
            raise ValueError(f"STDiT3Config.condition_frames must be >= 0, got {self.condition_frames}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"STDiT3Config.patch_size must be 3 positive integers, got {self.patch_size}")
        if self.patch_size[0] != 1:
            raise ValueError(
                f"STDiT3Config.patch_size[0] must be 1: actions are embedded per latent frame, got {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"STDiT3Config.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        head_dim = self.hidden_size // self.num_heads
        if head_dim % 2:
            raise ValueError(f"the head width hidden_size/num_heads must be even for rotary embeddings, got {head_dim}")
        if self.hidden_size % 4:
            raise ValueError(f"STDiT3Config.hidden_size must be divisible by 4, got {self.hidden_size}")

    @classmethod
    def xl_2(cls, **overrides) -> STDiT3Config:
        """The STDiT3-XL/2 preset of the released world models (about 0.9 B parameters in use)."""
        return cls(**{"depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": (1, 2, 2), **overrides})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    def to_json_dict(self) -> dict:
        """The reference `config.json` fields (so the file also reads as the reference's)."""
        data = asdict(self)
        data["patch_size"] = list(self.patch_size)
        data["pad_action_num"] = data.pop("condition_frames")
        return {"model_type": "STDiT3", **data}

    @classmethod
    def from_json_dict(cls, data: dict) -> STDiT3Config:
        """Reads a reference or our own `config.json`.

        Architecture fields are read; every other field of the reference config (runtime switches such as
        `enable_flash_attn`, training options, and the text-conditioning sizes of the unused caption embedder)
        does not change the computation of the action-conditioned model and is ignored.
        """
        data = dict(data)
        if "pad_action_num" in data:
            data["condition_frames"] = data.pop("pad_action_num")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json_file(cls, file: Path) -> STDiT3Config:
        """Reads `config.json`; every problem (missing, not UTF-8, not JSON, bad fields) names the file."""
        if not file.is_file():
            raise FileNotFoundError(
                f"no STDiT3 {CONFIG_NAME} at {file} (expected the architecture beside the weights, as in the released "
                "checkpoints; pass config=STDiT3Config(...) to load weights without one)"
            )
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{file} is not a UTF-8 JSON file ({err}); expected the STDiT3 config.json") from err
        if not isinstance(data, dict):
            raise ValueError(f"{file} holds a JSON {type(data).__name__}, expected an object of STDiT3 config fields")
        try:
            return cls.from_json_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{file} is not a valid STDiT3 config: {err}") from err


class RMSNorm(nn.Module):
    """RMS normalization over the last dimension, computed in float32 (queries and keys of one head)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_float(x).to(x.dtype)

    def forward_float(self, x: torch.Tensor) -> torch.Tensor:
        """The normalized and scaled `x` [..., D] in float32, not rounded back to `x`'s dtype."""
        x = x.float()
        return self.weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over frames, rotating interleaved pairs of channels.

    `freqs` is stored (key `rope.freqs`) as in the released weights.
    """

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        self.register_buffer("freqs", 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim))

    def pair_tables(self, length: int, offset: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine and sine [length, D/2] float32 of positions `offset .. offset + length - 1`, one per channel pair."""
        positions = torch.arange(offset, offset + length, device=device, dtype=torch.float32)
        angles = positions[:, None] * self.freqs.float()[None]  # [T, D/2]
        return angles.cos(), angles.sin()

    def tables(self, length: int, offset: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine and sine [length, D] float32 of positions `offset .. offset + length - 1` (each pair's twice)."""
        cos, sin = self.pair_tables(length, offset, device)
        return repeat(cos, "t d -> t (d r)", r=2), repeat(sin, "t d -> t (d r)", r=2)

    @staticmethod
    def rotate(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Rotates float32 `x` [..., T, D] by the angles of `tables` ([T, D] each)."""
        cos, sin = tables
        pairs = rearrange(x, "... (d r) -> ... d r", r=2)
        rotated = rearrange(torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1), "... d r -> ... (d r)")
        return x * cos + rotated * sin


def normalize_and_rotate(
    x: torch.Tensor, norm: nn.Module, tables: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """QK-norm then rotary embedding of queries or keys [N, heads, L, head_dim], in float32 with one rounding.

    The reference rounds to the model dtype after the norm and again after the rotation; computing both in float32
    and rounding once is the same up to that rounding, and saves two passes over the tensor.
    """
    if isinstance(norm, RMSNorm):
        y = norm.forward_float(x)
    elif tables is None:
        return x
    else:
        y = x.float()
    if tables is not None:
        y = RotaryEmbedding.rotate(y, tables)
    return y.to(x.dtype)


def short_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over a few positions as two batched matmuls and a float32 softmax.

    The temporal blocks attend over 4 to 12 frames for each of B * S patches: flash kernels tile 64 or more positions
    and the masked SDPA kernels are several times slower than these plain matmuls at that length.

    Args:
        q: queries [N, heads, L, head_dim] of the last L positions.
        k, v: keys and values [N, heads, P + L, head_dim] of the P earlier positions, then of the queries'.

    Returns:
        [N, heads, L, head_dim] in `v`'s dtype.
    """
    L, K = q.shape[-2], k.shape[-2]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2))
    future = torch.arange(K, device=q.device)[None] > torch.arange(K - L, K, device=q.device)[:, None]  # [L, K]
    probs = (scores * q.shape[-1] ** -0.5).masked_fill(future, float("-inf")).softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


class Attention(nn.Module):
    """Multi-head self-attention over the second dimension of `[N, L, C]`.

    `short_causal_kernel` is a runtime switch of causal attention, not architecture: `"matmul"` (default,
    `short_causal_attention`), `"triton"` (`fused_temporal_attention`: one GPU kernel for QK-norm, rotary embedding
    and attention of generated frames over cached condition frames; elsewhere as `"matmul"`) or `"sdpa"`
    (`scaled_dot_product_attention` with a causal mask, kept to measure the difference in `benchmarks/env_step.py`).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, rope: RotaryEmbedding | None, causal: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = RMSNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        # A plain attribute, not a submodule: the rotary table belongs to the model (key `rope.freqs`).
        self._rope = (rope,) if rope is not None else ()
        self.causal = causal
        self.short_causal_kernel = "matmul"

    def forward(self, x: torch.Tensor, past: KeyValue | None = None) -> tuple[torch.Tensor, KeyValue]:
        """Attends from `x` [N, L, C] to `past` keys/values (earlier positions) and to itself.

        Returns:
            the output [N, L, C] and the keys/values of `x`'s own positions ([N, heads, L, head_dim] each; None
            from the `"triton"` kernel, which attends to `past` without writing them).
        """
        qkv = self.qkv(x)  # [N, L, 3C]
        if self.short_causal_kernel == "triton" and past is not None:
            norms = [norm.weight if isinstance(norm, RMSNorm) else None for norm in (self.q_norm, self.k_norm)]
            eps = self.q_norm.eps if isinstance(self.q_norm, RMSNorm) else 0.0
            tables = self._rope[0].pair_tables(qkv.shape[1], past[0].shape[-2], x.device)
            out = fused_temporal_attention(qkv, *past, *norms, *tables, self.num_heads, eps)
            return self.proj(out), None
        q, k, v = rearrange(qkv, "n l (three h d) -> three n h l d", three=3, h=self.num_heads)
        offset = 0 if past is None else past[0].shape[-2]
        tables = self._rope[0].tables(q.shape[-2], offset, x.device) if self._rope else None
        q, k = normalize_and_rotate(q, self.q_norm, tables), normalize_and_rotate(k, self.k_norm, tables)
        own = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=-2), torch.cat([past[1], v], dim=-2)
        if not self.causal:
            x = F.scaled_dot_product_attention(q, k, v)  # [N, heads, L, head_dim]
        elif self.short_causal_kernel in ("matmul", "triton"):
            x = short_causal_attention(q, k, v)
        else:  # query i sits at position offset + i and sees keys up to there
            mask = torch.arange(k.shape[-2], device=x.device)[None] <= (
                torch.arange(q.shape[-2], device=x.device)[:, None] + offset
            )  # [L, offset + L]
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(rearrange(x, "n h l d -> n l (h d)")), own


@torch.library.custom_op("opensora_gym::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`gelu(linear(x, weight, bias), approximate="tanh")`; on a CUDA device one cuBLASLt matmul whose epilogue adds
    the bias and applies the GELU to the float32 accumulator, rounding once (the unfused pair rounds the linear's
    output, then the GELU's). A custom op, so that compiled blocks keep the fused call instead of splitting it."""
    if not x.is_cuda:  # the CPU's fused kernel applies the exact (erf) GELU, not the tanh one
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class Mlp(nn.Module):
    """fc1, tanh GELU, fc2. `fused_gelu` (a runtime switch, `STDiT3.set_fused_gelu`) runs fc1 and the GELU as one
    `linear_gelu_tanh`."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
        self.fused_gelu = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gelu:
            return self.fc2(linear_gelu_tanh(x, self.fc1.weight, self.fc1.bias))
        return self.fc2(self.act(self.fc1(x)))


class STDiT3Block(nn.Module):
    """adaLN-modulated attention + MLP block; spatial (within a frame) or temporal (causal over frames)."""

    def __init__(self, config: STDiT3Config, temporal: bool, rope: RotaryEmbedding | None = None):
        super().__init__()
        hidden = config.hidden_size
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(hidden, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(hidden, config.num_heads, config.qk_norm, rope=rope, causal=temporal)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden, int(hidden * config.mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden) / hidden**0.5)

    def forward(
        self,
        x: torch.Tensor,
        t_mlp: torch.Tensor,
        t0_mlp: torch.Tensor,
        x_mask: torch.Tensor,
        past: KeyValue | None = None,
    ) -> tuple[torch.Tensor, KeyValue | None]:
        """Args:
        x: tokens [B, T, S, C].
        t_mlp: modulation of generated frames, [B, T, 6C] (spatial: per frame) or [B, 1, 6C] (temporal).
        t0_mlp: modulation of condition frames, [B, 1, 6C].
        x_mask: [B, T] bool, true for generated frames.
        past: temporal blocks only: keys/values of earlier frames ([B*S, heads, T_past, head_dim] each).

        Returns:
            the tokens and, for a temporal block, the keys/values of these frames.
        """
        B = x.shape[0]
        mod = rearrange(t_mlp, "b t (n c) -> b t n c", n=6) + self.scale_shift_table  # [B, T or 1, 6, C]
        mod0 = rearrange(t0_mlp, "b t (n c) -> b t n c", n=6) + self.scale_shift_table  # [B, 1, 6, C]
        # Choosing the modulation per frame equals the reference's modulating twice and choosing per frame,
        # since modulation is elementwise.
        mod = torch.where(x_mask[:, :, None, None], mod, mod0)  # [B, T, 6, C]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:, :, None].unbind(dim=3)  # [B,T,1,C]

        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        kv = None
        if self.temporal:
            h, kv = self.attn(rearrange(h, "b t s c -> (b s) t c"), past)
            h = rearrange(h, "(b s) t c -> b t s c", b=B)
        else:
            h, _ = self.attn(rearrange(h, "b t s c -> (b t) s c"))
            h = rearrange(h, "(b t) s c -> b t s c", b=B)
        x = x + gate_msa * h

        h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.mlp(h), kv


class PatchEmbed3D(nn.Module):
    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> [B, T, h*w, hidden], padding H and W up to a multiple of the patch."""
        _, _, _, H, W = x.shape
        ph, pw = self.patch_size[1:]
        x = F.pad(x, (0, -W % pw, 0, -H % ph))
        return rearrange(self.proj(x), "b c t h w -> b t (h w) c")


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of a scalar (cos half, then sin half) followed by an MLP."""

    def __init__(self, hidden: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B] -> [B, hidden]."""
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(dtype))


class ActionEmbedder(nn.Module):
    """Embeds each action of the chunk; condition frames get the learned `none_action` embedding.

    Action dropout and guidance (options, not in the reference) give the generated frames of chosen clips the same
    `none_action` embedding, so that one model also predicts the chunk without its actions.
    """

    def __init__(self, hidden: int, action_dim: int, condition_frames: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(action_dim, hidden * 4), nn.SiLU(), nn.Linear(hidden * 4, hidden))
        self.none_action = nn.Embedding(1, hidden)
        self.condition_frames = condition_frames

    def forward(self, actions: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """[B, A, action_dim] -> [B, condition_frames + A, hidden]; `drop` as for `generated`."""
        B = actions.shape[0]
        none = self.none_action.weight[None].expand(B, self.condition_frames, -1)
        return torch.cat([none, self.generated(actions, drop)], dim=1)

    def generated(self, actions: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """[B, A, action_dim] -> [B, A, hidden], the generated frames' embeddings; clips where `drop` [B] (bool) is
        true get `none_action` instead of their actions' (None: no clip)."""
        embedded = self.fc(actions)
        if drop is None:
            return embedded
        if drop.shape != actions.shape[:1] or drop.dtype != torch.bool:
            raise ValueError(
                f"drop must be a bool tensor of shape ({actions.shape[0]},), got {drop.dtype} {tuple(drop.shape)}"
            )
        return torch.where(drop[:, None, None], self.none_action.weight[None].to(embedded.dtype), embedded)


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden) / hidden**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor, t0: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, S, C], t and t0 [B, C] (embeddings before the t_block) -> [B, T, S, patch * out]."""
        shift, scale = (self.scale_shift_table[None] + t[:, None])[:, None, None].unbind(dim=3)  # [B,1,1,C]
        shift0, scale0 = (self.scale_shift_table[None] + t0[:, None])[:, None, None].unbind(dim=3)
        x = self.norm_final(x) * (1 + scale) + shift
        # The reference modulates the condition frames a second time, on top of the first modulation (it
        # normalizes the already modulated tokens). Kept for parity; the sampler discards these frames.
        x_condition = self.norm_final(x) * (1 + scale0) + shift0
        return self.linear(torch.where(x_mask[:, :, None, None], x, x_condition))


class PositionEmbedding2D(nn.Module):
    """Sin-cos embedding of the patch grid; the first half encodes the column, the second the row."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden

    def forward(self, h: int, w: int, scale: float, base_size: int, device, dtype) -> torch.Tensor:
        """-> [h*w, hidden] in row-major patch order."""
        rows = torch.arange(h, device=device) / scale * (base_size / h)
        cols = torch.arange(w, device=device) / scale * (base_size / w)
        rows, cols = torch.meshgrid(rows, cols, indexing="ij")  # [h, w] each

        half = self.hidden // 2
        inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2, device=device).float() / half))

        def sincos(pos: torch.Tensor) -> torch.Tensor:
            out = pos.reshape(-1)[:, None] * inv_freq[None]
            return torch.cat([out.sin(), out.cos()], dim=-1)

        return torch.cat([sincos(cols), sincos(rows)], dim=-1).to(dtype)


class STDiT3(nn.Module):
    """Action-conditioned STDiT3. See the module docstring for the conditioning."""

    def __init__(self, config: STDiT3Config):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.rope = RotaryEmbedding(config.head_dim)
        self.pos_embed = PositionEmbedding2D(hidden)
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.action_embedder = ActionEmbedder(hidden, config.action_dim, config.condition_frames)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.spatial_blocks = nn.ModuleList(STDiT3Block(config, temporal=False) for _ in range(config.depth))
        self.temporal_blocks = nn.ModuleList(
            STDiT3Block(config, temporal=True, rope=self.rope) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(hidden, math.prod(config.patch_size), config.out_channels)
        # Runtime state of `compile_blocks`, not architecture.
        self.one_pass_head_norms = False

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    def compile_blocks(self, dynamic: bool = True, one_pass_head_norms: bool = False, **kwargs) -> None:
        """`torch.compile` every block; fuses the many elementwise operations of modulation, normalization and
        rotary embedding (2.2x faster forward on an H100 in bf16, see `benchmarks/stdit3_forward.py`). The blocks
        share their compiled graphs (one per kind of block and frame count).

        Args:
            dynamic: compile for any batch size (the batch changes when only some sub-envs step, and recompiling
                for each size would cost minutes). `False` compiles for the shapes seen: use it only when the
                batch never changes, as with the sampler's padded `micro_batch_size`.
            one_pass_head_norms: compile the per-head QK-norms (and any other reduction of at most 128 elements) as
                one-pass reductions (`opensora_gym.models.inductor_heuristics`): the same arithmetic, generated code
                that reads each row once on a GPU.
            kwargs: further arguments of `torch.compile` (`mode`, ...).

        Raises:
            ValueError: `one_pass_head_norms` is not a bool.
        """
        if not isinstance(one_pass_head_norms, bool):
            raise ValueError(f"one_pass_head_norms must be True or False, got {one_pass_head_norms!r}")
        self.one_pass_head_norms = one_pass_head_norms
        for block in (*self.spatial_blocks, *self.temporal_blocks):
            block.compile(dynamic=dynamic, **kwargs)

    def set_temporal_attention(self, kernel: str) -> None:
        """Chooses the kernel of the causal temporal attention: `"matmul"` (default), `"triton"` or `"sdpa"`.

        A runtime switch (not saved); all compute the same attention, see `Attention`. `"triton"` runs in
        `forward_generated` on a CUDA GPU (and under Triton's interpreter); at the released sizes it is faster and
        takes less memory than the compiled `"matmul"` path, and `WorldModel.from_pretrained(compile=True)` picks it
        on a CUDA device (README, "Speed").

        Raises:
            ValueError: an unknown kernel, or `"triton"` for a model whose device the kernel cannot run on.
        """
        if kernel not in ("matmul", "triton", "sdpa"):
            raise ValueError(f"temporal attention kernel must be 'matmul', 'triton' or 'sdpa', got {kernel!r}")
        device = self.x_embedder.proj.weight.device
        if kernel == "triton" and (kernel_available is None or not kernel_available(device)):
            raise ValueError(
                f"the 'triton' temporal attention kernel needs Triton and a CUDA device, the model is on {device}"
                + ("" if kernel_available else " and Triton is not installed")
            )
        for block in self.temporal_blocks:
            block.attn.short_causal_kernel = kernel

    def set_fused_gelu(self, enabled: bool) -> None:
        """Runs each MLP's fc1 and tanh GELU as one matmul with a GELU epilogue (`linear_gelu_tanh`), or not.

        A runtime switch (not saved): the same function with one rounding fewer. It saves a pass over the MLP's
        widest activations on a CUDA GPU; elsewhere it computes the unfused pair. Like the `"triton"` temporal
        attention it has no backward: it is for sampling (the env), not for training.

        Raises:
            ValueError: `enabled` is not a bool, or the block linears are FP8 (`use_fp8_linears`).
        """
        if not isinstance(enabled, bool):
            raise ValueError(f"set_fused_gelu expects True or False, got {enabled!r}")
        if enabled and self.fp8_linears:
            raise ValueError("the fused GELU needs the float fc1 weights; the block linears are FP8 (use_fp8_linears)")
        for block in (*self.spatial_blocks, *self.temporal_blocks):
            block.mlp.fused_gelu = enabled

    def use_fp8_linears(self) -> None:
        """Replaces the linears of every block (attention `qkv` and `proj`, MLP `fc1` and `fc2`) by `Float8Linear`s.

        An approximate runtime mode, not architecture: FP8 weights with one scale per output channel, activations
        quantized per token (`opensora_gym.models.float8`). The embedders, the `t_block` and the final layer keep
        the model dtype. Call it after the model has its device and dtype (and before `compile_blocks`); the
        float weights of the swapped layers are freed, so the model can no longer be saved.

        Raises:
            ValueError: the model's device runs no FP8 matmul (a CUDA GPU below compute capability 8.9), or the
                linears are FP8 already.
        """
        if self.fp8_linears:
            raise ValueError("the block linears are FP8 already: use_fp8_linears() was called before")
        if self.spatial_blocks[0].mlp.fused_gelu:
            raise ValueError("the fused GELU is on: call set_fused_gelu(False) before use_fp8_linears()")
        check_fp8_device(self.x_embedder.proj.weight.device)
        for block in (*self.spatial_blocks, *self.temporal_blocks):
            block.attn.qkv = Float8Linear.from_linear(block.attn.qkv)
            block.attn.proj = Float8Linear.from_linear(block.attn.proj)
            block.mlp.fc1 = Float8Linear.from_linear(block.mlp.fc1)
            block.mlp.fc2 = Float8Linear.from_linear(block.mlp.fc2)

    @property
    def fp8_linears(self) -> bool:
        """Whether the blocks' linears run in FP8 (`use_fp8_linears`)."""
        return isinstance(self.spatial_blocks[0].attn.qkv, Float8Linear)

    def check_inputs(self, x: torch.Tensor, timestep: torch.Tensor, actions: torch.Tensor, x_mask: torch.Tensor):
        """Raises ValueError naming the expected and received shapes."""
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must have shape [B, {cfg.in_channels}, T, H, W], got {tuple(x.shape)}")
        B, _, T = x.shape[:3]
        if timestep.shape != (B,):
            raise ValueError(f"timestep must have shape ({B},), got {tuple(timestep.shape)}")
        expected_actions = T - cfg.condition_frames
        if actions.ndim != 3 or actions.shape != (B, expected_actions, cfg.action_dim):
            raise ValueError(
                f"actions must have shape ({B}, {expected_actions}, {cfg.action_dim}) for {T} frames of which "
                f"{cfg.condition_frames} are condition frames, got {tuple(actions.shape)}"
            )
        if x_mask is None or x_mask.shape != (B, T):
            got = None if x_mask is None else tuple(x_mask.shape)
            raise ValueError(f"x_mask must have shape ({B}, {T}) (true for generated frames), got {got}")

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        actions: torch.Tensor,
        x_mask: torch.Tensor,
        height: int | torch.Tensor,
        width: int | torch.Tensor,
        condition_timestep: torch.Tensor | None = None,
        drop_actions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicts the velocity (and the unused sigma half) for every latent frame.

        Args:
            x: latents [B, C, T, H, W], T = condition_frames + number of actions.
            timestep: [B] on the 0..1000 scale.
            actions: normalized actions [B, A, action_dim].
            x_mask: [B, T], true (or 1) for generated frames, false (or 0) for condition frames.
            height, width: the image size the latents stand for (scales the position embedding grid).
            condition_timestep: [B], the noise level the condition frames are modulated with; None: the
                reference's fixed `CONDITION_TIMESTEP` (15). Condition-noise augmentation trains with higher levels.
            drop_actions: [B] bool, clips whose generated frames get the "no action" embedding instead of their
                actions' (action dropout, `ActionEmbedder.generated`); None: none (the reference).

        Returns:
            [B, out_channels, T, H, W] float32; channels [:in_channels] are the velocity.
        """
        self.check_inputs(x, timestep, actions, x_mask)
        if condition_timestep is not None and condition_timestep.shape != timestep.shape:
            raise ValueError(
                f"condition_timestep must have shape {tuple(timestep.shape)}, got {tuple(condition_timestep.shape)}"
            )
        x_mask = x_mask.to(device=x.device, dtype=torch.bool)
        # The reference casts the timestep to the model dtype before embedding it (in bf16 this rounds it).
        t, t0 = self._timestep_embeddings(timestep.to(self.dtype), condition_timestep)
        t_spatial = self.t_block(t[:, None] + self.action_embedder(actions.to(self.dtype), drop_actions))  # [B, T, 6C]
        t_temporal, t0_mlp = self.t_block(t)[:, None], self.t_block(t0)[:, None]  # [B, 1, 6C] each
        tokens = self._tokens(x, height, width)  # [B, T, S, C]
        tokens, _ = self._blocks(tokens, t_spatial, t_temporal, t0_mlp, x_mask)
        return self._unpatchify(self.final_layer(tokens, t, t0, x_mask), x.shape)

    @torch.no_grad()
    def condition_cache(
        self,
        condition_latents: torch.Tensor,
        height: int | torch.Tensor,
        width: int | torch.Tensor,
        condition_timestep: float = CONDITION_TIMESTEP,
    ) -> list[KeyValue]:
        """Keys and values of the condition frames in every temporal block, for `forward_generated`.

        Condition frames see only themselves (causal temporal attention) and are modulated with a fixed
        timestep (the reference's 15) and no action, so their activations are the same at every sampling step:
        computing them once per chunk instead of at each of the sampler's steps gives the same result for the
        generated frames.

        Args:
            condition_latents: [B, C, Tc, H, W].
            condition_timestep: the noise level the condition frames are modulated with (0..1000).
        """
        if condition_latents.ndim != 5 or condition_latents.shape[1] != self.config.in_channels:
            raise ValueError(
                f"condition_latents must have shape [B, {self.config.in_channels}, Tc, H, W], "
                f"got {tuple(condition_latents.shape)}"
            )
        B, _, Tc = condition_latents.shape[:3]
        level = torch.full((B,), condition_timestep, device=condition_latents.device)
        _, t0 = self._timestep_embeddings(torch.zeros(B, device=condition_latents.device, dtype=self.dtype), level)
        t0_mlp = self.t_block(t0)[:, None]  # [B, 1, 6C]
        x_mask = torch.zeros(B, Tc, dtype=torch.bool, device=condition_latents.device)
        tokens = self._tokens(condition_latents, height, width)
        _, cache = self._blocks(tokens, t0_mlp, t0_mlp, t0_mlp, x_mask, keep_cache=True)
        return cache

    def forward_generated(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        actions: torch.Tensor,
        cache: list[KeyValue],
        height: int | torch.Tensor,
        width: int | torch.Tensor,
        drop_actions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model output for the generated frames only, the condition frames given by `condition_cache`.

        Equal (up to float rounding) to `forward` on the concatenated frames, restricted to the generated ones.

        Args:
            x: generated latents [B, C, A, H, W].
            timestep: [B].
            actions: normalized actions [B, A, action_dim].
            cache: `condition_cache` of the condition frames.
            drop_actions: [B] bool, as for `forward`.

        Returns:
            [B, out_channels, A, H, W] float32.
        """
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must have shape [B, {cfg.in_channels}, A, H, W], got {tuple(x.shape)}")
        B, _, A = x.shape[:3]
        if actions.shape != (B, A, cfg.action_dim) or timestep.shape != (B,):
            raise ValueError(
                f"actions must have shape ({B}, {A}, {cfg.action_dim}) and timestep ({B},), "
                f"got {tuple(actions.shape)} and {tuple(timestep.shape)}"
            )
        if len(cache) != cfg.depth:
            raise ValueError(f"cache must hold {cfg.depth} temporal blocks' keys/values, got {len(cache)}")
        t, t0 = self._timestep_embeddings(timestep.to(self.dtype))
        t_spatial = self.t_block(t[:, None] + self.action_embedder.generated(actions.to(self.dtype), drop_actions))
        t_temporal, t0_mlp = self.t_block(t)[:, None], self.t_block(t0)[:, None]
        x_mask = torch.ones(B, A, dtype=torch.bool, device=x.device)
        tokens, _ = self._blocks(self._tokens(x, height, width), t_spatial, t_temporal, t0_mlp, x_mask, cache)
        return self._unpatchify(self.final_layer(tokens, t, t0, x_mask), x.shape)

    def _timestep_embeddings(
        self, timestep: torch.Tensor, condition_timestep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [B, C] of the timestep and of the condition frames' timestep (default: the fixed 15)."""
        t = self.t_embedder(timestep, self.dtype)
        if condition_timestep is None:
            condition_timestep = torch.full_like(timestep, CONDITION_TIMESTEP)
        t0 = self.t_embedder(condition_timestep.to(device=timestep.device, dtype=timestep.dtype), self.dtype)
        return t, t0

    def _tokens(self, x: torch.Tensor, height, width) -> torch.Tensor:
        """Latents [B, C, T, H, W] -> patch tokens with the 2D position embedding [B, T, S, C]."""
        ph, pw = self.config.patch_size[1:]
        h, w = -(-x.shape[3] // ph), -(-x.shape[4] // pw)
        pos = self.pos_embed(
            h,
            w,
            scale=math.sqrt(float(height) * float(width)) / self.config.input_sq_size,
            base_size=round(math.sqrt(h * w)),
            device=x.device,
            dtype=self.dtype,
        )  # [S, C]
        return self.x_embedder(x.to(self.dtype)) + pos

    def _blocks(
        self, x, t_spatial, t_temporal, t0_mlp, x_mask, past: list[KeyValue] | None = None, keep_cache: bool = False
    ) -> tuple[torch.Tensor, list[KeyValue]]:
        """Runs the block pairs; returns the tokens and, with `keep_cache`, each temporal block's keys/values of
        these frames (else an empty list: holding them would keep 2 of every block's activations alive)."""
        cache = []
        # Compiled blocks compile on their first call, here: the heuristic has to be in place then.
        with one_pass_short_rows() if self.one_pass_head_norms else contextlib.nullcontext():
            for i, (spatial, temporal) in enumerate(zip(self.spatial_blocks, self.temporal_blocks, strict=True)):
                x, _ = spatial(x, t_spatial, t0_mlp, x_mask)
                x, kv = temporal(x, t_temporal, t0_mlp, x_mask, None if past is None else past[i])
                if keep_cache:
                    cache.append(kv)
        return x, cache

    def _unpatchify(self, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """[B, T, S, ph*pw*C_out] -> [B, C_out, T, H, W] float32, cropping the patch padding."""
        _, _, T, H, W = shape
        ph, pw = self.config.patch_size[1:]
        h, w = -(-H // ph), -(-W // pw)
        x = rearrange(x, "b t (h w) (p q c) -> b c t (h p) (w q)", h=h, w=w, p=ph, q=pw, c=self.config.out_channels)
        return x[:, :, :T, :H, :W].float()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: STDiT3Config | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> STDiT3:
        """Loads the released weights (a checkpoint folder, an index file or one `.safetensors` file).

        The architecture comes from `config`, else from `config.json` beside the weights (a missing, unreadable or
        invalid `config.json` is an error that names the file: no preset is guessed).
        Key names and shapes are checked against the model before any tensor is read; the keys in
        `UNUSED_CHECKPOINT_KEYS` are skipped. The model is built on the meta device and takes the loaded tensors,
        so nothing is allocated twice.

        Returns:
            the model in eval mode.
        """
        path = Path(path)
        files = weight_files(path)
        if config is None:
            config = STDiT3Config.from_json_file((path if path.is_dir() else path.parent) / CONFIG_NAME)
        with torch.device("meta"):
            model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        found = {k: s for k, s in stored_shapes(files).items() if not is_unused_checkpoint_key(k)}
        check_state_dict_shapes(expected, found, source=f"STDiT3 weights at {path}")
        model.load_state_dict(read_tensors(files, list(expected), device=device, dtype=dtype), assign=True)
        return model.eval()

    def save_pretrained(self, folder: str | Path, max_shard_bytes: int | None = None) -> None:
        """Writes `config.json`, `model-0000k.safetensors` shards and `model.safetensors.index.json`."""
        if self.fp8_linears:
            raise ValueError(
                "cannot save a model whose block linears run in FP8 (use_fp8_linears frees the float weights): save "
                "the model as loaded, without the FP8 option"
            )
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.config.to_json_dict(), indent=2))
        save_sharded(self.state_dict(), folder, max_shard_bytes=max_shard_bytes)
