"""The evaluation runner on the real LIBERO simulator (one short episode)."""

from importlib.util import find_spec

import imageio.v2 as imageio
import pytest
import torch

from opensora_gym.libero import LiberoConfig, LiberoVectorEnv
from opensora_gym.wrappers.video import RecordEpisodeVideo
from trainers.config import PRESETS_DIR, load_config
from trainers.evaluate import evaluate_policy, libero_episodes
from trainers.runner import Trainer
from vla_policies import SmallCNNPolicy, SmallPolicyConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_spec("libero") is None, reason="needs the libero extra: pip install -e '.[libero]'"),
]


def test_evaluation_runner_runs_chosen_libero_episodes(tmp_path):
    from libero.libero import benchmark

    env = LiberoVectorEnv(LiberoConfig(suite="libero_spatial", max_episode_steps=16, image_size=64), num_envs=1)
    env = RecordEpisodeVideo(env, tmp_path, episode_trigger=lambda i: i == 0)
    try:
        episodes = libero_episodes(env.unwrapped.walk, num_episodes=1)
        assert episodes == [{"task_id": 0, "trial_id": 0}]
        policy = SmallCNNPolicy(SmallPolicyConfig(image_size=64), generator=torch.Generator().manual_seed(0))
        result = evaluate_policy(env, policy, episodes, do_sample=False)
    finally:
        env.close()
    language = benchmark.get_benchmark_dict()["libero_spatial"]().get_task(0).language
    assert result.num_episodes == 1
    outcome = result.outcomes[0]
    assert outcome.task == language and outcome.episode == {"task_id": 0, "trial_id": 0}
    assert outcome.length == 16 and not outcome.success  # an untrained policy does not solve it in 16 steps
    assert result.per_task()[language]["episodes"] == 1
    low, high = result.interval
    assert low == 0.0 and 0.0 < high < 1.0
    video = imageio.mimread(tmp_path / "episode-env0-episode0.mp4")
    assert len(video) == 1 + 16  # the start frame and every executed step


def test_training_evaluates_in_libero_when_configured(tmp_path):
    from libero.libero import benchmark

    overrides = [
        f"runner.log_path={tmp_path}", "runner.progress_bar=false", "env.train.tiny_checkpoint=random",
        "env.train.total_num_envs=8", "env.train.video_cfg.save_video=false", "actor.model.channels=[8]",
        "actor.model.hidden_size=32", "actor.micro_batch_size=8", "actor.global_batch_size=8",
        "env.eval.env_type=libero", "env.eval.suite=libero_spatial", "env.eval.total_num_envs=1",
        "env.eval.num_episodes=1", "env.eval.max_episode_steps=8", "env.eval.protocol=openvla_oft",
    ]  # fmt: skip
    trainer = Trainer(load_config(PRESETS_DIR / "tiny_cpu_grpo.yaml", overrides))
    result = trainer.evaluate()
    outcome = result.outcomes[0]
    # A LIBERO episode (task 0, trial 0, its instruction), not a world-model start trajectory.
    assert outcome.episode == {"task_id": 0, "trial_id": 0} and outcome.length == 8
    assert outcome.task == benchmark.get_benchmark_dict()["libero_spatial"]().get_task(0).language
    assert trainer.evaluations == [(0, result)]


def test_named_protocols_set_the_settling_and_the_limit():
    rlinf = LiberoConfig.from_protocol("rlinf", suite="libero_object")
    assert (rlinf.num_steps_wait, rlinf.settle_gripper, rlinf.episode_limit) == (15, 0.0, 512)
    oft = LiberoConfig.from_protocol("openvla_oft", suite="libero_object")
    assert (oft.num_steps_wait, oft.settle_gripper, oft.episode_limit) == (10, -1.0, 280)
    assert LiberoConfig.from_protocol("openvla_oft", 16).episode_limit == 16
    with pytest.raises(ValueError, match="protocol must be one of"):
        LiberoConfig.from_protocol("libero")
