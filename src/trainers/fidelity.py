"""The fidelity audit of a run's world model and policy (the `audit` config section): `opensora-gym audit` and the
trainer's periodic audit. The measuring code is `opensora_gym.audit`; this module builds its envs and policy.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from opensora_gym.audit import AuditReport, audit_world_model
from opensora_gym.rectified_flow import RectifiedFlowSampler
from opensora_gym.spaces import policy_actions
from opensora_gym.world_model import WorldModel
from trainers.build import build_world_model_env
from trainers.config import TrainConfig
from trainers.evaluate import libero_episodes
from vla_policies.base import Policy

if TYPE_CHECKING:
    from opensora_gym.libero import LiberoConfig

__all__ = ["SIMULATOR_REPORT", "audit_metrics", "run_fidelity_audit", "simulator_config"]

# The name of the report against the simulator; approximate modes are `steps_<k>`.
SIMULATOR_REPORT = "simulator"


def simulator_config(config: TrainConfig) -> LiberoConfig:
    """The audited simulator: the audit's protocol and suite, rendered at the side the evaluation renders at
    (`env.eval.image_size`, e.g. the recordings' 128 px that a policy shrinks as it shrank its training frames), or
    at the world model's side when none is set; the audit resizes the simulator's frames to the world model's."""
    from opensora_gym.libero import LiberoConfig

    audit = config.audit
    image_size = config.env.eval.image_size or config.env.train.image_size
    return LiberoConfig.from_protocol(audit.protocol, audit.max_episode_steps, suite=audit.suite, image_size=image_size)


def run_fidelity_audit(
    config: TrainConfig, world_model: WorldModel, policy: Policy, folder: str | Path
) -> dict[str, AuditReport]:
    """Audits `world_model` with `policy` as `config.audit` says and saves each report under `folder/<name>`.

    Returns:
        `{"simulator": the world model against LIBERO, "steps_<k>": approximate mode k against exact mode, ...}`.
    """
    from opensora_gym.libero import LiberoVectorEnv, suite_walk

    audit, folder = config.audit, Path(folder)
    starts = [
        (e["task_id"], e["trial_id"])
        for e in libero_episodes(suite_walk(audit.suite), audit.num_starts, audit.task_ids, audit.trial_ids)
    ]
    if audit.recorded_episodes is not None and len(audit.recorded_episodes) != len(starts):
        raise ValueError(
            f"audit.recorded_episodes must name one trajectory per start ({len(starts)}), got "
            f"{len(audit.recorded_episodes)}"
        )
    num_envs = min(audit.total_num_envs or len(starts), len(starts))
    libero_config = simulator_config(config)
    chunk = config.env.train.action_chunk
    steps = math.ceil(libero_config.episode_limit / chunk) * chunk

    def world_model_env(model: WorldModel):
        return build_world_model_env(config, num_envs, group_size=1, world_model=model, max_episode_steps=steps)

    exact = world_model_env(world_model)
    recorded = None
    if audit.recorded_episodes is not None:
        recorded = [policy_actions(exact.dataset.episode(i).actions) for i in audit.recorded_episodes]
    policy.eval()
    generator = torch.Generator(device=policy.device).manual_seed(audit.seed)

    @torch.no_grad()
    def act(observation):
        out = policy.act(
            observation,
            do_sample=config.env.eval.do_sample,
            temperature=config.rollout.temperature_eval,
            top_k=config.rollout.top_k,
            generator=generator,
        )
        return out.actions

    def run(name: str, candidate, reference=None) -> AuditReport:
        videos = folder / name / "videos" if audit.save_video else None
        report = audit_world_model(
            simulator,
            candidate,
            starts,
            act,
            recorded_actions=recorded,
            reference_env=reference,
            seed=audit.seed,
            divergence_psnr=audit.divergence_psnr,
            video_folder=videos,
        )
        report.save(folder / name)
        return report

    simulator = LiberoVectorEnv(libero_config, num_envs=num_envs)
    try:
        reports = {SIMULATOR_REPORT: run(SIMULATOR_REPORT, exact)}
        for k in audit.compare_steps:
            reports[f"steps_{k}"] = run(f"steps_{k}", world_model_env(_with_sampling_steps(world_model, k)), exact)
    finally:
        simulator.close()
    return reports


def _with_sampling_steps(model: WorldModel, num_sampling_steps: int) -> WorldModel:
    """`model` with another number of sampling steps; the networks are shared, not copied."""
    sampler = RectifiedFlowSampler(dataclasses.replace(model.sampler.config, num_sampling_steps=num_sampling_steps))
    return WorldModel(model.dit, model.vae, model.reward_model, model.statistics, sampler, model.image_size)


def audit_metrics(reports: dict[str, AuditReport]) -> dict[str, float]:
    """The reports' summaries as logger metrics: `audit/<key>` against the simulator, `audit/steps_<k>/<key>`."""
    metrics = {}
    for name, report in reports.items():
        prefix = "audit/" if name == SIMULATOR_REPORT else f"audit/{name}/"
        metrics.update({f"{prefix}{key}": value for key, value in report.summary().items()})
    return metrics
