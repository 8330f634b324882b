"""FP8 linear layers: an approximate, inference-only replacement of `nn.Linear` through `torch._scaled_mm`.

Both operands are quantized to float8 e4m3 (3 mantissa bits: each element rounds with a relative error of at most
2^-4) with row-wise scales: the weight once, one scale per output channel; the activations at every call, one scale
per token (row of the flattened input). `torch._scaled_mm` multiplies them with float32 accumulation and returns
the input's dtype. On random Gaussian operands the output's relative error is about 3.5% (`tests/test_float8.py`).

`torch._scaled_mm` runs on the CPU and on CUDA GPUs of compute capability 8.9 or more (Ada, Hopper and later);
on a GPU both dimensions of the weight must be multiples of 16, which `Float8Linear` asks on every device.
"""

from __future__ import annotations

import torch
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
# CUDA GPUs before Ada (8.9) have no FP8 tensor cores and `torch._scaled_mm` refuses to run there.
MIN_CUDA_CAPABILITY = (8, 9)
# Keeps the scale of an all-zero row finite (its quantized values are then 0).
MIN_SCALE = 1e-12


def check_fp8_device(device: torch.device | str) -> None:
    """Raises ValueError unless FP8 matmuls run on `device`: the CPU, or a CUDA GPU of compute capability >= 8.9."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise ValueError(f"FP8 linears run on the CPU or a CUDA GPU, got device {str(device)!r}")
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability < MIN_CUDA_CAPABILITY:
        raise ValueError(
            f"FP8 linears need a CUDA GPU of compute capability >= 8.9 (Ada, Hopper or later), got "
            f"{capability[0]}.{capability[1]} on {str(device)!r}: turn the FP8 option off on this GPU"
        )


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise FP8 quantization of `x` [M, K]: the largest magnitude of each row maps to 448.

    Returns:
        the quantized rows [M, K] float8_e4m3fn and their scales [M, 1] float32, with `x ~= q * scale`.
    """
    scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=MIN_SCALE)  # [M, 1]
    # The clamp guards the rounding of the division: e4m3fn has no infinity, and casts past 448 give NaN.
    quantized = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized, scale


class Float8Linear(nn.Module):
    """`y = x W^T + b` with W and x quantized to FP8 (see the module docstring); inference only, no gradients.

    The quantized weight, its scales and the bias are non-persistent buffers: they are derived from a loaded
    checkpoint at run time and never saved (`STDiT3.save_pretrained` refuses a model that holds them).

    Attributes:
        weight: [out_features, in_features] float8_e4m3fn.
        weight_scale: [1, out_features] float32, the scale of each output channel (each row of the weight).
        bias: [out_features] in the dtype of the replaced layer, or None.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("weight_scale", weight_scale, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Float8Linear:
        """Quantizes the weight of `linear` (which is left unchanged) once, one scale per output channel."""
        out_features, in_features = linear.weight.shape
        if in_features % 16 or out_features % 16:
            raise ValueError(
                f"FP8 linears need in_features and out_features that are multiples of 16 (a GPU's FP8 matmul "
                f"asks it), got {in_features} and {out_features}"
            )
        with torch.no_grad():
            weight, scale = quantize_rows(linear.weight)  # [N, K], [N, 1]
            bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(weight, scale.reshape(1, out_features), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_features] -> [..., out_features] in `x`'s dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input must have {self.in_features} features in its last dimension, got {x.shape[-1]}")
        quantized, scale = quantize_rows(x.reshape(-1, self.in_features))  # [M, K], [M, 1]
        # CUDA's FP8 matmul takes a row-major first operand and a column-major second one (the weight transposed).
        quantized = quantized.contiguous()
        # cuBLASLt refuses a bias with a float32 output: add it afterwards then.
        fused_bias = self.bias is not None and x.dtype != torch.float32
        y = torch._scaled_mm(
            quantized,
            self.weight.t(),
            scale_a=scale,
            scale_b=self.weight_scale,
            bias=self.bias.to(x.dtype) if fused_bias else None,
            out_dtype=x.dtype,
        )  # [M, N]
        if self.bias is not None and not fused_bias:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
