"""The fidelity audit: known-answer metrics, agreement counts, and a real LIBERO episode against a tiny world model."""

from __future__ import annotations

import json
import math
from importlib.util import find_spec

import imageio.v2 as imageio
import numpy as np
import pytest

from opensora_gym.audit import (
    MAX_PSNR,
    AuditReport,
    ClosedLoopEpisode,
    audit_world_model,
    psnr,
    side_by_side,
    ssim,
    success_agreement,
    to_world_model_frames,
)
from opensora_gym.env import OpenSoraLiberoEnv
from opensora_gym.spaces import controller_actions, policy_actions
from opensora_gym.world_model import WorldModel


def test_psnr_known_values():
    black = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_allclose(psnr(black, np.full_like(black, 255)), [0.0, 0.0])
    np.testing.assert_allclose(psnr(black, black + 10), 10 * math.log10(255**2 / 100))
    assert psnr(black[0], black[0]) == MAX_PSNR  # identical: the finite cap
    with pytest.raises(ValueError, match=r"one shape \[..., H, W, C\], got \(16, 16, 3\) and \(8, 16, 3\)"):
        psnr(black[0], black[0, :8])


def test_ssim_of_identical_images_is_one_and_of_a_constant_shift_is_the_luminance_term():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 200, size=(3, 24, 20, 3), dtype=np.uint8)
    np.testing.assert_allclose(ssim(image, image), 1.0, atol=1e-12)
    # A constant shift c keeps every variance and covariance: only the luminance term is left. On flat images of
    # value a the means are a and a + c in every window.
    a, c = 100.0, 30.0
    flat = np.full((16, 16, 3), a)
    c1 = (0.01 * 255) ** 2
    expected = (2 * a * (a + c) + c1) / (a**2 + (a + c) ** 2 + c1)
    assert ssim(flat, flat + c) == pytest.approx(expected, abs=1e-12)
    # On a textured image the shift changes the luminance term window by window; SSIM drops below 1.
    assert ssim(image[0], image[0] + 50) < 1.0
    # Inverting an image's contrast gives a negative structure term.
    assert ssim(image[0], 255 - image[0]) < 0.0
    with pytest.raises(ValueError, match="at least 11 x 11 pixels, got 8 x 20"):
        ssim(image[0, :8], image[0, :8])


def test_success_agreement_counts_and_rates():
    world_model = [1, 1, 0, 0, 1, 0]
    simulator = [1, 0, 0, 1, 0, 0]
    agreement = success_agreement(world_model, simulator)
    assert (agreement.both_success, agreement.both_failure) == (1, 2)
    assert (agreement.false_success, agreement.missed_success) == (2, 1)
    rates = agreement.rates()
    assert rates["agreement"]["rate"] == pytest.approx(3 / 6)
    assert rates["false_success_rate"]["rate"] == pytest.approx(2 / 4)  # over the simulator's 4 failures
    assert rates["missed_success_rate"]["rate"] == pytest.approx(1 / 2)  # over its 2 successes
    assert rates["world_model_success"]["rate"] == pytest.approx(3 / 6)
    assert rates["false_success_rate"]["ci_low"] == pytest.approx(0.15003, abs=5e-5)  # Wilson, 2 of 4
    assert rates["false_success_rate"]["ci_high"] == pytest.approx(0.84997, abs=5e-5)
    # No success in the simulator: the missed-success rate has nothing to count.
    assert success_agreement([True, False], [False, False]).rates()["missed_success_rate"] is None
    with pytest.raises(ValueError, match=r"one length, got \(2,\) and \(3,\)"):
        success_agreement([True, False], [True, False, True])


def test_report_summary_and_markdown_from_fixed_episodes(tmp_path):
    # (world model, simulator, replay of the world model's actions in the simulator)
    outcomes = [(True, True, True), (True, False, True), (False, False, False), (False, False, False)]
    report = AuditReport(
        settings={"reference": "LIBERO simulator"},
        closed_loop=[
            ClosedLoopEpisode(0, k, "task", sim, wm, 8, 8, replay_success=replay)
            for k, (wm, sim, replay) in enumerate(outcomes)
        ],
    )
    summary = report.summary()
    assert summary["closed_loop/agreement"] == 0.75 and summary["closed_loop/false_success_rate"] == pytest.approx(
        1 / 3
    )
    assert summary["closed_loop/missed_success_rate"] == 0.0
    # Both imagined successes replay as successes: the false one misled the policy through its frames.
    assert summary["closed_loop/replay_agreement"] == 1.0 and summary["closed_loop/replay_false_success_rate"] == 0.0
    json_path, markdown_path = report.save(tmp_path)
    saved = json.loads(json_path.read_text())
    assert saved["closed_loop_agreement"]["false_success"] == 1 and saved["replay_agreement"]["both_success"] == 2
    markdown = markdown_path.read_text()
    assert "| false_success_rate | 33.3% |" in markdown
    assert "The simulator confirms 2 of the world model's 2 imagined successes" in markdown
    # Audited against another world model, nothing is replayed: no replay numbers.
    unreplayed = AuditReport(settings={}, closed_loop=[ClosedLoopEpisode(0, 0, "task", True, True, 8, 8)])
    assert not any(key.startswith("closed_loop/replay_") for key in unreplayed.summary())
    assert "## Replay" not in unreplayed.markdown()


def test_frames_resize_and_side_by_side_panel():
    frames = np.zeros((2, 3, 64, 64, 3), dtype=np.uint8)
    assert to_world_model_frames(frames, 32).shape == (2, 3, 32, 32, 3)
    left, right = np.full((4, 4, 3), 10, np.uint8), np.full((4, 4, 3), 250, np.uint8)
    panel = side_by_side(left, right)
    assert panel.shape == (4, 12, 3) and (panel[:, 8:] == 240).all()


def test_policy_actions_invert_controller_actions():
    controller = np.array([[0.1, 0, 0, 0, 0, 0, -1], [0, 0, 0, 0, 0, 0.2, 1], [0, 0, 0, 0, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(policy_actions(controller)[:, -1], [1.0, 0.0, 0.5])
    np.testing.assert_array_equal(controller_actions(policy_actions(controller)), controller)


class _StartFramesOnly:
    """A stand-in for the LIBERO env that only renders start frames (the reference is another world model)."""

    num_envs = 2

    def __init__(self, images: np.ndarray):
        self.images, self.unwrapped = images, self

    def reset(self, seed=None, options=None):
        return {"image": self.images, "task": ("put the bowl on the plate", "open the drawer")}, {}


def test_an_approximate_mode_against_exact_mode_with_recorded_actions(checkpoint, tmp_path):
    settings = {"checkpoint": checkpoint, "image_size": 32, "dtype": "float32", "max_episode_steps": 16}
    exact_model = WorldModel.from_pretrained(checkpoint, num_sampling_steps=2, image_size=32)
    exact = OpenSoraLiberoEnv(2, world_model=exact_model, **settings)
    fast_model = WorldModel.from_pretrained(checkpoint, num_sampling_steps=1, image_size=32)
    approximate = OpenSoraLiberoEnv(2, world_model=fast_model, **settings)
    starts = np.stack([exact.dataset.start_frame(e)[0] for e in (0, 1)])
    recorded = [policy_actions(exact.dataset.episode(e).actions) for e in (0, 1, 2)]
    report = audit_world_model(
        _StartFramesOnly(starts), approximate, [(0, 0), (0, 1), (1, 0)], recorded_actions=recorded,
        reference_env=exact, max_chunks=1, video_folder=tmp_path,
    )  # fmt: skip
    assert report.settings["reference"].startswith("world model (2 sampling steps")
    assert report.settings["world_model"].startswith("world model (1 sampling steps")
    assert [(e.task_id, e.trial_id) for e in report.open_loop] == [(0, 0), (0, 1), (1, 0)]
    assert not report.closed_loop  # no policy: open loop only
    for episode in report.open_loop:
        assert [c.chunk for c in episode.chunks] == [0] and episode.chunks[0].frames == 8
        assert np.isfinite([episode.chunks[0].psnr, episode.chunks[0].ssim]).all()
    assert len(imageio.mimread(report.open_loop[2].video)) == 1 + 8
    # Against a copy of itself (the same noise, the same actions) the world model matches frame for frame.
    twin = OpenSoraLiberoEnv(2, world_model=exact_model, **settings)
    same = audit_world_model(_StartFramesOnly(starts), twin, [(0, 0)], recorded_actions=recorded[:1],
                             reference_env=exact, max_chunks=1)  # fmt: skip
    assert same.open_loop[0].chunks[0].psnr == MAX_PSNR and same.open_loop[0].chunks[0].ssim == pytest.approx(1.0)
    assert same.chunk_agreement().rates()["agreement"]["rate"] == 1.0
    with pytest.raises(ValueError, match=r"one \[T >= 8, 7\] array per start \(1\), got 1 arrays, too short"):
        audit_world_model(_StartFramesOnly(starts), twin, [(0, 0)], recorded_actions=[recorded[0][:4]],
                          reference_env=exact, max_chunks=1)  # fmt: skip
    with pytest.raises(ValueError, match="two different env objects"):
        audit_world_model(_StartFramesOnly(starts), exact, [(0, 0)], recorded_actions=recorded[:1],
                          reference_env=exact)  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(find_spec("libero") is None, reason="needs the libero extra: pip install -e '.[libero]'")
def test_a_real_libero_episode_against_a_tiny_world_model(checkpoint, tmp_path):
    from opensora_gym.libero import LiberoConfig, LiberoVectorEnv

    size, chunk = 32, 8
    model = WorldModel.from_pretrained(checkpoint, num_sampling_steps=1, image_size=size)
    world_model_env = OpenSoraLiberoEnv(
        1, checkpoint=checkpoint, world_model=model, image_size=size, dtype="float32", max_episode_steps=16
    )

    def act(obs):  # move right with the gripper open: a fixed policy of the right shape
        actions = np.zeros((len(obs["task"]), chunk, 7), dtype=np.float32)
        actions[..., 0], actions[..., -1] = 0.5, 1.0
        return actions

    simulator = LiberoVectorEnv(LiberoConfig(max_episode_steps=16, image_size=size), num_envs=1)
    try:
        report = audit_world_model(
            simulator, world_model_env, [(0, 3)], act, divergence_psnr=MAX_PSNR, video_folder=tmp_path / "videos"
        )
    finally:
        simulator.close()
    (episode,) = report.open_loop
    assert (episode.task_id, episode.trial_id) == (0, 3) and len(episode.chunks) == 2
    for c in episode.chunks:
        assert c.frames == chunk and 0 < c.psnr < MAX_PSNR and -1 <= c.ssim < 1 and 0 <= c.max_success_prob <= 1
        assert not c.simulator_success  # 16 steps of moving right do not solve the task
    assert episode.first_divergence == 0  # every chunk is below the (impossible) threshold
    (closed,) = report.closed_loop
    assert closed.simulator_length == 16 and not closed.simulator_success
    assert closed.world_model_length in (8, 16)
    # The fixed policy's world-model actions are the simulator's: their replay fails as the simulator's episode did.
    assert closed.replay_success is False
    summary = report.summary()
    keys = ("open_loop/psnr", "open_loop/ssim", "open_loop/label_agreement", "open_loop/first_divergence_chunk",
            "closed_loop/agreement", "closed_loop/false_success_rate", "closed_loop/world_model_success",
            "closed_loop/replay_agreement", "closed_loop/replay_simulator_success")  # fmt: skip
    for key in keys:
        assert np.isfinite(summary[key]), key
    json_path, markdown_path = report.save(tmp_path)
    assert json.loads(json_path.read_text())["open_loop"][0]["chunks"][1]["chunk"] == 1
    assert "## Closed loop" in markdown_path.read_text()
    video = imageio.mimread(episode.video)
    assert len(video) == 1 + 16 and video[0].shape[1] == 3 * video[0].shape[0]  # start + every step, 3 panels
    assert closed.video.endswith("closed_loop-task0-trial3.mp4")
    imagined = imageio.mimread(closed.video)  # the start, then every imagined frame of the policy's episode
    assert len(imagined) == 1 + closed.world_model_length and imagined[0].shape[0] == imagined[0].shape[1]


def test_training_audits_every_interval_and_logs_audit_numbers(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import trainers.fidelity
    from trainers.config import PRESETS_DIR, load_config
    from trainers.runner import Trainer

    calls = []

    def fake_audit(config, world_model, policy, folder):  # the real one runs LIBERO: see the command's test
        calls.append(folder.name)
        episodes = [ClosedLoopEpisode(0, k, "task", k == 0, True, 8, 8) for k in range(2)]
        return {"simulator": AuditReport(settings={}, closed_loop=episodes)}

    monkeypatch.setattr(trainers.fidelity, "run_fidelity_audit", fake_audit)
    overrides = [
        f"runner.log_path={tmp_path}", "runner.progress_bar=false", "env.train.tiny_checkpoint=random",
        "env.train.total_num_envs=4", "env.train.max_episode_steps=8", "env.train.video_cfg.save_video=false",
        "env.train.group_size=2", "actor.model.channels=[8]", "actor.model.hidden_size=32",
        "actor.micro_batch_size=4", "actor.global_batch_size=4", "runner.max_steps=2", "runner.val_check_interval=-1",
        "runner.save_interval=-1", "audit.interval=2",
    ]  # fmt: skip
    Trainer(load_config(PRESETS_DIR / "tiny_cpu_grpo.yaml", overrides)).run()
    assert calls == ["step2"]
    events = EventAccumulator(str(tmp_path / "tiny_cpu_grpo" / "tensorboard"))
    events.Reload()
    false_success = events.Scalars("audit/closed_loop/false_success_rate")
    assert [(e.step, e.value) for e in false_success] == [(2, 1.0)]  # the simulator's one failure: a WM success


@pytest.mark.slow
@pytest.mark.skipif(find_spec("libero") is None, reason="needs the libero extra: pip install -e '.[libero]'")
def test_the_audit_command_against_libero_and_an_approximate_mode(tmp_path, capsys):
    from trainers.cli import main

    main([
        "audit", "--config", "tiny_cpu_grpo", f"runner.log_path={tmp_path}", "runner.progress_bar=false",
        "env.train.tiny_checkpoint=random", "env.train.num_sampling_steps=2", "audit.task_ids=[1]",
        "audit.trial_ids=[0]", "audit.max_episode_steps=8", "audit.compare_steps=[1]",
    ])  # fmt: skip
    folder = tmp_path / "tiny_cpu_grpo" / "audit" / "initial_policy"
    simulator = json.loads((folder / "simulator" / "audit.json").read_text())
    assert simulator["settings"]["starts"] == [[1, 0]] and simulator["settings"]["reference"] == "LIBERO simulator"
    assert len(simulator["open_loop"][0]["chunks"]) == 1 and len(simulator["closed_loop"]) == 1
    assert (folder / "simulator" / "videos" / "open_loop-task1-trial0.mp4").is_file()
    approximate = json.loads((folder / "steps_1" / "audit.json").read_text())
    assert approximate["settings"]["reference"].startswith("world model (2 sampling steps")
    assert "open_loop/psnr" in approximate["summary"] and (folder / "steps_1" / "audit.md").is_file()
    assert "# World-model fidelity audit" in capsys.readouterr().out


def test_the_audit_renders_the_simulator_where_the_evaluation_does():
    """A policy trained on 128 px renders shrunk to 64 px must see the same in the audit: the simulator renders at
    env.eval.image_size (its frames are resized to the world model's side for the comparisons), else at the world
    model's side."""
    from trainers.config import load_config
    from trainers.fidelity import simulator_config

    libero = ["env.eval.env_type=libero", "env.eval.num_episodes=null", "audit.protocol=openvla_oft"]
    config = load_config("tiny_cpu_grpo", [*libero, "env.eval.image_size=128"])
    simulator = simulator_config(config)
    assert simulator.image_size == 128 != config.env.train.image_size
    assert simulator.suite == config.audit.suite and simulator.num_steps_wait == 10
    assert simulator_config(load_config("tiny_cpu_grpo", libero)).image_size == config.env.train.image_size
