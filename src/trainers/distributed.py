"""Training on several processes: `torchrun` with replicated (`ddp`) or sharded (`fsdp`) policy weights.

Launch (one process per GPU; `actor.strategy` picks how the policy is spread):

    torchrun --nproc_per_node 2 -m trainers.cli train --config opensora_libero_spatial_grpo_openvlaoft \
        runner.device=cuda actor.strategy=fsdp

or `torchrun --nproc_per_node 2 $(which opensora-gym) train --config ... actor.strategy=ddp`. On the CPU the same
command runs gloo processes (`runner.device=cpu`). `torch.distributed` is initialised from torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): nccl on CUDA with rank r on `cuda:LOCAL_RANK`, gloo on
the CPU. `NCCL_NVLS_ENABLE=0` is set (unless already set) before NCCL starts: NVLink multicast stays off.

What each rank does:

- Env: rank r steps `env.train.total_num_envs / world_size` sub-envs (a multiple of `env.train.group_size`, so a
  GRPO group never spans ranks) and resets them with `seed + r * local_num_envs`, so sub-env generators get the
  seeds of the single-process run's sub-envs. The start trajectories are drawn per rank from that seed, so they
  are not the single-process run's draws.
- Targets: GRPO advantages are per group, hence exact per rank; PPO's advantage whitening uses the mean and std
  over every rank's valid entries (`normalize_advantages_global`).
- Update: `actor.global_batch_size` counts chunk steps over all ranks; rank r cuts its shuffled steps into
  batches of `global_batch_size / world_size` (`rank_batch_size`), so every rank runs the same number of optimizer
  steps. A micro-batch's loss is weighted by 1 / the micro-batches of a rank's share (`embodied`) or by
  `world_size x its valid entries / the valid entries of this optimizer step over all ranks` (`token_mean`;
  `plan_optimizer_steps` gathers the counts), and gradients are averaged over ranks, so the step's gradient is
  that of one process holding the whole global batch.
  A non-finite loss on any rank stops every rank (`first_failure`), as do non-finite weights (`all_ranks_finite`).
- `ddp`: every rank holds the full policy; after the backward passes of an optimizer step, the gradients of the
  trainable parameters are averaged with one all-reduce per bucket (`average_gradients`). This keeps the
  policy's own `act` / `evaluate` methods, which a `DistributedDataParallel` wrapper would bypass (its hooks
  only fire through `forward`), and gives DDP's result.
- `fsdp`: the policy is sharded with FSDP2 (`fully_shard`: each LLaMA decoder layer and ViT block of
  OpenVLA-OFT, then the whole policy), `evaluate` registered as a forward method. FSDP's collectives run in every
  forward, so every rank runs the same number of micro-batches (a rank short of rows runs zero-weighted passes).
  Rollouts, evaluation and checkpoints use a full replica of the policy on each rank (no collectives, so ranks
  may stop their rollouts at different steps); after each update the trainable parameters (LoRA adapters and
  value head when LoRA is on) are gathered into it (`sync_replica`).
- Metrics: the rollout metrics are computed over every rank's trajectories and valid entries (the per-rank
  selections are gathered), the update metrics over every rank's micro-batches.
- Files: only rank 0 writes TensorBoard, videos, `config.yaml` and checkpoints. Checkpoints hold the full policy
  (`save_pretrained`) and the full optimizer state (FQN-keyed under `fsdp`), plus every rank's generators, so a
  run resumed with the same number of ranks continues exactly.
"""

from __future__ import annotations

import copy
import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from vla_policies.base import Policy

__all__ = [
    "DistributedContext",
    "OptimizerStepPlan",
    "ParallelPolicy",
    "all_ranks_finite",
    "average_gradients",
    "first_failure",
    "gather_concat",
    "init_distributed",
    "normalize_advantages_global",
    "plan_optimizer_steps",
    "rank_batch_size",
]

Strategy = Literal["none", "ddp", "fsdp"]
# Gradients are all-reduced in flat buckets of at most this many elements: few collectives, bounded extra memory.
BUCKET_NUMEL = 2**25
# A rank may wait for rank 0's evaluation or checkpoint: far longer than the default 10 minutes.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job.

    Attributes:
        rank: global rank.
        world_size: processes in the job (1: no process group, every collective is the identity).
        local_rank: rank on this machine (the CUDA device index).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def device(self, device: str) -> str:
        """The device of this rank for a configured `device`: `cuda` becomes `cuda:LOCAL_RANK` when distributed."""
        if self.is_distributed and torch.device(device).type == "cuda":
            return f"cuda:{self.local_rank}"
        return device

    def all_gather_objects(self, value: Any) -> list[Any]:
        """`value` of every rank, in rank order (picklable objects; `[value]` on one process)."""
        if not self.is_distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        if not self.is_distributed:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums `tensor` over ranks in place and returns it."""
        if self.is_distributed:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.is_distributed:
            torch.distributed.barrier()


def init_distributed(device: str) -> DistributedContext:
    """Joins the torchrun job of this process (or returns a one-process context when not launched by torchrun).

    Args:
        device: the configured device (`cpu`, `cuda`): nccl on CUDA (rank r on `cuda:LOCAL_RANK`), gloo otherwise.

    Raises:
        RuntimeError: CUDA was asked for but this rank has no GPU `LOCAL_RANK`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistributedContext()
    context = DistributedContext(
        rank=int(os.environ["RANK"]), world_size=world_size, local_rank=int(os.environ.get("LOCAL_RANK", "0"))
    )
    if torch.distributed.is_initialized():
        return context
    if torch.device(device).type == "cuda":
        if context.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"rank {context.rank} wants cuda:{context.local_rank} but this machine has "
                f"{torch.cuda.device_count()} GPUs: launch at most that many processes per node"
            )
        # NVLink multicast (NVLS) must stay off on our machines; NCCL reads this when it creates a communicator.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(context.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
    return context


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


@torch.no_grad()
def average_gradients(parameters: Sequence[nn.Parameter], context: DistributedContext) -> None:
    """Replaces each gradient by its mean over ranks (a parameter without gradient counts as zeros).

    Every rank must pass the same parameters in the same order. Gradients are flattened into buckets of at most
    `BUCKET_NUMEL` elements per dtype and device, one all-reduce each.
    """
    if not context.is_distributed:
        return
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    buckets: dict[tuple[torch.dtype, torch.device], list[list[torch.Tensor]]] = {}
    for parameter in parameters:
        grad = parameter.grad
        lists = buckets.setdefault((grad.dtype, grad.device), [[]])
        if lists[-1] and sum(g.numel() for g in lists[-1]) + grad.numel() > BUCKET_NUMEL:
            lists.append([])
        lists[-1].append(grad)
    for lists in buckets.values():
        for grads in lists:
            flat = torch.cat([g.reshape(-1) for g in grads])  # [sum of numels]
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            flat /= context.world_size
            offset = 0
            for grad in grads:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()


def gather_concat(tensors: dict[str, torch.Tensor], context: DistributedContext) -> dict[str, torch.Tensor]:
    """Every rank's 1-D tensors, concatenated in rank order (the tensors unchanged on one process)."""
    if not context.is_distributed:
        return tensors
    parts = context.all_gather_objects({key: value.cpu() for key, value in tensors.items()})
    return {key: torch.cat([part[key] for part in parts]) for key in tensors}


def normalize_advantages_global(
    advantages: torch.Tensor, mask: torch.Tensor, context: DistributedContext, eps: float = 1e-5
) -> torch.Tensor:
    """`trainers.advantages.normalize_advantages` with the mean and unbiased std of every rank's valid entries.

    Args:
        advantages: [T, B, R] this rank's advantages.
        mask: [T, B, R] bool, this rank's valid entries.
        context: the job.
        eps: added to the std.

    Returns:
        [T, B, R] `(advantages - mean) / (std + eps)`, unchanged when fewer than 2 entries are valid overall.
    """
    valid = advantages[mask].double()  # [num_valid]
    totals = context.all_reduce_sum(torch.stack([torch.tensor(float(valid.numel())), valid.sum().cpu()]))
    count, total = float(totals[0]), float(totals[1])
    if count < 2:
        return advantages
    mean = total / count
    squares = context.all_reduce_sum(((valid - mean) ** 2).sum().cpu().reshape(1))
    std = (float(squares[0]) / (count - 1)) ** 0.5
    return ((advantages.double() - mean) / (std + eps)).to(advantages.dtype)


def _shard_units(policy: Policy) -> list[nn.Module]:
    """The blocks FSDP shards one by one (OpenVLA-OFT's decoder layers and ViT blocks); the rest goes with the root."""
    from vla_policies import OpenVLAOFTPolicy

    if not isinstance(policy, OpenVLAOFTPolicy):
        return []
    model = policy.model
    backbone = model.vision_backbone
    return [
        *model.language_model.model.layers,
        *backbone.featurizer.blocks,
        *backbone.fused_featurizer.blocks,
    ]


class ParallelPolicy:
    """The trained policy spread over the ranks of `context` as `strategy` says (see the module docstring).

    Args:
        policy: the policy, the same weights on every rank (rank 0's are broadcast to make sure).
        strategy: `none` (one process), `ddp` (replicas, averaged gradients) or `fsdp` (sharded, with a full
            replica for rollouts).
        context: the job.

    Attributes:
        module: the policy the optimizer steps (sharded under `fsdp`; its `evaluate` runs FSDP's collectives).
        replica: the full policy for `act`, evaluation and `save_pretrained` (`module` itself unless `fsdp`).
    """

    def __init__(self, policy: Policy, strategy: Strategy, context: DistributedContext):
        self.strategy: Strategy = strategy if context.is_distributed else "none"
        self.context = context
        if self.strategy != "none":
            with torch.no_grad():
                for tensor in [*policy.parameters(), *policy.buffers()]:
                    torch.distributed.broadcast(tensor.data, src=0)
        self.module = policy
        self.replica = policy
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

            self.replica = copy.deepcopy(policy)
            for unit in _shard_units(policy):
                fully_shard(unit)
            fully_shard(policy)
            register_fsdp_forward_method(policy, "evaluate")

    @property
    def lockstep(self) -> bool:
        """Every rank must run the same number of forward/backward passes (FSDP collectives run in them)."""
        return self.strategy == "fsdp"

    def sync_gradients(self, parameters: Sequence[nn.Parameter]) -> None:
        """Averages gradients over ranks under `ddp` (FSDP's backward already reduced them)."""
        if self.strategy == "ddp":
            average_gradients(parameters, self.context)

    def local_norm(self, norm: torch.Tensor) -> torch.Tensor:
        """A gradient norm as a plain tensor (FSDP's `clip_grad_norm_` returns a replicated DTensor)."""
        if self.strategy != "fsdp":
            return norm
        from torch.distributed.tensor import DTensor

        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    @torch.no_grad()
    def sync_replica(self) -> None:
        """Copies the trained (trainable) parameters into the replica under `fsdp`; a collective on every rank."""
        if self.strategy != "fsdp":
            return
        replica = dict(self.replica.named_parameters())
        for name, parameter in self.module.named_parameters():
            if parameter.requires_grad:
                replica[name].copy_(parameter.full_tensor())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Loads a full (unsharded) policy state dict on every rank: into the shards and the replica under `fsdp`."""
        if self.strategy != "fsdp":
            self.module.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.module, state, options=StateDictOptions(full_state_dict=True))
        self.replica.load_state_dict(state)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> tuple[str, dict[str, Any]]:
        """(layout, the full optimizer state): `ids` (`optimizer.state_dict()`) or `fqn` (parameter names, fsdp).

        A collective under `fsdp`; the state is complete on rank 0 (other ranks may get an empty one).
        """
        if self.strategy != "fsdp":
            return "ids", optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return "fqn", get_optimizer_state_dict(self.module, optimizer, options=options)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, layout: str, state: dict[str, Any]) -> None:
        """Restores what `optimizer_state` returned (every rank passes the full state).

        Raises:
            ValueError: the state was saved under another strategy's layout, or does not fit the parameters.
        """
        wanted = "fqn" if self.strategy == "fsdp" else "ids"
        if layout != wanted:
            raise ValueError(
                f"the optimizer state has the {layout!r} layout but actor.strategy {self.strategy!r} needs {wanted!r}: "
                "resume with the actor.strategy the checkpoint was written with"
            )
        if layout == "ids":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            self.module, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
        )


# ------------------------------------------------------------------------------------------------ the update


def rank_batch_size(global_batch_size: int, micro_batch_size: int, context: DistributedContext) -> int:
    """The chunk steps of each rank per optimizer step: `global_batch_size / world_size`, whole micro-batches.

    Raises:
        ValueError: `global_batch_size` is not a multiple of `micro_batch_size` x the number of ranks.
    """
    if global_batch_size % (micro_batch_size * context.world_size):
        raise ValueError(
            f"actor.global_batch_size ({global_batch_size}) must be a multiple of actor.micro_batch_size "
            f"({micro_batch_size}) times the number of ranks ({context.world_size}): each rank takes an equal "
            "share of every global batch in whole micro-batches"
        )
    return global_batch_size // context.world_size


@dataclass(frozen=True)
class OptimizerStepPlan:
    """The forward/backward passes of one optimizer step on this rank.

    Attributes:
        passes: the rows of each pass (a micro-batch's rows with a valid entry); None is a zero-weighted pass,
            which FSDP's collectives need when another rank runs more passes, and which a global batch without a
            valid row takes so that the optimizer still steps (with zero gradients), as RLinf's does.
        micro_batches: the micro-batches of the global batch on each rank.
        valid_entries: the valid entries of the global batch over every rank.
        world_size: the number of ranks.
    """

    passes: list[torch.Tensor | None]
    micro_batches: int
    valid_entries: int
    world_size: int

    def token_mean_weight(self, valid: int) -> float:
        """The weight of a pass with `valid` valid entries under the token-mean: its share of the global batch's
        valid entries, times the ranks since the gradients are averaged over ranks."""
        return self.world_size * valid / self.valid_entries


def plan_optimizer_steps(
    global_batches: list[list[torch.Tensor]], mask: torch.Tensor, context: DistributedContext, lockstep: bool
) -> list[OptimizerStepPlan]:
    """The passes of each optimizer step, from this rank's global batches and every rank's counts.

    Args:
        global_batches: per optimizer step, the rows of each micro-batch that have a valid entry.
        mask: [M, R] bool valid entries of this rank's rows.
        context: the job (a collective when distributed).
        lockstep: every rank runs the same number of passes (`ParallelPolicy.lockstep`).

    Returns:
        one plan per global batch, in order.
    """
    # Per optimizer step: passes with rows and valid entries, on every rank.
    counts = context.all_gather_objects(
        [(sum(len(rows) > 0 for rows in step), int(mask[torch.cat(step)].sum())) for step in global_batches]
    )
    plans = []
    for index, step in enumerate(global_batches):
        passes: list[torch.Tensor | None] = [rows for rows in step if len(rows)]
        if lockstep:
            passes += [None] * (max(1, *(rank[index][0] for rank in counts)) - len(passes))
        elif not passes:
            passes = [None]
        valid_entries = sum(rank[index][1] for rank in counts)
        plans.append(OptimizerStepPlan(passes, len(step), valid_entries, context.world_size))
    return plans


def first_failure(
    failure: tuple[str, dict[str, float]] | None, context: DistributedContext
) -> tuple[str, dict[str, float]] | None:
    """This rank's (reason, metrics) of a non-finite loss, else another rank's (every rank stops together), else
    None; a collective when distributed."""
    failures = context.all_gather_objects(failure)
    if failures[context.rank] is not None:
        return failures[context.rank]
    for other, found in enumerate(failures):
        if found is not None:
            return f"{found[0]} on rank {other}", found[1]
    return None


def all_ranks_finite(parameters: Sequence[torch.Tensor], context: DistributedContext) -> bool:
    """Whether every parameter is finite on every rank (a sharded parameter checks its local shard on each)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in parameters]
    finite = bool(torch.stack([p.detach().isfinite().all() for p in local]).all())
    return all(context.all_gather_objects(finite))
