"""Two gloo processes on the CPU: identical weights on both ranks, rank 0's files, and the 2 x N/2 = 1 x N update."""

import copy
import dataclasses
import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from trainers.build import build_optimizer, build_policy, build_world_model_env, resolve_world_model
from trainers.config import PRESETS_DIR, load_config
from trainers.distributed import (
    DistributedContext,
    ParallelPolicy,
    init_distributed,
    normalize_advantages_global,
    plan_optimizer_steps,
)
from trainers.grpo import grpo_targets
from trainers.rollout import RolloutBatch, collect_rollout
from trainers.runner import Trainer
from trainers.update import PolicyUpdater, flatten_for_update

WORLD_SIZE = 2
NUM_ENVS = 16
GROUP_SIZE = 8


def tiny_overrides(log_path, *extra):
    """The tiny GRPO job at test size: 16 sub-envs in groups of 8, one chunk per episode, a narrow CNN."""
    return [
        f"runner.log_path={log_path}",
        "runner.progress_bar=false",
        "runner.max_steps=2",
        "runner.save_interval=1",
        "runner.val_check_interval=-1",
        f"env.train.total_num_envs={NUM_ENVS}",
        f"env.train.group_size={GROUP_SIZE}",
        "env.train.max_episode_steps=8",
        "env.train.video_cfg.save_video=true",
        "env.train.video_cfg.num_envs=1",
        "actor.model.channels=[8]",
        "actor.model.hidden_size=32",
        "actor.micro_batch_size=4",
        "actor.global_batch_size=16",
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join(rank: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)


def state_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def train_worker(rank: int, port: int, overrides: list[str], out: Path) -> None:
    join(rank, port)
    config = load_config(PRESETS_DIR / "tiny_cpu_grpo.yaml", overrides)
    trainer = Trainer(config)
    result = trainer.run()
    record = {
        "hash": state_hash(trainer.policy.state_dict()),
        "history": result.history,
        "local_num_envs": trainer.env.num_envs,
        "seed_of_first_pass": trainer.env_seed(1, 0),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    torch.distributed.destroy_process_group()


def spawn_training(tmp_path, name, *extra):
    out = tmp_path / f"{name}_out"
    out.mkdir()
    overrides = tiny_overrides(tmp_path, f"runner.experiment_name={name}", *extra)
    mp.spawn(train_worker, args=(free_port(), overrides, out), nprocs=WORLD_SIZE, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_end_with_identical_weights_and_rank0_writes(tmp_path, strategy):
    ranks = spawn_training(
        tmp_path, strategy, "env.train.tiny_checkpoint=action_sensitive", f"actor.strategy={strategy}"
    )
    assert ranks[0]["hash"] == ranks[1]["hash"]
    # Every rank logs the same metrics: they are reduced over all 16 sub-envs.
    assert ranks[0]["history"] == ranks[1]["history"]
    assert len(ranks[0]["history"]) == 2
    assert [r["local_num_envs"] for r in ranks] == [NUM_ENVS // WORLD_SIZE] * WORLD_SIZE
    assert ranks[1]["seed_of_first_pass"] - ranks[0]["seed_of_first_pass"] == NUM_ENVS // WORLD_SIZE
    run_dir = tmp_path / strategy
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(list((run_dir / "tensorboard").iterdir())) == 1  # rank 1 wrote no event file
    videos = sorted(p.name for p in (run_dir / "video" / "train").glob("*.mp4"))
    assert videos and all(name.startswith("step1") for name in videos)
    checkpoint = run_dir / "checkpoints" / "global_step_2"
    assert (checkpoint / "policy" / "model.safetensors").is_file()
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert state["optimizer_layout"] == ("fqn" if strategy == "fsdp" else "ids")
    assert len(state["rank_generators"]) == WORLD_SIZE
    from safetensors.torch import load_file

    saved = load_file(checkpoint / "policy" / "model.safetensors")
    assert state_hash(saved) == ranks[0]["hash"]  # the full (unsharded) weights


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_critic_warmup_on_two_ranks_freezes_the_policy_on_every_rank(tmp_path, strategy):
    ppo = [
        "algorithm.adv_type=gae", "algorithm.filter_rewards=false", "actor.model.add_value_head=true",
        "actor.model.value_type=action_level",
    ]  # fmt: skip
    ranks = spawn_training(
        tmp_path, strategy, "env.train.tiny_checkpoint=action_sensitive", f"actor.strategy={strategy}",
        "actor.optim.critic_warmup_steps=1", *ppo,
    )  # fmt: skip
    assert ranks[0]["hash"] == ranks[1]["hash"] and ranks[0]["history"] == ranks[1]["history"]
    lr = load_config(PRESETS_DIR / "tiny_cpu_grpo.yaml").actor.optim.lr
    assert [m["train/actor/lr"] for m in ranks[0]["history"]] == [0.0, lr]
    first = torch.load(tmp_path / strategy / "checkpoints" / "global_step_1" / "trainer_state.pt", weights_only=True)
    assert first["optimizer_steps"] == 1


def test_resume_on_two_ranks_continues_exactly(tmp_path):
    uninterrupted = spawn_training(tmp_path, "full", "env.train.tiny_checkpoint=random", "actor.strategy=ddp")
    resume = tmp_path / "full" / "checkpoints" / "global_step_1"
    resumed = spawn_training(
        tmp_path,
        "resumed",
        "env.train.tiny_checkpoint=random",
        "actor.strategy=ddp",
        f"runner.resume_dir={resume}",
        # The resumed run reads the world model of the first run's folder.
        f"env.train.checkpoint={tmp_path / 'full' / 'tiny_world_model_random'}",
    )
    assert resumed[0]["hash"] == resumed[1]["hash"] == uninterrupted[0]["hash"]
    assert resumed[0]["history"] == uninterrupted[0]["history"][1:]


# ------------------------------------------------------------------------------------------ one update step


def update_config(log_path):
    return load_config(
        PRESETS_DIR / "tiny_cpu_grpo.yaml",
        tiny_overrides(
            log_path,
            "env.train.tiny_checkpoint=random",
            "algorithm.filter_rewards=false",
            # One optimizer step; each rank's rows form one micro-batch.
            "actor.micro_batch_size=8",
            "actor.global_batch_size=16",
            "actor.optim.clip_grad=1000.0",
        ),
    )


def rollout_of_all_envs(config) -> tuple[RolloutBatch, torch.nn.Module]:
    """The same 16-env rollout in every process (fixed seeds), and the initial policy."""
    env = build_world_model_env(config, num_envs=NUM_ENVS)
    policy = build_policy(config.actor.model, env.world_model.statistics, "cpu", config.actor.seed)
    batch = collect_rollout(env, policy, 1, seed=3, generator=torch.Generator().manual_seed(4), temperature=1.6)
    return batch, policy


def trajectories(batch: RolloutBatch, start: int, stop: int) -> RolloutBatch:
    """Trajectories [start, stop) of a batch (the sub-envs of one rank)."""
    picked = {}
    for name in ("images", "action_tokens", "logprobs", "rewards", "dones", "loss_mask"):
        picked[name] = getattr(batch, name)[:, start:stop]
    for name in ("success", "episode_return", "episode_length"):
        picked[name] = getattr(batch, name)[start:stop]
    tasks = [step[start:stop] for step in batch.tasks]
    return RolloutBatch(tasks=tasks, values=None, **picked)


def updated_gradients_and_weights(config, policy, data, strategy, context):
    """(first Adam moments by parameter name, full weights) after one update under `strategy`."""
    parallel = ParallelPolicy(copy.deepcopy(policy), strategy, context)
    updater = PolicyUpdater(
        parallel.module,
        build_optimizer(parallel.module, config.actor),
        config.algorithm,
        config.actor,
        config.rollout,
        config.env.train.max_episode_steps,
        parallel=parallel,
    )
    metrics = updater.update(data)
    parallel.sync_replica()
    layout, state = parallel.optimizer_state(updater.optimizer)
    if layout == "ids":
        params = [p for group in updater.optimizer.param_groups for p in group["params"]]
        names = {id(p): n for n, p in parallel.module.named_parameters()}
        moments = {names[id(params[i])]: s["exp_avg"].clone() for i, s in state["state"].items()}
    else:
        # The full state is gathered on rank 0 only.
        moments = {name: s["exp_avg"].clone() for name, s in state.get("state", {}).items()}
    weights = {k: v.clone() for k, v in parallel.replica.state_dict().items()}
    return moments, weights, metrics


def update_worker(rank: int, port: int, log_path: Path, out: Path) -> None:
    join(rank, port)
    context = init_distributed("cpu")
    config = update_config(log_path)
    batch, policy = rollout_of_all_envs(config)
    share = NUM_ENVS // WORLD_SIZE
    batch = trajectories(batch, rank * share, (rank + 1) * share)
    targets = grpo_targets(batch, config.algorithm, config.env.train.group_size)
    data = flatten_for_update(batch, targets, with_critic=False)
    results = {s: updated_gradients_and_weights(config, policy, data, s, context) for s in ("ddp", "fsdp")}
    advantages = torch.randn(3, share, 1, generator=torch.Generator().manual_seed(rank))
    mask = torch.rand(3, share, 1, generator=torch.Generator().manual_seed(10 + rank)) > 0.3
    normalized = normalize_advantages_global(advantages, mask, context)
    torch.save(
        {"results": results, "advantages": advantages, "mask": mask, "normalized": normalized}, out / f"{rank}.pt"
    )
    torch.distributed.destroy_process_group()


def test_two_ranks_of_half_the_envs_update_like_one_process_of_all(tmp_path):
    config = update_config(tmp_path)
    resolve_world_model(config)
    batch, policy = rollout_of_all_envs(config)
    targets = grpo_targets(batch, config.algorithm, config.env.train.group_size)
    data = flatten_for_update(batch, targets, with_critic=False)
    assert len(data) == NUM_ENVS  # every trajectory's single chunk step is fitted
    moments, weights, metrics = updated_gradients_and_weights(config, policy, data, "none", DistributedContext())

    out = tmp_path / "ranks"
    out.mkdir()
    mp.spawn(update_worker, args=(free_port(), tmp_path, out), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(out / f"{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    for strategy in ("ddp", "fsdp"):
        rank_moments = [r["results"][strategy][0] for r in ranks]
        rank_weights = [r["results"][strategy][1] for r in ranks]
        assert state_hash(rank_weights[0]) == state_hash(rank_weights[1]), strategy
        assert rank_moments[0].keys() == moments.keys()
        for name, moment in moments.items():
            # The same gradient summed in another order: float32 rounding only.
            torch.testing.assert_close(rank_moments[0][name], moment, rtol=1e-5, atol=1e-7, msg=f"{strategy} {name}")
        for name, weight in weights.items():
            # Adam's first step moves every entry by about lr: the weights agree where the gradients are not noise.
            torch.testing.assert_close(rank_weights[0][name], weight, rtol=1e-5, atol=1e-5, msg=f"{strategy} {name}")
        rank_metrics = ranks[0]["results"][strategy][2]
        assert rank_metrics.keys() == metrics.keys()
        for key in ("actor/policy_loss", "entropy_loss", "actor/grad_norm"):
            assert rank_metrics[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-7), (strategy, key)

    # PPO's whitening over both ranks equals the whitening of the concatenated advantages.
    from trainers.advantages import normalize_advantages

    whole = normalize_advantages(
        torch.cat([r["advantages"] for r in ranks], dim=1), torch.cat([r["mask"] for r in ranks], dim=1)
    )
    torch.testing.assert_close(torch.cat([r["normalized"] for r in ranks], dim=1), whole)


@dataclasses.dataclass(frozen=True)
class RankZeroOfTwo(DistributedContext):
    """Rank 0 of two, where rank 1's gathered value is `other` (no process group)."""

    other: object = None

    def all_gather_objects(self, value):
        return [value, self.other]


def passes_of(plans):
    return [[None if rows is None else rows.tolist() for rows in plan.passes] for plan in plans]


def test_plans_pad_a_short_rank_with_zero_weighted_passes_under_fsdp():
    mask = torch.tensor([[True], [False], [True], [True], [False], [False]])  # rank 0's six rows
    empty = torch.tensor([], dtype=torch.long)
    # Rank 0's rows with a valid entry, per micro-batch of each optimizer step; rank 1 sends (passes, valid entries).
    global_batches = [[torch.tensor([0]), empty], [torch.tensor([2, 3]), empty], [empty, empty]]
    context = RankZeroOfTwo(world_size=2, other=[(2, 5), (0, 0), (0, 0)])
    fsdp = plan_optimizer_steps(global_batches, mask, context, lockstep=True)
    ddp = plan_optimizer_steps(global_batches, mask, context, lockstep=False)
    # FSDP: as many passes as the rank with the most; a step without valid rows anywhere still takes one pass.
    assert passes_of(fsdp) == [[[0], None], [[2, 3]], [None]]
    assert passes_of(ddp) == [[[0]], [[2, 3]], [None]]
    assert [plan.valid_entries for plan in fsdp] == [6, 2, 0] and fsdp[0].micro_batches == 2
    # The token-mean weight of rank 0's pass: its valid entries over both ranks', times the 2 ranks.
    assert fsdp[0].token_mean_weight(1) == 2 * 1 / 6
