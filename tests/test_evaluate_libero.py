"""The evaluation runner on the real LIBERO simulator (one short episode)."""

from importlib.util import find_spec

import imageio.v2 as imageio
import pytest
import torch

from opensora_gym.libero import LiberoConfig, LiberoVectorEnv
from opensora_gym.wrappers.video import RecordEpisodeVideo
from trainers.evaluate import evaluate_policy, libero_episodes
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
