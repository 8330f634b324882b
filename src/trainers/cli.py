"""`opensora-gym` command line: train and evaluate policies, audit world models, record, convert and train them.

opensora-gym train --config tiny_cpu_grpo runner.max_steps=20
opensora-gym eval --config tiny_cpu_grpo runner.ckpt_path=runs/tiny_cpu_grpo/checkpoints/global_step_20
opensora-gym audit --config tiny_cpu_grpo runner.ckpt_path=runs/tiny_cpu_grpo/checkpoints/global_step_20
opensora-gym configs
opensora-gym rollout --chunks 2
opensora-gym collect --expert --output data/spatial_expert --task-ids 0 1 --trial-ids 0 1 2
opensora-gym convert lerobot datasets/libero_lerobot --output data/libero_lerobot
opensora-gym train-world-model --dataset data/spatial_expert/dataset --vae runs/vae/vae --out runs/wm
opensora-gym compare-evals runs/a/eval/policy/eval_results.json runs/b/eval/policy/eval_results.json
torchrun --nproc_per_node 2 -m trainers.cli train --config tiny_cpu_grpo actor.strategy=ddp
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

from opensora_gym import cli as world_model_cli
from opensora_gym import convert
from opensora_gym.training import cli as training_cli
from trainers import behavior_cloning, collect, compare
from trainers.config import TrainConfig, config_to_dict, load_config, preset_names, resolve_config_path

__all__ = ["build_parser", "main", "run_audit", "run_eval"]

DEFAULT_PRESET = "libero_spatial_small_grpo"
# Errors with a message meant for the user: bad settings, missing or malformed files, a diverged run, a missing extra.
KNOWN_ERRORS = (ValueError, OSError, ImportError, RuntimeError)
# The keys a newcomer changes first, shown with their defaults in `--help`.
MAIN_KEYS = (
    "runner.experiment_name", "runner.log_path", "runner.max_steps", "runner.device", "runner.resume_dir",
    "runner.ckpt_path", "env.train.checkpoint", "env.train.total_num_envs", "env.train.max_episode_steps",
    "env.eval.env_type", "algorithm.adv_type", "env.train.group_size", "actor.model.model_type",
    "actor.model.model_path", "actor.optim.lr", "actor.global_batch_size", "actor.micro_batch_size",
)  # fmt: skip


def _main_keys_help() -> str:
    defaults = config_to_dict(TrainConfig())
    lines = []
    for key in MAIN_KEYS:
        value = defaults
        for part in key.split("."):
            value = value[part]
        lines.append(f"  {key}={value}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    epilog = (
        f"presets (--config NAME): {', '.join(preset_names())}\n"
        f"main keys (key.path=value) and their defaults:\n{_main_keys_help()}\n"
        "opensora-gym configs lists the presets with what each runs."
    )
    parser = argparse.ArgumentParser(
        prog="opensora-gym",
        description=__doc__.split("\n")[0],
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("train", "train a policy with GRPO or PPO in the world-model env (or the real simulator)"),
        ("eval", "evaluate a policy (runner.ckpt_path) over a fixed list of episodes"),
        ("audit", "audit the world model against the LIBERO simulator with a policy (the audit section)"),
    ):
        command = commands.add_parser(
            name, help=help_text, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        command.add_argument(
            "--config",
            default=DEFAULT_PRESET,
            help=f"a YAML file or a preset name (default: {DEFAULT_PRESET}; presets: {', '.join(preset_names())})",
        )
        command.add_argument("--debug", action="store_true", help="show the traceback of an error")
        command.add_argument(
            "overrides", nargs="*", metavar="key.path=value", help="config overrides, e.g. runner.max_steps=10"
        )
    commands.add_parser("configs", help="list the shipped config presets")
    world_model_cli.add_rollout_arguments(
        commands.add_parser("rollout", help="imagine a few action chunks in the world model and write an mp4")
    )
    convert.add_convert_arguments(commands.add_parser("convert", help="LIBERO HDF5 or LeRobot data -> dataset folder"))
    collect.add_collect_arguments(
        commands.add_parser("collect", help="LIBERO episodes of the expert or a policy -> dataset folder")
    )
    training_cli.add_commands(commands)
    behavior_cloning.add_command(commands)
    compare.add_command(commands)
    return parser


def list_presets() -> None:
    """Prints each preset's name and the first line of its leading comment."""
    for name in preset_names():
        first = resolve_config_path(name).read_text(encoding="utf-8").splitlines()[0]
        summary = first.removeprefix("#").strip() if first.startswith("#") else ""
        print(f"{name:45s} {summary}")


def run_eval(config: TrainConfig) -> dict:
    """Evaluates `runner.ckpt_path` (or the initial policy) on `env.eval`; prints a table, writes JSON.

    Every evaluation gets its own folder, `<run folder>/eval/<policy>[-k]` (results, TensorBoard, videos), so it
    neither writes into a training run's curves nor replaces an earlier evaluation.

    Returns:
        the result as plain data (`EvalResult.to_dict`), with `folder` added.
    """
    from trainers.build import build_eval_env, eval_metrics, evaluate, starting_policy
    from trainers.loggers import MetricLogger
    from trainers.runner import check_run_inputs

    check_run_inputs(config, evaluation=True)
    folder = _new_eval_folder(config)
    with build_eval_env(config, folder) as setup:
        result = evaluate(config, setup, starting_policy(config, setup.statistics))
    print(result.table())
    data = {**result.to_dict(), "folder": str(folder)}
    (folder / "eval_results.json").write_text(json.dumps(data, indent=2) + "\n")
    logger = MetricLogger(config.runner.logger_backends, folder, folder.name)
    logger.log(eval_metrics(result), 0)
    logger.close()
    print(f"results: {folder / 'eval_results.json'}")
    return data


def run_audit(config: TrainConfig) -> dict:
    """Audits `env.train`'s world model against LIBERO with `runner.ckpt_path` (or the initial policy) as the
    `audit` section says, in `<run folder>/audit/<policy>[-k]`; prints the markdown reports.

    Returns:
        the logged numbers (`trainers.fidelity.audit_metrics`), with `folder` added.
    """
    from trainers.build import build_world_model_env, starting_policy
    from trainers.fidelity import audit_metrics, run_fidelity_audit
    from trainers.runner import check_run_inputs

    check_run_inputs(config)
    folder = _new_eval_folder(config, "audit")
    world_model = build_world_model_env(config, num_envs=1, group_size=1).world_model
    reports = run_fidelity_audit(config, world_model, starting_policy(config, world_model.statistics), folder)
    for report in reports.values():
        print(report.markdown())
    print(f"reports: {folder}")
    return {**audit_metrics(reports), "folder": str(folder)}


def _new_eval_folder(config: TrainConfig, kind: str = "eval") -> Path:
    """`<run folder>/<kind>/<name of the evaluated policy>`, with `-2`, `-3`, ... when taken; created."""
    ckpt = config.runner.ckpt_path
    name = "initial_policy" if ckpt is None else Path(ckpt).resolve().name
    parent = config.runner.run_dir / kind
    parent.mkdir(parents=True, exist_ok=True)
    folder, k = parent / name, 1
    while True:
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            k += 1
            folder = parent / f"{name}-{k}"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "rollout":
            world_model_cli.rollout(args)
        elif args.command == "configs":
            list_presets()
        elif args.command == "convert":
            convert.run_convert(args)
        elif args.command == "collect":
            collect.run_collect(args)
        elif args.command in training_cli.COMMANDS:
            training_cli.run(args)
        elif args.command == "train-policy":
            behavior_cloning.run(args)
        elif args.command == "compare-evals":
            compare.run(args)
        elif args.command == "train":
            from trainers.runner import train

            result = train(load_config(args.config, args.overrides))
            print(f"run folder: {result.run_dir}; last checkpoint: {result.last_checkpoint}")
        elif args.command == "audit":
            run_audit(load_config(args.config, args.overrides))
        else:
            run_eval(load_config(args.config, args.overrides))
    except KNOWN_ERRORS as error:
        if getattr(args, "debug", False):
            traceback.print_exc()
        message = " ".join(str(error).split())  # one line, whatever the error's own layout
        sys.exit(f"opensora-gym {args.command}: {message} (--debug shows the traceback)")
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
