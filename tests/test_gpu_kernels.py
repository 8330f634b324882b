"""Exact mode's fused GPU kernels on a real CUDA GPU (CI has none: these are skipped there; the CPU tests run the
Triton kernel under Triton's interpreter, tests/test_temporal_attention.py). On a GPU machine:
`python -m pytest tests/test_gpu_kernels.py`."""

import pytest
import torch

from opensora_gym.models.stdit3 import STDiT3, STDiT3Config
from opensora_gym.presets import make_tiny_checkpoint
from opensora_gym.world_model import WorldModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

WIDTHS = {
    "tiny": STDiT3Config(depth=2, hidden_size=32, num_heads=4),  # head_dim 8
    "shipped": STDiT3Config(depth=2, hidden_size=256, num_heads=4),  # the embedded world model's head_dim 64
    "xl": STDiT3Config(depth=1, hidden_size=1152, num_heads=16),  # the released head_dim 72
}


@pytest.mark.parametrize("name", list(WIDTHS))
def test_fused_kernels_add_no_error_over_bf16_rounding(name):
    # As tests/test_stdit3.py's bf16 check: against the float32 uncached forward, exact mode's GPU path (the fused
    # temporal attention kernel and fc1 + GELU epilogue, bf16, cached condition frames) errs no more than the plain
    # bf16 forward with SDPA, the reference's computation.
    config = WIDTHS[name]
    torch.manual_seed(0)
    model = STDiT3(config).eval().cuda()
    g = torch.Generator().manual_seed(0)
    batch, c = 3, config.condition_frames
    x = torch.randn(batch, config.in_channels, c + 8, 8, 8, generator=g).cuda()
    timestep = (torch.rand(batch, generator=g) * 1000).cuda()
    actions = (torch.rand(batch, 8, config.action_dim, generator=g) * 2 - 1).cuda()
    x_mask = torch.tensor([[0] * c + [1] * 8] * batch, dtype=torch.bool).cuda()
    with torch.no_grad():
        exact = model(x, timestep, actions, x_mask, 64, 64)[:, :, c:]
        model.to(torch.bfloat16)
        model.set_temporal_attention("sdpa")
        plain = model(x, timestep, actions, x_mask, 64, 64)[:, :, c:]
        model.set_temporal_attention("triton")
        model.set_fused_gelu(True)
        cache = model.condition_cache(x[:, :, :c], 64, 64)
        fused = model.forward_generated(x[:, :, c:], timestep, actions, cache, 64, 64)

    def error(out):
        return ((out.float() - exact).norm() / exact.norm()).item()

    assert error(plain) < 0.05
    assert error(fused) <= 1.05 * error(plain)


def test_compiled_world_model_on_a_gpu_runs_the_fused_kernels(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "tiny")
    model = WorldModel.from_pretrained(folder, device="cuda", dtype=torch.bfloat16, image_size=64, compile=True)
    assert all(block.attn.short_causal_kernel == "triton" for block in model.dit.temporal_blocks)
    assert all(block.mlp.fused_gelu for block in (*model.dit.spatial_blocks, *model.dit.temporal_blocks))
    assert model.dit.one_pass_head_norms
    plain = WorldModel.from_pretrained(folder, device="cuda", dtype=torch.bfloat16, image_size=64)
    assert plain.dit.temporal_blocks[0].attn.short_causal_kernel == "matmul"
    assert not plain.dit.spatial_blocks[0].mlp.fused_gelu
    assert not plain.dit.one_pass_head_norms
