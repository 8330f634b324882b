"""GRPO and PPO must learn a task whose answer is known, on the CPU in about a minute each.

The world model is `make_action_sensitive_checkpoint`'s: a frame succeeds iff its action's first normalized number
exceeds 0.8, so the initial (nearly uniform) policy succeeds in about 57% of one-chunk episodes and a policy that
learnt the rule in all of them. Success rates are measured by sampled evaluations over a fixed list of episodes
before and after training, and read back from the TensorBoard event files.
"""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from opensora_gym.presets import make_action_sensitive_checkpoint
from trainers.config import PRESETS_DIR, load_config
from trainers.runner import Trainer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    report = make_action_sensitive_checkpoint(tmp_path_factory.mktemp("action_sensitive"), image_size=32)
    assert report.classifier_accuracy >= 0.95, report
    return report.folder


@pytest.mark.learning
@pytest.mark.slow
@pytest.mark.parametrize(("algorithm", "steps"), [("grpo", 8), ("ppo", 12)])
def test_training_lifts_the_success_rate(checkpoint, tmp_path, algorithm, steps):
    config = load_config(
        PRESETS_DIR / f"tiny_cpu_{algorithm}.yaml",
        [
            f"env.train.checkpoint={checkpoint}",
            f"runner.log_path={tmp_path}",
            f"runner.max_steps={steps}",
            f"runner.val_check_interval={steps}",
            "runner.save_interval=-1",
            "runner.progress_bar=false",
            "env.train.video_cfg.save_video=false",
            "env.eval.total_num_envs=32",
            "env.eval.num_episodes=128",
            "env.eval.do_sample=true",
        ],
    )
    trainer = Trainer(config)
    before = trainer.evaluate()
    result = trainer.run()
    ((final_step, after),) = [(s, r) for s, r in trainer.evaluations if s == steps]
    print(f"{algorithm}: success {before.success_rate:.1%} -> {after.success_rate:.1%} in {steps} steps")
    assert before.success_rate <= 0.60
    assert after.success_rate >= 0.90

    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("eval/success_once")}
    assert logged == {0: pytest.approx(before.success_rate), final_step: pytest.approx(after.success_rate)}
    train_success = [e.value for e in events.Scalars("env/success_once")]
    assert train_success == pytest.approx([m["env/success_once"] for m in result.history])
    assert max(train_success[-2:]) >= 0.9 > train_success[0]
