import pytest

from trainers.config import PRESETS_DIR, ConfigError, TrainConfig, config_to_dict, from_dict, load_config, preset_names


@pytest.mark.parametrize("name", sorted(p.name for p in PRESETS_DIR.glob("*.yaml")))
def test_every_shipped_config_loads_and_round_trips(name):
    config = load_config(PRESETS_DIR / name)
    assert from_dict(TrainConfig, config_to_dict(config)) == config


def test_published_recipe_values():
    for suite in ("spatial", "object"):
        config = load_config(PRESETS_DIR / f"opensora_libero_{suite}_grpo_openvlaoft.yaml")
        train, algorithm, optim = config.env.train, config.algorithm, config.actor.optim
        assert (train.total_num_envs, train.group_size, train.max_episode_steps) == (64, 8, 256)
        assert (train.num_sampling_steps, train.rollout_epoch, train.suite) == (10, 16, suite)
        assert (optim.lr, optim.value_lr, optim.weight_decay, optim.clip_grad) == (2e-5, 3e-3, 0.01, 1.0)
        assert config.rollout.temperature_train == 1.6 and train.reward_coef == 5.0
        assert algorithm.filter_rewards and (algorithm.rewards_lower_bound, algorithm.rewards_upper_bound) == (0.5, 4.5)
        # RLinf's embodied actor passes no dual clip for OpenVLA-OFT and aggregates with masked_mean_ratio.
        assert (algorithm.clip_ratio_low, algorithm.clip_ratio_high, algorithm.clip_ratio_c) == (0.2, 0.28, None)
        assert algorithm.loss_aggregation == "embodied"
        # 256 / 8 chunk steps x 16 rollout epochs x 64 envs = 32768 rows: 4 optimizer steps of 8192.
        steps = train.max_episode_steps // 8 * train.rollout_epoch * train.total_num_envs
        assert steps // config.actor.global_batch_size == 4
        assert config.runner.save_interval == 25 and algorithm.normalize_advantages
        assert not config.actor.model.is_lora and config.actor.model.lora_rank == 32  # RLinf: full fine-tuning
        assert config.runner.logger_backends == ("tensorboard",)
        assert config.actor.global_batch_size == 8192 and config.actor.micro_batch_size == 32


def test_overrides_set_nested_values_with_yaml_types():
    config = load_config(
        PRESETS_DIR / "tiny_cpu_grpo.yaml",
        [
            "env.train.group_size=4",
            "actor.optim.lr=1e-2",
            "runner.logger_backends=[tensorboard, wandb]",
            "env.train.checkpoint=null",
            "actor.model.channels=[8, 16]",
        ],
    )
    assert config.env.train.group_size == 4
    assert config.actor.optim.lr == 0.01
    assert config.runner.logger_backends == ("tensorboard", "wandb")
    assert config.env.train.checkpoint is None
    assert config.actor.model.channels == (8, 16)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm.grup_size=4"], "unknown config key 'grup_size'.*allowed keys: \\['adv_type', 'normalize_adv"),
        (["env.train.group_size=four"], "env.train.group_size must be an integer, got 'four'"),
        (["algorithm.adv_type=ppo"], "algorithm.adv_type must be one of \\['grpo', 'gae'\\], got 'ppo'"),
        (["algorithm.normalize_advantages=3"], "algorithm.normalize_advantages must be true or false"),
        (["runner.logger_backends=[tensorboard, mlflow]"], "runner.logger_backends must be a list of"),
        (["env.train.group_size=3"], "total_num_envs \\(32\\) must be a multiple of env.train.group_size \\(3\\)"),
        (["algorithm.clip_ratio_c=0.5"], "clip_ratio_c must be > 1"),
        (["algorithm.adv_type=gae"], "needs a critic: set actor.model.add_value_head true"),
        (["actor.micro_batch_size=5"], "global_batch_size \\(32\\) must be a multiple of actor.micro_batch_size"),
        (["env.train.group_size.x=1"], "env.train.group_size is a value, not a section"),
        (["algorithm"], "an override must look like key.path=value"),
        (["env.eval.image_size=128"], "env.eval.image_size sets the LIBERO render size: set env_type: libero"),
        (["env.eval.env_type=libero", "env.eval.image_size=0"], "env.eval.image_size must be"),
        (["actor.model.pooling=max"], "actor.model.pooling must be one of"),
        (["actor.optim.critic_warmup_steps=2"], "critic_warmup_steps 2 warms up a critic, but .* is 'grpo'"),
        (["actor.optim.critic_warmup_steps=-1"], "critic_warmup_steps must be >= 0"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PRESETS_DIR / "tiny_cpu_grpo.yaml", overrides)


def test_unknown_yaml_key_is_named_with_its_section(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("env:\n  train:\n    num_envs: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['num_envs'\] in env.train; allowed keys"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match=r"is neither a file nor a preset \(presets: .*tiny_cpu_grpo"):
        load_config(tmp_path / "missing.yaml")


def test_presets_load_by_name():
    assert "tiny_cpu_grpo" in preset_names() and "opensora_libero_spatial_grpo_openvlaoft" in preset_names()
    assert load_config("tiny_cpu_grpo") == load_config(PRESETS_DIR / "tiny_cpu_grpo.yaml")
    assert load_config("tiny_cpu_ppo.yaml").algorithm.adv_type == "gae"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("runner:\n  max_steps: [\n", r"is not valid YAML at line \d+, column \d+"),
        ("runner: !!python/object/apply:os.system ['echo hi']\n", r"not valid YAML at line 1.*constructor.*python"),
    ],
)
def test_yaml_errors_are_one_line_config_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "override",
    [
        "actor.optim.lr=nan", "actor.optim.lr=inf", "actor.optim.clip_grad=nan", "env.train.reward_coef=nan",
        "env.train.success_threshold=1.5", "env.train.success_threshold=nan", "algorithm.gamma=-inf",
        "env.train.total_num_envs=100000", "runner.experiment_name=../escape", "runner.experiment_name=a/b",
    ],
)  # fmt: skip
def test_non_finite_and_out_of_range_settings_are_rejected(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].split(".")[-1]):
        load_config("tiny_cpu_grpo", [override])


def test_rows_per_step_must_fill_whole_global_batches():
    with pytest.raises(ConfigError, match=r"fits 32 chunk steps .* multiple of actor.global_batch_size \(64\)"):
        load_config(PRESETS_DIR / "tiny_cpu_grpo.yaml", ["actor.global_batch_size=64"])
    with pytest.raises(ConfigError, match="loss_aggregation"):
        load_config(PRESETS_DIR / "tiny_cpu_grpo.yaml", ["algorithm.loss_aggregation=seq_mean"])
