"""`opensora-gym` command line: `train` and `eval` a policy from a YAML config, `rollout` imagines a few chunks.

opensora-gym train --config configs/tiny_cpu_grpo.yaml runner.max_steps=20
opensora-gym eval --config configs/tiny_cpu_grpo.yaml runner.ckpt_path=runs/tiny_cpu_grpo/checkpoints/global_step_20
opensora-gym rollout --chunks 2
torchrun --nproc_per_node 2 -m trainers.cli train --config configs/tiny_cpu_grpo.yaml actor.strategy=ddp
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from opensora_gym import cli as world_model_cli
from opensora_gym.training import cli as training_cli
from trainers.config import ConfigError, TrainConfig, load_config

__all__ = ["build_parser", "main", "run_eval"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opensora-gym", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("train", "train a policy with GRPO or PPO in the world-model env"),
        ("eval", "evaluate a policy (runner.ckpt_path) over a fixed list of episodes"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", help="YAML config (default: the built-in defaults)")
        command.add_argument(
            "overrides", nargs="*", metavar="key.path=value", help="config overrides, e.g. runner.max_steps=10"
        )
    world_model_cli.add_rollout_arguments(
        commands.add_parser("rollout", help="imagine a few action chunks in the world model and write an mp4")
    )
    training_cli.add_commands(commands)
    return parser


def run_eval(config: TrainConfig) -> dict:
    """Evaluates `runner.ckpt_path` (or the initial policy) on `env.eval`; prints a table, writes JSON.

    Returns:
        the result as plain data (`EvalResult.to_dict`).
    """
    from trainers.evaluate import evaluate_policy
    from trainers.loggers import MetricLogger
    from trainers.runner import build_eval_env, build_policy, load_policy

    eval_cfg, runner = config.env.eval, config.runner
    setup = build_eval_env(config, runner.run_dir)
    env, statistics, episodes = setup.env, setup.statistics, setup.episodes
    if runner.ckpt_path is not None:
        policy = load_policy(config, runner.ckpt_path, statistics)
    else:
        policy = build_policy(config.actor.model, statistics, runner.device, config.actor.seed)
    try:
        result = evaluate_policy(
            env,
            policy,
            episodes,
            do_sample=eval_cfg.do_sample,
            temperature=config.rollout.temperature_eval,
            top_k=config.rollout.top_k,
            seed=eval_cfg.seed,
        )
    finally:
        env.close()
    print(result.table())
    runner.run_dir.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    (runner.run_dir / "eval_results.json").write_text(json.dumps(data, indent=2) + "\n")
    low, high = result.interval
    logger = MetricLogger(runner.logger_backends, runner.run_dir, runner.experiment_name)
    logger.log({"eval/success_once": result.success_rate, "eval/success_ci_low": low, "eval/success_ci_high": high}, 0)
    logger.close()
    print(f"results: {runner.run_dir / 'eval_results.json'}")
    return data


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "rollout":
        world_model_cli.rollout(args)
        return
    if args.command in training_cli.COMMANDS:
        training_cli.run(args)
        return
    try:
        config = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as error:
        sys.exit(f"opensora-gym {args.command}: {error}")
    if args.command == "train":
        from trainers.runner import train

        result = train(config)
        print(f"run folder: {result.run_dir}; last checkpoint: {result.last_checkpoint}")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    else:
        run_eval(config)


if __name__ == "__main__":
    main()
