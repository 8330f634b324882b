import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from opensora_gym.checkpoint import WEIGHTS_INDEX_NAME, shard_name
from opensora_gym.models.stdit3 import STDiT3, STDiT3Config, is_unused_checkpoint_key, linear_gelu_tanh

TINY = STDiT3Config(depth=2, hidden_size=32, num_heads=4)


def tiny_inputs(batch=2, latent=4, generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    T = TINY.condition_frames + 8
    x = torch.randn(batch, TINY.in_channels, T, latent, latent, generator=g)
    timestep = torch.rand(batch, generator=g) * 1000
    actions = torch.rand(batch, 8, TINY.action_dim, generator=g) * 2 - 1
    x_mask = torch.tensor([[0] * TINY.condition_frames + [1] * 8] * batch, dtype=torch.bool)
    return x, timestep, actions, x_mask


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return STDiT3(TINY).eval()


@pytest.mark.reference
def test_forward_matches_reference(stdit3_reference):
    case, model = stdit3_reference.case, stdit3_reference.model
    kwargs = stdit3_reference.meta["model_kwargs"]
    with torch.no_grad():
        out = model(case["x"], case["timestep"], case["actions"], case["x_mask"], kwargs["height"], kwargs["width"])
    assert out.shape == case["out_masked"].shape
    assert (out - case["out_masked"]).abs().max().item() <= 1e-4


@pytest.mark.reference
def test_xl2_accepts_every_manifest_key(reference_dir):
    manifest = json.loads((reference_dir / "manifest_stdit3_xl2.json").read_text())
    with torch.device("meta"):
        model = STDiT3(STDiT3Config.xl_2())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    kept = {k: v for k, v in manifest.items() if not is_unused_checkpoint_key(k)}
    assert ours == kept
    dropped = set(manifest) - set(kept)
    assert dropped and all(".cross_attn." in k or k.split(".")[0] in ("y_embedder", "fps_embedder") for k in dropped)


def test_condition_frames_do_not_see_generated_frames():
    # Causal temporal attention: the condition frames' outputs ignore the generated latents and the actions.
    model = tiny_model()
    x, timestep, actions, x_mask = tiny_inputs()
    other = x.clone()
    other[:, :, TINY.condition_frames :] = torch.randn_like(other[:, :, TINY.condition_frames :])
    with torch.no_grad():
        out = model(x, timestep, actions, x_mask, 32, 32)
        out_other = model(other, timestep, -actions, x_mask, 32, 32)
    cond = slice(0, TINY.condition_frames)
    torch.testing.assert_close(out[:, :, cond], out_other[:, :, cond])
    assert not torch.allclose(out[:, :, TINY.condition_frames :], out_other[:, :, TINY.condition_frames :])


def test_batch_items_are_independent():
    model = tiny_model()
    x, timestep, actions, x_mask = tiny_inputs(batch=3)
    with torch.no_grad():
        full = model(x, timestep, actions, x_mask, 32, 32)
        single = model(x[1:2], timestep[1:2], actions[1:2], x_mask[1:2], 32, 32)
    torch.testing.assert_close(full[1:2], single, rtol=1e-5, atol=1e-5)


def test_odd_latent_size_is_padded_and_cropped():
    model = tiny_model()
    x, timestep, actions, x_mask = tiny_inputs(latent=5)
    with torch.no_grad():
        out = model(x, timestep, actions, x_mask, 40, 40)
    assert out.shape == (2, TINY.out_channels, 12, 5, 5)
    assert torch.isfinite(out).all()


def test_bf16_forward_runs_and_stays_close():
    model = tiny_model()
    x, timestep, actions, x_mask = tiny_inputs()
    with torch.no_grad():
        ref = model(x, timestep, actions, x_mask, 32, 32)
        out = model.to(torch.bfloat16)(x, timestep, actions, x_mask, 32, 32)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize(
    ("field", "bad", "message"),
    [
        ("x", torch.zeros(2, 3, 12, 4, 4), r"x must have shape \[B, 4, T, H, W\], got \(2, 3, 12, 4, 4\)"),
        ("timestep", torch.zeros(3), r"timestep must have shape \(2,\), got \(3,\)"),
        ("actions", torch.zeros(2, 7), r"actions must have shape \(2, 8, 7\).*got \(2, 7\)"),
        ("x_mask", None, r"x_mask must have shape \(2, 12\).*got None"),
    ],
)
def test_bad_inputs_name_the_expected_shape(field, bad, message):
    model = tiny_model()
    args = dict(zip(("x", "timestep", "actions", "x_mask"), tiny_inputs(), strict=True))
    args[field] = bad
    with pytest.raises(ValueError, match=message):
        model(**args, height=32, width=32)


@pytest.mark.parametrize("max_shard_bytes", [None, 20_000])
def test_save_and_load_round_trip(tmp_path, max_shard_bytes):
    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_bytes=max_shard_bytes)
    index = json.loads((tmp_path / WEIGHTS_INDEX_NAME).read_text())
    shards = set(index["weight_map"].values())
    assert (len(shards) > 1) == (max_shard_bytes is not None)
    loaded = STDiT3.from_pretrained(tmp_path)
    assert loaded.config == TINY
    x, timestep, actions, x_mask = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, timestep, actions, x_mask, 32, 32), model(x, timestep, actions, x_mask, 32, 32), rtol=0, atol=0
        )


def test_loads_a_single_file_and_drops_unused_keys(tmp_path):
    model = tiny_model()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["spatial_blocks.0.cross_attn.q_linear.weight"] = torch.zeros(32, 32)
    state["y_embedder.y_embedding"] = torch.zeros(3, 8)
    save_file(state, tmp_path / "weights.safetensors")
    loaded = STDiT3.from_pretrained(tmp_path / "weights.safetensors", config=TINY, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert not any(is_unused_checkpoint_key(k) for k in loaded.state_dict())


def test_wrong_shapes_and_missing_keys_are_named(tmp_path):
    model = tiny_model()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["t_block.1.weight"] = torch.zeros(5, 5)
    del state["final_layer.linear.bias"]
    save_file(state, tmp_path / "weights.safetensors")
    with pytest.raises(ValueError) as err:
        STDiT3.from_pretrained(tmp_path / "weights.safetensors", config=TINY)
    assert "final_layer.linear.bias" in str(err.value)
    assert "t_block.1.weight: file (5, 5) vs model (192, 32)" in str(err.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape("model-00001.safetensors")):
        STDiT3.from_pretrained(tmp_path / "nowhere")
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / shard_name(1)).unlink()
    with pytest.raises(FileNotFoundError, match=f"names the shard {shard_name(1)}"):
        STDiT3.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"no STDiT3 config\.json at .*config\.json \(expected the architecture beside the weights"),
        (b"\xff\xfe{}", r"config\.json is not a UTF-8 JSON file"),
        (b'{"depth": 2,', r"config\.json is not a UTF-8 JSON file"),
        (b"[1, 2]", r"config\.json holds a JSON list, expected an object"),
        (b'{"depth": 0}', r"config\.json is not a valid STDiT3 config: STDiT3Config\.depth must be a positive integer"),
    ],
)
def test_missing_or_bad_config_json_is_named(tmp_path, content, message):
    tiny_model().save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    if content is None:
        config.unlink()
    else:
        config.write_bytes(content)
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        STDiT3.from_pretrained(tmp_path)


def test_corrupt_weights_are_named(tmp_path):
    (tmp_path / "model-00001.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=re.escape("model-00001.safetensors is not a readable safetensors file")):
        STDiT3.from_pretrained(tmp_path, config=TINY)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 30}, "divisible by num_heads"),
        ({"patch_size": (2, 2, 2)}, "patch_size"),
        ({"depth": 0}, "depth"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        STDiT3Config(**{"depth": 2, "hidden_size": 32, "num_heads": 4, **overrides})


def test_config_json_round_trip_uses_reference_names():
    data = TINY.to_json_dict()
    assert data["pad_action_num"] == TINY.condition_frames
    assert STDiT3Config.from_json_dict({**data, "enable_flash_attn": True}) == TINY


def test_generated_frames_with_cached_condition_equal_the_full_forward():
    model = tiny_model()
    x, timestep, actions, x_mask = tiny_inputs(batch=3)
    c = TINY.condition_frames
    with torch.no_grad():
        full = model(x, timestep, actions, x_mask, 32, 32)
        cache = model.condition_cache(x[:, :, :c], 32, 32)
        generated = model.forward_generated(x[:, :, c:], timestep, actions, cache, 32, 32)
    torch.testing.assert_close(generated, full[:, :, c:], rtol=1e-5, atol=1e-5)


def test_dropped_actions_give_the_none_action_embedding_in_both_paths():
    model = tiny_model()
    x, timestep, actions, x_mask = tiny_inputs(batch=3)
    c = TINY.condition_frames
    drop = torch.tensor([False, True, True])
    other = torch.rand(actions.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        kept = model(x, timestep, actions, x_mask, 32, 32)
        dropped = model(x, timestep, actions, x_mask, 32, 32, drop_actions=drop)
        dropped_other = model(x, timestep, other, x_mask, 32, 32, drop_actions=drop)
        none = model.action_embedder.none_action.weight
        embedded = model.action_embedder(actions, drop)
        cache = model.condition_cache(x[:, :, :c], 32, 32)
        generated = model.forward_generated(x[:, :, c:], timestep, actions, cache, 32, 32, drop)
    assert torch.equal(dropped[0], kept[0])  # clip 0 keeps its actions
    assert not torch.allclose(dropped[1:, :, c:], kept[1:, :, c:], atol=1e-4)
    assert torch.equal(dropped[1:], dropped_other[1:])  # a dropped clip does not see its actions
    assert torch.equal(embedded[1:], none.expand(2, c + 8, -1))
    torch.testing.assert_close(generated, dropped[:, :, c:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"drop must be a bool tensor of shape \(3,\), got torch.int64 \(3,\)"):
        model(x, timestep, actions, x_mask, 32, 32, drop_actions=torch.tensor([0, 1, 1]))


def test_condition_timestep_modulates_the_condition_frames_in_both_paths():
    model = tiny_model()
    x, timestep, actions, x_mask = tiny_inputs(batch=3)
    c = TINY.condition_frames
    with torch.no_grad():
        default = model(x, timestep, actions, x_mask, 32, 32)
        fifteen = model(x, timestep, actions, x_mask, 32, 32, torch.full((3,), 15.0))
        raised = model(x, timestep, actions, x_mask, 32, 32, torch.tensor([15.0, 200.0, 400.0]))
        cache = model.condition_cache(x[:, :, :c], 32, 32, 400.0)
        generated = model.forward_generated(x[:, :, c:], timestep, actions, cache, 32, 32)
        full = model(x, timestep, actions, x_mask, 32, 32, torch.full((3,), 400.0))
    assert torch.equal(default, fifteen)
    assert torch.equal(raised[0], default[0])  # items are independent; item 0 keeps the level 15
    assert not torch.allclose(raised[1:, :, c:], default[1:, :, c:], atol=1e-4)
    torch.testing.assert_close(generated, full[:, :, c:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"condition_timestep must have shape \(3,\), got \(2,\)"):
        model(x, timestep, actions, x_mask, 32, 32, torch.full((2,), 15.0))


def test_forward_generated_rejects_mismatched_inputs():
    model = tiny_model()
    x, timestep, actions, _ = tiny_inputs()
    cache = model.condition_cache(x[:, :, :4], 32, 32)
    with pytest.raises(ValueError, match=r"actions must have shape \(2, 8, 7\)"):
        model.forward_generated(x[:, :, 4:], timestep, actions[:, :5], cache, 32, 32)
    with pytest.raises(ValueError, match="cache must hold 2"):
        model.forward_generated(x[:, :, 4:], timestep, actions, cache[:1], 32, 32)


@pytest.mark.parametrize("latent", [4, 5])
def test_temporal_attention_kernels_agree(latent):
    # The matmul kernel of the short causal attention computes what masked SDPA computes, cached or not (the
    # "triton" kernel: tests/test_temporal_attention.py).
    model = tiny_model()
    x, timestep, actions, x_mask = tiny_inputs(batch=3, latent=latent)
    c = TINY.condition_frames
    outputs = {}
    with torch.no_grad():
        for kernel in ("sdpa", "matmul"):
            model.set_temporal_attention(kernel)
            cache = model.condition_cache(x[:, :, :c], 32, 32)
            outputs[kernel] = (
                model(x, timestep, actions, x_mask, 32, 32),
                model.forward_generated(x[:, :, c:], timestep, actions, cache, 32, 32),
            )
    for fast, sdpa in zip(outputs["matmul"], outputs["sdpa"], strict=True):
        torch.testing.assert_close(fast, sdpa, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'matmul', 'triton' or 'sdpa', got 'flash'"):
        model.set_temporal_attention("flash")


def test_bf16_fast_path_adds_no_error_over_bf16_rounding(kernel="matmul"):
    # Exact mode's fast path (bf16, cached condition frames, fused QK-norm + RoPE, matmul temporal attention;
    # tests/test_temporal_attention.py runs this with the "triton" kernel) against the float32 uncached forward:
    # its error is that of the plain bf16 forward with SDPA, the reference's computation, and no more.
    x, timestep, actions, x_mask = tiny_inputs(batch=3)
    c = TINY.condition_frames
    model = tiny_model()
    with torch.no_grad():
        exact = model(x, timestep, actions, x_mask, 32, 32)[:, :, c:]
        model.to(torch.bfloat16)
        model.set_temporal_attention("sdpa")
        plain = model(x, timestep, actions, x_mask, 32, 32)[:, :, c:]
        model.set_temporal_attention(kernel)
        cache = model.condition_cache(x[:, :, :c], 32, 32)
        fast = model.forward_generated(x[:, :, c:], timestep, actions, cache, 32, 32)

    def error(out):
        return ((out - exact).norm() / exact.norm()).item()

    assert error(plain) < 0.05
    assert error(fast) <= 1.05 * error(plain)


@pytest.mark.parametrize(("fp8_linears", "fused_gelu"), [(False, False), (True, False), (False, True)])
def test_blocks_trace_as_one_graph_each(fp8_linears, fused_gelu, kernel="matmul"):
    # torch.compile fuses a block only as far as it traces: a graph break would split it and cost speed.
    model = tiny_model()
    model.set_temporal_attention(kernel)
    model.set_fused_gelu(fused_gelu)
    if fp8_linears:
        model.use_fp8_linears()
    x = tiny_inputs()[0]
    c = TINY.condition_frames
    with torch.no_grad():
        cache = model.condition_cache(x[:, :, :c], 32, 32)
        tokens = model._tokens(x[:, :, c:], 32, 32)  # [B, A, S, C]
        modulation = torch.randn(2, 8, 6 * TINY.hidden_size)
        x_mask = torch.ones(2, 8, dtype=torch.bool)
        for block, past in ((model.spatial_blocks[0], None), (model.temporal_blocks[0], cache[0])):
            explained = torch._dynamo.explain(block)(tokens, modulation, modulation[:, :1], x_mask, past)
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_fused_gelu_computes_fc1_and_the_tanh_gelu():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 5, 16), torch.randn(24, 16), torch.randn(24)
    fused = linear_gelu_tanh(x, weight, bias)
    torch.testing.assert_close(fused, F.gelu(F.linear(x, weight, bias), approximate="tanh"), rtol=0, atol=0)
    assert (fused - F.gelu(F.linear(x, weight, bias))).abs().max() > 1e-5  # the tanh form, not the erf one
    x, timestep, actions, x_mask = tiny_inputs()
    model = tiny_model()
    with torch.no_grad():
        plain = model(x, timestep, actions, x_mask, 32, 32)
        model.set_fused_gelu(True)
        assert all(block.mlp.fused_gelu for block in (*model.spatial_blocks, *model.temporal_blocks))
        torch.testing.assert_close(model(x, timestep, actions, x_mask, 32, 32), plain, rtol=0, atol=0)


def test_fused_gelu_rejects_bad_switches_and_fp8_linears():
    model = tiny_model()
    with pytest.raises(ValueError, match="set_fused_gelu expects True or False, got 1"):
        model.set_fused_gelu(1)
    model.set_fused_gelu(True)
    with pytest.raises(ValueError, match=r"the fused GELU is on: call set_fused_gelu\(False\) before"):
        model.use_fp8_linears()
    assert not model.fp8_linears
    model.set_fused_gelu(False)
    model.use_fp8_linears()
    with pytest.raises(ValueError, match="the fused GELU needs the float fc1 weights"):
        model.set_fused_gelu(True)
    assert not model.spatial_blocks[0].mlp.fused_gelu


def test_one_pass_head_norms_compile_the_blocks_under_the_heuristic_and_keep_the_result():
    # The heuristic has to be in place when the compiled blocks compile, on their first call inside `_blocks`.
    from torch._inductor.virtualized import V

    from opensora_gym.models.inductor_heuristics import OnePassShortRows

    x, timestep, actions, x_mask = tiny_inputs()
    model = tiny_model()
    with torch.no_grad():
        plain = model(x, timestep, actions, x_mask, 32, 32)
    seen = []
    model.spatial_blocks[0].register_forward_pre_hook(lambda module, args: seen.append(type(V.choices)))
    with pytest.raises(ValueError, match="one_pass_head_norms must be True or False, got 'yes'"):
        model.compile_blocks(one_pass_head_norms="yes")
    assert not model.one_pass_head_norms
    model.compile_blocks(one_pass_head_norms=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(model(x, timestep, actions, x_mask, 32, 32), plain, rtol=0, atol=0)
    model.compile_blocks(backend="eager")
    with torch.no_grad():
        model(x, timestep, actions, x_mask, 32, 32)
    assert seen[0] is OnePassShortRows and seen[1] is not OnePassShortRows


@pytest.mark.parametrize(("row", "one_pass"), [(72, True), (128, True), (129, False), (1152, False)])
def test_one_pass_short_rows_makes_rows_up_to_128_persistent(monkeypatch, row, one_pass):
    # Where inductor's own rule says no (it says yes to inner rows up to 1024 and any row up to 64), rows of at most
    # 128 elements (a head's channels) become one-pass reductions; wider ones (the 1152-wide layer norms) do not.
    from types import SimpleNamespace

    from torch._inductor.choices import InductorChoices
    from torch._inductor.sizevars import SizeVarAllocator
    from torch._inductor.virtualized import V

    from opensora_gym.models.inductor_heuristics import OnePassShortRows

    monkeypatch.setattr(InductorChoices, "should_use_persistent_reduction", staticmethod(lambda *args: False))
    features = SimpleNamespace(reduction_numel=row)
    with V.set_graph_handler(SimpleNamespace(sizevars=SizeVarAllocator())):
        assert OnePassShortRows.should_use_persistent_reduction(features, False) is one_pass
        assert OnePassShortRows.should_use_persistent_reduction(features, True) is False  # cooperative: inductor's
