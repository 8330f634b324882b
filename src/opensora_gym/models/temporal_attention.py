"""One fused GPU kernel for the temporal attention of the generated frames (exact mode's `"triton"` kernel).

Compiled temporal blocks run this attention as five kernels or more: QK-norm and rotary embedding of the queries and
keys, the concatenation with the cached condition keys/values, a float32 batched GEMV for the scores, the softmax, a
second GEMV for the weighted values (4.3 ms per block call at the recipe's 64 envs, 1.2 s of an 8 s chunk step on an
H200). Each (patch, head) pair attends over 4 to 12 frames only, so one Triton program per pair can read its raw
queries, keys and values once from the `qkv` projection's output, normalize and rotate them in registers, attend,
and write the output in the layout the `proj` linear reads.

It computes what `Attention` computes with `normalize_and_rotate` and `short_causal_attention`, with the same
roundings: queries and keys rounded once to the model dtype after the float32 norm and rotation, float32 scores and
softmax, probabilities rounded to the model dtype, float32 accumulation of the weighted values. It needs a CUDA GPU
(or Triton's interpreter, `TRITON_INTERPRET=1`, which the CPU tests use).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _interpreted() -> bool:
    """Whether Triton's interpreter runs the kernels (chosen when they are defined, from `TRITON_INTERPRET`)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_available(device: torch.device) -> bool:
    """Whether the kernel runs on `device`'s tensors: a CUDA device, or any device under Triton's interpreter."""
    return device.type == "cuda" or _interpreted()


@triton.jit
def _normalize_rotate(x, partner, weight, partner_weight, cos, sin, sign, head_dim, eps, HAS_NORM: tl.constexpr):
    """RMS-normalizes rows of float32 `x` [R, DB] (their channel pairs swapped in `partner`), then rotates pairs."""
    if HAS_NORM:
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / head_dim + eps)  # [R]; padded channels are zeros
        x = weight[None, :] * (x * inv_rms[:, None])
        partner = partner_weight[None, :] * (partner * inv_rms[:, None])
    return x * cos + sign[None, :] * partner * sin


@triton.jit
def _dot(a, b, FLOAT32: tl.constexpr):
    """a @ b with float32 accumulation; in IEEE float32 (exact products of the rounded operands) with `FLOAT32`."""
    if FLOAT32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _fused_temporal_attention_kernel(
    qkv_ptr,
    past_k_ptr,
    past_v_ptr,
    q_weight_ptr,
    k_weight_ptr,
    freqs_ptr,
    out_ptr,
    num_heads,
    head_dim,
    hidden,
    length,
    past_length,
    stride_qkv_n,
    stride_qkv_l,
    stride_pk_n,
    stride_pk_h,
    stride_pk_p,
    stride_pv_n,
    stride_pv_h,
    stride_pv_p,
    stride_out_n,
    stride_out_l,
    eps,
    scale,
    HAS_NORM: tl.constexpr,
    LB: tl.constexpr,
    KB: tl.constexpr,
    DB: tl.constexpr,
    DOT_FLOAT32: tl.constexpr,
):
    dtype = out_ptr.dtype.element_ty
    pid = tl.program_id(0)
    n = pid // num_heads
    h = pid % num_heads
    d = tl.arange(0, DB)
    d_in = d < head_dim
    swapped = d ^ 1  # the other channel of each rotated pair
    sign = tl.where(d % 2 == 0, -1.0, 1.0)  # rotate: (x0, x1) -> (-x1, x0)
    freq = tl.load(freqs_ptr + d // 2, mask=d_in, other=0.0)
    weight_q = tl.load(q_weight_ptr + d, mask=d_in, other=0.0).to(tl.float32)
    weight_q_swapped = tl.load(q_weight_ptr + swapped, mask=d_in, other=0.0).to(tl.float32)
    weight_k = tl.load(k_weight_ptr + d, mask=d_in, other=0.0).to(tl.float32)
    weight_k_swapped = tl.load(k_weight_ptr + swapped, mask=d_in, other=0.0).to(tl.float32)
    row = qkv_ptr + n * stride_qkv_n + h * head_dim

    # Queries: the generated frames at positions past_length .. past_length + length - 1.
    l = tl.arange(0, LB)  # noqa: E741
    l_mask = (l < length)[:, None] & d_in[None, :]
    q_angle = (past_length + l).to(tl.float32)[:, None] * freq[None, :]  # [LB, DB]
    q_rows = row + l[:, None] * stride_qkv_l
    q = tl.load(q_rows + d[None, :], mask=l_mask, other=0.0).to(tl.float32)
    q_swapped = tl.load(q_rows + swapped[None, :], mask=l_mask, other=0.0).to(tl.float32)
    q = _normalize_rotate(
        q, q_swapped, weight_q, weight_q_swapped, tl.cos(q_angle), tl.sin(q_angle), sign, head_dim, eps, HAS_NORM
    )
    q = q.to(dtype)

    # Keys and values: the cached condition frames (normalized and rotated already), then the generated frames'.
    j = tl.arange(0, KB)
    cached = (j < past_length)[:, None] & d_in[None, :]
    own = ((j >= past_length) & (j < past_length + length))[:, None] & d_in[None, :]
    own_rows = row + tl.where(j >= past_length, j - past_length, 0)[:, None] * stride_qkv_l
    k_angle = j.to(tl.float32)[:, None] * freq[None, :]  # [KB, DB]
    k_own = tl.load(own_rows + hidden + d[None, :], mask=own, other=0.0).to(tl.float32)
    k_own_swapped = tl.load(own_rows + hidden + swapped[None, :], mask=own, other=0.0).to(tl.float32)
    k_own = _normalize_rotate(
        k_own,
        k_own_swapped,
        weight_k,
        weight_k_swapped,
        tl.cos(k_angle),
        tl.sin(k_angle),
        sign,
        head_dim,
        eps,
        HAS_NORM,
    )
    k_cached = tl.load(
        past_k_ptr + n * stride_pk_n + h * stride_pk_h + j[:, None] * stride_pk_p + d[None, :], mask=cached, other=0.0
    )
    k = tl.where(own, k_own.to(dtype), k_cached)  # [KB, DB]
    v_own = tl.load(own_rows + 2 * hidden + d[None, :], mask=own, other=0.0)
    v_cached = tl.load(
        past_v_ptr + n * stride_pv_n + h * stride_pv_h + j[:, None] * stride_pv_p + d[None, :], mask=cached, other=0.0
    )
    v = tl.where(own, v_own, v_cached)  # [KB, DB]

    # Products of the rounded operands accumulated in float32, as the matmuls of `short_causal_attention` compute them.
    scores = _dot(q, tl.trans(k), DOT_FLOAT32) * scale  # [LB, KB]
    visible = (j[None, :] <= past_length + l[:, None]) & (j < past_length + length)[None, :]
    scores = tl.where(visible, scores, float("-inf"))
    weights = tl.exp(scores - tl.max(scores, axis=1)[:, None])
    probs = (weights / tl.sum(weights, axis=1)[:, None]).to(dtype)
    out = _dot(probs, v, DOT_FLOAT32)  # [LB, DB]
    out_rows = out_ptr + n * stride_out_n + l[:, None] * stride_out_l + h * head_dim
    tl.store(out_rows + d[None, :], out.to(dtype), mask=l_mask)


@torch.library.custom_op("opensora_gym::fused_temporal_attention", mutates_args=())
def fused_temporal_attention(
    qkv: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    freqs: torch.Tensor,
    num_heads: int,
    eps: float,
) -> torch.Tensor:
    """Causal temporal attention of the generated frames over the cached condition frames and themselves.

    A custom op, so that compiled blocks call the kernel as it is instead of tracing into it.

    Args:
        qkv: the `qkv` projection of the generated frames' tokens, [N, L, 3 * heads * head_dim] (queries, keys,
            values, each heads x head_dim), last dimension contiguous.
        past_k, past_v: the condition frames' keys (normalized and rotated) and values, [N, heads, P, head_dim].
        q_weight, k_weight: the RMS norms' weights [head_dim], or None for a model without QK-norm.
        freqs: the rotary frequencies [head_dim / 2] (float32 math, whatever their dtype).
        num_heads: attention heads.
        eps: the RMS norms' epsilon.

    Returns:
        [N, L, heads * head_dim] in `qkv`'s dtype, the heads side by side as `proj` reads them.
    """
    _check_inputs(qkv, past_k, past_v, num_heads)
    N, L, three_hidden = qkv.shape
    hidden = three_hidden // 3
    head_dim = hidden // num_heads
    P = past_k.shape[2]
    out = torch.empty(N, L, hidden, device=qkv.device, dtype=qkv.dtype)
    has_norm = q_weight is not None
    _fused_temporal_attention_kernel[(N * num_heads,)](
        qkv,
        past_k,
        past_v,
        q_weight if has_norm else freqs,
        k_weight if has_norm else freqs,
        freqs.float(),
        out,
        num_heads,
        head_dim,
        hidden,
        L,
        P,
        qkv.stride(0),
        qkv.stride(1),
        *past_k.stride()[:3],
        *past_v.stride()[:3],
        out.stride(0),
        out.stride(1),
        eps,
        head_dim**-0.5,
        HAS_NORM=has_norm,
        # tl.dot tiles are 16 or more on each side.
        LB=max(16, triton.next_power_of_2(L)),
        KB=max(16, triton.next_power_of_2(P + L)),
        DB=max(16, triton.next_power_of_2(head_dim)),
        # Triton's interpreter multiplies bf16 and fp16 tiles wrongly; their float32 products are the same numbers.
        DOT_FLOAT32=qkv.dtype == torch.float32 or _interpreted(),
        num_warps=4,
    )
    return out


@fused_temporal_attention.register_fake
def _(qkv, past_k, past_v, q_weight, k_weight, freqs, num_heads, eps):
    return qkv.new_empty(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)


def _check_inputs(qkv: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, num_heads: int) -> None:
    """Raises ValueError unless the shapes and layouts are the kernel's (named in the message)."""
    if qkv.ndim != 3 or qkv.shape[2] % (3 * num_heads) or qkv.stride(2) != 1:
        raise ValueError(
            f"qkv must be [N, L, 3 * {num_heads} * head_dim] with a contiguous last dimension, got shape "
            f"{tuple(qkv.shape)} and strides {qkv.stride()}"
        )
    N, head_dim = qkv.shape[0], qkv.shape[2] // (3 * num_heads)
    if head_dim % 2:
        raise ValueError(f"the rotary embedding pairs channels: head_dim must be even, got {head_dim}")
    P = past_k.shape[2] if past_k.ndim == 4 else None
    for name, past in (("past_k", past_k), ("past_v", past_v)):
        if past.ndim != 4 or tuple(past.shape) != (N, num_heads, P, head_dim) or past.stride(3) != 1:
            raise ValueError(
                f"{name} must have shape [{N}, {num_heads}, P, {head_dim}] (the same P for keys and values) with a "
                f"contiguous last dimension, got shape {tuple(past.shape)} and strides {past.stride()}"
            )
