"""Behaviour cloning of the small policy: targets, augmentation, learning a visible rule, the saved folder."""

import json

import numpy as np
import pytest
import torch

from opensora_gym.data import load_trajectory, save_trajectory
from trainers.behavior_cloning import BehaviorCloningConfig, chunk_targets, random_shift, train_behavior_cloning
from trainers.build import build_policy
from trainers.cli import main as cli_main
from trainers.config import ModelConfig
from vla_policies.small import SmallCNNPolicy, SmallPolicyConfig

TASKS = ("go left", "go right")


def test_chunk_targets_hold_the_next_actions_and_repeat_the_last():
    actions = np.arange(5, dtype=np.float32)[:, None] * np.ones((1, 2), dtype=np.float32)  # [5, 2]: row t is t
    chunks = chunk_targets(actions, 3)
    assert chunks.shape == (5, 3, 2)
    np.testing.assert_array_equal(chunks[0, :, 0], [0, 1, 2])
    np.testing.assert_array_equal(chunks[3, :, 0], [3, 4, 4])
    np.testing.assert_array_equal(chunks[4, :, 0], [4, 4, 4])


def test_random_shift_moves_the_image_by_at_most_the_shift():
    images = torch.zeros(16, 12, 12, 3, dtype=torch.uint8)
    images[:, 6, 6] = 255  # one bright pixel in the middle
    generator = torch.Generator().manual_seed(0)
    shifted = random_shift(images, 2, generator)
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    positions = [torch.nonzero(s[..., 0]).flatten().tolist() for s in shifted]
    assert all(len(p) == 2 and abs(p[0] - 6) <= 2 and abs(p[1] - 6) <= 2 for p in positions)
    assert len({tuple(p) for p in positions}) > 1  # not all the same offset
    assert torch.equal(random_shift(images, 0, generator), images)


def test_spatial_softmax_pooling_finds_where_a_feature_is():
    policy = SmallCNNPolicy(SmallPolicyConfig(pooling="spatial_softmax", channels=(4,)))
    feature_map = torch.zeros(1, 2, 5, 5)
    feature_map[0, 0, 1, 4] = 50.0  # channel 0 peaks at row 1 (y = -0.5), column 4 (x = 1)
    pooled = policy._pool(feature_map)  # [1, 3 * 2]: averages, then x, then y
    assert pooled.shape == (1, 6)
    assert pooled[0, 2].item() == pytest.approx(1.0, abs=1e-3)
    assert pooled[0, 4].item() == pytest.approx(-0.5, abs=1e-3)
    assert pooled[0, 3].item() == pytest.approx(0.0, abs=1e-6)  # a flat channel: the centre


def _visible_rule_dataset(folder, episodes=6, length=12, size=16):
    """Episodes whose actions follow what is seen: a bright left half asks for x = -0.8, a right half for +0.8,
    and the task text alone asks to close the gripper ("go right": +1 in the recorded controller convention) or
    to open it (-1); every episode succeeds at its last frame, which holds no action (zeros), as recorded ones."""
    for episode in range(episodes):
        task, side = TASKS[(episode // 2) % 2], episode % 2  # every 4 episodes: each pair once
        frames = []
        for t in range(length):
            image = np.zeros((size, size, 3), dtype=np.uint8)
            image[:, side * size // 2 : (side + 1) * size // 2] = 200
            action = np.zeros(7, dtype=np.float32)
            action[0] = 0.8 if side else -0.8
            action[6] = 1.0 if task == "go right" else -1.0
            if t == length - 1:
                action[:] = 0.0
            frames.append({"image": image, "delta_action": action, "task": task, "success": t == length - 1})
        save_trajectory(folder / f"traj{episode:06d}.npy", frames)


def test_cloning_learns_a_visible_rule_and_saves_a_loadable_policy(tmp_path):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    _visible_rule_dataset(dataset, episodes=12)  # 2 held out: every (side, task) pair still trains
    config = BehaviorCloningConfig(
        datasets=[dataset],
        out=tmp_path / "bc",
        image_size=16,
        channels=(8, 8),
        hidden_size=32,
        shift=0,
        held_out_fraction=0.1,
        max_steps=400,
        batch_size=32,
        lr=3e-3,
        log_every=50,
    )
    report, folder = train_behavior_cloning(config)
    assert report.held_out_episodes == 2 and report.episodes == 10 and report.frames == 110  # final frames: no action
    assert report.losses[-1] < report.losses[0]
    # the first number of the first action follows the image, the gripper follows the text: errors far below 0.8
    assert report.held_out_action_mae[0] < 0.2 and report.held_out_action_mae[6] < 0.2
    saved = json.loads((tmp_path / "bc" / "bc_report.json").read_text())
    assert saved["held_out_token_accuracy"] == pytest.approx(report.held_out_token_accuracy)

    policy = SmallCNNPolicy.from_pretrained(folder)
    assert policy.config.pooling == "spatial_softmax" and policy.value_head is None
    right = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    right[:, :, 8:] = 200
    logits, _ = policy.action_logits({"image": right, "task": ["go right"]})
    actions = policy.tokens_to_actions(logits.argmax(-1))  # [1, 8, 7] robot units: gripper 1 open, 0 close
    assert actions[0, 0, 0] > 0.5 and actions[0, 0, 6] < 0.1
    logits, _ = policy.action_logits({"image": right, "task": ["go left"]})
    assert policy.tokens_to_actions(logits.argmax(-1))[0, 0, 6] > 0.9
    # the RL config describing the same architecture loads it
    model = ModelConfig(image_size=16, channels=(8, 8), hidden_size=32, pooling="spatial_softmax", add_value_head=False)
    assert isinstance(build_policy(model, None, "cpu", seed=0, path=folder), SmallCNNPolicy)


def test_only_successful_episodes_are_cloned_unless_asked(tmp_path):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    _visible_rule_dataset(dataset, episodes=3)
    failed = [
        {
            "image": np.zeros((16, 16, 3), np.uint8),
            "delta_action": np.zeros(7, np.float32),
            "task": "x",
            "success": False,
        }
    ] * 5
    save_trajectory(dataset / "traj000009.npy", failed)
    common = {"datasets": [dataset], "image_size": 16, "channels": (4,), "hidden_size": 8, "max_steps": 2}
    only, _ = train_behavior_cloning(BehaviorCloningConfig(out=tmp_path / "a", held_out_fraction=0.0, **common))
    everything, _ = train_behavior_cloning(
        BehaviorCloningConfig(out=tmp_path / "b", held_out_fraction=0.0, successful_only=False, **common)
    )
    assert (only.episodes, only.frames) == (3, 33)
    assert (everything.episodes, everything.frames) == (4, 37)


def test_cli_trains_and_reports(tmp_path, capsys):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    _visible_rule_dataset(dataset, episodes=2)
    cli_main(
        [
            "train-policy",
            "--dataset",
            str(dataset),
            "--out",
            str(tmp_path / "bc"),
            "--image-size",
            "16",
            "--channels",
            "4",
            "--hidden-size",
            "8",
            "--max-steps",
            "3",
            "--held-out-fraction",
            "0.5",
        ]
    )
    assert "held-out 1 episodes" in capsys.readouterr().out
    assert (tmp_path / "bc" / "policy" / "model.safetensors").is_file()


def test_bad_settings_fail_early_with_the_value(tmp_path):
    with pytest.raises(ValueError, match="shift must be >= 0, got -1"):
        BehaviorCloningConfig(datasets=[tmp_path], out=tmp_path / "bc", shift=-1)
    empty = tmp_path / "empty"
    empty.mkdir()
    save_trajectory(
        empty / "traj0.npy",
        [
            {
                "image": np.zeros((8, 8, 3), np.uint8),
                "delta_action": np.zeros(7, np.float32),
                "task": "t",
                "success": False,
            }
        ],
    )
    with pytest.raises(ValueError, match="needs at least 2 successful episodes, got 0"):
        train_behavior_cloning(BehaviorCloningConfig(datasets=[empty], out=tmp_path / "bc"))
    assert not (tmp_path / "bc").exists()


def test_action_key_picks_the_expert_labels_over_the_executed_actions(tmp_path):
    """The executed actions (delta_action) always go left; the expert's labels (expert_action) follow the image:
    cloning with action_key="expert_action" learns the labels."""
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    _visible_rule_dataset(dataset, episodes=8)
    for path in sorted(dataset.glob("traj*.npy")):
        frames = load_trajectory(path)
        for frame in frames:
            frame["expert_action"] = frame["delta_action"].copy()
            frame["delta_action"][0] = -0.8 if frame["delta_action"].any() else 0.0
        save_trajectory(path, frames)
    common = {"datasets": [dataset], "image_size": 16, "channels": (8, 8), "hidden_size": 32, "shift": 0}
    common |= {"held_out_fraction": 0.0, "max_steps": 300, "batch_size": 32, "lr": 3e-3}
    right = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    right[:, :, 8:] = 200
    first_x = {}
    for key in ("delta_action", "expert_action"):
        _, folder = train_behavior_cloning(BehaviorCloningConfig(out=tmp_path / key, action_key=key, **common))
        policy = SmallCNNPolicy.from_pretrained(folder)
        logits, _ = policy.action_logits({"image": right, "task": ["go right"]})
        first_x[key] = float(policy.tokens_to_actions(logits.argmax(-1))[0, 0, 0])
    assert first_x["delta_action"] < -0.5 < 0.5 < first_x["expert_action"]
