"""World-model, VAE and reward-model training: the reference loss by hand, learning, exact resume, the report."""

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from opensora_gym.data import ActionStatistics, TrajectoryDataset, save_trajectory
from opensora_gym.env import OpenSoraLiberoEnv
from opensora_gym.models.reward import ResNetRewardModel
from opensora_gym.models.stdit3 import STDiT3, STDiT3Config
from opensora_gym.models.vae import SDXL_SCALING_FACTOR, VideoVAE
from opensora_gym.presets import TinyCheckpointSpec, make_tiny_checkpoint, tiny_vae_config
from opensora_gym.rectified_flow import RectifiedFlowConfig, RectifiedFlowSampler
from opensora_gym.training.clips import LatentClips, encode_latents
from opensora_gym.training.rectified_flow import rectified_flow_loss
from opensora_gym.training.reward_model import (
    RewardTrainingConfig,
    classification_report,
    load_labelled_frames,
    train_reward_model,
)
from opensora_gym.training.vae import VAETrainingConfig, calibrate_latent_scale, train_vae
from opensora_gym.training.world_model import WorldModelTrainingConfig, own_condition_frames, train_world_model
from opensora_gym.world_model import frames_from_uint8
from trainers.cli import main as cli_main

TINY_DIT = STDiT3Config(depth=1, hidden_size=32, num_heads=2)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A tiny released-layout folder: 3 episodes of 16 frames at 32 px whose square moves with the actions."""
    spec = TinyCheckpointSpec(image_size=32, num_trajectories=3, trajectory_length=16, dit=TINY_DIT)
    return make_tiny_checkpoint(tmp_path_factory.mktemp("recorded"), spec)


def tiny_config(recorded, out, **overrides) -> WorldModelTrainingConfig:
    settings = {
        "dataset": recorded / "dataset",
        "out": out,
        "vae": recorded / "vae",
        "reward_model": recorded,
        "dit": TINY_DIT,
        "image_size": 32,
        "batch_size": 8,
        "max_steps": 40,
        "lr": 1e-3,
        "warmup_steps": 2,
        "ema_decay": 0.9,
        "mixed_precision": "no",
        "log_every": 5,
        "preview_every": 0,
        "checkpoint_every": 100,
    }
    return WorldModelTrainingConfig(**{**settings, **overrides})


def test_loss_matches_hand_computation_of_the_reference_loss():
    torch.manual_seed(0)
    model = STDiT3(TINY_DIT).eval()
    B, C, F, h, w = 2, 4, 12, 4, 4
    x0, noise = torch.randn(B, C, F, h, w), torch.randn(B, C, F, h, w)
    actions = torch.rand(B, 8, 7) * 2 - 1
    t = torch.tensor([700.0, 120.0])

    loss = rectified_flow_loss(model, x0, actions, noise, t, height=32, width=32)

    expected = []
    for b in range(B):
        x_in = x0[b].clone()
        for f in range(F):
            s = 15.0 / 1000 if f < 4 else float(t[b]) / 1000  # condition frames at t0 = 15, the others at t
            x_in[:, f] = (1 - s) * x0[b, :, f] + s * noise[b, :, f]
        x_mask = torch.tensor([[False] * 4 + [True] * 8])
        velocity = model(x_in[None], t[b : b + 1], actions[b : b + 1], x_mask, 32, 32)[0, :C]
        target = x0[b] - noise[b]
        frame_means = [((velocity[:, f] - target[:, f]) ** 2).mean() for f in range(4, F)]  # generated only
        expected.append(sum(frame_means) / len(frame_means))
    torch.testing.assert_close(loss, torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_condition_noise_augmentation_noises_the_condition_frames_and_tells_the_model():
    torch.manual_seed(0)
    model = STDiT3(TINY_DIT).eval()
    B, C, F, h, w = 2, 4, 12, 4, 4
    x0, noise = torch.randn(B, C, F, h, w), torch.randn(B, C, F, h, w)
    actions = torch.rand(B, 8, 7) * 2 - 1
    t, condition_t = torch.tensor([700.0, 120.0]), torch.tensor([15.0, 300.0])

    assert torch.equal(
        rectified_flow_loss(model, x0, actions, noise, t, 32, 32, condition_t=torch.full((B,), 15.0)),
        rectified_flow_loss(model, x0, actions, noise, t, 32, 32),
    )
    loss = rectified_flow_loss(model, x0, actions, noise, t, 32, 32, condition_t=condition_t)
    b, s = 1, 0.3  # clip 1: condition frames at 300 / 1000, the model told 300
    x_in = torch.cat([(1 - s) * x0[b, :, :4] + s * noise[b, :, :4], 0.88 * x0[b, :, 4:] + 0.12 * noise[b, :, 4:]], 1)
    x_mask = torch.tensor([[False] * 4 + [True] * 8])
    velocity = model(x_in[None], t[1:], actions[1:], x_mask, 32, 32, condition_t[1:])[0, :C, 4:]
    torch.testing.assert_close(loss[1], ((velocity - (x0[b] - noise[b])[:, 4:]) ** 2).mean(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss[1], rectified_flow_loss(model, x0, actions, noise, t, 32, 32)[1])


@pytest.mark.parametrize("level", [10.0, 1001.0])
def test_condition_timestep_max_outside_its_range_is_rejected(recorded, tmp_path, level):
    with pytest.raises(ValueError, match=rf"condition_timestep_max must be in \[15.0, 1000\], got {level}"):
        tiny_config(recorded, tmp_path / "run", condition_timestep_max=level)


@pytest.mark.parametrize("option", [{"condition_timestep_max": 400.0}, {"action_dropout": 0.5}])
def test_training_options_change_the_run_and_resume_exactly(recorded, tmp_path, option):
    # Condition-noise augmentation and action dropout draw from the run's generator: resumed runs must replay them.
    whole = train_world_model(tiny_config(recorded, tmp_path / "whole", max_steps=5, **option))
    plain = train_world_model(tiny_config(recorded, tmp_path / "plain", max_steps=5))
    train_world_model(tiny_config(recorded, tmp_path / "split", max_steps=3, **option))
    resumed = train_world_model(tiny_config(recorded, tmp_path / "split", max_steps=5, **option))
    assert resumed.losses == whole.losses[3:]
    assert whole.losses != plain.losses
    assert all(math.isfinite(loss) for loss in whole.losses)


@pytest.fixture(scope="module")
def longer(tmp_path_factory):
    """As `recorded`, with 2 episodes of 20 frames: clips at starts 8-11 have a whole chunk before them."""
    spec = TinyCheckpointSpec(image_size=32, num_trajectories=2, trajectory_length=20, dit=TINY_DIT)
    return make_tiny_checkpoint(tmp_path_factory.mktemp("longer"), spec)


def test_own_condition_is_the_models_sample_of_the_chunk_before(longer, tmp_path):
    clips = LatentClips.load(
        encode_latents(TrajectoryDataset(longer / "dataset"), VideoVAE.from_pretrained(longer / "vae"), 32,
                       tmp_path / "latents.safetensors")
    )  # fmt: skip
    batch = torch.tensor([3, 8, 11, 20])  # episode 0 starts 3, 8, 11; episode 1 (clips 12-23) start 8
    has_previous, previous = clips.previous_chunk(batch)
    assert has_previous.tolist() == [False, True, True, True]
    assert clips.frame_indices(previous[1:])[:, -1].tolist() == clips.frame_indices(batch[1:])[:, 3].tolist()

    statistics = ActionStatistics.from_json(longer)
    means, _ = clips.batch(batch, statistics, generator=None)
    x0, _ = clips.batch(batch, statistics, generator=torch.Generator().manual_seed(1))  # posterior samples
    before = x0.clone()
    ema = STDiT3.from_pretrained(longer).eval()
    sampler = RectifiedFlowSampler(RectifiedFlowConfig(num_sampling_steps=2, action_guidance=2.0))
    use = torch.tensor([True, True, False, True])
    generator = torch.Generator().manual_seed(5)
    again = torch.Generator().manual_seed(5)
    replaced, mse = own_condition_frames(ema, clips, batch, x0, use, statistics, sampler, 32, generator, bf16=False)

    # The same draws by hand: the earlier clips' posterior sample, the sampler's seed, a rollout's chunk.
    earlier, actions = clips.batch(previous[[1, 3]], statistics, again)
    seed = int(torch.randint(2**62, (1,), generator=again))
    sampled = sampler.sample(ema, earlier[:, :, :4], actions, height=32, width=32,
                             generator=torch.Generator().manual_seed(seed))  # fmt: skip
    torch.testing.assert_close(replaced[[1, 3], :, :4], sampled[:, :, -4:])
    assert torch.equal(replaced[[0, 2]], x0[[0, 2]]), "no chunk before it, or not drawn: recorded frames"
    assert torch.equal(replaced[:, :, 4:], x0[:, :, 4:]), "the targets stay the recorded frames"
    # how far the model's own frames are from the recorded frames' posterior means
    assert mse == pytest.approx(float((sampled[:, :, -4:] - means[[1, 3], :, :4]).pow(2).mean()), rel=1e-5)
    assert not torch.equal(replaced, x0) and torch.equal(x0, before), "x0 itself is not changed"

    none, mse = own_condition_frames(ema, clips, batch, x0, ~has_previous, statistics, sampler, 32, generator, False)
    assert none is x0 and mse is None


def test_own_condition_changes_the_run_resumes_exactly_and_is_logged(longer, tmp_path):
    option = {"own_condition": 0.5, "own_condition_guidance": 2.0}
    whole = train_world_model(tiny_config(longer, tmp_path / "whole", max_steps=5, **option))
    plain = train_world_model(tiny_config(longer, tmp_path / "plain", max_steps=5))
    train_world_model(tiny_config(longer, tmp_path / "split", max_steps=3, **option))
    resumed = train_world_model(tiny_config(longer, tmp_path / "split", max_steps=5, **option))
    assert resumed.losses == whole.losses[3:]
    assert whole.losses != plain.losses and all(math.isfinite(loss) for loss in whole.losses)
    events = EventAccumulator(str(tmp_path / "whole" / "tensorboard")).Reload()
    mse = [event.value for event in events.Scalars("own_condition/condition_mse")]
    assert mse and all(value > 0 and math.isfinite(value) for value in mse)

    for name, value in (("own_condition", 1.5), ("own_condition_guidance", -1.0)):
        with pytest.raises(ValueError, match=rf"{name} must be .*, got {value}"):
            tiny_config(longer, tmp_path / "bad", **{name: value})


def test_action_dropout_trains_clips_without_their_actions(recorded, tmp_path):
    torch.manual_seed(0)
    model = STDiT3(TINY_DIT).eval()
    x0, noise = torch.randn(2, 4, 12, 4, 4), torch.randn(2, 4, 12, 4, 4)
    actions, other, t = torch.rand(2, 8, 7), torch.rand(2, 8, 7), torch.tensor([700.0, 120.0])
    drop = torch.tensor([False, True])
    loss = rectified_flow_loss(model, x0, actions, noise, t, 32, 32, drop_actions=drop)
    assert torch.equal(loss[0], rectified_flow_loss(model, x0, actions, noise, t, 32, 32)[0])
    assert torch.equal(loss[1], rectified_flow_loss(model, x0, other, noise, t, 32, 32, drop_actions=drop)[1])

    with pytest.raises(ValueError, match=r"action_dropout must be in \[0, 1\), got 1.0"):
        tiny_config(recorded, tmp_path / "run", action_dropout=1.0)


def test_clips_pair_each_generated_frame_with_the_action_that_produced_it(recorded, tmp_path):
    vae = VideoVAE.from_pretrained(recorded / "vae")
    dataset = TrajectoryDataset(recorded / "dataset")
    clips = LatentClips.load(encode_latents(dataset, vae, 32, tmp_path / "latents.safetensors"))
    assert len(clips) == 3 * (16 - 8)
    # Clip 1 of episode 0: condition frames 0, 0, 0, 1 (frame 0 repeated), generated frames 2..9.
    assert clips.frame_indices(torch.tensor([1])).tolist() == [[0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]
    statistics = ActionStatistics.from_json(recorded)
    latents, actions = clips.batch(torch.tensor([1]), statistics, generator=None)
    assert latents.shape == (1, 4, 12, 4, 4)
    episode = dataset.episode(0)
    np.testing.assert_allclose(actions[0].numpy(), statistics.normalize(episode.actions[1:9]), rtol=1e-6)
    assert clips.mean.dtype == torch.float16


def test_world_model_loss_falls_and_the_folder_loads_in_the_env(recorded, tmp_path):
    result = train_world_model(tiny_config(recorded, tmp_path / "run", max_steps=20, lr=2e-3, preview_every=10))
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < 0.85 * first, (first, last)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm", "preview/latent_mse"} <= set(scalars)
    assert any(tag.startswith("loss_by_t/") for tag in scalars)
    assert events.Tags()["images"] == ["preview/real_top_predicted_below"]

    env = OpenSoraLiberoEnv(num_envs=2, checkpoint=result.checkpoint, image_size=32, num_sampling_steps=2)
    env.reset(seed=0)
    _, reward, _, _, _ = env.step(env.action_space.sample())
    assert reward.shape == (2,)
    env.close()
    ema = load_file(next(result.checkpoint.glob("model-*.safetensors")))
    assert all(torch.isfinite(value).all() for value in ema.values())


def test_resume_reproduces_the_uninterrupted_run(recorded, tmp_path):
    whole = train_world_model(tiny_config(recorded, tmp_path / "whole", max_steps=5))
    train_world_model(tiny_config(recorded, tmp_path / "split", max_steps=3))
    resumed = train_world_model(tiny_config(recorded, tmp_path / "split", max_steps=5))

    assert resumed.losses == whole.losses[3:]
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(whole.last_checkpoint / name)
        b = load_file(resumed.last_checkpoint / name)
        assert all(torch.equal(a[key], b[key]) for key in a), name


def test_fine_tuning_takes_the_init_classifier_only_if_there_is_one(recorded, tmp_path):
    init = tmp_path / "init"
    shutil.copytree(recorded, init, ignore=shutil.ignore_patterns("dataset", "resnet_rm.pth"))
    tuned = tiny_config(recorded, tmp_path / "tuned", dit=None, init_checkpoint=init, reward_model=None, max_steps=1)
    result = train_world_model(tuned)
    assert not (result.checkpoint / "resnet_rm.pth").exists(), "no classifier to copy: the export has none"

    shutil.copy2(recorded / "resnet_rm.pth", init / "resnet_rm.pth")
    result = train_world_model(replace(tuned, out=tmp_path / "with_rm"))
    assert (result.checkpoint / "resnet_rm.pth").is_file(), "the init checkpoint's classifier goes along"

    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match=r"broken\.pth is not a readable torch checkpoint"):
        train_world_model(replace(tuned, out=tmp_path / "bad", reward_model=broken))
    assert not (tmp_path / "bad").exists(), "a wrong classifier fails before the training starts"


def test_cli_trains_a_world_model(recorded, longer, tmp_path):
    cli_main(
        ["train-world-model", "--dataset", str(longer / "dataset"), "--vae", str(longer / "vae"),
         "--out", str(tmp_path / "cli"), "--image-size", "32", "--preset", "tiny", "--depth", "1",
         "--hidden-size", "32", "--num-heads", "2", "--patch-size", "1", "--max-steps", "2", "--batch-size", "8",
         "--mixed-precision", "no", "--preview-every", "0", "--own-condition", "1", "--own-condition-guidance", "2",
         "--log-every", "1"]
    )  # fmt: skip
    events = EventAccumulator(str(tmp_path / "cli" / "tensorboard")).Reload()
    assert "own_condition/condition_mse" in events.Tags()["scalars"], "--own-condition reaches the training"
    exported = tmp_path / "cli" / "world_model"
    assert json.loads((exported / "config.json").read_text())["patch_size"] == [1, 1, 1]
    assert (exported / "dataset_statistics.json").is_file()
    dit = STDiT3.from_pretrained(exported)
    assert dit.x_embedder.proj.kernel_size == (1, 1, 1), "one token per latent pixel"

    with pytest.raises(SystemExit, match=r"expected no size options, got \['depth', 'patch_size'\]"):
        cli_main(
            ["train-world-model", "--dataset", str(recorded / "dataset"), "--init-checkpoint", str(exported),
             "--out", str(tmp_path / "tuned"), "--depth", "2", "--patch-size", "2"]
        )  # fmt: skip
    assert not (tmp_path / "tuned").exists(), "refused before anything is written"


def test_vae_training_lowers_the_loss_and_writes_a_calibrated_vae(recorded, tmp_path):
    config = VAETrainingConfig(
        dataset=recorded / "dataset", out=tmp_path, image_size=32, block_out_channels=(8, 8, 8, 8),
        norm_num_groups=4, batch_size=4, max_steps=12, lr=3e-3, calibration_frames=16,
    )  # fmt: skip
    result = train_vae(config)
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    vae = VideoVAE.from_pretrained(result.folder)
    frames = torch.from_numpy(TrajectoryDataset(recorded / "dataset").episode(0).images)  # [16, 32, 32, 3]
    latents = vae.encode(frames_from_uint8(frames, 32)[:, :, None], sample=False)  # [16, 4, 1, 4, 4], scaled
    assert 0.5 < float(latents.detach().std()) < 2.0


def test_latent_calibration_keeps_reconstructions():
    torch.manual_seed(0)
    ae = VideoVAE.from_config(tiny_vae_config()).autoencoder.eval()
    frames = torch.rand(6, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        before = ae.decode(ae.encode(frames).latent_dist.mean).sample
        k = calibrate_latent_scale(ae, frames)
        scaled = ae.encode(frames).latent_dist.mean * SDXL_SCALING_FACTOR
        after = ae.decode(ae.encode(frames).latent_dist.mean).sample
    assert k != pytest.approx(1.0)
    assert float(scaled.std()) == pytest.approx(1.0, rel=1e-4)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_report_on_a_known_case():
    prob = torch.tensor([0.9, 0.8, 0.3, 0.6, 0.1, 0.5])
    labels = torch.tensor([1, 1, 0, 0, 0, 1])
    episode_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    report = classification_report(prob, labels, episode_ids, ["a", "b"], bins=10)
    # round(): 1, 1, 0, 1, 0, 0 (0.5 rounds to 0, as in the env) -> correct: yes, yes, yes, no, yes, no.
    assert report.accuracy == pytest.approx(4 / 6)
    # One frame per bin: ECE = mean |label - prob| = (0.1 + 0.2 + 0.3 + 0.6 + 0.1 + 0.5) / 6.
    assert report.ece == pytest.approx(1.8 / 6)
    assert report.false_success_rate == pytest.approx(1 / 3)  # 0.6 of the 3 non-success frames
    assert report.missed_success_rate == pytest.approx(1 / 3)  # 0.5 of the 3 success frames
    a, b = report.episodes
    assert (a.false_success_rate, a.missed_success_rate, a.success_frames) == (0.0, 0.0, 2)
    assert (b.false_success_rate, b.missed_success_rate, b.success_frames) == (0.5, 1.0, 1)
    empty = classification_report(torch.tensor([0.2]), torch.tensor([0]), torch.tensor([0]), ["c"])
    assert math.isnan(empty.missed_success_rate)
    saved = json.loads(empty.to_json())  # valid JSON: the undefined rates are null, the defined ones kept
    assert saved["missed_success_rate"] is None and saved["episodes"][0]["missed_success_rate"] is None
    assert saved["false_success_rate"] == 0.0 and json.loads(report.to_json())["accuracy"] == pytest.approx(4 / 6)


def test_reward_training_separates_two_classes(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "dataset").mkdir()
    for episode in range(6):
        frames = []
        for t in range(12):
            success = t >= 6  # the bowl is on the plate from frame 6 on: a bright square in the corner
            image = rng.integers(0, 60, size=(32, 32, 3), dtype=np.uint8)
            if success:
                image[:12, :12] = 230
            frames.append({"image": image, "delta_action": np.zeros(7, np.float32), "instruction": "x",
                           "success": success})  # fmt: skip
        save_trajectory(tmp_path / "dataset" / f"traj{episode}.npy", frames)
    config = RewardTrainingConfig(
        dataset=tmp_path / "dataset", out=tmp_path / "rm", image_size=32, widths=(4, 8, 8, 16),
        held_out_fraction=0.34, batch_size=16, max_steps=40, lr=3e-3,
    )  # fmt: skip
    report, path = train_reward_model(config)
    assert report.accuracy >= 0.95, report.table()
    assert report.frames == 2 * 12  # two held-out episodes, whole
    assert report.false_success_rate <= 0.05 and report.missed_success_rate <= 0.05
    assert isinstance(ResNetRewardModel.from_pretrained(path), ResNetRewardModel)
    assert json.loads((tmp_path / "rm" / "reward_report.json").read_text())["frames"] == 24


def test_success_window_labels_the_frames_before_each_success(tmp_path):
    # LIBERO's recordings end at their first success frame: one flagged frame per successful episode.
    flags = {"a": [0, 0, 0, 0, 0, 1], "b": [0, 0, 0, 0], "c": [1, 0, 0, 1, 0, 0]}
    (tmp_path / "dataset").mkdir()
    for name, episode in flags.items():
        frames = [{"image": np.full((8, 8, 3), t, np.uint8), "delta_action": np.zeros(7, np.float32),
                   "instruction": "x", "success": bool(f)} for t, f in enumerate(episode)]  # fmt: skip
        save_trajectory(tmp_path / "dataset" / f"traj_{name}.npy", frames)
    dataset = TrajectoryDataset(tmp_path / "dataset")
    _, as_recorded, _ = load_labelled_frames(dataset, "success")
    images, windowed, episodes = load_labelled_frames(dataset, "success", success_window=3)
    assert as_recorded.astype(int).tolist() == flags["a"] + flags["b"] + flags["c"]
    # frame t is a success when one of the flags t, t + 1, t + 2 of its own episode is (never across episodes)
    assert windowed.astype(int).tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0]  # a | b | c
    assert episodes.tolist() == [0] * 6 + [1] * 4 + [2] * 6 and images.shape == (16, 8, 8, 3)
    with pytest.raises(ValueError, match="success_window must be a positive integer, got 0"):
        RewardTrainingConfig(dataset=tmp_path / "dataset", out=tmp_path / "rm", success_window=0)


def test_statistics_come_from_beside_the_dataset_else_from_its_actions(recorded, tmp_path):
    from opensora_gym.data import load_trajectory
    from opensora_gym.training.world_model import _statistics

    def statistics_of(dataset):
        config = tiny_config(recorded, tmp_path / "run", dataset=dataset)
        vae = VideoVAE.from_pretrained(recorded / "vae")
        latents = encode_latents(TrajectoryDataset(dataset), vae, 32, tmp_path / f"{dataset.parent.name}.safetensors")
        return _statistics(config, LatentClips.load(latents))

    # What `collect` and `convert` write beside the dataset folder is used as it is.
    np.testing.assert_array_equal(statistics_of(recorded / "dataset").q01, ActionStatistics.from_json(recorded).q01)
    # A dataset alone, whose actions never vary dimension 3 (a scripted expert that never rotates).
    alone = tmp_path / "alone" / "dataset"
    alone.mkdir(parents=True)
    for path in sorted((recorded / "dataset").glob("traj*.npy")):
        frames = load_trajectory(path)
        for frame in frames:
            frame["delta_action"] = np.asarray(frame["delta_action"], dtype=np.float32).copy()
            frame["delta_action"][3] = 0.0
        save_trajectory(alone / path.name, frames)
    statistics = statistics_of(alone)
    assert (statistics.q01[3], statistics.q99[3]) == (-1.0, 1.0)  # the controller's range
