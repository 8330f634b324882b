"""One fused GPU kernel for the temporal attention of the generated frames (exact mode's `"triton"` kernel).

Compiled temporal blocks run this attention as five kernels or more: QK-norm and rotary embedding of the queries and
keys, the concatenation with the cached condition keys/values, a float32 batched GEMV for the scores, the softmax, a
second GEMV for the weighted values (about 1.9 s of an 8 s chunk step on an H200 at the recipe's 64 envs; 5.9 ms a call
timed alone). Each (patch, head) pair attends over 4 to 12 frames only, so one Triton program (one warp) for one patch
and one head reads their raw queries, keys and values once from the `qkv` projection's output, normalizes them and
rotates them in registers with the cosines and sines of the caller's rotation tables, attends key by key (broadcast
products and sums: tensor-core tiles would be mostly padding at these sizes), and writes the output in the layout the
`proj` linear reads: 2.1 ms a call at those shapes, about 0.6 s of a 6.5 s chunk step (`benchmarks/fused_kernels.py`;
README, "Speed"). A variant with the two products as tensor-core tiles padded to 16 (one patch and one head per
program) took 2.9 ms a call at its best launch on an H100, against this kernel's 2.1 ms, and was removed.

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


# Launch configuration: patches per program and warps per program (`benchmarks/fused_kernels.py`).
BLOCK_N = 1
NUM_WARPS = 1


@triton.jit
def _load_pairs(ptr, i, mask):
    """The even and odd channels `2 i` and `2 i + 1` at `ptr` (rows broadcast against the pair index `i`), float32."""
    even = tl.load(ptr + 2 * i, mask=mask, other=0.0).to(tl.float32)
    return even, tl.load(ptr + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _normalize_rotate(even, odd, weight_even, weight_odd, cos, sin, head_dim, eps, HAS_NORM: tl.constexpr):
    """RMS-normalizes float32 rows split into their even and odd channels (`[..., pairs]` each, the norm over the
    last axis), then rotates each (even, odd) pair by its angle: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
    if HAS_NORM:
        squares = tl.sum(even * even + odd * odd, axis=-1)  # padding is zeros
        inv_rms = tl.expand_dims(tl.rsqrt(squares / head_dim + eps), -1)
        even = weight_even * (even * inv_rms)
        odd = weight_odd * (odd * inv_rms)
    return even * cos - odd * sin, odd * cos + even * sin


@triton.jit
def _fused_temporal_attention_kernel(
    qkv_ptr,
    past_k_ptr,
    past_v_ptr,
    q_weight_ptr,
    k_weight_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    num_rows,
    head_dim,
    hidden,
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
    LENGTH: tl.constexpr,
    PAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LB: tl.constexpr,
    KB: tl.constexpr,
    PB: tl.constexpr,
    DB: tl.constexpr,
):
    """One program: BLOCK_N patches x one head. Tensors are [patch, frame, channel]; the (tiny) products are
    broadcasts and sums, not tensor-core tiles, so nothing is padded but the channels (and frames to a power of 2)."""
    dtype = out_ptr.dtype.element_ty
    h = tl.program_id(1)
    n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N))[:, None, None]  # [BN, 1, 1]
    l = tl.arange(0, LB)[None, :, None]  # noqa: E741  [1, LB, 1]
    i = tl.arange(0, PB)[None, None, :]  # channel pairs [1, 1, PB]
    d = tl.arange(0, DB)[None, None, :]  # channels [1, 1, DB]
    pair_in = i < head_dim // 2
    n_in = n < num_rows
    if HAS_NORM:
        weight_q_even, weight_q_odd = _load_pairs(q_weight_ptr, i, pair_in)
        weight_k_even, weight_k_odd = _load_pairs(k_weight_ptr, i, pair_in)
    else:  # unused
        weight_q_even = 0.0
        weight_q_odd = 0.0
        weight_k_even = 0.0
        weight_k_odd = 0.0
    rows = qkv_ptr + n * stride_qkv_n + h * head_dim  # [BN, 1, 1]

    # Queries: the generated frames at positions PAST .. PAST + LENGTH - 1, rounded once to the model dtype.
    q_mask = n_in & (l < LENGTH) & pair_in
    q_rows = rows + l * stride_qkv_l
    table = l * (head_dim // 2) + i  # [1, LB, PB]: the rotation tables of the generated frames
    q_even, q_odd = _load_pairs(q_rows, i, q_mask)
    q_even, q_odd = _normalize_rotate(
        q_even,
        q_odd,
        weight_q_even,
        weight_q_odd,
        tl.load(cos_ptr + table, mask=(l < LENGTH) & pair_in, other=0.0),
        tl.load(sin_ptr + table, mask=(l < LENGTH) & pair_in, other=0.0),
        head_dim,
        eps,
        HAS_NORM,
    )
    q_even = q_even.to(dtype).to(tl.float32)
    q_odd = q_odd.to(dtype).to(tl.float32)

    # Scores [BN, LB, KB] in float32 against each key: the cached condition frames' (normalized and rotated
    # already), then the generated frames' own (normalized and rotated here, rounded to the model dtype).
    key = tl.arange(0, KB)[None, None, :]
    scores = tl.full((BLOCK_N, LB, KB), float("-inf"), tl.float32)
    k_mask = n_in & pair_in
    for j in tl.static_range(PAST + LENGTH):
        if j < PAST:
            k_even, k_odd = _load_pairs(past_k_ptr + n * stride_pk_n + h * stride_pk_h + j * stride_pk_p, i, k_mask)
        else:
            k_table = (j - PAST) * (head_dim // 2) + i  # [1, 1, PB]
            k_even, k_odd = _load_pairs(rows + (j - PAST) * stride_qkv_l + hidden, i, k_mask)
            k_even, k_odd = _normalize_rotate(
                k_even,
                k_odd,
                weight_k_even,
                weight_k_odd,
                tl.load(cos_ptr + k_table, mask=pair_in, other=0.0),
                tl.load(sin_ptr + k_table, mask=pair_in, other=0.0),
                head_dim,
                eps,
                HAS_NORM,
            )
            k_even = k_even.to(dtype).to(tl.float32)
            k_odd = k_odd.to(dtype).to(tl.float32)
        score = tl.sum(q_even * k_even + q_odd * k_odd, axis=2)[:, :, None] * scale  # [BN, LB, 1]
        visible = (key == j) & (j <= PAST + l)  # query l sits at position PAST + l
        scores = tl.where(visible, score, scores)

    # The softmax in float32, the probabilities rounded to the model dtype, the weighted values summed in float32.
    weights = tl.exp(scores - tl.max(scores, axis=2)[:, :, None])
    probs = (weights / tl.sum(weights, axis=2)[:, :, None]).to(dtype).to(tl.float32)
    out = tl.zeros((BLOCK_N, LB, DB), tl.float32)
    v_mask = n_in & (d < head_dim)
    for j in tl.static_range(PAST + LENGTH):
        if j < PAST:
            v_row = past_v_ptr + n * stride_pv_n + h * stride_pv_h + j * stride_pv_p
        else:
            v_row = rows + (j - PAST) * stride_qkv_l + 2 * hidden
        prob = tl.sum(tl.where(key == j, probs, 0.0), axis=2)[:, :, None]  # [BN, LB, 1]
        out += prob * tl.load(v_row + d, mask=v_mask, other=0.0).to(tl.float32)
    out_rows = out_ptr + n * stride_out_n + l * stride_out_l + h * head_dim
    tl.store(out_rows + d, out.to(dtype), mask=n_in & (l < LENGTH) & (d < head_dim))


@torch.library.custom_op("opensora_gym::fused_temporal_attention", mutates_args=())
def fused_temporal_attention(
    qkv: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
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
        cos, sin: the rotary tables of the generated frames' positions, [L, head_dim / 2] float32, one angle per
            channel pair (`RotaryEmbedding.pair_tables(L, P, device)`).
        num_heads: attention heads.
        eps: the RMS norms' epsilon.

    Returns:
        [N, L, heads * head_dim] in `qkv`'s dtype, the heads side by side as `proj` reads them.
    """
    _check_inputs(qkv, past_k, past_v, cos, sin, num_heads)
    return launch(qkv, past_k, past_v, q_weight, k_weight, cos, sin, num_heads, eps)


def launch(
    qkv: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float,
    block_n: int = BLOCK_N,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """`fused_temporal_attention` with a chosen launch configuration (`benchmarks/fused_kernels.py` sweeps
    it): `block_n` patches per program (a power of 2), `num_warps` warps each. Inputs are not checked."""
    N, L, three_hidden = qkv.shape
    hidden = three_hidden // 3
    head_dim = hidden // num_heads
    P = past_k.shape[2]
    out = torch.empty(N, L, hidden, device=qkv.device, dtype=qkv.dtype)
    has_norm = q_weight is not None
    tensors = (qkv, past_k, past_v, q_weight if has_norm else cos, k_weight if has_norm else cos, cos, sin, out)
    strides = (qkv.stride(0), qkv.stride(1), *past_k.stride()[:3], *past_v.stride()[:3], out.stride(0), out.stride(1))
    sizes = {"HAS_NORM": has_norm, "LENGTH": L, "PAST": P, "num_warps": num_warps}
    _fused_temporal_attention_kernel[(triton.cdiv(N, block_n), num_heads)](
        *tensors,
        N,
        head_dim,
        hidden,
        *strides,
        eps,
        head_dim**-0.5,
        **sizes,
        BLOCK_N=block_n,
        LB=triton.next_power_of_2(L),
        KB=triton.next_power_of_2(P + L),
        PB=triton.next_power_of_2(head_dim // 2),
        DB=triton.next_power_of_2(head_dim),
    )
    return out


@fused_temporal_attention.register_fake
def _(qkv, past_k, past_v, q_weight, k_weight, cos, sin, num_heads, eps):
    return qkv.new_empty(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)


def _check_inputs(
    qkv: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int
) -> None:
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
    L = qkv.shape[1]
    for name, table in (("cos", cos), ("sin", sin)):
        if tuple(table.shape) != (L, head_dim // 2) or table.dtype != torch.float32 or not table.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous float32 [{L}, {head_dim // 2}] table (frames x channel pairs), got "
                f"{table.dtype} of shape {tuple(table.shape)}"
            )
