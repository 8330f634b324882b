"""The `opensora-gym` command as a new user meets it: presets by name, one-line errors, checks before loading."""

import subprocess
import sys
import zipfile

import pytest
import torch

from opensora_gym.checkpoint import CheckpointLayout, locate
from trainers.build import load_policy, resolve_world_model
from trainers.cli import main
from trainers.config import ConfigError, load_config, preset_names
from trainers.runner import check_run_inputs
from vla_policies.small import SmallCNNPolicy


def test_configs_lists_every_preset(capsys):
    main(["configs"])
    out = capsys.readouterr().out
    for name in preset_names():
        assert name in out
    assert "embedded default job" in out


def test_help_lists_presets_and_main_keys_with_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "tiny_cpu_grpo" in out and "runner.max_steps=100" in out and "env.train.total_num_envs=64" in out


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["actor.optim.lr=nan"], "actor.optim.lr must be a finite number, got nan"),
        (["runner.experiment_name=../x"], "plain folder name"),
        (["actor.model.model_type=openvla_oft", "actor.model.model_path=models/none"], "hf download"),
        (["env.train.checkpoint=no/such/folder"], "env.train.checkpoint: checkpoint folder no/such/folder"),
        (["runner.resume_dir=no/such/global_step_3"], "runner.resume_dir no/such/global_step_3 does not exist"),
    ],
)
def test_known_errors_are_one_line(tmp_path, overrides, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "tiny_cpu_grpo", f"runner.log_path={tmp_path}", *overrides])
    text = str(exit_info.value.code)
    assert text.startswith("opensora-gym train: ") and message in text and "\n" not in text
    assert not (tmp_path / "tiny_cpu_grpo").exists()  # rejected before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_a_missing_gpu_is_named_before_anything_loads():
    with pytest.raises(ConfigError, match=r"torch sees no CUDA GPU on this machine: use runner\.device=cpu"):
        check_run_inputs(load_config("tiny_cpu_grpo", ["runner.device=cuda"]))


def test_the_tiny_world_model_is_built_aside_and_renamed(tmp_path):
    config = load_config(
        "tiny_cpu_grpo", [f"runner.log_path={tmp_path}", "env.train.tiny_checkpoint=random", "runner.experiment_name=r"]
    )
    stale = tmp_path / "r" / "tiny_world_model_random.partial"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{")  # what a killed run leaves behind
    folder = resolve_world_model(config)
    assert not stale.exists() and (tmp_path / "r" / "tiny_world_model_random" / "resnet_rm.pth").is_file()
    assert resolve_world_model(config) == folder


@pytest.mark.slow
def test_the_wheel_ships_the_presets_and_the_embedded_models(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        check=True,
    )
    (wheel,) = tmp_path.glob("opensora_gym-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in preset_names():
        assert f"trainers/configs/{name}.yaml" in names
    shipped = locate("embedded:libero_spatial_small")
    for path in shipped.rglob("*"):
        if path.is_file():
            assert f"opensora_gym/assets/{path.relative_to(shipped.parent).as_posix()}" in names


def test_train_without_config_runs_the_embedded_default():
    from trainers.cli import build_parser

    args = build_parser().parse_args(["train", "runner.max_steps=1"])
    assert args.config == "libero_spatial_small_grpo"
    config = load_config(args.config, args.overrides)
    assert config.env.train.checkpoint == "embedded:libero_spatial_small"
    assert config.actor.model.model_path == "embedded:libero_spatial_small/policy"
    # both ship inside the package, in the layouts their loaders read
    assert CheckpointLayout.resolve(locate(config.env.train.checkpoint)).dataset.is_dir()
    assert isinstance(load_policy(locate(config.actor.model.model_path), "cpu"), SmallCNNPolicy)
