"""`opensora-gym collect`: the scripted LIBERO-Spatial expert's waypoints (no simulator), the per-frame success
flag, and real LIBERO collections into the dataset layout, resumed after a crash."""

from __future__ import annotations

import json
import time
from importlib.util import find_spec

import numpy as np
import pytest

from opensora_gym import collect as collect_module
from opensora_gym.checkpoint import DATASET_FOLDER, STATISTICS_NAME
from opensora_gym.collect import CollectConfig, collect_episodes
from opensora_gym.data import ActionStatistics, TrajectoryDataset, load_trajectory
from opensora_gym.expert import PHASES, ScriptedSpatialExpert, SpatialExpert, SpatialExpertConfig, waypoint
from opensora_gym.wrappers.trajectory_recorder import episode_frames

needs_libero = pytest.mark.skipif(
    find_spec("libero") is None,
    reason="the libero package is not installed (pip install 'opensora-gym[libero]')",
)

# LIBERO-Spatial task 0 trial 0 after the settling steps, as the simulator reports it (rounded).
START = np.array([-0.211, -0.011, 1.174])
BOWL = np.array([-0.063, 0.202, 0.898])
PLATE = np.array([0.053, 0.205, 0.903])
# LIBERO's controller moves the end effector about 1.25 cm per step at full command.
STEP_LENGTH = 0.0125
# The default expert's hand at the grasp (from the bowl) and at the release (from the plate); its approach height.
GRASP_OFFSET = np.array([0.0, 0.045, 0.012])
RELEASE_OFFSET = np.array([0.0, 0.045, 0.10])
APPROACH = np.array([0.0, 0.0, 0.10])


def _play_kinematic(expert: SpatialExpert, steps: int = 220) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Runs the expert against an ideal hand that moves `STEP_LENGTH * command` per step and carries the bowl while
    the gripper is closed; returns (phase, hand position, action) of every step."""
    hand, bowl = START.copy(), BOWL.copy()
    trace = []
    for _ in range(steps):
        phase = expert.phase
        action = expert.act(hand, bowl, PLATE)
        trace.append((phase, hand.copy(), action))
        move = STEP_LENGTH * action[:3].astype(np.float64)
        hand = hand + move
        if action[-1] == 0.0 and phase != "grasp":
            bowl = bowl + move
    return trace


def test_expert_keeps_its_action_before_the_noise_and_ramps_the_lift():
    config = SpatialExpertConfig(action_noise_std=0.1, lift_ramp_steps=6)
    expert = SpatialExpert(config, np.random.default_rng(3))
    hand, bowl, lift_commands = START.copy(), BOWL.copy(), []
    for _ in range(220):
        phase = expert.phase
        action = expert.act(hand, bowl, PLATE)
        intended = expert.intended
        assert action[-1] == intended[-1], "the noise touches the arm only"
        assert np.all(np.abs(intended[:6]) <= 1.0)
        noise = action[:6] - intended[:6]
        unclipped = np.abs(action[:6]) < 1.0
        assert np.any(noise[unclipped] != 0.0)
        if phase == "lift":
            lift_commands.append(intended[2])
        move = STEP_LENGTH * action[:3].astype(np.float64)
        hand = hand + move
        if action[-1] == 0.0 and phase != "grasp":
            bowl = bowl + move
    assert len(lift_commands) > 6
    assert max(lift_commands[:6]) <= 0.25 < max(lift_commands[6:]), "slow for 6 steps, then the full command"
    with pytest.raises(ValueError, match="lift_ramp_speed must lie in"):
        SpatialExpertConfig(lift_ramp_speed=0.0)


def test_waypoints_are_offset_from_the_bowl_and_the_plate():
    config = SpatialExpertConfig()
    grasp, gripper_open = waypoint("descend", BOWL, PLATE, config)
    np.testing.assert_allclose(grasp, BOWL + GRASP_OFFSET)
    assert gripper_open
    np.testing.assert_allclose(waypoint("approach", BOWL, PLATE, config)[0], grasp + APPROACH)
    assert waypoint("grasp", BOWL, PLATE, config)[1] is False
    np.testing.assert_allclose(waypoint("lift", BOWL, PLATE, config)[0], [grasp[0], grasp[1], 1.15])
    np.testing.assert_allclose(waypoint("carry", BOWL, PLATE, config)[0], [PLATE[0], PLATE[1] + 0.045, 1.15])
    release, gripper_open = waypoint("release", BOWL, PLATE, config)
    np.testing.assert_allclose(release, PLATE + RELEASE_OFFSET)
    assert gripper_open
    with pytest.raises(ValueError, match="phase must be one of"):
        waypoint("dance", BOWL, PLATE, config)


def test_expert_visits_every_phase_and_grasps_and_releases_at_the_waypoints():
    trace = _play_kinematic(SpatialExpert(SpatialExpertConfig(), np.random.default_rng(0)))
    phases = [phase for phase, _, _ in trace]
    assert list(dict.fromkeys(phases)) == list(PHASES), "phases out of order"
    assert phases.index("release") < 150, "the expert should place the bowl well within the 220-step limit"
    closing = next(hand for phase, hand, action in trace if action[-1] == 0.0)
    assert np.linalg.norm(closing - (BOWL + GRASP_OFFSET)) < 0.01
    opening = next(hand for phase, hand, action in trace if phase == "release")
    assert np.linalg.norm(opening - (PLATE + RELEASE_OFFSET)) < 0.01
    assert phases.count("release") == SpatialExpertConfig().grasp_steps, "the hand holds still while it opens"
    assert np.linalg.norm(trace[-1][1] - (PLATE + RELEASE_OFFSET + APPROACH)) < 0.01, "then it retreats upward"
    for phase, _, action in trace:
        assert action.dtype == np.float32 and action.shape == (7,)
        assert np.all(np.abs(action[:6]) <= 1.0) and np.all(action[3:6] == 0.0), "no rotation"
        assert action[-1] == (1.0 if phase in ("approach", "descend", "release", "retreat") else 0.0), phase


def test_mistakes_and_noise_come_from_the_episode_generator():
    config = SpatialExpertConfig(mistake_probability=1.0, action_noise_std=0.2)
    early, shifted = 0, 0
    for seed in range(20):
        expert = SpatialExpert(config, np.random.default_rng(seed))
        early += expert.release_after is not None
        distance = np.linalg.norm(expert.place_shift)
        shifted += distance > 0
        assert (expert.release_after is None) == (0.12 <= distance <= 0.2)
    assert early > 0 and shifted > 0 and early + shifted == 20

    early_release = next(
        SpatialExpert(config, np.random.default_rng(seed))
        for seed in range(20)
        if SpatialExpert(config, np.random.default_rng(seed)).release_after is not None
    )
    phases = [phase for phase, _, _ in _play_kinematic(early_release)]
    assert "release" in phases and "lower" not in phases, "an early release opens before lowering over the plate"

    first, second = (_play_kinematic(SpatialExpert(config, np.random.default_rng(7)), 30) for _ in range(2))
    for (_, _, a), (_, _, b) in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    clean = SpatialExpert(SpatialExpertConfig(), np.random.default_rng(7))
    assert clean.release_after is None and not clean.place_shift.any()
    with pytest.raises(ValueError, match="mistake_probability must lie in"):
        SpatialExpertConfig(mistake_probability=1.5)


def test_a_hover_mistake_holds_the_bowl_above_the_plate_and_never_releases():
    config = SpatialExpertConfig(mistake_probability=1.0, mistake_kinds=("hover",), hover_offset=(0.02, 0.05))
    expert = SpatialExpert(config, np.random.default_rng(4))
    assert expert.hover is not None and 0.02 <= expert.hover <= 0.05
    assert expert.release_after is None and not expert.place_shift.any()
    trace = _play_kinematic(expert)
    phases = [phase for phase, _, _ in trace]
    assert "release" not in phases and phases[-40:] == ["lower"] * 40, "it stays in `lower` to the end"
    assert all(action[-1] == 0.0 for _, _, action in trace[-40:]), "the gripper stays closed"
    hold = PLATE + RELEASE_OFFSET + np.array([0.0, 0.0, expert.hover])
    assert np.linalg.norm(trace[-1][1] - hold) < 0.01, "the hand holds at the drawn height above the release point"

    mixed = SpatialExpertConfig(mistake_probability=1.0, mistake_kinds=("early_release", "wrong_place", "hover", "rim"))
    experts = [SpatialExpert(mixed, np.random.default_rng(seed)) for seed in range(40)]
    kinds = [(e.release_after is not None) + 2 * bool(e.place_shift.any()) + 4 * (e.hover is not None) for e in experts]
    assert sorted(set(kinds)) == [1, 2, 4, 6], "each episode makes exactly one mistake (rim: shift and hold), all occur"
    assert SpatialExpertConfig(mistake_kinds=["hover"]).mistake_kinds == ("hover",), "kept as a tuple"
    for bad in [(), ("hover", "hover"), ("drop",)]:
        with pytest.raises(ValueError, match="mistake_kinds must be distinct names"):
            SpatialExpertConfig(mistake_kinds=bad)
    with pytest.raises(ValueError, match="hover_offset must be"):
        SpatialExpertConfig(hover_offset=(0.05, 0.0))


def test_a_rim_mistake_holds_the_bowl_beside_the_release_point_and_never_releases():
    config = SpatialExpertConfig(
        mistake_probability=1.0, mistake_kinds=("rim",), hover_offset=(-0.01, 0.01), rim_distance=(0.04, 0.06)
    )
    expert = SpatialExpert(config, np.random.default_rng(5))
    shift = expert.place_shift
    assert 0.04 <= np.linalg.norm(shift) <= 0.06 and shift[2] == 0.0, "a sideways shift of the drawn length"
    assert expert.hover is not None and -0.01 <= expert.hover <= 0.01 and expert.release_after is None
    trace = _play_kinematic(expert)
    phases = [phase for phase, _, _ in trace]
    assert "release" not in phases and phases[-40:] == ["lower"] * 40, "it stays in `lower` to the end"
    assert all(action[-1] == 0.0 for _, _, action in trace[-40:]), "the gripper stays closed"
    hold = PLATE + shift + RELEASE_OFFSET + np.array([0.0, 0.0, expert.hover])
    assert np.linalg.norm(trace[-1][1] - hold) < 0.01, "the hand holds beside the release point, at the drawn height"
    with pytest.raises(ValueError, match=r"rim_distance must be \(min, max\) with 0 < min <= max"):
        SpatialExpertConfig(rim_distance=(0.0, 0.05))


def test_episode_frames_flag_success_from_the_first_success_frame_on():
    images = [np.full((4, 4, 3), t, dtype=np.uint8) for t in range(4)]
    actions = [np.full(7, t, dtype=np.float32) for t in range(3)]
    pose = np.arange(8, dtype=np.float32)
    frames = episode_frames(images, actions, "put it", 2, 5, pose, [False, False, False, True])
    assert [frame["success"] for frame in frames] == [False, False, False, True]
    assert [type(frame["success"]) for frame in frames] == [bool] * 4
    np.testing.assert_array_equal(frames[-1]["delta_action"], np.zeros(7))
    assert {frame["task"] for frame in frames} == {"put it"} and frames[0]["task_id"] == 2
    failed = episode_frames(images, actions, "put it", 2, 5, pose, [False] * 4)
    assert not any(frame["success"] for frame in failed)
    with pytest.raises(ValueError, match="needs 4 images, got 3"):
        episode_frames(images[:3], actions, "put it", 2, 5, pose, [False] * 3)
    with pytest.raises(ValueError, match="needs 4 success flags, got 3"):
        episode_frames(images, actions, "put it", 2, 5, pose, [False] * 3)


def test_collect_config_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="suite must be one of"):
        CollectConfig(tmp_path, suite="libero_100")
    with pytest.raises(ValueError, match="task_ids must be a non-empty list"):
        CollectConfig(tmp_path, task_ids=[])
    with pytest.raises(ValueError, match="num_episodes must be a positive int"):
        CollectConfig(tmp_path, num_episodes=0)


class _Recording:
    """An actor that records the infos it sees and passes the expert's actions on."""

    def __init__(self, actor):
        self.actor = actor
        self.action_chunk = actor.action_chunk
        self.infos = []

    def begin(self, index, seed):
        self.actor.begin(index, seed)

    def act(self, observation, info):
        self.infos.append(info)
        return self.actor.act(observation, info)


@needs_libero
@pytest.mark.slow
def test_collection_writes_the_layout_and_resumes_after_a_crash(tmp_path, monkeypatch):
    """Two short expert episodes (task 0, trials 0 and 1, 6 steps, 64 px): a crash while writing the second keeps
    the first; the rerun plays only the second, and the statistics come last, over both."""
    config = CollectConfig(
        tmp_path, task_ids=(0,), trial_ids=(0, 1), image_size=64, max_episode_steps=6, privileged_state=True,
        progress=False,
    )  # fmt: skip
    real_write = collect_module.save_trajectory
    written = []

    def crash_on_second(path, frames):
        written.append(path.name)
        if len(written) == 2:
            raise RuntimeError("simulated crash")
        return real_write(path, frames)

    monkeypatch.setattr(collect_module, "save_trajectory", crash_on_second)
    actor = _Recording(ScriptedSpatialExpert(SpatialExpertConfig(), num_envs=1))
    with pytest.raises(RuntimeError, match="simulated crash"):
        collect_episodes(config, actor)
    folder = tmp_path / DATASET_FOLDER
    assert sorted(path.name for path in folder.iterdir()) == ["traj000000_task00_trial00.npy"]
    assert not (tmp_path / STATISTICS_NAME).exists()
    first_written = (folder / "traj000000_task00_trial00.npy").stat().st_mtime_ns

    poses = actor.infos[0]["object_poses"][0]
    assert list(poses) == ["akita_black_bowl_1", "plate_1"]
    np.testing.assert_allclose(poses["akita_black_bowl_1"][:3], BOWL, atol=0.005)
    np.testing.assert_allclose(poses["plate_1"][:3], PLATE, atol=0.005)
    np.testing.assert_allclose(np.linalg.norm(poses["plate_1"][3:]), 1.0, atol=1e-5)

    monkeypatch.setattr(collect_module, "save_trajectory", real_write)
    actor = ScriptedSpatialExpert(SpatialExpertConfig(), num_envs=1)
    episodes = collect_episodes(config, actor)
    assert [(e.path.name, e.new, e.success, e.length) for e in episodes] == [
        ("traj000000_task00_trial00.npy", False, False, 6),
        ("traj000001_task00_trial01.npy", True, False, 6),
    ]
    assert (folder / "traj000000_task00_trial00.npy").stat().st_mtime_ns == first_written
    assert not [path.name for path in folder.iterdir() if path.name.startswith(".")]

    dataset = TrajectoryDataset(folder)
    assert len(dataset) == 2
    episode = dataset.episode(1)
    assert episode.images.shape == (7, 64, 64, 3) and episode.images.std() > 10
    assert episode.task == "pick up the black bowl between the plate and the ramekin and place it on the plate"
    assert episode.init_ee_pose.shape == (8,)
    frames = load_trajectory(episode.path)
    assert [frame["success"] for frame in frames] == [False] * 7
    assert {frame["trial_id"] for frame in frames} == {1}
    # The expert approaches: open gripper (controller -1), no rotation.
    np.testing.assert_array_equal(episode.actions[:-1, -1], -np.ones(6))
    np.testing.assert_array_equal(episode.actions[:-1, 3:6], np.zeros((6, 3)))
    executed = np.concatenate([dataset.episode(i).actions[:-1] for i in range(2)])
    statistics = ActionStatistics.from_json(tmp_path)
    q01, q99 = np.quantile(executed.astype(np.float64), [0.01, 0.99], axis=0)
    varied = q99 > q01  # the others never vary in these six steps: the controller's range
    np.testing.assert_allclose(statistics.q01[varied], q01[varied], rtol=1e-6)
    np.testing.assert_allclose(statistics.q99[varied], q99[varied], rtol=1e-6)
    assert (statistics.q01[~varied] == -1).all() and (statistics.q99[~varied] == 1).all()
    assert not varied[3:].any(), "no rotation, gripper always open"
    assert set(json.loads((tmp_path / STATISTICS_NAME).read_text())["action"]) >= {"q01", "q99"}


@needs_libero
@pytest.mark.slow
def test_expert_solves_libero_spatial_task_0_trial_0(tmp_path):
    start = time.perf_counter()
    config = CollectConfig(tmp_path, task_ids=(0,), trial_ids=(0,), image_size=64, privileged_state=True)
    (episode,) = collect_episodes(config, ScriptedSpatialExpert(SpatialExpertConfig(), num_envs=1))
    assert episode.success and episode.length < 220
    frames = load_trajectory(episode.path)
    assert [frame["success"] for frame in frames] == [False] * episode.length + [True]
    # Without noise the labels are the executed actions, in the same (controller) convention.
    np.testing.assert_array_equal(
        np.stack([frame["expert_action"] for frame in frames]), np.stack([frame["delta_action"] for frame in frames])
    )
    print(f"expert episode: {episode.length} steps in {time.perf_counter() - start:.1f} s")


@needs_libero
@pytest.mark.slow
def test_post_success_steps_record_what_follows_the_success(tmp_path):
    after = 12
    config = CollectConfig(
        tmp_path, task_ids=(0,), trial_ids=(0,), image_size=32, privileged_state=True, post_success_steps=after
    )
    (episode,) = collect_episodes(config, ScriptedSpatialExpert(SpatialExpertConfig(), num_envs=1))
    flags = [frame["success"] for frame in load_trajectory(episode.path)]
    first = flags.index(True)
    # the same episode as without the option up to its success (test above), then `after` more steps, each
    # flagged by LIBERO's own check: the bowl stays on the plate while the hand opens and leaves
    assert episode.success and episode.length == first + after and len(flags) == episode.length + 1
    assert not any(flags[:first]) and all(flags[first:]), flags
