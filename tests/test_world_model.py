import json
import shutil
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from einops import rearrange

from opensora_gym import checkpoint as checkpoint_module
from opensora_gym.checkpoint import WEIGHTS_INDEX_NAME, CheckpointLayout, locate
from opensora_gym.data import TrajectoryDataset
from opensora_gym.presets import TinyCheckpointSpec, make_tiny_checkpoint
from opensora_gym.world_model import WorldModel, frames_from_uint8, frames_to_uint8
from trainers.cli import main


def start_images(checkpoint, n):
    dataset = TrajectoryDataset(CheckpointLayout.resolve(checkpoint).dataset)
    return torch.from_numpy(np.stack([dataset.start_frame(i % len(dataset))[0] for i in range(n)]))


def generators(seed, n):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_tiny_checkpoint_has_the_released_layout(checkpoint):
    layout = CheckpointLayout.resolve(checkpoint)
    index = json.loads((layout.root / WEIGHTS_INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (layout.vae / "config.json").is_file()
    assert (layout.vae / "diffusion_pytorch_model.safetensors").is_file()
    assert layout.reward_weights.is_file() and layout.statistics.is_file()
    dataset = TrajectoryDataset(layout.dataset)
    assert len(dataset) == TinyCheckpointSpec().num_trajectories
    episode = dataset.episode(0)
    assert episode.images.dtype == np.uint8 and episode.images.shape[1:] == (64, 64, 3)
    assert episode.actions.shape == (TinyCheckpointSpec().trajectory_length, 7)


def test_embedded_names_resolve_to_the_package_assets(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "EMBEDDED_DIR", tmp_path)
    shutil.copytree(checkpoint, tmp_path / "demo")
    assert CheckpointLayout.resolve("embedded:demo").root == tmp_path / "demo"
    assert locate("embedded:demo/vae") == tmp_path / "demo" / "vae"
    assert locate("runs/demo") == Path("runs/demo")  # plain paths stay paths
    with pytest.raises(
        FileNotFoundError, match=r"no embedded model 'embedded:other'; the package ships \['embedded:demo'\]"
    ):
        locate("embedded:other")


def test_tiny_checkpoint_is_deterministic_and_leaves_global_rng_alone(tmp_path):
    state = torch.random.get_rng_state()
    a = make_tiny_checkpoint(tmp_path / "a", seed=3)
    b = make_tiny_checkpoint(tmp_path / "b", seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    for name in ("model-00001.safetensors", "resnet_rm.pth", "dataset/traj0.npy", "dataset_statistics.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_chunk_step_equals_the_components(checkpoint, world_model):
    n = 2
    latents = world_model.encode_start(start_images(checkpoint, n), generator=generators(0, n))
    assert latents.shape == (n, 4, 4, 8, 8)
    actions = torch.rand(n, 8, 7, generator=torch.Generator().manual_seed(1)) * 2 - 1
    prediction = world_model.predict_chunk(latents, actions, generator=generators(5, n))

    normalized = world_model.statistics.normalize(actions)
    sampled = world_model.sampler.sample(
        world_model.dit, latents, normalized, height=64, width=64, generator=generators(5, n)
    )
    assert torch.equal(prediction.latents, sampled[:, :, 4:])
    decoded = world_model.vae.decode(sampled[:, :, 4:])
    assert torch.equal(prediction.frames, frames_to_uint8(decoded))
    prob = world_model.reward_model(rearrange(decoded, "n c t h w -> (n t) c h w"))
    torch.testing.assert_close(prediction.success_prob, prob.reshape(n, 8))
    assert prediction.frames.shape == (n, 8, 64, 64, 3)


def test_sub_env_results_do_not_depend_on_the_batch(checkpoint, world_model):
    images = start_images(checkpoint, 3)
    actions = torch.rand(3, 8, 7, generator=torch.Generator().manual_seed(2)) * 2 - 1
    batch_latents = world_model.encode_start(images, generator=generators(0, 3))
    batch = world_model.predict_chunk(batch_latents, actions, generator=generators(10, 3))
    alone_latents = world_model.encode_start(images[1:2], generator=generators(1, 1))
    alone = world_model.predict_chunk(alone_latents, actions[1:2], generator=generators(11, 1))
    torch.testing.assert_close(batch.latents[1:2], alone.latents, rtol=1e-4, atol=1e-4)


def test_a_start_frame_is_encoded_as_the_reference_repeats_it(checkpoint, world_model):
    images = start_images(checkpoint, 2)
    latents = world_model.encode_start(images, generator=generators(0, 2))
    # The reference: the normalized frame repeated over the condition frames, each copy sampled from the posterior.
    repeated = frames_from_uint8(images, world_model.image_size)[:, :, None].expand(-1, -1, 4, -1, -1)
    torch.testing.assert_close(latents, world_model.vae.encode(repeated, generator=generators(0, 2)), rtol=0, atol=0)
    window = images[:, None].expand(-1, 4, -1, -1, -1)  # the same frame given as 4 condition frames
    torch.testing.assert_close(world_model.encode_start(window, generator=generators(0, 2)), latents, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"expected 4 condition frames \[N, Tc, H, W, 3\], got shape \(2, 3,"):
        world_model.encode_start(window[:, :3])


def test_frame_conversions_round_trip():
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    x = frames_from_uint8(images, 16)
    assert x.min() >= -1 and x.max() <= 1
    back = frames_to_uint8(rearrange(x, "n c h w -> n c 1 h w"))[:, 0]
    assert (back.int() - images.int()).abs().max() <= 1


@pytest.mark.parametrize("part", ["vae", "resnet_rm.pth", "dataset", "dataset_statistics.json"])
def test_missing_part_is_named(checkpoint, tmp_path, part):
    copy = shutil.copytree(checkpoint, tmp_path / "ckpt")
    target = copy / part
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=f"has no {part}"):
        WorldModel.from_pretrained(copy)


def test_rollout_command_writes_a_video(tmp_path, capsys):
    main(["rollout", "--out", str(tmp_path), "--num-envs", "2", "--chunks", "2", "--num-sampling-steps", "2"])
    printed = capsys.readouterr().out
    assert "frames/s" in printed
    frames = imageio.mimread(tmp_path / "rollout.mp4")
    assert len(frames) == 16
    assert frames[0].shape == (64, 128, 3)
