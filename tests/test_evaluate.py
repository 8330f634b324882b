import json

import pytest

from opensora_gym.env import OpenSoraLiberoEnv
from opensora_gym.presets import make_tiny_checkpoint
from trainers.cli import main
from trainers.config import load_config
from trainers.evaluate import evaluate_policy, libero_episodes, wilson_interval, world_model_episodes
from vla_policies import SmallCNNPolicy, SmallPolicyConfig


@pytest.mark.parametrize(
    ("successes", "trials", "low", "high"),
    [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (57, 100, 0.4722, 0.6627)],
)
def test_wilson_interval_known_values(successes, trials, low, high):
    assert wilson_interval(successes, trials) == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_rejects_impossible_counts():
    with pytest.raises(ValueError, match="0 <= successes <= trials"):
        wilson_interval(3, 2)
    with pytest.raises(ValueError, match="trials >= 1"):
        wilson_interval(0, 0)


def test_episode_lists():
    assert world_model_episodes(3, 5) == [{"episode_indices": i} for i in (0, 1, 2, 0, 1)]
    assert world_model_episodes(2) == [{"episode_indices": 0}, {"episode_indices": 1}]
    walk = [(0, 0), (0, 1), (1, 0)]
    assert libero_episodes(walk) == [{"task_id": t, "trial_id": k} for t, k in walk]
    assert libero_episodes(walk, 2) == [{"task_id": 0, "trial_id": 0}, {"task_id": 0, "trial_id": 1}]
    assert libero_episodes(walk, task_ids=[1]) == [{"task_id": 1, "trial_id": 0}]
    assert libero_episodes(walk, 10, task_ids=[1]) == [{"task_id": 1, "trial_id": 0}]  # a pair runs once
    assert libero_episodes(walk, trial_ids=[0]) == [{"task_id": 0, "trial_id": 0}, {"task_id": 1, "trial_id": 0}]
    with pytest.raises(ValueError, match=r"task_ids must lie in 0\.\.1, got \[7\]"):
        libero_episodes(walk, task_ids=[7])
    with pytest.raises(ValueError, match="set env_type: libero"):
        load_config(None, ["env.eval.task_ids=[0, 1]"])
    assert load_config(None, ["env.eval.env_type=libero", "env.eval.task_ids=[0, 3]"]).env.eval.task_ids == (0, 3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.mark.parametrize(("bias", "success", "length"), [(50.0, True, 8), (-50.0, False, 16)])
def test_every_listed_episode_runs_once_in_order(checkpoint, bias, success, length):
    env = OpenSoraLiberoEnv(
        4, checkpoint=checkpoint, num_sampling_steps=1, image_size=32, dtype="float32", max_episode_steps=16
    )
    # The classifier's bias fixes the outcome: +50 succeeds on the first chunk, -50 never (truncation at 16).
    env.world_model.reward_model.net[-2].bias.data.fill_(bias)
    policy = SmallCNNPolicy(SmallPolicyConfig(image_size=32, channels=(8,), hidden_size=32))
    episodes = world_model_episodes(len(env.dataset), 6)  # two waves of 4, the second one partial
    result = evaluate_policy(env, policy, episodes, do_sample=True, seed=1)
    assert [o.episode for o in result.outcomes] == episodes
    assert [o.task for o in result.outcomes] == [env.dataset.start_frame(i)[1] for i in range(6)]
    assert all(o.success == success and o.length == length for o in result.outcomes)
    assert result.success_rate == float(success) and result.num_episodes == 6
    per_task = result.per_task()
    assert sum(row["episodes"] for row in per_task.values()) == 6
    assert result.interval == wilson_interval(6 * success, 6)
    assert "overall" in result.table() and json.dumps(result.to_dict())
    with pytest.raises(ValueError, match="same option keys"):
        evaluate_policy(env, policy, [{"episode_indices": 0}, {"task_id": 0}])


def test_cli_eval_writes_results_and_tensorboard(tmp_path, capsys):
    policy = SmallCNNPolicy(SmallPolicyConfig(image_size=32, channels=(8,), hidden_size=32, add_value_head=False))
    policy.save_pretrained(tmp_path / "policy")
    overrides = [
        f"runner.log_path={tmp_path}", "runner.experiment_name=eval", f"runner.ckpt_path={tmp_path / 'policy'}",
        "env.train.tiny_checkpoint=random", "env.train.max_episode_steps=16", "env.eval.total_num_envs=3",
        "env.eval.num_episodes=4", "actor.model.channels=[8]", "actor.model.hidden_size=32",
    ]  # fmt: skip
    main(["eval", "--config", "tiny_cpu_grpo", *overrides])
    # Each evaluation has its own folder: it writes no step 0 into the run's curves and replaces no earlier result.
    first = tmp_path / "eval" / "eval" / "policy"
    data = json.loads((first / "eval_results.json").read_text())
    assert data["episodes"] == 4 and 0.0 <= data["ci_low"] <= data["success_rate"] <= data["ci_high"] <= 1.0
    assert data["folder"] == str(first)
    assert "overall" in capsys.readouterr().out
    assert list((first / "tensorboard").glob("events.out.tfevents.*"))
    assert not (tmp_path / "eval" / "tensorboard").exists()
    main(["eval", "--config", "tiny_cpu_grpo", *overrides])
    second = json.loads((tmp_path / "eval" / "eval" / "policy-2" / "eval_results.json").read_text())
    assert second["success_rate"] == data["success_rate"]  # the same seeded episodes
    with pytest.raises(SystemExit, match=r"another architecture: .*hidden_size=32 \(config: 64\)"):
        main(["eval", "--config", "tiny_cpu_grpo", *overrides, "actor.model.hidden_size=64"])
