"""The small-scale experiment's data and packaging scripts: shrink recorded episodes, package float16 models."""

import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from opensora_gym.checkpoint import CheckpointLayout, locate
from opensora_gym.data import ActionStatistics, TrajectoryDataset, load_trajectory, save_trajectory
from opensora_gym.env import OpenSoraLiberoEnv
from opensora_gym.spaces import controller_actions
from opensora_gym.testing import random_chunk_actions

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "experiments" / "libero_spatial_small"


def run_script(name, *args):
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPTS / name), *map(str, args)]
    return subprocess.run(command, check=True, env=env, capture_output=True).stdout.decode()


def test_shrink_merges_renumbers_and_resizes(checkpoint, tmp_path):
    source = CheckpointLayout.resolve(checkpoint).dataset  # tiny episodes at 64 px
    run_script("shrink.py", "--size", 32, "--out", tmp_path / "small", source, source)
    merged = TrajectoryDataset(tmp_path / "small" / "dataset")
    originals = TrajectoryDataset(source)
    assert len(merged) == 2 * len(originals)
    assert [p.name.split("_", 1)[0] for p in merged.paths] == [f"traj{i:06d}" for i in range(len(merged))]
    episode, original = merged.episode(len(originals)), originals.episode(0)
    assert episode.images.shape[1:] == (32, 32, 3)
    np.testing.assert_array_equal(episode.actions, original.actions)
    statistics = ActionStatistics.from_json(tmp_path / "small")
    assert statistics.action_dim == original.actions.shape[1]
    run_script("shrink.py", "--size", 32, "--first-frames", "--out", tmp_path / "starts", source)
    starts = TrajectoryDataset(tmp_path / "starts" / "dataset")
    assert len(starts) == len(originals) and len(starts.episode(0).images) == 1
    np.testing.assert_array_equal(starts.episode(0).images[0], episode.images[0])
    run_script("shrink.py", "--size", 32, "--last", 5, "--out", tmp_path / "ends", source)
    ends = TrajectoryDataset(tmp_path / "ends" / "dataset")
    np.testing.assert_array_equal(ends.episode(0).images, episode.images[-5:])
    np.testing.assert_array_equal(ends.episode(0).actions, original.actions[-5:])


def test_shrink_windows_hold_drawn_frames_and_their_context(checkpoint, tmp_path):
    source = CheckpointLayout.resolve(checkpoint).dataset
    run_script("shrink.py", "--size", 32, "--out", tmp_path / "whole", source)
    run_script(
        "shrink.py", "--size", 32, "--windows", 3, "--context", 4, "--seed", 5, "--out", tmp_path / "win", source
    )
    whole, windows = TrajectoryDataset(tmp_path / "whole" / "dataset"), TrajectoryDataset(tmp_path / "win" / "dataset")
    assert len(windows) == 3 * len(whole)
    for index, path in enumerate(windows.paths):
        episode = whole.episode(index // 3)
        frame = int(path.stem.rsplit("_frame", 1)[1])
        assert path.stem.split("_", 1)[1].startswith(episode.path.stem.split("_", 1)[1])
        window = windows.episode(index)
        np.testing.assert_array_equal(window.images, episode.images[max(frame - 3, 0) : frame + 1])
        np.testing.assert_array_equal(window.actions, episode.actions[max(frame - 3, 0) : frame + 1])
    frames = [int(p.stem.rsplit("_frame", 1)[1]) for p in windows.paths]
    assert all(a < b for a, b in zip(frames[0::3], frames[1::3], strict=True))  # distinct, in order per episode
    longest = max(len(whole.episode(i).images) for i in range(len(whole)))
    with pytest.raises(subprocess.CalledProcessError):
        run_script("shrink.py", "--windows", longest + 1, "--out", tmp_path / "bad", source)
    assert not (tmp_path / "bad" / "dataset").exists()  # nothing written


def test_package_writes_a_float16_folder_that_the_env_loads(checkpoint, tmp_path):
    models = tmp_path / "models"
    (models / "world_model").mkdir(parents=True)
    for path in Path(checkpoint).iterdir():
        if path.is_file():
            shutil.copy2(path, models / "world_model" / path.name)
    shutil.copytree(Path(checkpoint) / "vae", models / "vae")
    run_script("package.py", "--models", models, "--dataset", checkpoint, "--out", tmp_path / "wm")

    layout = CheckpointLayout.resolve(tmp_path / "wm")
    weights = [load_file(p) for p in layout.root.glob("*.safetensors")] + [
        load_file(next(layout.vae.glob("*.safetensors")))
    ]
    assert all(t.dtype == torch.float16 for w in weights for t in w.values() if t.is_floating_point())
    assert all(len(load_trajectory(p)) == 1 for p in TrajectoryDataset(layout.dataset).paths)  # start frames only
    env = OpenSoraLiberoEnv(
        2, checkpoint=layout.root, num_sampling_steps=1, image_size=64, dtype="float32", max_episode_steps=8
    )
    observation, _ = env.reset(seed=0)
    _, reward, *_ = env.step(random_chunk_actions(2, seed=0))
    assert observation["image"].shape == (2, 64, 64, 3) and np.isfinite(reward).all()
    env.close()
    run_script("package.py", "--models", models, "--dataset", checkpoint, "--whole-episodes", "--out", tmp_path / "all")
    shipped = TrajectoryDataset(CheckpointLayout.resolve(tmp_path / "all").dataset)
    recorded = TrajectoryDataset(CheckpointLayout.resolve(checkpoint).dataset)
    for index in range(len(recorded)):
        np.testing.assert_array_equal(shipped.episode(index).images, recorded.episode(index).images)


@pytest.mark.slow
@pytest.mark.skipif(find_spec("libero") is None, reason="needs the libero extra: pip install -e '.[libero]'")
def test_imagined_actions_replay_in_the_simulator(tmp_path):
    # The shipped world model and policy imagine two episodes from its first two start windows; the simulator
    # executes the first one's actions from the initial state of the same task and trial (the windows start
    # mid-episode: this checks that the actions reach the simulator as imagined).
    imagined = tmp_path / "imagined.npz"
    run_script(
        "imagine.py", "--out", imagined, "--max-starts", 2, "--num-envs", 2, "--seed", 3, "--",
        "runner.device=cpu", "env.train.num_sampling_steps=1", "env.train.checkpoint=embedded:libero_spatial_small",
        "actor.model.model_path=embedded:libero_spatial_small/policy",
    )  # fmt: skip
    data = np.load(imagined)
    starts = TrajectoryDataset(CheckpointLayout.resolve(locate("embedded:libero_spatial_small")).dataset).paths[:2]
    named = [tuple(int(n) for n in re.search(r"task(\d+)_trial(\d+)", path.name).groups()) for path in starts]
    assert list(zip(data["task"].tolist(), data["trial"].tolist(), strict=True)) == named
    assert data["actions"].shape == (2, 192, 7) and (1 <= data["length"]).all() and (data["length"] <= 192).all()
    peak, final = data["peak_probability"], data["final_probability"]  # the classifier's, over each episode's frames
    assert ((0 <= final) & (final <= peak) & (peak <= 1)).all() and (peak[data["success"]] >= 0.5).all()
    for actions, length in zip(data["actions"], data["length"], strict=True):
        assert np.isfinite(actions).all() and not actions[length:].any()  # zeros past each episode's end
    out = tmp_path / "replay"
    task, trial = named[0]
    run_script(
        "replay.py", imagined, "--out", out, "--task-ids", task, "--trial-ids", trial, "--all-outcomes",
        "--image-size", 32, "--max-episode-steps", 16, "--post-success-steps", 0,
    )  # fmt: skip
    replayed = TrajectoryDataset(out / "dataset")
    assert len(replayed) == 1
    episode = replayed.episode(0)
    executed = episode.actions[:-1]  # one action after each frame but the last
    assert episode.images.shape[1:] == (32, 32, 3) and 1 <= len(executed) <= 16
    # the simulator executed the imagined actions (in its controller's units) as long as they lasted
    steps = min(len(executed), int(data["length"][0]))
    expected = np.clip(controller_actions(data["actions"][0, :steps]), -1, 1)
    np.testing.assert_allclose(executed[:steps], expected, atol=1e-6)


def test_perturb_moves_each_tensor_as_far_as_the_tuning_in_a_random_direction(tmp_path):
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(8, 4, generator=generator), "b": torch.randn(5, generator=generator)}
    tuned = {"a": base["a"] + 0.1 * torch.randn(8, 4, generator=generator), "b": base["b"].clone()}
    for name, weights in (("base", base), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        save_file(weights, tmp_path / name / "model.safetensors")
        (tmp_path / name / "config.json").write_text('{"hidden_size": 4}')
    run_script("perturb.py", "--base", tmp_path / "base", "--tuned", tmp_path / "tuned", "--out", tmp_path / "c")
    control = load_file(tmp_path / "c" / "model.safetensors")
    assert (tmp_path / "c" / "config.json").read_text() == '{"hidden_size": 4}'
    torch.testing.assert_close((control["a"] - base["a"]).norm(), (tuned["a"] - base["a"]).norm())
    assert not torch.allclose(control["a"], tuned["a"])  # the same distance, another direction
    torch.testing.assert_close(control["b"], base["b"], rtol=0, atol=0)  # unchanged by the tuning: unchanged

    save_file({"a": base["a"]}, tmp_path / "tuned" / "model.safetensors")
    with pytest.raises(subprocess.CalledProcessError) as failure:
        run_script("perturb.py", "--base", tmp_path / "base", "--tuned", tmp_path / "tuned", "--out", tmp_path / "d")
    assert b"differ in keys: ['b']" in failure.value.stderr
    assert not (tmp_path / "d").exists()


def test_halve_copies_the_files_with_float16_weights(tmp_path):
    from safetensors.torch import save_file

    weights = {"w": torch.randn(3, 2, generator=torch.Generator().manual_seed(0)), "step": torch.tensor([7])}
    (tmp_path / "policy" / "sub").mkdir(parents=True)
    save_file(weights, tmp_path / "policy" / "model.safetensors")
    (tmp_path / "policy" / "config.json").write_text('{"hidden_size": 4}')
    run_script("halve.py", tmp_path / "policy", tmp_path / "half")
    halved = load_file(tmp_path / "half" / "model.safetensors")
    assert halved["w"].dtype == torch.float16 and halved["step"].dtype == torch.int64
    torch.testing.assert_close(halved["w"], weights["w"].half(), rtol=0, atol=0)
    assert (tmp_path / "half" / "config.json").read_text() == '{"hidden_size": 4}'
    assert not (tmp_path / "half" / "sub").exists()  # files only, as package.py ships them

    save_file({"w": torch.full((2,), 1e6)}, tmp_path / "policy" / "model.safetensors")
    with pytest.raises(subprocess.CalledProcessError) as failure:
        run_script("halve.py", tmp_path / "policy", tmp_path / "overflow")
    assert b"does not fit in float16" in failure.value.stderr
    assert not (tmp_path / "overflow").exists()  # nothing written


def _import_script(name):
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location(name.removesuffix(".py"), SCRIPTS / name)
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_branching_expert_shares_grasp_and_lift_then_places_elsewhere():
    from opensora_gym.expert import SpatialExpertConfig

    branch = _import_script("branch.py")
    config = SpatialExpertConfig(action_noise_std=0.1, lift_ramp_steps=8)
    expert = branch.BranchingExpert(config, num_envs=3, starts=2, shift=(0.05, 0.05))
    for index, episode in enumerate((0, 2, 3)):  # start 0 branch 0, start 0 branch 1, start 1 branch 1
        expert.begin(index, (7, episode))
    bowl, plate = np.array([0.0, 0.0, 0.9]), np.array([0.25, 0.0, 0.9])
    position = np.tile([0.0, 0.2, 1.1], (3, 1))
    trace, phases = [], []
    for _ in range(200):
        grasped = [e.phase not in ("approach", "descend", "grasp") for e in expert.experts]
        info = {
            "state": position.copy(),
            "object_poses": [
                {"bowl": position[i] - (0.0, 0.045, 0.012) if grasped[i] else bowl, "plate": plate} for i in range(3)
            ],
        }
        actions = expert.act({}, info)[:, 0]
        trace.append(actions)
        phases.append(expert.experts[0].phase)
        position = position + 0.0125 * actions[:, :3]
    trace = np.stack(trace)  # [T, 3 experts, 7]
    carry = phases.index("carry")
    assert 0 < carry < phases.index("release")  # the simple kinematics reach the place
    np.testing.assert_array_equal(trace[:carry, 0], trace[:carry, 1])  # same noise, same start: same prefix
    assert not np.array_equal(trace[carry:, 0], trace[carry:, 1])  # the place differs
    assert not np.array_equal(trace[:carry, 1], trace[:carry, 2])  # another start draws other noise
    assert np.linalg.norm(expert.experts[1].place_shift) == pytest.approx(0.05)
    assert not expert.experts[0].place_shift.any()


def _branch_episodes(folder):
    """Three branches of start (0, 0) that part at action 10 (episode 0 succeeds from frame 17) and one of (1, 5);
    returns the shared images."""
    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, size=(20, 64, 64, 3), dtype=np.uint8)
    prefix = generator.uniform(-0.5, 0.5, size=(10, 7)).astype(np.float32)
    folder.mkdir(parents=True)
    for episode, (task, trial) in enumerate([(0, 0), (0, 0), (0, 0), (1, 5)]):
        actions = np.concatenate([prefix, generator.uniform(-0.5, 0.5, size=(10, 7)).astype(np.float32)])
        branch_images = np.concatenate([images[:11], generator.integers(0, 256, size=(9, 64, 64, 3), dtype=np.uint8)])
        frames = [
            {
                "image": branch_images[t],
                "delta_action": actions[t],
                "instruction": "put",
                "success": episode == 0 and t >= 17,
            }
            for t in range(20)
        ]
        save_trajectory(folder / f"traj{episode:06d}_task{task:02d}_trial{trial:02d}.npy", frames)
    return images


def test_shrink_until_success_cuts_after_the_first_success_frame(tmp_path):
    _branch_episodes(tmp_path / "recorded" / "dataset")  # episode 0 succeeds from frame 17; the others never
    run_script("shrink.py", "--until-success", "--last", 5, "--out", tmp_path / "cut", tmp_path / "recorded")
    run_script("shrink.py", "--out", tmp_path / "whole", tmp_path / "recorded")
    cut, whole = TrajectoryDataset(tmp_path / "cut" / "dataset"), TrajectoryDataset(tmp_path / "whole" / "dataset")
    np.testing.assert_array_equal(cut.episode(0).images, whole.episode(0).images[13:18])  # frames 13-17
    assert cut.episode(0).success.tolist() == [False] * 4 + [True]
    for index in range(1, 4):  # no success: the last 5 frames
        np.testing.assert_array_equal(cut.episode(index).actions, whole.episode(index).actions[-5:])


def test_branch_discrimination_scores_the_branches_of_each_start(checkpoint, tmp_path):
    folder = tmp_path / "branches" / "dataset"
    images = _branch_episodes(folder)
    out = tmp_path / "discrimination.json"
    run_script(
        "branch_discrimination.py", "--dataset", folder, "--starts", "0:0-2", "--world-model", checkpoint,
        "--draws", 2, "--out", out,
    )  # fmt: skip
    result = json.loads(out.read_text())["results"][str(checkpoint)]
    rows = result["episodes"]
    assert [row["episode"] for row in rows] == [f"traj{e:06d}_task00_trial00.npy" for e in range(3)]
    assert [row["branch_frame"] for row in rows] == [11, 11, 11]  # frame 11 follows action 10, the first to differ
    assert [row["real"] for row in rows] == [True, False, False]
    assert all(row["imagined"] in (0.0, 0.5, 1.0) for row in rows)
    assert all(0 <= row["peak_probability"] <= 1 for row in rows)
    assert all(row["peak_probability"] > 0.5 for row in rows if row["imagined"] == 1.0)
    assert all(isinstance(row["classifier_on_recorded"], bool) for row in rows)
    summary = result["summary"]
    assert summary["episodes"] == 3 and summary["real_successes"] == 1
    assert summary["pairs_ordered_right"]["pairs"] == 2
    assert 0 <= summary["pairs_ordered_right_by_peak_probability"] <= 1 and summary["auroc_peak_probability"] >= 0
    assert summary["false_success"]["of"] == 2 and summary["missed"]["of"] == 1
    seen = [row["classifier_on_recorded"] for row in rows]
    assert summary["classifier_on_recorded"] == {"false_success": sum(seen[1:]), "missed": int(not seen[0])}
    response = summary["action_response"]
    assert response["pairs"] == 3 and response["median_ratio"] > 0 and 0 <= response["nearer_own_branch"] <= 1

    branch = _import_script("branch_discrimination.py")
    recorded = (images[10:], images[::-1][10:])
    episodes = [TrajectoryDataset(folder).episode(index) for index in range(2)]
    episodes[1] = replace(episodes[1], images=episodes[1].images[:13], actions=episodes[1].actions[:13])
    world_model = branch.load_world_model(checkpoint, "cpu", 2.0)
    peak, frames = branch.imagine_from(world_model, episodes, 3, 2, [5, 6])
    assert peak.shape == (2, 2) and [f.shape for f in frames] == [(2, 17, 64, 64, 3), (2, 10, 64, 64, 3)]
    for index, seed in enumerate([5, 6]):  # side by side as alone: each episode's own noise
        alone_peak, (alone,) = branch.imagine_from(world_model, episodes[index : index + 1], 3, 2, [seed])
        assert np.abs(frames[index].astype(int) - alone).max() <= 1
        np.testing.assert_allclose(peak[index], alone_peak[0], atol=1e-4)
    _, apart = branch.imagine_from(world_model, episodes, [3, 5], 2, [5, 6])  # one first frame per episode
    assert np.abs(apart[0].astype(int) - frames[0]).max() <= 1 and apart[1].shape == (2, 8, 64, 64, 3)
    _, (later,) = branch.imagine_from(world_model, episodes[1:], 5, 2, [6])
    assert np.abs(apart[1].astype(int) - later).max() <= 1
    same = branch.action_response((recorded[0][None], recorded[1][None]), recorded)  # imagined = the simulator
    assert same == (1.0, 1.0)
    assert branch.action_response((recorded[1][None], recorded[0][None]), recorded) == (1.0, 0.0)  # swapped
    assert branch.action_response((recorded[0][None], recorded[0][None]), recorded)[0] == 0.0  # ignores actions
    swapped_end = (
        np.concatenate([recorded[0][:5], recorded[1][5:]]),
        np.concatenate([recorded[1][:5], recorded[0][5:]]),
    )
    assert branch.action_response((swapped_end[0][None], swapped_end[1][None]), recorded, last=4) == (1.0, 0.0)
    assert branch.parse_starts(["0:1-3", "1:4"]) == {(0, 1), (0, 2), (0, 3), (1, 4)}
    with pytest.raises(ValueError, match="TASK:FIRST-LAST"):
        branch.parse_starts(["0-3"])


def test_imagined_frames_are_written_with_the_recorded_labels_and_scored(checkpoint, tmp_path, monkeypatch):
    from opensora_gym.models.reward import ResNetRewardModel
    from opensora_gym.world_model import frames_from_uint8

    _branch_episodes(tmp_path / "dataset")

    def write_imagined(*options):
        common = ["write", "--dataset", tmp_path / "dataset", "--starts", "0:0", "--world-model", checkpoint]
        run_script("imagined_frames.py", *common, *options)

    imagined = tmp_path / "imagined"
    # 3 episodes: batches of 2 and 1
    write_imagined("--draws", 2, "--action-guidance", 2, "--batch", 2, "--out", imagined)
    written = TrajectoryDataset(imagined)
    names = [path.name for path in written.paths]
    assert names == [f"traj{e}{d:02d}_task00_trial00.npy" for e in range(3) for d in range(2)]
    first = written.episode(0)
    assert first.images.shape == (9, 64, 64, 3)  # frames 11-19, after the branch point
    assert first.success.tolist() == [False] * 6 + [True] * 3  # episode 0's flags from frame 17
    assert not any(written.episode(index).success.any() for index in range(2, 6))
    from_start = tmp_path / "from_start"
    write_imagined("--draws", 1, "--from-start", "--out", from_start)
    whole = TrajectoryDataset(from_start).episode(0)
    assert whole.images.shape == (19, 64, 64, 3)  # frames 1-19: the env's start, frame 0 repeated, as condition
    assert whole.success.tolist() == [False] * 16 + [True] * 3
    later = tmp_path / "from_frame"
    write_imagined("--draws", 1, "--from-frame", 15, "--out", later)
    tail = TrajectoryDataset(later).episode(0)
    assert tail.images.shape == (5, 64, 64, 3) and tail.success.tolist() == [False] * 2 + [True] * 3  # frames 15-19
    with pytest.raises(subprocess.CalledProcessError) as failure:
        write_imagined("--from-frame", 20, "--out", tmp_path / "too_late")
    assert b"expected episodes with frames from 1 up to after the one imagined from, got" in failure.value.stderr
    assert b"frame 20 of 20" in failure.value.stderr
    to_end = tmp_path / "from_end"
    write_imagined("--draws", 1, "--from-end", 5, "--out", to_end)
    ends = TrajectoryDataset(to_end)
    assert all(ends.episode(index).images.shape == (5, 64, 64, 3) for index in range(len(ends)))  # the last 5 each
    assert np.abs(ends.episode(0).images.astype(int) - tail.images).max() <= 1, "episode 0 (20 frames): from 15"
    assert ends.episode(0).success.tolist() == tail.success.tolist()
    ahead = tmp_path / "one_chunk_ahead"
    write_imagined("--draws", 2, "--one-chunk-ahead", "--out", ahead)
    teacher_forced = TrajectoryDataset(ahead).episode(0)
    assert teacher_forced.images.shape == (19, 64, 64, 3) and teacher_forced.success.tolist() == whole.success.tolist()

    monkeypatch.syspath_prepend(str(SCRIPTS))  # the script imports its sibling
    script = _import_script("imagined_frames.py")
    world_model = _import_script("branch_discrimination.py").load_world_model(checkpoint, "cpu", 1.0)  # as written
    episode = TrajectoryDataset(tmp_path / "dataset").episode(0)
    frames = script.one_chunk_ahead(world_model, episode, 2, 0)  # seed 0: task 0 x 100 + trial 0, as `write`
    for draw in range(2):
        written_draw = TrajectoryDataset(ahead).episode(draw).images.astype(int)
        assert np.abs(frames[draw].astype(int) - written_draw).max() <= 1
    reconstructed = tmp_path / "reconstructed"
    write_imagined("--reconstruct", "--out", reconstructed)
    assert TrajectoryDataset(reconstructed).paths[0].name == "traj000_task00_trial00.npy"  # draw 00 only
    through_vae = TrajectoryDataset(reconstructed).episode(0)
    assert through_vae.success.tolist() == whole.success.tolist()
    assert np.abs(script.reconstruct(world_model, episode)[0].astype(int) - through_vae.images).max() <= 1
    reencoded = tmp_path / "reencoded"
    write_imagined("--draws", 1, "--from-start", "--reencode", "--out", reencoded)
    again = TrajectoryDataset(reencoded).episode(0).images
    np.testing.assert_array_equal(again[:8], whole.images[:8])  # the first chunk: the recorded condition
    assert (again[8:] != whole.images[8:]).any(), "the later chunks see the frames encoded again"
    with pytest.raises(subprocess.CalledProcessError) as failure:
        write_imagined("--one-chunk-ahead", "--reencode", "--out", tmp_path / "both")
    assert b"--reencode applies to imagined rollouts, not to --one-chunk-ahead" in failure.value.stderr

    changed = replace(episode, images=np.concatenate([episode.images[:9], 255 - episode.images[9:]]))
    after = script.one_chunk_ahead(world_model, changed, 2, 0)
    # frames 1-16 (chunks from frames 1 and 9) see recorded frames 0-8 only; frames 17-19 see frames 13-16
    np.testing.assert_array_equal(after[:, :16], frames[:, :16])
    assert (after[:, 16:] != frames[:, 16:]).any(), "the last chunk's condition changed"

    out = tmp_path / "score.json"
    run_script(
        "imagined_frames.py", "score", "--dataset", imagined, "--classifier", Path(checkpoint) / "resnet_rm.pth",
        "--out", out,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["summary"]["episodes"] == 3 and result["summary"]["real_successes"] == 1
    assert result["summary"]["pairs"] == 2
    classifier = ResNetRewardModel.from_pretrained(Path(checkpoint) / "resnet_rm.pth").eval()
    with torch.no_grad():
        peaks = [
            float(classifier(frames_from_uint8(torch.from_numpy(written.episode(i).images), 64)).max()) for i in (0, 1)
        ]
    assert result["episodes"][0]["peak_probability"] == pytest.approx(np.mean(peaks), abs=1e-6)
    draws = 2  # of each of the 3 episodes, one a success
    for threshold, false_successes, missed in ((0.0, 2 * draws, 0), (1.01, 0, draws)):  # every draw called / none
        run_script(
            "imagined_frames.py", "score", "--dataset", imagined, "--classifier", Path(checkpoint) / "resnet_rm.pth",
            "--threshold", threshold, "--out", out,
        )  # fmt: skip
        summary = json.loads(out.read_text())["summary"]
        assert summary["draws_false_success"] == f"{false_successes}/{2 * draws}"
        assert summary["draws_missed"] == f"{missed}/{draws}"
        agreement = 2 * draws - false_successes + draws - missed
        assert summary["draws_agreement"] == f"{agreement}/{3 * draws}"
    run_script(
        "imagined_frames.py", "score", "--dataset", imagined, "--classifier", Path(checkpoint) / "resnet_rm.pth",
        "--last", 3, "--out", out,
    )  # fmt: skip
    result = json.loads(out.read_text())
    with torch.no_grad():
        ends = [
            float(classifier(frames_from_uint8(torch.from_numpy(written.episode(i).images[-3:]), 64)).mean())
            for i in (0, 1)
        ]
    assert result["episodes"][0]["end_probability"] == pytest.approx(np.mean(ends), abs=1e-6)
    assert "auroc_end_probability" in result["summary"] and "peak_probability" not in result["episodes"][0]


def test_imagined_vs_real_ranks_the_starts_by_their_imagined_success(tmp_path):
    # Three starts, two draws each: imagined rates 1.0, 0.5, 0.0; the first really succeeds, the others fail.
    np.savez(
        tmp_path / "imagined.npz",
        task=np.array([0, 0, 0, 0, 1, 1]),
        trial=np.array([0, 0, 1, 1, 0, 0]),
        success=np.array([True, True, True, False, False, False]),
    )
    outcomes = [
        {"episode": {"task_id": task, "trial_id": trial}, "success": success}
        for task, trial, success in ((0, 0, True), (0, 1, False), (1, 0, False))
    ]
    (tmp_path / "real.json").write_text(json.dumps({"outcomes": outcomes}))
    run_script("imagined_vs_real.py", tmp_path / "imagined.npz", tmp_path / "real.json", "--out", tmp_path / "s.json")
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["starts"] == 3 and summary["imagined_draws_per_start"] == [2, 2]
    assert summary["imagined_rate_on_real_successes"] == 1.0 and summary["imagined_rate_on_real_failures"] == 0.25
    assert summary["auroc"] == 1.0 and summary["real_success_rate"] == 1 / 3

    outcomes.append({"episode": {"task_id": 1, "trial_id": 5}, "success": True})
    (tmp_path / "real.json").write_text(json.dumps({"outcomes": outcomes}))
    with pytest.raises(subprocess.CalledProcessError) as failure:
        run_script("imagined_vs_real.py", tmp_path / "imagined.npz", tmp_path / "real.json")
    assert b"(task 1, trial 5) has no imagined episode" in failure.value.stderr


def _recorded(folder, outcomes):
    """One 3-frame episode per (task 0, trial) with the simulator flagging the last frame when it succeeds."""
    folder.mkdir(parents=True)
    for number, (trial, success) in enumerate(outcomes):
        steps = [
            {"image": np.zeros((8, 8, 3), np.uint8), "delta_action": np.zeros(7, np.float32), "instruction": "put",
             "success": success and t == 2}
            for t in range(3)
        ]  # fmt: skip
        save_trajectory(folder / f"traj{number:06d}_task00_trial{trial:02d}.npy", steps)


def test_imagined_vs_recorded_ranks_the_starts_by_their_rollouts_outcome(tmp_path):
    _recorded(tmp_path / "dataset", [(0, True), (1, False), (2, False)])
    # two draws of the three starts, draw after draw: imagined rates 1.0, 0.5, 0.0
    np.savez(tmp_path / "imagined.npz", success=np.array([True, True, False, True, False, False]))
    run_script("imagined_vs_recorded.py", tmp_path / "imagined.npz", tmp_path / "dataset", "--out", tmp_path / "s.json")
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["starts"] == 3 and summary["draws"] == 2 and summary["recorded_success"] == 1 / 3
    assert summary["imagined_on_recorded_successes"] == 1.0 and summary["imagined_on_recorded_failures"] == 0.25
    assert summary["auroc"] == 1.0 and 0 <= summary["auroc_95"][0] <= 1.0 == summary["auroc_95"][1]
    np.savez(tmp_path / "imagined.npz", success=np.array([True, True, False, True]))
    with pytest.raises(subprocess.CalledProcessError) as failure:
        run_script("imagined_vs_recorded.py", tmp_path / "imagined.npz", tmp_path / "dataset")
    assert b"expected a whole number of draws of the 3 starts, got 4 episodes" in failure.value.stderr


def test_grpo_curves_reads_each_seeds_tensorboard(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for seed, values in (("seed1", [0.5] * 5 + [0.7] * 5), ("seed2", [0.4] * 6)):
        with SummaryWriter(tmp_path / seed / "tensorboard") as writer:
            for step, value in enumerate(values, start=1):
                writer.add_scalar("env/success_once", value, step)
                writer.add_scalar("train/actor/approx_kl", 1e-4, step)
                if seed == "seed2":  # logged since session 25
                    writer.add_scalar("rollout/groups_with_signal", 0.25 * (step % 2), step)
                    writer.add_scalar("train/actor/kl", 0.01 * step, step)
    printed = run_script("grpo_curves.py", tmp_path, "--out", tmp_path / "curves.json", "--last-step", 9)
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert sorted(curves) == ["seed1", "seed2"]
    assert sorted(curves["seed1"]) == ["env/success_once", "train/actor/approx_kl"]
    assert curves["seed2"]["rollout/groups_with_signal"][:2] == [[1, 0.25], [2, 0.0]]
    assert curves["seed2"]["train/actor/kl"][-1] == [6, 0.06]
    assert "seed2: groups with a signal 0.125 (mean of 6 steps)" in printed
    assert [step for step, _ in curves["seed1"]["env/success_once"]] == list(range(1, 10))
    assert curves["seed2"]["env/success_once"][-1] == [6, 0.4]
    with pytest.raises(subprocess.CalledProcessError) as failure:
        run_script("grpo_curves.py", tmp_path / "seed1", "--out", tmp_path / "none.json")
    assert b"expected seedS/tensorboard folders" in failure.value.stderr


def test_start_or_action_separates_the_memory_of_a_start_from_the_reading_of_its_actions(tmp_path):
    _recorded(tmp_path / "train", [(0, True), (1, False), (2, True), (3, True), (3, False), (4, True), (4, False)])
    # held out: trials 1 and 2 turn out otherwise than their training rollout
    _recorded(tmp_path / "heldout", [(0, True), (1, True), (2, False), (3, True), (4, False)])
    rows = [
        {"episode": str(n), "real": real, "peak_probability": p}
        for n, real, p in ((0, True, 0.9), (1, True, 0.8), (2, False, 0.1), (3, True, 0.7), (4, False, 0.3))
    ]
    (tmp_path / "score.json").write_text(json.dumps({"episodes": rows}))
    run_script(
        "start_or_action.py", "--score", tmp_path / "score.json", "--heldout", tmp_path / "heldout",
        "--train", tmp_path / "train", "--out", tmp_path / "s.json",
    )  # fmt: skip
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["episodes"] == 5 and summary["real_successes"] == 3
    assert summary["auroc_world_model"] == 1.0
    # memory: successes (1, 0, 0.5) against failures (1, 0.5): two ties and one pair right of six
    assert summary["auroc_training_outcome"] == pytest.approx(2 / 6)
    assert summary["starts_where_outcomes_differ"] == 2 and summary["auroc_where_outcomes_differ"] == 1.0
    assert summary["auroc_within_training_successes"] == 1.0 and summary["auroc_within_training_failures"] is None
    assert summary["auroc_within_mixed_starts"] == 1.0  # trials 3 and 4: 0.7 (success) above 0.3
    low, high = summary["auroc_training_outcome_interval_95"]
    assert 0 <= low < 2 / 6 < high <= 1 and summary["auroc_within_training_failures_interval_95"] is None
    ends = [{"episode": r["episode"], "real": r["real"], "end_probability": r["peak_probability"]} for r in rows]
    (tmp_path / "end.json").write_text(json.dumps({"episodes": ends}))  # `score --last K`'s rows: the same summary
    run_script(
        "start_or_action.py", "--score", tmp_path / "end.json", "--heldout", tmp_path / "heldout",
        "--train", tmp_path / "train", "--out", tmp_path / "end_summary.json",
    )  # fmt: skip
    assert json.loads((tmp_path / "end_summary.json").read_text()) == summary

    rows[2]["real"] = True
    (tmp_path / "score.json").write_text(json.dumps({"episodes": rows}))
    with pytest.raises(subprocess.CalledProcessError) as failure:
        run_script(
            "start_or_action.py", "--score", tmp_path / "score.json", "--heldout", tmp_path / "heldout",
            "--train", tmp_path / "train",
        )  # fmt: skip
    assert b"held-out episode 2: the score says real=True, its recording False" in failure.value.stderr


def test_from_recorded_starts_inside_recordings_and_records_what_the_actions_do(tmp_path):
    # Two 24-step LIBERO episodes are recorded; from 8 frames before each one's end the simulator replays the
    # recorded prefix (reaching the recorded frame to the bit), then plays given "imagined" actions, and records them.
    from opensora_gym.libero import LiberoConfig, LiberoVectorEnv
    from opensora_gym.wrappers import TrajectoryRecorder

    pytest.importorskip("libero")
    recorded = tmp_path / "recorded"
    generator = np.random.default_rng(4)
    envs = TrajectoryRecorder(
        LiberoVectorEnv(LiberoConfig(image_size=32, max_episode_steps=24, return_frames=True), num_envs=2), recorded
    )
    try:
        envs.reset(options={"task_id": 0, "trial_id": [0, 1]})
        for _ in range(3):
            envs.step(generator.uniform(-0.5, 0.5, size=(2, 8, 7)).astype(np.float32))
    finally:
        envs.close()
    dataset = TrajectoryDataset(recorded)
    assert [path.name for path in dataset.paths] == ["traj000000_task00_trial00.npy", "traj000001_task00_trial01.npy"]
    actions = generator.uniform(-0.5, 0.5, size=(2, 8, 7)).astype(np.float32)
    imagined = tmp_path / "imagined.npz"
    np.savez(imagined, task=[0, 0], trial=[0, 1], success=[True, False], length=[8, 8], actions=actions)
    out = tmp_path / "replayed.json"
    run_script(
        "from_recorded.py", recorded, "--last", 8, "--steps", 8, "--imagined", imagined, "--image-size", 32,
        "--record", tmp_path / "record", "--context", 4, "--out", out,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert [row["start"] for row in report["starts"]] == [16, 16]
    assert [row["start_frame_max_diff"] for row in report["starts"]] == [0, 0]
    assert [row["imagined_success"] for row in report["starts"]] == [True, False]
    assert report["agreement"]["episodes"] == 2 and report["real"]["episodes"] == 2
    written = TrajectoryDataset(tmp_path / "record" / "dataset")
    for index in range(2):
        episode, source = written.episode(index), dataset.episode(index)
        assert len(episode.images) == 4 + 1 + 8
        np.testing.assert_array_equal(episode.images[:5], source.images[12:17])  # the recorded context and start
        np.testing.assert_array_equal(episode.actions[:4], source.actions[12:16])
        np.testing.assert_allclose(episode.actions[4:12], controller_actions(actions[index]), atol=1e-6)
        assert episode.images[5:].std() > 0 and not np.array_equal(episode.images[5], source.images[17])
    assert (tmp_path / "record" / "dataset_statistics.json").is_file()
    # The shipped policy acting from the same recorded state instead.
    run_script(
        "from_recorded.py", recorded, "--last", 8, "--steps", 8, "--policy", "embedded:libero_spatial_small/policy",
        "--image-size", 32, "--count", 1, "--out", out,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["actor"]["policy"] == "embedded:libero_spatial_small/policy" and report["real"]["episodes"] == 1
    assert report["starts"][0]["start_frame_max_diff"] == 0 and report["starts"][0]["length"] == 8


def test_classifier_on_real_scores_episodes_as_the_env_would_end_them(tmp_path):
    # A classifier that calls every frame a success and one that calls none, on two real failures and one success
    # (flagged only before the scored frames in one failure: that flag does not count).
    from opensora_gym.models.reward import ResNetRewardModel

    for name, bias in (("always", 5.0), ("never", -5.0)):
        model = ResNetRewardModel(widths=(4, 8, 8, 16))
        torch.nn.init.zeros_(model.net[-2].weight)
        torch.nn.init.constant_(model.net[-2].bias, bias)
        (tmp_path / name).mkdir()
        torch.save(model.state_dict(), tmp_path / name / "resnet_rm.pth")
    folder = tmp_path / "dataset"
    folder.mkdir()
    image = np.full((16, 16, 3), 100, dtype=np.uint8)
    for index, flags in enumerate(([False] * 6, [True] + [False] * 5, [False] * 5 + [True])):
        frames = [{"image": image, "delta_action": np.zeros(7, np.float32), "task": "t", "success": f} for f in flags]
        save_trajectory(folder / f"traj{index:06d}_task00_trial{index:02d}.npy", frames)
    out = tmp_path / "scores.json"
    run_script(
        "classifier_on_real.py", "--classifiers", tmp_path / "always" / "resnet_rm.pth",
        tmp_path / "never" / "resnet_rm.pth", "--dataset", folder, "--skip", 1, "--out", out,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["episodes"] == 3 and report["real_successes"] == 1
    always, never = report["classifiers"]["always/resnet_rm.pth"], report["classifiers"]["never/resnet_rm.pth"]
    assert (always["false_success"], always["missed_success"], always["both_success"]) == (2, 0, 1)
    assert (never["false_success"], never["missed_success"], never["both_failure"]) == (0, 1, 2)
    held_out = tmp_path / "report.json"
    held_out.write_text(json.dumps({"episodes": [{"episode": "traj000002_task00_trial02.npy"}]}))
    run_script(
        "classifier_on_real.py", "--classifiers", tmp_path / "never" / "resnet_rm.pth", "--dataset", folder,
        "--held-out", held_out, "--out", out,
    )  # fmt: skip
    assert json.loads(out.read_text())["episodes"] == 1
    with pytest.raises(subprocess.CalledProcessError):
        run_script(
            "classifier_on_real.py", "--classifiers", tmp_path / "never", "--dataset", folder, folder, "--out", out
        )


def test_group_agreement_correlates_imagined_and_real_advantages_within_groups(tmp_path):
    # Two starts, three draws. Start a: imagined 1,0,0 and real 1,0,0 (the same ranking); start b: imagined 1,1,0 and
    # real 0,0,1 (the opposite ranking).
    imagined = {"a": [1, 0, 0], "b": [1, 1, 0]}
    real = {"a": [1, 0, 0], "b": [0, 0, 1]}
    paths = []
    for draw in range(3):
        starts = [
            {"file": name, "imagined_success": bool(imagined[name][draw]), "real_success": bool(real[name][draw])}
            for name in ("a", "b")
        ]
        paths.append(tmp_path / f"d{draw}.json")
        paths[-1].write_text(json.dumps({"starts": starts}))
    run_script("group_agreement.py", "--replays", *paths, "--out", tmp_path / "g.json", "--bootstrap", "20")
    report = json.loads((tmp_path / "g.json").read_text())
    # Advantages: a: imagined and real (2/3, -1/3, -1/3), 2/3 summed product; b: imagined (1/3, 1/3, -2/3), real
    # (-1/3, -1/3, 2/3), -2/3. Sums of squares 4/3 each: correlation 0. Pairs ranked by both: a 2 same, b 2 opposite.
    assert report["advantage_correlation"] == pytest.approx(0.0, abs=1e-12)
    # Every group's std is 1/sqrt(3): normalized, the two groups' products (+2, -2) still cancel.
    assert report["normalized_advantage_correlation"] == pytest.approx(0.0, abs=1e-9)
    assert report["pairs"] == {"same_order": 2, "opposite_order": 2} and report["pair_accuracy"] == 0.5
    assert report["groups_with_signal"]["both"]["count"] == 2 and report["agreement"]["both_success"] == 1
    assert report["per_start"][1] == {"file": "b", "imagined": [1, 1, 0], "real": [0, 0, 1]}
    assert report["groups_with_signal"]["imagined_only"]["count"] == 0

    # Against another imagination of the same starts that ranks every group as the simulator does (correlation 1),
    # two draws: the difference is -1, and no resample of starts can make it positive.
    against = []
    for draw in range(2):
        starts = [{"file": name, "imagined_success": draw == 0, "real_success": draw == 0} for name in ("a", "b")]
        against.append(tmp_path / f"other{draw}.json")
        against[-1].write_text(json.dumps({"starts": starts}))
    out = tmp_path / "g_against.json"
    run_script("group_agreement.py", "--replays", *paths, "--against", *against, "--out", out, "--bootstrap", "50")
    compared = json.loads(out.read_text())["against"]
    assert compared["advantage_correlation"] == pytest.approx(1.0) and compared["group_size"] == 2
    assert compared["correlation_difference"] == pytest.approx(-1.0)
    low, high = compared["correlation_difference_95"]
    assert -2.0 <= low <= high <= 1e-12
    with pytest.raises(subprocess.CalledProcessError) as failure:
        run_script("group_agreement.py", "--replays", *paths, "--against", *against[:1], "--out", out)
    assert b"a group needs at least 2 draws, got 1 --against file" in failure.value.stderr
    against[1].write_text(json.dumps({"starts": [{"file": "b", "imagined_success": 1, "real_success": 1}] * 2}))
    against[0].write_text(against[1].read_text())
    with pytest.raises(subprocess.CalledProcessError) as failure:
        run_script("group_agreement.py", "--replays", *paths, "--against", *against, "--out", out)
    assert b"--against replays other starts than --replays" in failure.value.stderr

    # No start the simulator solves: GRPO's imagined signal (both starts) is all noise, the two measures are undefined.
    for draw, path in enumerate(paths):
        starts = [
            {"file": name, "imagined_success": bool(imagined[name][draw]), "real_success": False} for name in "ab"
        ]
        path.write_text(json.dumps({"starts": starts}))
    run_script("group_agreement.py", "--replays", *paths, "--out", tmp_path / "g.json", "--bootstrap", "20")
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["advantage_correlation"] is None and report["pair_accuracy"] is None
    assert report["groups_with_signal"]["imagined_only"]["count"] == 2
    assert report["groups_with_signal"]["real"]["ci_low"] == 0.0 and report["bootstrap_95"]["pair_accuracy"] == []

    (tmp_path / "d2.json").write_text(json.dumps({"starts": [{"file": "x"}, {"file": "b"}]}))
    with pytest.raises(subprocess.CalledProcessError) as failure:
        run_script("group_agreement.py", "--replays", *paths, "--out", tmp_path / "g.json")
    assert b"replays other starts than" in failure.value.stderr


def test_group_agreement_ranks_groups_by_a_graded_score_from_the_imagination(tmp_path):
    # The groups of the test above (imagined outcomes uncorrelated with the real ones), graded by scores that rise
    # with the real outcome, steeply in group a (0.25 + 0.5 x real) and barely in b (0.49 + 0.02 x real): every group
    # ranks as the simulator does (normalized correlation 1); unnormalized, b's small spread weighs little:
    # (0.5 + 0.02) / sqrt(2 (0.5^2 + 0.02^2)). The 0/1 agreement stays the outcomes'.
    imagined = {"a": [1, 0, 0], "b": [1, 1, 0]}
    real = {"a": [1, 0, 0], "b": [0, 0, 1]}
    names = {"a": (0, 1), "b": (1, 2)}
    paths = []
    for draw in range(3):
        starts = [
            {
                "file": name, "task": names[name][0], "trial": names[name][1],
                "imagined_success": bool(imagined[name][draw]), "real_success": bool(real[name][draw]),
            }
            for name in ("a", "b")
        ]  # fmt: skip
        paths.append(tmp_path / f"d{draw}.json")
        paths[-1].write_text(json.dumps({"actor": {"imagined": "img.npz", "draw": draw}, "starts": starts}))
    rows = [(name, draw) for draw in range(3) for name in ("a", "b")]  # imagine.py's order: draw-major
    slope = {"a": (0.25, 0.5), "b": (0.49, 0.02)}
    npz = tmp_path / "img.npz"
    np.savez(
        npz,
        task=[names[n][0] for n, _ in rows],
        trial=[names[n][1] for n, _ in rows],
        success=[bool(imagined[n][d]) for n, d in rows],
        peak_probability=np.array([slope[n][0] + slope[n][1] * real[n][d] for n, d in rows], dtype=np.float64),
    )
    out = tmp_path / "graded.json"
    run_script("group_agreement.py", "--replays", *paths, "--scores", npz, "--out", out, "--bootstrap", "20")
    report = json.loads(out.read_text())
    assert report["score"] == "peak_probability" and report["normalized_advantage_correlation"] == pytest.approx(1.0)
    assert report["advantage_correlation"] == pytest.approx(0.52 / np.sqrt(2 * (0.5**2 + 0.02**2)))
    assert report["pairs"] == {"same_order": 4, "opposite_order": 0} and report["pair_accuracy"] == 1.0
    assert report["imagined_success"] == pytest.approx(0.5) and report["mean_score"] == pytest.approx(0.37 + 0.52 / 6)
    assert report["agreement"]["both_success"] == 1 and report["per_start"][0]["imagined"] == [0.75, 0.25, 0.25]
    with pytest.raises(subprocess.CalledProcessError) as failure:
        run_script(
            "group_agreement.py", "--replays", *paths, "--scores", npz, "--score", "final_probability", "--out", out
        )
    assert b"has no 'final_probability'" in failure.value.stderr
    flipped = dict(np.load(npz))
    flipped["success"] = ~flipped["success"]
    np.savez(npz, **flipped)
    with pytest.raises(subprocess.CalledProcessError) as failure:
        run_script("group_agreement.py", "--replays", *paths, "--scores", npz, "--out", out)
    assert b"draw 0 is not the imagination" in failure.value.stderr


def test_balance_keeps_as_many_real_successes_as_failures_of_each_mixed_start(tmp_path):
    # Three draws of three starts. Real outcomes: (0, 1) succeeds in draws 0 and 2, fails in 1; (0, 3) fails in all;
    # (1, 1) succeeds in draw 1 only. Each recorded file holds one frame that names its draw and start.
    real = {(0, 1): [1, 0, 1], (0, 3): [0, 0, 0], (1, 1): [0, 1, 0]}
    replays, recorded = [], []
    for draw in range(3):
        folder = tmp_path / f"rec_d{draw}"
        (folder / "dataset").mkdir(parents=True)
        starts = []
        for number, ((task, trial), outcomes) in enumerate(real.items()):
            frame = {"image": np.full((4, 4, 3), 10 * draw + number, np.uint8), "delta_action": np.zeros(7)}
            name = f"traj{number + 3 * draw:06d}_task{task:02d}_trial{trial:02d}.npy"
            save_trajectory(folder / "dataset" / name, [frame])
            starts.append({"task": task, "trial": trial, "real_success": bool(outcomes[draw])})
        replays.append(tmp_path / f"replay_d{draw}.json")
        replays[-1].write_text(json.dumps({"starts": starts}))
        recorded.append(folder)
    extra = tmp_path / "pre" / "dataset"
    extra.mkdir(parents=True)
    save_trajectory(extra / "traj000000_task01_trial07.npy", [{"image": np.full((4, 4, 3), 99, np.uint8)}])
    out = tmp_path / "mix"
    printed = run_script("balance.py", "--replays", *replays, "--recorded", *recorded, "--with", extra, "--out", out)
    assert "4 replays of 2 starts (2 successes) + 1 episodes" in printed
    names = sorted(path.name for path in (out / "dataset").iterdir())
    assert names == [
        "traj000000_task00_trial01.npy",  # (0, 1): its first success (draw 0), then its first failure (draw 1)
        "traj000001_task00_trial01.npy",
        "traj000002_task01_trial01.npy",  # (1, 1): the success of draw 1, then the failure of draw 0
        "traj000003_task01_trial01.npy",
        "traj000004_task01_trial07.npy",
    ]
    values = [int(load_trajectory(out / "dataset" / name)[0]["image"][0, 0, 0]) for name in names]
    assert values == [0, 10, 12, 2, 99]
    listing = json.loads((out / "balanced.json").read_text())["kept"]
    assert [row["real_success"] for row in listing] == [True, False, True, False]

    with pytest.raises(subprocess.CalledProcessError) as failure:
        run_script("balance.py", "--replays", *replays, "--recorded", *recorded, "--out", out)
    assert b"exists: give a new --out folder" in failure.value.stderr
    (recorded[2] / "dataset" / "traj000006_task00_trial01.npy").unlink()
    with pytest.raises(subprocess.CalledProcessError) as failure:
        run_script("balance.py", "--replays", *replays, "--recorded", *recorded, "--out", tmp_path / "other")
    assert b"expected one recorded file of task 0 trial 1" in failure.value.stderr
    assert not (tmp_path / "other").exists()
    with pytest.raises(subprocess.CalledProcessError) as failure:
        run_script("balance.py", "--replays", *replays, "--recorded", *recorded[:2], "--out", tmp_path / "other")
    assert b"got 3 JSONs, 2 folders" in failure.value.stderr


def test_recorded_outcomes_counts_successes_and_mixed_starts(tmp_path):
    # Start (0, 2) ends both ways, (1, 4) always fails, (0, 6) always succeeds (its flag on a post-success frame).
    episodes = [((0, 2), [0, 0, 1]), ((1, 4), [0, 0, 0, 0]), ((0, 2), [0, 0]), ((0, 6), [0, 1, 1])]
    folder = tmp_path / "rec" / "dataset"
    folder.mkdir(parents=True)
    for number, ((task, trial), flags) in enumerate(episodes):
        frames = [
            {
                "image": np.zeros((4, 4, 3), np.uint8),
                "delta_action": np.zeros(7),
                "success": bool(flag),
                "task": "put the bowl on the plate",
                "task_id": task,
                "trial_id": trial,
            }
            for flag in flags
        ]
        save_trajectory(folder / f"traj{number:06d}_task{task:02d}_trial{trial:02d}.npy", frames)
    out = tmp_path / "outcomes.json"
    run_script("recorded_outcomes.py", folder, "--out", out)
    report = json.loads(out.read_text())
    assert report["episodes"] == 4 and report["success"]["count"] == 2
    assert report["mean_frames"] == {"success": 3.0, "failure": 3.0}
    assert report["starts"] == 3 and report["mixed_starts"]["count"] == 1
    assert report["always_success_starts"] == 1 and report["never_success_starts"] == 1
    assert report["per_start"] == [
        {"task": 0, "trial": 2, "outcomes": [1, 0]},
        {"task": 0, "trial": 6, "outcomes": [1]},
        {"task": 1, "trial": 4, "outcomes": [0]},
    ]
