import numpy as np
import pytest
import torch

from opensora_gym.checkpoint import CHECKPOINT_ENV_VAR
from opensora_gym.env import OpenSoraLiberoConfig, OpenSoraLiberoEnv
from opensora_gym.spaces import controller_actions
from opensora_gym.testing import random_chunk_actions
from opensora_gym.world_model import WorldModel

FAST = {"num_sampling_steps": 2, "image_size": 64, "dtype": "float32", "max_episode_steps": 32}


def make_env(checkpoint, world_model, num_envs=2, **overrides):
    return OpenSoraLiberoEnv(num_envs, checkpoint=checkpoint, world_model=world_model, **{**FAST, **overrides})


def test_spaces_contain_what_the_env_returns(checkpoint, world_model):
    env = make_env(checkpoint, world_model, num_envs=3)
    assert env.metadata["autoreset_mode"].value == "NextStep"
    assert env.single_action_space.shape == (8, 7) and env.action_space.shape == (3, 8, 7)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert obs["image"].shape == (3, 64, 64, 3) and obs["image"].dtype == np.uint8
    assert info["episode_index"].shape == (3,) and len(info["task"]) == 3
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert env.observation_space.contains(obs)
    assert reward.shape == (3,) and reward.dtype == np.float32
    assert terminated.dtype == bool and truncated.dtype == bool
    assert info["frame_rewards"].shape == (3, 8) and info["success_prob"].shape == (3, 8)
    assert info["_frame_rewards"].all()
    np.testing.assert_allclose(reward, info["frame_rewards"].sum(axis=1), rtol=1e-6)


def test_seeding_is_deterministic(checkpoint, world_model):
    results = []
    for _ in range(2):
        env = make_env(checkpoint, world_model)
        obs0, _ = env.reset(seed=7)
        obs1, reward, *_ = env.step(random_chunk_actions(2))
        results.append((obs0["image"], obs1["image"], reward))
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)
    env = make_env(checkpoint, world_model)
    env.reset(seed=8, options={"episode_indices": [0, 0]})
    other, *_ = env.step(random_chunk_actions(2))
    env.reset(seed=7, options={"episode_indices": [0, 0]})
    same_episode, *_ = env.step(random_chunk_actions(2))
    assert not np.array_equal(other["image"], same_episode["image"])


def test_a_sub_env_does_not_depend_on_batch_size_or_neighbours(checkpoint, world_model):
    big = make_env(checkpoint, world_model, num_envs=3)
    big.reset(seed=10, options={"episode_indices": [0, 1, 2]})
    obs_big, *_ = big.step(random_chunk_actions(3))
    small = make_env(checkpoint, world_model, num_envs=1)
    small.reset(seed=11, options={"episode_indices": [1]})
    obs_small, *_ = small.step(random_chunk_actions(3)[1:2])
    diff = np.abs(obs_big["image"][1].astype(int) - obs_small["image"][0].astype(int))
    assert diff.max() <= 1  # float rounding of batched kernels may move a pixel by one level


def test_chunk_step_equals_the_components(checkpoint, world_model):
    env = make_env(checkpoint, world_model, num_envs=2, return_frames=True)
    env.reset(seed=3, options={"episode_indices": [4, 5]})
    actions = random_chunk_actions(2)
    obs, reward, _, _, info = env.step(actions)

    images = torch.from_numpy(np.stack([env.dataset.start_frame(e)[0] for e in (4, 5)]))
    generators = [torch.Generator().manual_seed(3 + i) for i in range(2)]
    latents = world_model.encode_start(images, generator=generators)
    executed = torch.from_numpy(controller_actions(actions))  # the env converts the gripper convention
    prediction = world_model.predict_chunk(latents, executed, generator=generators)
    # Equal up to float rounding, which may move a pixel by one level.
    assert np.abs(info["frames"].astype(int) - prediction.frames.numpy().astype(int)).max() <= 1
    np.testing.assert_array_equal(obs["image"], info["frames"][:, -1])
    np.testing.assert_allclose(info["success_prob"], prediction.success_prob.numpy(), atol=1e-5)
    frame_reward = np.round(info["success_prob"])
    expected = frame_reward - np.concatenate([np.zeros((2, 1)), frame_reward[:, :-1]], axis=1)
    np.testing.assert_allclose(reward, expected.sum(axis=1))


def test_an_episode_can_start_late_with_its_recorded_frames_as_the_condition(checkpoint, world_model):
    env = make_env(checkpoint, world_model, start_frame="end-5")
    obs, info = env.reset(seed=4, options={"episode_indices": [2, 3]})
    recorded = [env.dataset.images(e)[0] for e in (2, 3)]
    last = [len(images) - 1 - 5 for images in recorded]
    window = torch.from_numpy(np.stack([images[t - 3 : t + 1] for images, t in zip(recorded, last, strict=True)]))
    generators = [torch.Generator().manual_seed(4 + i) for i in range(2)]
    np.testing.assert_array_equal(env.get_state()[0].latents, world_model.encode_start(window, generators)[0])
    assert np.abs(obs["image"].astype(int) - window[:, -1].numpy().astype(int)).max() <= 1  # one [-1, 1] round trip
    assert info["episode_index"].tolist() == [2, 3]
    first = make_env(checkpoint, world_model, start_frame=0)
    first.reset(seed=4, options={"episode_indices": [2, 3]})
    starts = torch.from_numpy(np.stack([images[0] for images in recorded]))
    generators = [torch.Generator().manual_seed(4 + i) for i in range(2)]
    np.testing.assert_array_equal(first.get_state()[1].latents, world_model.encode_start(starts, generators)[1])


def test_random_start_frames_are_shared_by_a_group_and_repeat_under_a_seed(checkpoint, world_model):
    env = make_env(checkpoint, world_model, num_envs=4, group_size=2, start_frame="random")
    obs, info = env.reset(seed=6)
    assert info["episode_index"][0] == info["episode_index"][1] and info["episode_index"][2] == info["episode_index"][3]
    np.testing.assert_array_equal(obs["image"][0], obs["image"][1])
    # Each start is one of its trajectory's recorded frames (after the env's [-1, 1] round trip).
    for index in (0, 2):
        recorded = env.dataset.images(int(info["episode_index"][index]))[0].astype(int)
        closest = np.abs(recorded - obs["image"][index].astype(int)).reshape(len(recorded), -1).max(axis=1).min()
        assert closest <= 1
    again, again_info = env.reset(seed=6)
    np.testing.assert_array_equal(again["image"], obs["image"])
    np.testing.assert_array_equal(again_info["episode_index"], info["episode_index"])


def test_a_bad_start_frame_fails_before_a_model_loads(checkpoint):
    with pytest.raises(ValueError, match=r"start_frame must be a frame index >= 0, 'end-K' .* got 'end\+4'"):
        OpenSoraLiberoEnv(2, checkpoint=checkpoint, start_frame="end+4")


def test_per_sub_env_truncation_and_next_step_autoreset(checkpoint, never_success):
    env = make_env(checkpoint, never_success, num_envs=2, max_episode_steps=16)
    env.reset(seed=0)
    states = env.get_state([1])
    states[0].elapsed_steps = 8
    env.set_state(states, [1])
    _, _, terminated, truncated, info = env.step(random_chunk_actions(2))
    assert truncated.tolist() == [False, True] and not terminated.any()
    assert info["episode_length"].tolist() == [8, 16]
    obs, reward, terminated, truncated, info = env.step(random_chunk_actions(2, seed=1))
    # Sub-env 1 resets on this step: its action is ignored and its infos are masked.
    assert truncated.tolist() == [True, False]
    assert reward[1] == 0 and info["_frame_rewards"].tolist() == [True, False]
    assert info["episode_length"].tolist() == [16, 0]
    start = env.dataset.start_frame(int(info["episode_index"][1]))[0]
    assert np.abs(obs["image"][1].astype(int) - start.astype(int)).max() <= 1
    _, _, _, truncated, info = env.step(random_chunk_actions(2, seed=2))
    assert truncated.tolist() == [False, False] and info["episode_length"].tolist() == [0, 8]


def test_termination_when_the_classifier_says_success(checkpoint):
    model = WorldModel.from_pretrained(checkpoint, num_sampling_steps=2, image_size=64)
    model.reward_model.net[-2].bias.data.fill_(50.0)  # probability 1 for every frame
    env = make_env(checkpoint, model, num_envs=2)
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(random_chunk_actions(2))
    assert terminated.all() and info["success_once"].all()
    np.testing.assert_allclose(reward, [1.0, 1.0])
    np.testing.assert_allclose(info["episode_return"], [1.0, 1.0])


def test_groups_share_their_start_even_after_autoreset(checkpoint, never_success):
    env = make_env(checkpoint, never_success, num_envs=4, group_size=2, max_episode_steps=16)
    _, info = env.reset(seed=5)
    first = info["episode_index"]
    assert first[0] == first[1] and first[2] == first[3]
    states = env.get_state([0])
    states[0].elapsed_steps = 8
    env.set_state(states, [0])
    env.step(random_chunk_actions(4))  # sub-env 0 truncates
    _, _, _, _, info = env.step(random_chunk_actions(4))  # sub-env 0 resets; the others truncate
    second_of_0 = info["episode_index"][0]
    _, _, _, _, info = env.step(random_chunk_actions(4))  # sub-envs 1..3 reset
    assert info["episode_index"][1] == second_of_0
    assert info["episode_index"][2] == info["episode_index"][3]


def test_forking_a_state(checkpoint, world_model):
    env = make_env(checkpoint, world_model, num_envs=3)
    env.reset(seed=0, options={"episode_indices": [0, 1, 2]})
    env.set_state(env.get_state([0]) * 2, [1, 2])
    actions = np.repeat(random_chunk_actions(1), 3, axis=0)
    obs, *_ = env.step(actions)
    np.testing.assert_array_equal(obs["image"][0], obs["image"][1])
    np.testing.assert_array_equal(obs["image"][0], obs["image"][2])
    env.set_state(env.get_state([0]) * 2, [1, 2], seeds=[100, 101])
    obs, *_ = env.step(actions)
    assert not np.array_equal(obs["image"][1], obs["image"][2])


def fresh_after_reset(checkpoint, world_model):
    env = make_env(checkpoint, world_model)
    env.reset(seed=1)
    return env


@pytest.mark.parametrize(
    ("actions", "error", "message"),
    [
        (np.zeros((2, 7)), ValueError, r"actions must have shape \(2, 8, 7\), got \(2, 7\)"),
        (np.zeros((3, 8, 7)), ValueError, r"actions must have shape \(2, 8, 7\), got \(3, 8, 7\)"),
        (np.full((2, 8, 7), np.nan), ValueError, r"actions must be finite, got NaN or inf for sub-envs \[0, 1\]"),
        (np.array([[[np.inf] * 7] * 8, [[0.0] * 7] * 8]), ValueError, r"finite.*sub-envs \[0\]"),
        (np.full((2, 8, 7), "a"), TypeError, r"actions must be real numbers of shape \(2, 8, 7\), got dtype <U1"),
        (np.zeros((2, 8, 7), dtype=bool), TypeError, "got dtype bool"),
        (None, TypeError, "got dtype object"),
        (torch.zeros(2, 8, 7, dtype=torch.complex64), TypeError, "got dtype complex64"),
    ],
)
def test_bad_actions_are_rejected_and_leave_the_state_unchanged(checkpoint, world_model, actions, error, message):
    env = fresh_after_reset(checkpoint, world_model)
    with pytest.raises(error, match=message):
        env.step(actions)
    obs, reward, *_ = env.step(random_chunk_actions(2))
    reference = fresh_after_reset(checkpoint, world_model)
    obs_ref, reward_ref, *_ = reference.step(random_chunk_actions(2))
    np.testing.assert_array_equal(obs["image"], obs_ref["image"])
    np.testing.assert_array_equal(reward, reward_ref)


def test_step_before_reset_and_bad_reset_options(checkpoint, world_model):
    env = make_env(checkpoint, world_model)
    with pytest.raises(ValueError, match=r"step\(\) called before reset\(\)"):
        env.step(random_chunk_actions(2))
    with pytest.raises(ValueError, match=r"episode_indices must lie in \[0, 5\]"):
        env.reset(options={"episode_indices": [0, 6]})
    with pytest.raises(ValueError, match="episode_indices must be 2 integers"):
        env.reset(options={"episode_indices": [0]})
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"task_id": 0})
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"sub-env indices must lie in \[0, 1\]"):
        env.get_state([2])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"group_size": 0}, "group_size must be a positive integer"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"success_from": "logits"}, "success_from"),
        ({"max_episode_steps": 20}, "multiple of action_chunk"),
        ({"suite": "goal"}, "suite must be one of"),
        ({"condition_timestep": 10.0}, r"condition_timestep must be a number in \[15.0, 1000\), got 10.0"),
        ({"condition_timestep": "high"}, "condition_timestep must be a number"),
        ({"action_guidance": -1.0}, r"action_guidance must be a finite number >= 0, got -1.0"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        OpenSoraLiberoConfig(**overrides)


def test_checkpoint_resolution(checkpoint, world_model, tmp_path, monkeypatch):
    monkeypatch.setenv(CHECKPOINT_ENV_VAR, str(checkpoint))
    env = OpenSoraLiberoEnv(1, world_model=world_model, **FAST)
    assert len(env.dataset) == 6
    monkeypatch.setenv(CHECKPOINT_ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        OpenSoraLiberoEnv(1, **FAST)
    monkeypatch.delenv(CHECKPOINT_ENV_VAR)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="hf download RLinf/RLinf-OpenSora-LIBERO-Object"):
        OpenSoraLiberoEnv(1, suite="object", **FAST)


def test_render_and_offload(checkpoint, world_model):
    env = make_env(checkpoint, world_model, render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    frames = env.render()
    assert len(frames) == 2 and np.array_equal(frames[0], obs["image"][0])
    env.offload()
    env.onload()
    env.step(random_chunk_actions(2))


def test_registered_ids_make_vector_and_single_envs(checkpoint):
    import gymnasium as gym

    import opensora_gym  # noqa: F401  (registers the ids)

    env = gym.make_vec("OpenSoraLibero-Object-v0", num_envs=2, checkpoint=checkpoint, **FAST)
    assert isinstance(env, OpenSoraLiberoEnv) and env.config.suite == "object" and env.num_envs == 2
    single = gym.make("OpenSoraLibero-Spatial-v0", checkpoint=checkpoint, **{**FAST, "max_episode_steps": 8})
    obs, info = single.reset(seed=0, options={"episode_index": 2})
    assert single.observation_space.contains(obs) and info["episode_index"] == 2
    obs, reward, terminated, truncated, info = single.step(single.action_space.sample())
    assert single.observation_space.contains(obs) and isinstance(reward, float)
    assert truncated or terminated
    with pytest.raises(ValueError, match=r"the episode has ended: call reset\(\)"):
        single.step(single.action_space.sample())
    single.reset(seed=0)
    with pytest.raises(ValueError, match=r"action must have shape \(8, 7\)"):
        single.step(np.zeros(7))


def test_partial_reset_restarts_only_the_masked_sub_envs(checkpoint, never_success):
    env = make_env(checkpoint, never_success, num_envs=3, max_episode_steps=16)
    env.reset(seed=4)
    obs_before, *_ = env.step(random_chunk_actions(3))
    before = env.get_state()
    obs, info = env.reset(options={"reset_mask": np.array([False, True, False])})
    after = env.get_state()
    assert after[0].elapsed_steps == 8 and after[2].elapsed_steps == 8 and after[1].elapsed_steps == 0
    np.testing.assert_array_equal(obs["image"][0], obs_before["image"][0])
    start = env.dataset.start_frame(int(info["episode_index"][1]))[0]
    assert np.abs(obs["image"][1].astype(int) - start.astype(int)).max() <= 1
    assert torch.equal(after[0].latents, before[0].latents)

    # The same restart as the next-step autoreset of sub-env 1 when its episode ends after one chunk.
    auto = make_env(checkpoint, never_success, num_envs=3, max_episode_steps=16)
    auto.reset(seed=4)
    states = auto.get_state([1])
    states[0].elapsed_steps = 8
    auto.set_state(states, [1])
    auto.step(random_chunk_actions(3))
    auto_obs, _, _, _, auto_info = auto.step(random_chunk_actions(3, seed=1))
    assert auto_info["episode_index"][1] == info["episode_index"][1]
    np.testing.assert_array_equal(auto_obs["image"][1], obs["image"][1])


def test_partial_reset_rejects_bad_masks_as_gymnasium_does(checkpoint, world_model):
    env = make_env(checkpoint, world_model)
    with pytest.raises(ValueError, match="reset_mask needs a full reset"):
        env.reset(options={"reset_mask": np.array([True, False])})
    env.reset(seed=0)
    before = env.get_state()
    for mask, error, message in [
        ([True, False], TypeError, "reset_mask must be a numpy array of 2 bools, got list"),
        (np.array([1, 0]), TypeError, "reset_mask must have dtype bool, got int64"),
        (np.array([True]), ValueError, r"reset_mask must have shape \(2,\), got \(1,\)"),
        (np.array([False, False]), ValueError, "reset_mask must choose at least one sub-env, got all False"),
    ]:
        with pytest.raises(error, match=message):
            env.reset(seed=1, options={"reset_mask": mask})
    assert env.np_random_seed == (0, 1)
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(before, env.get_state(), strict=True))


def test_vector_seeding_follows_gymnasium(checkpoint, world_model):
    env = make_env(checkpoint, world_model)
    assert env.metadata["render_fps"] > 0 and env.np_random_seed == (None, None)
    obs_int, _ = env.reset(seed=np.int64(7))
    assert env.np_random_seed == (7, 8)
    obs_list, _ = env.reset(seed=[7, np.uint64(8)])
    np.testing.assert_array_equal(obs_int["image"], obs_list["image"])
    env.reset(seed=[3, None])
    assert env.np_random_seed[0] == 3 and isinstance(env.np_random_seed[1], int)

    # A seeded partial reset reseeds only the masked sub-envs, with the seeds a full reset would give them.
    env.reset(seed=0)
    env.step(random_chunk_actions(2))
    obs, _ = env.reset(seed=10, options={"reset_mask": np.array([False, True])})
    assert env.np_random_seed == (0, 11)
    assert [s.elapsed_steps for s in env.get_state()] == [8, 0]
    again = make_env(checkpoint, world_model)
    again.reset(seed=0)
    again.step(random_chunk_actions(2))
    obs_again, _ = again.reset(seed=[99, 11], options={"reset_mask": np.array([False, True])})
    np.testing.assert_array_equal(obs["image"], obs_again["image"])


@pytest.mark.parametrize(
    ("seed", "error", "message"),
    [
        (2**64 - 1, ValueError, r"\[0, 2\*\*64 - 1\] \(seed \+ i for sub-env i of 2\), got \[18446744073709551616\]"),
        (-1, ValueError, r"seeds must lie in \[0, 2\*\*64 - 1\] .*got \[-1\]"),
        ([1], ValueError, r"seed must be an int or 2 seeds \(one per sub-env\), got 1"),
        ([1, 2.5], TypeError, r"seeds must be ints or None, got \['int', 'float'\]"),
        (True, TypeError, "seed must be an int, 2 ints or None"),
        ("7", TypeError, "seed must be an int, 2 ints or None"),
    ],
)
def test_bad_seeds_change_nothing(checkpoint, world_model, seed, error, message):
    env = fresh_after_reset(checkpoint, world_model)
    with pytest.raises(error, match=message):
        env.reset(seed=seed)
    assert env.np_random_seed == (1, 2)
    obs, *_ = env.step(random_chunk_actions(2))
    obs_ref, *_ = fresh_after_reset(checkpoint, world_model).step(random_chunk_actions(2))
    np.testing.assert_array_equal(obs["image"], obs_ref["image"])


def test_actions_outside_the_box_are_clipped(checkpoint, world_model):
    actions = random_chunk_actions(2) * 4
    obs, reward, *_ = fresh_after_reset(checkpoint, world_model).step(actions)
    obs_ref, reward_ref, *_ = fresh_after_reset(checkpoint, world_model).step(np.clip(actions, -1, 1))
    np.testing.assert_array_equal(obs["image"], obs_ref["image"])
    np.testing.assert_array_equal(reward, reward_ref)


@pytest.mark.parametrize("part", ["latents", "success probabilities"])
def test_non_finite_predictions_raise_and_change_nothing(checkpoint, part):
    model = WorldModel.from_pretrained(checkpoint, num_sampling_steps=2, image_size=64)
    env = make_env(checkpoint, model)
    env.reset(seed=0)
    layer = model.dit.final_layer.linear if part == "latents" else model.reward_model.net[-2]
    layer.bias.data.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=rf"NaN or inf {part} for sub-envs \[0, 1\]; no sub-env was changed"):
        env.step(random_chunk_actions(2))
    assert [s.elapsed_steps for s in env.get_state()] == [0, 0]


def edited(field, value):
    """An edit of one SubEnvState field: `value` or `value(state)`."""

    def edit(state):
        setattr(state, field, value(state) if callable(value) else value)

    return edit


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (edited("latents", lambda s: s.latents[:2]), ValueError, r"states\[1\]\.latents must be torch\.float32 of"),
        (edited("latents", lambda s: s.latents.double()), ValueError, "got torch.float64"),
        (edited("latents", lambda s: s.latents * np.nan), ValueError, r"states\[1\]\.latents must be finite"),
        (edited("image", lambda s: s.image.astype(np.float32)), ValueError, r"uint8 of shape \(64, 64, 3\)"),
        (edited("task", 3), TypeError, r"states\[1\]\.task must be str, got int"),
        (edited("success_once", "yes"), TypeError, "success_once must be bool or bool, got str"),
        (edited("elapsed_steps", True), TypeError, "elapsed_steps must be int or integer, got bool"),
        (edited("elapsed_steps", 40), ValueError, r"elapsed_steps must lie in \[0, 32\], got 40"),
        (
            edited("episode_index", 6),
            ValueError,
            r"episode_index must lie in \[0, 5\] or be -1 \(a given start image\), got 6",
        ),
        (edited("episode_return", float("inf")), ValueError, "rewards must be finite"),
        (edited("generator_state", None), ValueError, r"states\[1\] has no generator_state: pass seeds"),
        (edited("draw_generator_state", None), ValueError, r"states\[1\] has no draw_generator_state: pass seeds"),
        (edited("generator_state", torch.zeros(3, dtype=torch.uint8)), ValueError, "not a CPU torch.Generator"),
    ],
)
def test_set_state_checks_every_state_before_changing_any(checkpoint, world_model, edit, error, message):
    env = fresh_after_reset(checkpoint, world_model)
    before = env.get_state([0])[0]
    states = env.get_state([1, 1])
    states[0].elapsed_steps = 8
    edit(states[1])
    with pytest.raises(error, match=message):
        env.set_state(states, [0, 1])
    after = env.get_state([0])[0]
    assert after.elapsed_steps == 0 and torch.equal(after.latents, before.latents)
    with pytest.raises(TypeError, match=r"states\[0\] must be a SubEnvState \(from get_state\), got str"):
        env.set_state(["state"], [0])
    with pytest.raises(ValueError, match=r"seeds must be ints in \[0, 2\*\*64 - 1\], got \[-3\]"):
        env.set_state(env.get_state([0]), [0], seeds=[-3])
    assert env.np_random_seed == (1, 2)


def test_a_shared_world_model_must_match_the_config(checkpoint, world_model):
    with pytest.raises(ValueError, match=r"expected image_size 32 \(world model: 64\)"):
        make_env(checkpoint, world_model, image_size=32)
    with pytest.raises(ValueError, match=r"condition_frames 2 \(world model: 4\)"):
        make_env(checkpoint, world_model, condition_frames=2)
    with pytest.raises(ValueError, match=r"condition_timestep 100.0 \(world model: 15.0\)"):
        make_env(checkpoint, world_model, condition_timestep=100.0)
    with pytest.raises(ValueError, match=r"action_guidance 2.0 \(world model: 1.0\)"):
        make_env(checkpoint, world_model, action_guidance=2.0)


def test_action_guidance_changes_the_prediction_from_the_same_start(checkpoint):
    def step(action_guidance):
        env = OpenSoraLiberoEnv(2, checkpoint=checkpoint, action_guidance=action_guidance, **FAST)
        assert env.world_model.sampler.config.action_guidance == action_guidance
        obs0, _ = env.reset(seed=3)
        obs1, *_ = env.step(random_chunk_actions(2))
        env.close()
        return obs0["image"], obs1["image"]

    (start_a, guided), (start_b, plain) = step(3.0), step(1.0)
    np.testing.assert_array_equal(start_a, start_b)
    assert not np.array_equal(guided, plain)


def test_a_raised_condition_timestep_is_seeded_and_changes_the_prediction(checkpoint, world_model):
    def step(condition_timestep):
        env = OpenSoraLiberoEnv(2, checkpoint=checkpoint, condition_timestep=condition_timestep, **FAST)
        obs0, _ = env.reset(seed=3)
        obs1, *_ = env.step(random_chunk_actions(2))
        env.close()
        return obs0["image"], obs1["image"]

    (start_a, raised_a), (_, raised_b), (start_c, clean) = step(300.0), step(300.0), step(15.0)
    np.testing.assert_array_equal(raised_a, raised_b)
    np.testing.assert_array_equal(start_a, start_c)
    assert not np.array_equal(raised_a, clean)


def test_gymnasium_env_checker_passes_on_the_registered_single_env(checkpoint):
    import gymnasium as gym
    from gymnasium.utils.env_checker import check_env

    import opensora_gym  # noqa: F401  (registers the ids)

    env = gym.make("OpenSoraLibero-Spatial-v0", checkpoint=checkpoint, **{**FAST, "image_size": 32})
    check_env(env.unwrapped)
    env.reset(seed=np.int64(3))
    assert env.unwrapped.np_random_seed == 3


def test_a_given_start_image_starts_like_the_same_dataset_frame(checkpoint, world_model):
    recorded = make_env(checkpoint, world_model, num_envs=2)
    obs_recorded, _ = recorded.reset(seed=5, options={"episode_indices": [3, 1]})
    given = make_env(checkpoint, world_model, num_envs=2)
    frames = [given.dataset.start_frame(e) for e in (3, 1)]
    images, tasks = np.stack([image for image, _ in frames]), [task for _, task in frames]
    obs, info = given.reset(seed=5, options={"start_images": images, "start_tasks": tasks})
    np.testing.assert_array_equal(obs["image"], obs_recorded["image"])
    assert obs["task"] == obs_recorded["task"] and info["episode_index"].tolist() == [-1, -1]
    torch.testing.assert_close(given.get_state()[0].latents, recorded.get_state()[0].latents)
    actions = random_chunk_actions(2)
    np.testing.assert_array_equal(given.step(actions)[0]["image"], recorded.step(actions)[0]["image"])
    # A state started from a given image round-trips through get_state / set_state.
    given.set_state(given.get_state([0]), [1])


def test_start_images_of_another_size_are_resized_and_mask_partial_resets(checkpoint, world_model):
    env = make_env(checkpoint, world_model, num_envs=2)
    env.reset(seed=0, options={"episode_indices": [0, 1]})
    before = env.get_state([0])[0]
    images = np.full((2, 48, 40, 3), 200, dtype=np.uint8)
    obs, info = env.reset(
        options={"start_images": images, "start_tasks": ["a", "b"], "reset_mask": np.array([False, True])}
    )
    np.testing.assert_array_equal(obs["image"][0], before.image)
    assert obs["image"].shape == (2, 64, 64, 3) and info["episode_index"].tolist() == [0, -1]
    assert np.abs(obs["image"][1].astype(int) - 200).max() <= 1 and obs["task"] == (before.task, "b")


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"start_images": np.zeros((2, 8, 8, 3), np.uint8)}, ValueError, "come together"),
        ({"start_images": np.zeros((2, 8, 8, 3)), "start_tasks": ["a", "b"]}, TypeError, "uint8"),
        ({"start_images": np.zeros((1, 8, 8, 3), np.uint8), "start_tasks": ["a"]}, ValueError, r"\(2, H, W, 3\)"),
        ({"start_images": np.zeros((2, 8, 8, 3), np.uint8), "start_tasks": "ab"}, ValueError, "2 instructions"),
        ({"start_images": np.zeros((2, 8, 8, 3), np.uint8), "start_tasks": ["a", ""]}, TypeError, "non-empty"),
        (
            {"start_images": np.zeros((2, 8, 8, 3), np.uint8), "start_tasks": ["a", "b"], "episode_indices": [0, 1]},
            ValueError,
            "give one",
        ),
    ],
)
def test_bad_start_images_are_rejected(checkpoint, world_model, options, error, message):
    env = make_env(checkpoint, world_model, num_envs=2)
    with pytest.raises(error, match=message):
        env.reset(seed=0, options=options)
