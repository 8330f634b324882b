"""The fused temporal attention kernel (`set_temporal_attention("triton")`), run by Triton's interpreter on the CPU.

The interpreter is chosen when a kernel is defined, so each check runs in a fresh interpreter with
`TRITON_INTERPRET=1`.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from opensora_gym.models.stdit3 import STDiT3, STDiT3Config

TESTS = Path(__file__).parent


def interpreted(code: str) -> dict:
    """Runs `code` under Triton's interpreter (tests/ importable); returns the JSON it prints last."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("qk_norm", [True, False])
def test_fused_kernel_computes_the_matmul_attention(qk_norm):
    # head_dim 12 (padded to 16 in the kernel, as the released 72 is to 128), 4 cached + 8 generated frames (12 keys
    # padded to 16), an odd batch: float32 outputs of the whole model agree to float32 rounding.
    result = interpreted(
        f"""
        import json, torch
        from opensora_gym.models.stdit3 import STDiT3, STDiT3Config
        from test_stdit3 import tiny_inputs
        torch.manual_seed(0)
        config = STDiT3Config(depth=2, hidden_size=48, num_heads=4, qk_norm={qk_norm})
        model = STDiT3(config).eval()
        x, timestep, actions, _ = tiny_inputs(batch=3, latent=5)
        c = config.condition_frames
        outputs = []
        with torch.no_grad():
            for kernel in ("matmul", "triton"):
                model.set_temporal_attention(kernel)
                cache = model.condition_cache(x[:, :, :c], 32, 32)
                outputs.append(model.forward_generated(x[:, :, c:], timestep, actions, cache, 32, 32))
        print(json.dumps({{
            "max_difference": (outputs[0] - outputs[1]).abs().max().item(),
            "max_value": outputs[0].abs().max().item(),
        }}))
        """
    )
    assert result["max_value"] > 0.1
    assert result["max_difference"] <= 1e-5 * max(1.0, result["max_value"])


def test_fused_kernel_in_bf16_adds_no_error_over_bf16_rounding_and_traces_as_one_graph():
    # The exact-mode checks of the matmul kernel, with the "triton" kernel: its bf16 error against the float32
    # uncached forward is that of the reference's plain bf16 computation; compiled blocks call it (and the fused
    # GELU, as exact mode does on a GPU) without a break.
    result = interpreted(
        """
        import json
        import test_stdit3
        test_stdit3.test_bf16_fast_path_adds_no_error_over_bf16_rounding(kernel="triton")
        test_stdit3.test_blocks_trace_as_one_graph_each(fp8_linears=False, fused_gelu=True, kernel="triton")
        print(json.dumps({"passed": True}))
        """
    )
    assert result == {"passed": True}


def test_fused_kernel_rejects_a_cpu_model_and_bad_inputs():
    model = STDiT3(STDiT3Config(depth=1, hidden_size=32, num_heads=4))
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="needs Triton and a CUDA device, the model is on cpu"):
            model.set_temporal_attention("triton")
    assert model.temporal_blocks[0].attn.short_causal_kernel == "matmul"
    from opensora_gym.models.temporal_attention import fused_temporal_attention

    qkv, past = torch.zeros(2, 8, 96), torch.zeros(2, 4, 4, 8)
    weight, table = torch.ones(8), torch.ones(8, 4)
    with pytest.raises(ValueError, match=r"past_k must have shape \[2, 4, P, 8\] .* got shape \(2, 4, 8\)"):
        fused_temporal_attention(qkv, past[:, 0], past, weight, weight, table, table, 4, 1e-6)
    with pytest.raises(ValueError, match=r"past_v must have shape \[2, 4, P, 8\] .* got shape \(2, 4, 3, 8\)"):
        fused_temporal_attention(qkv, past, past[:, :, :3], weight, weight, table, table, 4, 1e-6)
    with pytest.raises(ValueError, match=r"qkv must be \[N, L, 3 \* 5 \* head_dim\]"):
        fused_temporal_attention(qkv, past, past, weight, weight, table, table, 5, 1e-6)
    with pytest.raises(
        ValueError, match=r"sin must be a contiguous float32 \[8, 4\] table .* got torch.float32 of shape \(4,\)"
    ):
        fused_temporal_attention(qkv, past, past, weight, weight, table, table[0], 4, 1e-6)


def test_the_micro_benchmark_times_both_kernels_against_float32(load_benchmark, tmp_path):
    out = tmp_path / "micro.json"
    argv = ["--device", "cpu", "--patches", "6", "--heads", "2", "--head-dim", "12", "--tokens", "32", "--repeats", "1"]
    assert load_benchmark("fused_kernels").main([*argv, "--compile-backend", "eager", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["torch"] == torch.__version__
    rows = result["attention"] + result["gelu"]
    assert result["attention"][0]["kernel"].startswith("compiled matmul path") and len(result["gelu"]) == 2
    assert all(row["s"] > 0 and 0 < row["max_difference_from_float32"] < 0.1 for row in rows)  # bf16 rounding
    assert result["gelu_form"]["max_difference_from_tanh_gelu"] < 1e-6
    assert result["gelu_form"]["max_difference_from_erf_gelu"] > 1e-5


def test_the_micro_benchmark_rejects_bad_shapes(load_benchmark, capsys):
    script = load_benchmark("fused_kernels")
    for argv, message in (
        (["--head-dim", "7"], "--head-dim must be even (rotary pairs), got 7"),
        (["--block-n", "2", "3"], "--block-n must be powers of 2, got [3]"),
        (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    ):
        with pytest.raises(SystemExit):
            script.parse_args(argv)
        assert message in capsys.readouterr().err
