"""The real LIBERO env and the trajectory recorder.

The simulator tests need the ``libero`` extra (``pip install 'opensora-gym[libero]'`` and the EGL libraries) and
skip only when the ``libero`` package is missing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from importlib.util import find_spec

import gymnasium as gym
import numpy as np
import pytest

import opensora_gym
from opensora_gym.data import ActionStatistics, TrajectoryDataset
from opensora_gym.libero import (
    CONTROLLER_NOOP_ACTION,
    SUITES,
    LiberoConfig,
    LiberoVectorEnv,
    LiberoWorkerError,
)
from opensora_gym.spaces import chunk_action_space, controller_actions, observation_space
from opensora_gym.wrappers import TrajectoryRecorder, build_action_statistics

needs_libero = pytest.mark.skipif(
    find_spec("libero") is None,
    reason="the libero package is not installed (pip install 'opensora-gym[libero]')",
)

IDS = ("Libero-Spatial-v0", "Libero-Object-v0", "Libero-Goal-v0", "Libero-10-v0", "Libero-90-v0")


def libero_task(suite: str, task_id: int):
    from libero.libero import benchmark

    return benchmark.get_benchmark_dict()[suite]().get_task(task_id)


def test_controller_actions_binarizes_and_flips_the_gripper():
    actions = np.array(
        [
            [0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 1.0],  # policy: open
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # policy: close
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.7],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5],
        ],
        dtype=np.float32,
    )
    converted = controller_actions(actions)
    np.testing.assert_array_equal(converted[:, -1], [-1.0, 1.0, -1.0, 1.0, 0.0])
    np.testing.assert_array_equal(converted[:, :6], actions[:, :6])
    assert converted.dtype == np.float32
    assert actions[0, -1] == 1.0, "the input must not change"
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 7\], got \(2, 6\)"):
        controller_actions(np.zeros((2, 6)))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="suite must be one of"):
        LiberoConfig(suite="libero_100")
    with pytest.raises(ValueError, match="image_size must be a positive int, got 0"):
        LiberoConfig(image_size=0)
    with pytest.raises(ValueError, match="max_episode_steps must be a positive int or None"):
        LiberoConfig(max_episode_steps=0)
    with pytest.raises(ValueError, match="start_method must be one of"):
        LiberoConfig(start_method="thread")
    with pytest.raises(ValueError, match="max_concurrent_resets must be a positive int or None, got 0"):
        LiberoConfig(max_concurrent_resets=0)
    assert LiberoConfig(suite="libero_10").episode_limit == 520
    assert LiberoConfig(suite="libero_10", max_episode_steps=16).episode_limit == 16
    limits = {name: suite.max_episode_steps for name, suite in SUITES.items()}
    # OpenVLA-OFT's TASK_MAX_STEPS.
    assert limits == {
        "libero_spatial": 220,
        "libero_object": 280,
        "libero_goal": 300,
        "libero_10": 520,
        "libero_90": 400,
    }


def test_registration_is_lazy():
    for env_id in IDS:
        assert gym.spec(env_id).vector_entry_point == "opensora_gym.libero:make_libero_vector_env"
        assert gym.spec(env_id).entry_point == "opensora_gym.libero:LiberoSingleEnv"
    probe = "import sys, opensora_gym; print(sorted({'libero', 'robosuite', 'mujoco'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert opensora_gym is not None


@needs_libero
def test_spaces_walk_and_bad_ids_without_simulating():
    env = LiberoVectorEnv(LiberoConfig(suite="libero_spatial"), num_envs=2)
    try:
        assert env.single_action_space == chunk_action_space(8, 7)
        assert env.single_observation_space == observation_space(256)
        assert env.action_space.shape == (2, 8, 7)
        assert env.num_tasks == 10 and env.num_episodes == 500
        assert env.walk[:2] == ((0, 0), (0, 1)) and env.walk[50] == (1, 0) and env.walk[-1] == (9, 49)
        assert len(set(env.walk)) == env.num_episodes
        with pytest.raises(RuntimeError, match=r"call reset\(\) before step\(\)"):
            env.step(np.zeros((2, 8, 7), dtype=np.float32))
        with pytest.raises(ValueError, match=r"task_id must be in 0\.\.9 \(LIBERO-Spatial has 10 tasks\), got 10"):
            env.reset(options={"task_id": 10, "trial_id": 0})
        with pytest.raises(ValueError, match=r"trial_id must be in 0\.\.49 .* got 50"):
            env.reset(options={"task_id": [0, 1], "trial_id": [0, 50]})
        with pytest.raises(ValueError, match=r"task_id must be an int or a sequence of 2 ints"):
            env.reset(options={"task_id": [0], "trial_id": 0})
        with pytest.raises(ValueError, match=r"both"):
            env.reset(options={"task_id": 0})
        with pytest.raises(TypeError, match="reset_mask must be a numpy array"):
            env.reset(options={"reset_mask": [True, False]})
        with pytest.raises(TypeError, match="reset_mask must have dtype bool"):
            env.reset(options={"reset_mask": np.array([1, 0])})
        with pytest.raises(ValueError, match="at least one sub-env"):
            env.reset(options={"reset_mask": np.zeros(2, dtype=bool)})
        with pytest.raises(RuntimeError, match="without a reset_mask first"):
            env.reset(options={"reset_mask": np.array([True, False])})
        replay = np.zeros((3, 7))
        with pytest.raises(ValueError, match=r"replay_actions needs task_id and trial_id .* got keys \[\]"):
            env.reset(options={"replay_actions": [replay, replay]})
        with pytest.raises(ValueError, match=r"replay_actions must be a sequence of 2 arrays \[k, 7\]"):
            env.reset(options={"task_id": 0, "trial_id": 0, "replay_actions": [replay]})
        with pytest.raises(ValueError, match=r"replay_actions\[1\] must be numbers of shape \[k, 7\], got .* \(3, 6\)"):
            env.reset(options={"task_id": 0, "trial_id": 0, "replay_actions": [replay, replay[:, :6]]})
        with pytest.raises(ValueError, match=r"replay_actions\[0\] must be finite"):
            env.reset(options={"task_id": 0, "trial_id": 0, "replay_actions": [replay + np.nan, replay]})
        # A refused reset leaves the env as it was.
        assert env.task_ids.tolist() == [0, 0] and env.walk_index.tolist() == [-1, -1]
    finally:
        env.close()


@needs_libero
@pytest.mark.slow
def test_real_episode_recorded_and_read_back(tmp_path):
    """Task 0 trial 0 of LIBERO-Spatial: image, task text, no-op chunks, no success, recorder round trip,
    autoreset from the walk, and a killed worker named in the error."""
    limit = 24
    envs = TrajectoryRecorder(
        gym.make_vec("Libero-Spatial-v0", num_envs=1, return_frames=True, max_episode_steps=limit), tmp_path
    )
    try:
        observation, info = envs.reset(options={"task_id": 0, "trial_id": 0})
        image = observation["image"][0]
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
        assert image.std() > 10, "the camera image is blank"
        assert observation["task"] == (libero_task("libero_spatial", 0).language,)
        assert envs.observation_space.contains(observation)
        assert info["task_id"].tolist() == [0] and info["trial_id"].tolist() == [0]
        assert info["walk_index"].tolist() == [-1]
        assert info["state"].shape == (1, 8)
        start_image, start_state = image.copy(), info["state"][0].copy()

        noop = np.zeros((1, 8, 7), dtype=np.float32)
        noop[..., -1] = 1.0  # the policy's "open"
        moves = np.random.default_rng(0).uniform(-0.5, 0.5, size=(1, 8, 7)).astype(np.float32)
        moves[..., -1] = np.random.default_rng(1).uniform(0.0, 1.0, size=(1, 8))
        for chunk, actions in enumerate((noop, noop, moves), start=1):
            observation, reward, terminated, truncated, info = envs.step(actions)
            assert reward.tolist() == [0.0] and terminated.tolist() == [False]
            assert truncated.tolist() == [chunk * 8 >= limit]
            assert info["success_once"].tolist() == [False]
            assert info["episode_length"].tolist() == [chunk * 8]
            assert info["frame_executed"].all()
            np.testing.assert_array_equal(info["frames"][0, -1], observation["image"][0])
        np.testing.assert_array_equal(info["controller_actions"][0], controller_actions(moves[0]))
        final_image = observation["image"][0].copy()

        assert len(envs.saved) == 1 and envs.saved[0].name == "traj000000_task00_trial00.npy"
        dataset = TrajectoryDataset(tmp_path)
        episode = dataset.episode(0)
        assert episode.images.shape == (limit + 1, 256, 256, 3)
        np.testing.assert_array_equal(episode.images[0], start_image)
        np.testing.assert_array_equal(episode.images[-1], final_image)
        np.testing.assert_array_equal(episode.actions[:16], np.tile(CONTROLLER_NOOP_ACTION, (16, 1)))
        np.testing.assert_array_equal(episode.actions[16:limit], controller_actions(moves[0]))
        np.testing.assert_array_equal(episode.actions[-1], np.zeros(7))
        assert episode.task == observation["task"][0]
        np.testing.assert_array_equal(episode.init_ee_pose, start_state)

        statistics = build_action_statistics(tmp_path, tmp_path)
        executed = episode.actions[:-1].astype(np.float64)
        np.testing.assert_allclose(statistics.q01, np.quantile(executed, 0.01, axis=0), rtol=1e-6)
        np.testing.assert_allclose(statistics.q99, np.quantile(executed, 0.99, axis=0), rtol=1e-6)
        np.testing.assert_array_equal(statistics.min, executed.min(axis=0).astype(np.float32))
        np.testing.assert_array_equal(statistics.max, executed.max(axis=0).astype(np.float32))
        np.testing.assert_array_equal(ActionStatistics.from_json(tmp_path).q99, statistics.q99)

        # Next-step autoreset: the action is ignored and the walk's first pair starts.
        observation, reward, terminated, truncated, info = envs.step(noop)
        assert info["walk_index"].tolist() == [0] and info["task_id"].tolist() == [0]
        assert info["_episode_length"].tolist() == [False] and reward.tolist() == [0.0]
        np.testing.assert_array_equal(observation["image"][0], start_image)

        os.kill(envs.unwrapped.worker_pids[0], signal.SIGKILL)
        with pytest.raises(LiberoWorkerError, match=r"worker 0 \(LIBERO-Spatial task 0, trial 0\) .*exited"):
            envs.step(noop)
        with pytest.raises(RuntimeError, match="closed"):
            envs.step(noop)
    finally:
        envs.close()


@needs_libero
@pytest.mark.slow
def test_replayed_actions_start_an_episode_at_a_recorded_frame(tmp_path):
    """Resetting with a recording's first s actions reaches its frame s (image and state, to the bit, s not a
    multiple of the chunk), and the same actions from there give the recording's next frames; the episode's length
    counts from the replayed frame."""
    limit, start = 24, 13
    moves = np.random.default_rng(2).uniform(-0.6, 0.6, size=(limit // 8, 1, 8, 7)).astype(np.float32)
    moves[..., -1] = np.random.default_rng(3).uniform(0.0, 1.0, size=(limit // 8, 1, 8))
    envs = TrajectoryRecorder(
        gym.make_vec("Libero-Spatial-v0", num_envs=1, image_size=64, return_frames=True, max_episode_steps=limit),
        tmp_path,
    )
    try:
        envs.reset(options={"task_id": 1, "trial_id": 2})
        states = []
        for actions in moves:
            _, _, _, _, info = envs.step(actions)
            states.append(info["state"][0].copy())
    finally:
        envs.close()
    recorded = TrajectoryDataset(tmp_path).episode(0)
    policy_moves = moves.reshape(-1, 7)

    env = LiberoVectorEnv(LiberoConfig(image_size=64, max_episode_steps=8, return_frames=True), num_envs=1)
    try:
        observation, info = env.reset(
            options={"task_id": 1, "trial_id": 2, "replay_actions": [recorded.actions[:start]]}
        )
        np.testing.assert_array_equal(observation["image"][0], recorded.images[start])
        assert not np.array_equal(recorded.images[start], recorded.images[0]), "the replay moved nothing"
        _, _, _, truncated, info = env.step(policy_moves[None, start : start + 8])
        np.testing.assert_array_equal(info["frames"][0], recorded.images[start + 1 : start + 9])
        assert info["episode_length"].tolist() == [8] and truncated.tolist() == [True]
        np.testing.assert_array_equal(info["controller_actions"][0], recorded.actions[start : start + 8])
        # Replaying a whole chunk boundary reaches the state the recording reported after that chunk.
        _, info = env.reset(options={"task_id": 1, "trial_id": 2, "replay_actions": [recorded.actions[:16]]})
        np.testing.assert_array_equal(info["state"][0], states[1])
    finally:
        env.close()


@needs_libero
@pytest.mark.slow
def test_reset_image_matches_openvla_oft_recipe():
    """Our reset equals OpenVLA-OFT's: LIBERO env seeded 0, initial state, 10 no-ops, image rotated 180 degrees."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv

    size, task_id, trial_id = 128, 1, 3
    tasks = benchmark.get_benchmark_dict()["libero_spatial"]()
    task = tasks.get_task(task_id)
    reference = OffScreenRenderEnv(
        bddl_file_name=os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file),
        camera_heights=size,
        camera_widths=size,
    )
    try:
        reference.seed(0)
        reference.reset()
        raw = reference.set_init_state(tasks.get_task_init_states(task_id)[trial_id])
        for _ in range(10):
            raw, _, _, _ = reference.step([0, 0, 0, 0, 0, 0, -1])
        expected_image = raw["agentview_image"][::-1, ::-1]
        expected_wrist = raw["robot0_eye_in_hand_image"][::-1, ::-1]
        expected_position = raw["robot0_eef_pos"]
    finally:
        reference.close()

    env = LiberoVectorEnv(LiberoConfig(image_size=size, wrist_image=True), num_envs=1)
    try:
        observation, info = env.reset(options={"task_id": task_id, "trial_id": trial_id})
    finally:
        env.close()
    np.testing.assert_array_equal(observation["image"][0], expected_image)
    np.testing.assert_array_equal(info["wrist_image"][0], expected_wrist)
    np.testing.assert_allclose(info["state"][0, :3], expected_position, rtol=1e-6)
    assert observation["task"] == (task.language,)


@needs_libero
@pytest.mark.slow
def test_images_rendered_only_where_used_change_nothing_else(monkeypatch):
    """The same actions in LIBERO rendering every step and in our simulator rendering once per chunk (and every
    step only with return_frames): the simulator states after every step, success, proprio and every image we
    return are identical, and we render one image per camera per chunk."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv

    from opensora_gym.libero import _Simulator

    size, task_id, trial_id, chunk, wait = 64, 0, 1, 4, 3
    cameras = ("agentview", "robot0_eye_in_hand")
    actions = np.random.default_rng(0).uniform(-1.0, 1.0, size=(2 * chunk, 7)).astype(np.float32)
    actions[:, -1] = np.sign(actions[:, -1])
    tasks = benchmark.get_benchmark_dict()["libero_spatial"]()
    task = tasks.get_task(task_id)

    reference = OffScreenRenderEnv(
        bddl_file_name=os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file),
        camera_names=list(cameras),
        camera_heights=size,
        camera_widths=size,
    )
    expected_states, expected_done, expected_images = [], [], []
    try:
        reference.seed(0)
        reference.reset()
        raw = reference.set_init_state(tasks.get_task_init_states(task_id)[trial_id])
        for action in [CONTROLLER_NOOP_ACTION.tolist()] * wait + actions.tolist():
            raw, _, done, _ = reference.step(action)
            expected_states.append(reference.get_sim_state())
            expected_done.append(done)
            expected_images.append({camera: raw[f"{camera}_image"][::-1, ::-1] for camera in cameras})
        expected_position = raw["robot0_eef_pos"]
    finally:
        reference.close()

    simulator = _Simulator(LiberoConfig(image_size=size, wrist_image=True, num_steps_wait=wait))
    try:
        simulator._build(task_id)
        states, renders = [], {camera: 0 for camera in cameras}
        step = simulator.env.step

        def recording_step(action):
            reply = step(action)
            states.append(simulator.env.get_sim_state())
            return reply

        monkeypatch.setattr(simulator.env, "step", recording_step)
        for camera, view in simulator.views.items():
            image = view.image

            def counting_image(camera=camera, image=image):
                renders[camera] += 1
                return image()

            monkeypatch.setattr(view, "image", counting_image)

        features = simulator.reset(task_id, trial_id, seed=0)
        np.testing.assert_array_equal(features["image"], expected_images[wait - 1]["agentview"])
        np.testing.assert_array_equal(features["wrist_image"], expected_images[wait - 1]["robot0_eye_in_hand"])
        assert renders == {"agentview": 1, "robot0_eye_in_hand": 1}, "settling must not render"
        evaluation = simulator.step(actions[:chunk], return_frames=False)
        assert renders == {"agentview": 2, "robot0_eye_in_hand": 2}, "one image per camera per chunk"
        recording = simulator.step(actions[chunk:], return_frames=True)
        assert renders == {"agentview": 2 + chunk, "robot0_eye_in_hand": 3}
    finally:
        simulator.close()

    assert len(states) == len(expected_states)
    for index, (state, expected) in enumerate(zip(states, expected_states, strict=True)):
        np.testing.assert_array_equal(state, expected, err_msg=f"simulator state after step {index}")
    assert not any(expected_done) and not evaluation["success"] and not recording["success"]
    assert evaluation["executed"] == recording["executed"] == chunk
    for result, last in ((evaluation, expected_images[wait - 1 + chunk]), (recording, expected_images[-1])):
        np.testing.assert_array_equal(result["image"], last["agentview"])
        np.testing.assert_array_equal(result["wrist_image"], last["robot0_eye_in_hand"])
    for index, frame in enumerate(recording["frames"]):
        np.testing.assert_array_equal(frame, expected_images[wait + chunk + index]["agentview"])
    np.testing.assert_allclose(recording["state"][:3], expected_position, rtol=1e-6)


@needs_libero
def test_make_gives_the_single_env_its_limit_in_actions_without_simulating():
    for env_id in ("Libero-Spatial-v0", "Libero-Spatial-Image-v0"):
        env = gym.make(env_id, image_size=32, max_episode_steps=16)
        try:
            assert env.unwrapped.vector_env.config.episode_limit == 16 and env.spec.max_episode_steps == 16
        finally:
            env.close()
    assert env.observation_space == gym.spaces.Box(0, 255, (32, 32, 3), np.uint8)


@needs_libero
@pytest.mark.slow
def test_the_image_id_ends_episodes_after_the_limit_in_actions():
    env = gym.make("Libero-Spatial-Image-v0", image_size=32, max_episode_steps=16)
    try:
        obs, info = env.reset(seed=0, options={"task_id": 1, "trial_id": 2})
        assert obs.shape == (32, 32, 3) and info["task"] == libero_task("libero_spatial", 1).language
        hold = np.tile(np.array([0, 0, 0, 0, 0, 0, 1], dtype=np.float32), (8, 1))  # [8, 7]: stay, gripper open
        ends = [env.step(hold) for _ in range(2)]
        assert [step[2:4] for step in ends] == [(False, False), (False, True)]  # 16 actions: 2 chunk steps
        assert ends[1][4]["task"] == info["task"] and ends[1][4]["episode_length"] == 16
    finally:
        env.close()


@needs_libero
@pytest.mark.slow
def test_single_env_passes_gymnasiums_checker_and_vector_env_resets_by_mask():
    from gymnasium.utils.env_checker import check_env

    single = gym.make("Libero-Spatial-v0", image_size=32, max_episode_steps=-1)
    try:
        check_env(single.unwrapped, skip_render_check=True)
        obs, info = single.reset(seed=0, options={"task_id": 1, "trial_id": 2})
        assert obs["image"].shape == (32, 32, 3) and isinstance(obs["task"], str) and info["task_id"] == 1
    finally:
        single.close()

    env = gym.make_vec("Libero-Spatial-v0", num_envs=2, image_size=32)
    try:
        start, _ = env.reset(options={"task_id": [0, 3], "trial_id": [0, 4]})
        moved, *_ = env.step(np.tile(np.array([0.5, 0, 0, 0, 0, 0, 1], dtype=np.float32), (2, 8, 1)))
        obs, info = env.reset(options={"reset_mask": np.array([True, False]), "task_id": 0, "trial_id": 0})
        np.testing.assert_array_equal(obs["image"][0], start["image"][0])  # the same initial state again
        np.testing.assert_array_equal(obs["image"][1], moved["image"][1])  # untouched
        assert info["_task_id"].tolist() == [True, False] and info["trial_id"].tolist() == [0, 4]
        assert env.unwrapped.episode_length.tolist()[1] == 8
    finally:
        env.close()


@needs_libero
@pytest.mark.slow
def test_resets_one_at_a_time_give_the_same_episodes():
    """Three sub-envs, first reset together and then one at a time (autoresets included): the same images."""
    observed = []
    for limit in (None, 1):
        config = LiberoConfig(image_size=32, max_episode_steps=8, max_concurrent_resets=limit)
        env = LiberoVectorEnv(config, num_envs=3)
        try:
            images = [env.reset(options={"task_id": [0, 1, 0], "trial_id": [4, 5, 6]})[0]["image"]]
            moves = np.random.default_rng(0).uniform(-0.5, 0.5, size=(3, 8, 7)).astype(np.float32)
            for _ in range(2):  # the episode ends at its limit; the next step resets all three from the walk
                observation, _, _, truncated, info = env.step(moves)
                images.append(observation["image"])
            assert truncated.tolist() == [False] * 3 and info["walk_index"].tolist() == [0, 1, 2]
            observed.append(np.stack(images))
        finally:
            env.close()
    np.testing.assert_array_equal(observed[0], observed[1])
