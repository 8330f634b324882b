import dataclasses
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainers.build import build_optimizer
from trainers.cli import main
from trainers.config import PRESETS_DIR, ConfigError, load_config
from trainers.runner import Trainer, TrainingDivergedError
from trainers.update import LoraBaseReference, PolicyUpdater, UpdateData
from vla_policies import SmallCNNPolicy, SmallPolicyConfig

LOGGED_NAMES = [
    "train/actor/approx_kl", "train/actor/clip_fraction", "train/actor/clipped_ratio", "train/actor/grad_norm",
    "train/actor/lr", "train/actor/policy_loss", "train/critic/value_loss", "train/critic/value_clip_ratio",
    "train/critic/explained_variance", "train/entropy_loss", "train/loss", "rollout/advantages_max",
    "rollout/advantages_mean", "rollout/advantages_min", "rollout/rewards", "env/episode_len", "env/return",
    "env/reward", "env/success_once",
]  # fmt: skip


def small_config(tmp_path, algorithm="ppo", *extra):
    """A 4-env, 2-chunk run on a tiny random world model, fast enough for a unit test."""
    return load_config(
        PRESETS_DIR / f"tiny_cpu_{algorithm}.yaml",
        [
            f"runner.log_path={tmp_path}",
            "runner.progress_bar=false",
            "env.train.tiny_checkpoint=random",
            "env.train.total_num_envs=4",
            "env.train.max_episode_steps=16",
            "env.train.video_cfg.save_video=false",
            "env.train.group_size=2",
            "actor.model.channels=[8]",
            "actor.model.hidden_size=32",
            "actor.micro_batch_size=4",
            "actor.global_batch_size=8",
            "algorithm.update_epoch=1",
            *extra,
        ],
    )


def policy_state(policy):
    return {k: v.clone() for k, v in policy.state_dict().items()}


def ppo_batch(policy: SmallCNNPolicy) -> UpdateData:
    """8 chunk steps of random images with the policy's own actions, random advantages and returns."""
    g = torch.Generator().manual_seed(0)
    obs = {"image": torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8, generator=g), "task": ["a", "b"] * 4}
    out = policy.act(obs, generator=g)
    return UpdateData(
        images=obs["image"],
        tasks=obs["task"],
        action_tokens=out.action_tokens,
        logprobs=out.logprobs,
        advantages=torch.randn(8, 1, generator=g),
        mask=torch.ones(8, 1, dtype=torch.bool),
        loss_mask_sum=torch.full((8, 1), 8.0),
        returns=torch.randn(8, 1, generator=g),
        values=out.values,
    )


def test_micro_batches_accumulate_to_the_global_batch_gradient(tmp_path):
    config = small_config(tmp_path, "ppo", "actor.optim.clip_grad=1000.0")
    policy = SmallCNNPolicy(SmallPolicyConfig(image_size=32, channels=(8,), hidden_size=32))
    data = ppo_batch(policy)
    results = []
    for micro in (8, 2):
        copy = SmallCNNPolicy(policy.config)
        copy.load_state_dict(policy.state_dict())
        actor = type(config.actor)(
            model=config.actor.model, optim=config.actor.optim, micro_batch_size=micro, global_batch_size=8
        )
        optimizer = build_optimizer(copy, actor)
        updater = PolicyUpdater(
            copy, optimizer, config.algorithm, actor, config.rollout, config.env.train.max_episode_steps
        )
        groups = updater.optimizer.param_groups
        assert [g["lr"] for g in groups] == [config.actor.optim.lr, config.actor.optim.value_lr]
        assert {id(p) for p in groups[1]["params"]} == {id(p) for p in copy.value_head.parameters()}
        metrics = updater.update(data)
        assert set(metrics) >= {"actor/policy_loss", "critic/value_loss", "actor/grad_norm", "actor/lr", "loss"}
        # Adam's first moment after one step is (1 - beta1) * the (unclipped) gradient: compare gradients there,
        # since the first Adam step itself divides each entry by its own size and so magnifies float noise.
        state = updater.optimizer.state
        results.append([state[p]["exp_avg"].clone() for group in groups for p in group["params"]])
        assert not torch.equal(copy.action_head.weight, policy.action_head.weight)
    for full, accumulated in zip(*results, strict=True):
        torch.testing.assert_close(accumulated, full, rtol=1e-5, atol=1e-7)


def test_after_the_critic_warmup_the_update_is_a_fresh_optimizers(tmp_path):
    """RLinf builds a new optimizer when the warm-up ends: the step after it equals a new optimizer's first step."""
    config = small_config(tmp_path, "ppo", "actor.optim.critic_warmup_steps=1")
    policy = SmallCNNPolicy(SmallPolicyConfig(image_size=32, channels=(8,), hidden_size=32))
    data = ppo_batch(policy)
    args = (config.algorithm, config.actor, config.rollout, config.env.train.max_episode_steps)
    updater = PolicyUpdater(policy, build_optimizer(policy, config.actor), *args)
    updater.update(data)  # the one warm-up step
    assert updater.optimizer_steps == 1 and not updater.critic_warmup and not updater.optimizer.state
    fresh = SmallCNNPolicy(policy.config)
    fresh.load_state_dict(policy.state_dict())
    no_warmup = dataclasses.replace(config.actor, optim=dataclasses.replace(config.actor.optim, critic_warmup_steps=0))
    fresh_updater = PolicyUpdater(fresh, build_optimizer(fresh, config.actor), *args[:1], no_warmup, *args[2:])
    metrics, fresh_metrics = updater.update(data), fresh_updater.update(data)
    assert metrics["actor/lr"] == fresh_metrics["actor/lr"] == config.actor.optim.lr
    for key, value in fresh.state_dict().items():
        assert torch.equal(policy.state_dict()[key], value), key


def test_critic_warmup_trains_the_value_head_alone_and_resumes_exactly(tmp_path):
    config = small_config(
        tmp_path, "ppo", "runner.max_steps=3", "runner.save_interval=1", "actor.optim.critic_warmup_steps=2",
        "runner.experiment_name=warm",
    )  # fmt: skip
    trainer = Trainer(config)
    states = [policy_state(trainer.policy)]
    step = trainer.step

    def step_and_keep_the_weights():
        metrics = step()
        states.append(policy_state(trainer.policy))
        return metrics

    trainer.step = step_and_keep_the_weights
    result = trainer.run()
    # One optimizer step per training step: steps 1 and 2 warm the critic up, step 3 trains everything.
    assert trainer.updater.optimizer_steps == 3
    for index, metrics in enumerate(result.history):
        before, after, warmup = states[index], states[index + 1], index < 2
        moved = {key for key in after if not torch.equal(before[key], after[key])}
        assert bool(moved - {key for key in after if key.startswith("value_head.")}) != warmup, moved
        assert any(key.startswith("value_head.") for key in moved)
        assert (metrics["train/actor/lr"] == 0.0) == warmup
        assert metrics["train/critic/value_loss"] > 0
        if warmup:
            assert metrics["train/actor/policy_loss"] == 0.0
            assert metrics["train/loss"] == pytest.approx(metrics["train/critic/value_loss"])

    resumed_config = small_config(
        tmp_path, "ppo", "runner.max_steps=3", "actor.optim.critic_warmup_steps=2",
        "runner.experiment_name=warm_resumed", f"runner.resume_dir={result.last_checkpoint.parent / 'global_step_1'}",
    )  # fmt: skip
    resumed = Trainer(resumed_config)
    assert resumed.updater.optimizer_steps == 1
    resumed.run()
    for key, value in policy_state(resumed.policy).items():
        assert torch.equal(value, states[-1][key]), key


def test_run_logs_the_names_saves_and_resumes_exactly(tmp_path):
    config = small_config(
        tmp_path, "ppo", "runner.max_steps=2", "runner.save_interval=1", "env.train.video_cfg.save_video=true",
        "env.train.video_cfg.num_envs=1", "runner.experiment_name=full",
    )  # fmt: skip
    trainer = Trainer(config)
    result = trainer.run()
    run = tmp_path / "full"
    assert result.last_checkpoint == run / "checkpoints" / "global_step_2"
    assert (run / "checkpoints" / "global_step_1" / "policy" / "model.safetensors").is_file()
    assert (run / "config.yaml").is_file() and list((run / "video" / "train").glob("step1-env0-*.mp4"))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    # Every name is computed each step; an undefined value (NaN) is left out of the curves, never drawn.
    assert all(set(LOGGED_NAMES) <= set(m) for m in result.history)
    defined = {name for m in result.history for name in LOGGED_NAMES if math.isfinite(m[name])}
    assert defined <= tags and len(defined) >= len(LOGGED_NAMES) - 1, sorted(set(LOGGED_NAMES) - tags)
    assert all(math.isfinite(e.value) for tag in tags for e in events.Scalars(tag))
    for name in ("env/success_once", "train/actor/policy_loss"):
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        assert logged == [(i + 1, pytest.approx(m[name], rel=1e-6)) for i, m in enumerate(result.history)]
    final = policy_state(trainer.policy)

    resumed_config = small_config(
        tmp_path, "ppo", "runner.max_steps=2", "runner.experiment_name=resumed",
        f"runner.resume_dir={run / 'checkpoints' / 'global_step_1'}",
    )  # fmt: skip
    resumed = Trainer(resumed_config)
    assert resumed.global_step == 1
    resumed.run()
    for key, value in policy_state(resumed.policy).items():
        assert torch.equal(value, final[key]), key
    assert resumed.history[0]["env/return"] == result.history[1]["env/return"]

    other = small_config(
        tmp_path, "ppo", "actor.model.hidden_size=16", "runner.experiment_name=other",
        f"runner.resume_dir={run / 'checkpoints' / 'global_step_1'}",
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"comes from another config: actor.model.hidden_size: 32 \(now 16\)"):
        Trainer(other)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    trainer = Trainer(small_config(tmp_path, "ppo", "runner.experiment_name=nan"))
    trainer.step()
    checkpoint = trainer.save_checkpoint()
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in checkpoint.rglob("*") if p.is_file()}
    with torch.no_grad():
        for parameter in trainer.policy.value_head.parameters():
            parameter.fill_(float("nan"))  # values (hence advantages and the loss) become NaN; sampling is unchanged
    with pytest.raises(TrainingDivergedError, match="training diverged at step 2: the loss is nan") as error:
        trainer.step()
    assert error.value.step == 2 and "env/success_once" in error.value.last_metrics
    assert "last completed step" in str(error.value) and "not overwritten" in str(error.value)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in checkpoint.rglob("*") if p.is_file()}
    assert after == digests and trainer.global_step == 1
    assert not (checkpoint.parent / "global_step_2").exists()


def test_cli_trains_and_rejects_bad_keys(tmp_path, capsys):
    overrides = [
        f"runner.log_path={tmp_path}", "runner.experiment_name=cli", "runner.max_steps=1", "runner.progress_bar=false",
        "env.train.tiny_checkpoint=random", "env.train.total_num_envs=2", "env.train.group_size=2",
        "env.train.video_cfg.save_video=false", "actor.model.channels=[8]", "actor.model.hidden_size=32",
        "actor.micro_batch_size=2", "actor.global_batch_size=2",
    ]  # fmt: skip
    main(["train", "--config", str(PRESETS_DIR / "tiny_cpu_grpo.yaml"), *overrides])
    assert (tmp_path / "cli" / "checkpoints" / "global_step_1" / "trainer_state.pt").is_file()
    assert "last checkpoint" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"unknown config key 'lr' .*allowed keys"):
        main(["train", "--config", str(PRESETS_DIR / "tiny_cpu_grpo.yaml"), "actor.lr=1"])


def tiny_oft_lora_overrides(tmp_path: Path, *extra: str) -> list[str]:
    """Overrides that train a tiny random OpenVLA-OFT checkpoint (written under `tmp_path`) with LoRA rank 4."""
    from vla_policies.testing import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / "oft", seed=0)
    return [
        "actor.model.model_type=openvla_oft", f"actor.model.model_path={folder}", "actor.model.is_lora=true",
        "actor.model.lora_rank=4", "actor.model.add_value_head=false", "runner.max_steps=1",
        "algorithm.filter_rewards=false", *extra,
    ]  # fmt: skip


def test_openvla_oft_with_lora_trains_saves_and_resumes(tmp_path):
    oft = tiny_oft_lora_overrides(tmp_path, "actor.model.value_type=action_level")
    trainer = Trainer(small_config(tmp_path, "grpo", "runner.experiment_name=oft", *oft))
    before = policy_state(trainer.policy)
    trainer.env.world_model.reward_model.net[-2].bias.data.fill_(0.0)  # mixed outcomes: nonzero advantages
    result = trainer.run()
    after = policy_state(trainer.policy)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed), sorted(changed)[:5]
    assert (result.last_checkpoint / "policy" / "adapter_model.safetensors").is_file()
    resumed = Trainer(
        small_config(
            tmp_path, "grpo", "runner.experiment_name=oft2", f"runner.resume_dir={result.last_checkpoint}", *oft
        )
    )
    for key, value in policy_state(resumed.policy).items():
        assert torch.equal(value, after[key]), key


def test_kl_reference_of_a_lora_policy_is_its_base_model(tmp_path):
    oft = tiny_oft_lora_overrides(tmp_path, "algorithm.kl_beta=0.1")
    trainer = Trainer(small_config(tmp_path, "grpo", "runner.experiment_name=kl", *oft))
    reference = trainer.updater.reference
    assert isinstance(reference, LoraBaseReference) and reference.policy is trainer.policy  # no second model
    for name, param in trainer.policy.named_parameters():
        if ".lora_B" in name:
            param.data.normal_(0.0, 0.5)  # the adapters now change the policy
    obs = {"image": np.zeros((2, 32, 32, 3), dtype=np.uint8), "task": ("open the drawer", "close the drawer")}
    tokens = trainer.policy.act(obs, generator=torch.Generator().manual_seed(0)).action_tokens
    adapted = trainer.policy.evaluate(obs, tokens).logprobs
    base = reference.evaluate(obs, tokens).logprobs
    assert not torch.allclose(adapted, base)
    trainable = {n for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)  # switching adapters off and on keeps them trainable
    kl = trainer.run().history[-1]["train/actor/kl"]
    assert math.isfinite(kl) and kl > 0


def test_a_fresh_run_does_not_replace_an_earlier_runs_checkpoints(tmp_path):
    config = small_config(tmp_path, "grpo", "runner.max_steps=1", "runner.experiment_name=again")
    first = Trainer(config).run().last_checkpoint
    digest = hashlib.sha256((first / "trainer_state.pt").read_bytes()).hexdigest()
    with pytest.raises(ConfigError, match="already holds checkpoints of an earlier run: resume it with"):
        Trainer(config)
    assert hashlib.sha256((first / "trainer_state.pt").read_bytes()).hexdigest() == digest
    Trainer(
        small_config(tmp_path, "grpo", "runner.max_steps=1", "runner.experiment_name=again", "runner.overwrite=true")
    )


def test_ppo_from_a_behaviour_cloned_small_policy_gets_a_new_critic(tmp_path):
    """A policy saved without a value head (as behaviour cloning saves it) trains with PPO: the critic is new."""
    bc_config = SmallPolicyConfig(image_size=32, channels=(8,), hidden_size=32, add_value_head=False)
    SmallCNNPolicy(bc_config, torch.Generator().manual_seed(5)).save_pretrained(tmp_path / "bc")
    bc = SmallCNNPolicy.from_pretrained(tmp_path / "bc")
    trainer = Trainer(
        small_config(tmp_path, "ppo", "runner.experiment_name=bc_ppo", f"actor.model.model_path={tmp_path / 'bc'}")
    )
    for key, value in bc.state_dict().items():
        assert torch.equal(trainer.policy.state_dict()[key], value), key
    assert trainer.policy.value_head is not None
    result = trainer.run()
    saved = SmallCNNPolicy.from_pretrained(result.last_checkpoint / "policy")
    assert saved.value_head is not None and saved.config.add_value_head
    with pytest.raises(ConfigError, match=r"another architecture: add_value_head=True \(config: False\)"):
        Trainer(
            small_config(
                tmp_path,
                "grpo",
                "runner.experiment_name=back",
                f"actor.model.model_path={result.last_checkpoint / 'policy'}",
                "actor.model.add_value_head=false",
            )
        )
