import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opensora_gym.models.reward import REWARD_WEIGHTS_NAME, ResNetRewardModel
from opensora_gym.safe_loading import UnsafeFileError

TINY_WIDTHS = (4, 8, 8, 16)


def _tiny_model(seed: int = 0) -> ResNetRewardModel:
    """A tiny model with random weights and non-trivial BatchNorm statistics."""
    generator = torch.Generator().manual_seed(seed)
    model = ResNetRewardModel(widths=TINY_WIDTHS)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
    return model.eval()


def _frames(batch: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2.4 - 1.2  # [N, 3, H, W] in [-1.2, 1.2]


@pytest.mark.reference
def test_parity_with_reference(reference_dir: Path, tmp_path: Path) -> None:
    weights = load_file(reference_dir / "reward_model_weights_fp16.safetensors")
    state_dict = {key: value.float() if value.is_floating_point() else value for key, value in weights.items()}
    torch.save(state_dict, tmp_path / REWARD_WEIGHTS_NAME)
    case = load_file(reference_dir / "reward_model_case.safetensors")

    model = ResNetRewardModel.from_pretrained(tmp_path)
    prob, reward = model.predict(case["frames"])

    assert prob.dtype == torch.float32
    torch.testing.assert_close(prob, case["prob"][:, 0], rtol=0.0, atol=1e-4)
    assert torch.equal(reward, case["reward"][:, 0])


@pytest.mark.reference
def test_full_size_layout_matches_manifest(reference_dir: Path) -> None:
    manifest = json.loads((reference_dir / "manifest_resnet_rm.json").read_text())
    with torch.device("meta"):
        model = ResNetRewardModel()

    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}

    assert sorted(set(shapes) - set(manifest)) == []
    assert sorted(set(manifest) - set(shapes)) == []
    assert {key: shapes[key] for key in manifest} == manifest


@pytest.mark.reference
def test_widths_are_inferred_from_reference_shapes(reference_dir: Path) -> None:
    manifest = json.loads((reference_dir / "manifest_resnet_rm.json").read_text())
    with torch.device("meta"):
        state_dict = {key: torch.empty(shape) for key, shape in manifest.items()}
        model = ResNetRewardModel.from_state_dict(state_dict)

    assert model.widths == tuple(manifest[f"net.{stage}.0.conv1.weight"][0] for stage in range(1, 5))


@pytest.mark.parametrize("wrap", [False, True])
def test_save_load_round_trip(tmp_path: Path, wrap: bool) -> None:
    model = _tiny_model()
    frames = _frames()
    saved = model.save_pretrained(tmp_path / "rm")
    assert saved == tmp_path / "rm" / REWARD_WEIGHTS_NAME
    if wrap:
        # Training scripts save {"model_state_dict": ..., "optimizer_state_dict": ..., "epoch": ...}.
        torch.save({"model_state_dict": torch.load(saved, weights_only=True), "epoch": 3}, saved)

    loaded = ResNetRewardModel.from_pretrained(tmp_path / "rm")

    assert loaded.widths == TINY_WIDTHS
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.testing.assert_close(loaded.predict(frames)[0], model.predict(frames)[0], rtol=0.0, atol=0.0)


def test_from_pretrained_accepts_the_file_path(tmp_path: Path) -> None:
    model = _tiny_model()
    path = model.save_pretrained(tmp_path)

    loaded = ResNetRewardModel.from_pretrained(path)

    assert torch.equal(loaded.predict(_frames())[0], model.predict(_frames())[0])


def test_predict_rounds_prob_and_clamps_input() -> None:
    model = _tiny_model()
    frames = _frames(batch=6)

    prob, reward = model.predict(frames)

    assert prob.shape == reward.shape == (6,)
    assert torch.equal(reward, torch.round(prob))
    assert set(reward.tolist()) <= {0.0, 1.0}
    clamped_prob, _ = model.predict(frames.clamp(-1.0, 1.0))
    assert torch.equal(prob, clamped_prob)
    assert not torch.equal(model.predict(frames * 0.5)[0], prob)


def test_predict_uses_running_statistics_and_keeps_mode() -> None:
    model = _tiny_model()
    frames = _frames(batch=4)
    eval_prob, _ = model.predict(frames)
    model.train()

    train_mode_prob, _ = model.predict(frames)

    assert model.training
    assert torch.equal(train_mode_prob, eval_prob)
    with torch.no_grad():
        batch_stats_prob = model(frames)
    assert not torch.allclose(batch_stats_prob, eval_prob)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_input(dtype: torch.dtype) -> None:
    model = _tiny_model()
    frames = _frames()

    prob, reward = model.predict(frames.to(dtype))

    assert prob.dtype == reward.dtype == torch.float32
    # The only difference is the rounding of the input to `dtype`; the network runs in float32.
    expected, _ = model.predict(frames.to(dtype).to(torch.float32))
    assert torch.equal(prob, expected)


def test_forward_is_differentiable() -> None:
    model = _tiny_model()
    frames = _frames(batch=2).requires_grad_(True)

    model(frames).sum().backward()

    assert frames.grad is not None
    assert model.net[7].weight.grad is not None


def test_bad_frames_are_rejected() -> None:
    model = _tiny_model()
    with pytest.raises(ValueError, match=re.escape("[N, 3, H, W], got (3, 32, 32)")):
        model.predict(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="float tensor"):
        model.predict(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_bad_widths_are_rejected() -> None:
    with pytest.raises(ValueError, match="widths must be 4 positive ints"):
        ResNetRewardModel(widths=(4, 8, 16))
    with pytest.raises(ValueError, match="widths must be 4 positive ints"):
        ResNetRewardModel(widths=(4, 0, 8, 16))


def test_mismatched_keys_and_shapes_are_named(tmp_path: Path) -> None:
    state_dict = _tiny_model().state_dict()
    del state_dict["net.2.0.conv3.bias"]
    state_dict["net.9.weight"] = torch.zeros(1)
    state_dict["net.7.weight"] = torch.zeros(1, 17)
    torch.save(state_dict, tmp_path / REWARD_WEIGHTS_NAME)

    with pytest.raises(ValueError) as info:
        ResNetRewardModel.from_pretrained(tmp_path)

    message = str(info.value)
    assert str(tmp_path / REWARD_WEIGHTS_NAME) in message
    assert "missing (1): net.2.0.conv3.bias" in message
    assert "unexpected (1): net.9.weight" in message
    assert "net.7.weight: checkpoint (1, 17), model (1, 16)" in message


def test_checkpoint_of_another_architecture_is_named() -> None:
    with pytest.raises(ValueError, match=r"no net\.1\.0\.conv1\.weight.*got keys starting \['fc\.weight'\]"):
        ResNetRewardModel.from_state_dict({"fc.weight": torch.zeros(1, 4)})


def test_missing_checkpoint_names_file_and_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        ResNetRewardModel.from_pretrained(tmp_path)

    assert str(tmp_path / REWARD_WEIGHTS_NAME) in str(info.value)
    assert "RLinf-OpenSora layout" in str(info.value)


def test_malicious_checkpoint_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class TouchMarker:
        def __reduce__(self):
            return (Path.touch, (marker,))

    state_dict = _tiny_model().state_dict()
    state_dict["payload"] = TouchMarker()
    torch.save(state_dict, tmp_path / REWARD_WEIGHTS_NAME)

    with pytest.raises(UnsafeFileError, match=re.escape(str(tmp_path / REWARD_WEIGHTS_NAME))):
        ResNetRewardModel.from_pretrained(tmp_path)
    assert not marker.exists()
