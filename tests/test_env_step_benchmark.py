import json

import pytest
import torch


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT", "matmul"),
        ("aten::addmm", "matmul"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<96, 128, 64, 4>>", "attention"),
        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
        ("aten::mkldnn_convolution", "convolution"),
        ("triton_per_fused_add_native_layer_norm_0", "fused (inductor)"),
        ("triton_red_fused__scaled_dot_product_cudnn_attention__to_copy_add_mean_1", "fused (inductor)"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128", "attention"),
        ("aten::silu", "other"),
    ],
)
def test_kernel_kinds(load_benchmark, name, kind):
    assert load_benchmark("env_step").kernel_kind(name) == kind


def test_the_ladder_profiles_kernels_and_gives_the_cudnn_switch_back(load_benchmark, tmp_path):
    script = load_benchmark("env_step")
    assert script.RUNGS_BY_NAME["cudnn"].exact and script.RUNGS_BY_NAME["cudnn"].cudnn_benchmark
    before = torch.backends.cudnn.benchmark
    out = tmp_path / "ladder.json"
    argv = ["--tiny", "--compile-backend", "eager", "--rungs", "cudnn", "--warmup-steps", "0", "--timed-steps", "1"]
    assert script.main([*argv, "--compare-chunks", "1", "--kernels", "4", "--out", str(out)]) == 0
    assert torch.backends.cudnn.benchmark == before
    (rung,) = json.loads(out.read_text())["rungs"]
    kernels = rung["kernels"]
    times = [row["s"] for row in kernels["top"]]
    assert len(times) == 4 and times == sorted(times, reverse=True) and times[-1] > 0
    assert all(row["calls"] >= 1 and row["name"] for row in kernels["top"])
    assert sum(kernels["by_kind"].values()) == pytest.approx(kernels["total_s"])
    assert kernels["by_kind"]["convolution"] > 0 and kernels["by_kind"]["matmul"] > 0  # the VAE's and the DiT's
    assert kernels["total_s"] >= sum(times)


def test_kernels_must_not_be_negative(load_benchmark):
    with pytest.raises(ValueError, match="kernels must be >= 0, got -1"):
        load_benchmark("env_step").parse_args(["--tiny", "--kernels", "-1"])
