import imageio.v2 as imageio
import numpy as np
import pytest

from opensora_gym.env import OpenSoraLiberoEnv
from opensora_gym.presets import TINY_TASKS
from opensora_gym.testing import random_chunk_actions
from opensora_gym.wrappers.video import RecordEpisodeVideo, _font, _wrap, annotate_frame

FAST = {"num_sampling_steps": 2, "image_size": 64, "dtype": "float32", "max_episode_steps": 16}


def make_env(checkpoint, world_model, num_envs=2):
    return OpenSoraLiberoEnv(num_envs, checkpoint=checkpoint, world_model=world_model, **FAST)


def read_video(path) -> np.ndarray:
    with imageio.get_reader(path) as reader:
        return np.stack([frame for frame in reader.iter_data()])  # [T, H, W, 3]


def upscale(frame, k):
    return np.repeat(np.repeat(frame, k, axis=0), k, axis=1)


def band_height(annotated, raw):
    """Rows from the bottom where the annotated frame differs from the raw one."""
    rows = np.nonzero((annotated != raw).any(axis=(1, 2)))[0]
    return annotated.shape[0] - rows.min()


@pytest.mark.parametrize("size", [64, 256])
def test_annotation_draws_a_dark_band_with_text_and_leaves_the_rest(size):
    frame = np.random.default_rng(0).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    out = annotate_frame(frame, TINY_TASKS[0], step=24)
    k = 256 // size
    raw = upscale(frame, k)
    assert out.shape == raw.shape and out.dtype == np.uint8
    band = band_height(out, raw)
    # Three lines of text (step, two task lines) take a band of a fraction of the frame.
    assert 0.1 * out.shape[0] < band < 0.35 * out.shape[0]
    np.testing.assert_array_equal(out[:-band], raw[:-band])
    region = out[-band:]
    # The band darkens the frame to at most 64 levels: bright pixels there are the text.
    assert (region > 128).all(axis=-1).sum() > 200
    assert np.median(region) < np.median(raw[-band:]) / 2  # the dark band


def test_long_task_text_is_cut_to_two_lines():
    font = _font(12)
    lines = _wrap(" ".join(["place the bowl on the plate"] * 10), font, width=240, max_lines=2)
    assert len(lines) == 2 and lines[-1].endswith("...")
    assert all(font.getlength(line) <= 240 for line in lines)
    assert _wrap("pick up the bowl", font, width=240, max_lines=2) == ["pick up the bowl"]


def test_each_episode_gets_a_file_with_the_start_frame_and_every_predicted_frame(checkpoint, never_success, tmp_path):
    env = RecordEpisodeVideo(make_env(checkpoint, never_success), tmp_path)
    assert env.unwrapped.return_frames
    obs, _ = env.reset(seed=0)
    first_images = obs["image"].copy()
    for seed in range(2):
        _, _, _, truncated, info = env.step(random_chunk_actions(2, seed))
    assert truncated.all()
    last_chunk = info["frames"].copy()
    assert sorted(p.name for p in env.video_paths) == ["episode-env0-episode0.mp4", "episode-env1-episode1.mp4"]
    for i, path in enumerate(sorted(env.video_paths)):
        video = read_video(path)
        assert video.shape == (1 + 2 * 8, 256, 256, 3)
        # Above the text band, the video shows the env's frames (up to the codec's loss).
        top = slice(0, 180)
        assert np.abs(video[0, top].astype(int) - upscale(first_images[i], 4)[top]).mean() < 6
        assert np.abs(video[-1, top].astype(int) - upscale(last_chunk[i, -1], 4)[top]).mean() < 6
    env.step(random_chunk_actions(2, 2))  # both sub-envs reset: new episodes 2 and 3 begin
    env.step(random_chunk_actions(2, 3))
    env.close()
    assert sorted(p.name for p in env.video_paths[2:]) == ["episode-env0-episode2.mp4", "episode-env1-episode3.mp4"]
    for path in env.video_paths[2:]:
        assert len(read_video(path)) == 1 + 8  # flushed by close() after one chunk


def test_episode_trigger_chooses_the_recorded_episodes(checkpoint, never_success, tmp_path):
    seen = []

    def every_other(episode_id):
        seen.append(episode_id)
        return episode_id % 2 == 0

    env = RecordEpisodeVideo(
        make_env(checkpoint, never_success), tmp_path, episode_trigger=every_other, name_prefix="t"
    )
    env.reset(seed=0)
    for seed in range(4):
        env.step(random_chunk_actions(2, seed))
    env.close()
    assert seen == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t-env0-episode0.mp4", "t-env0-episode2.mp4"]
    assert [len(read_video(tmp_path / name)) for name in ("t-env0-episode0.mp4", "t-env0-episode2.mp4")] == [17, 9]


def test_next_step_autoreset_splits_episodes_per_sub_env(checkpoint, never_success, tmp_path):
    env = RecordEpisodeVideo(make_env(checkpoint, never_success), tmp_path)
    env.reset(seed=0)
    # Sub-env 1 is half-way through its episode, so the two sub-envs end on different steps.
    state = env.unwrapped.get_state([1])
    state[0].elapsed_steps = 8
    env.unwrapped.set_state(state, [1])
    _, _, _, truncated, _ = env.step(random_chunk_actions(2, 0))
    assert truncated.tolist() == [False, True]
    obs, _, _, truncated, info = env.step(random_chunk_actions(2, 1))
    assert truncated.tolist() == [True, False] and info["_frames"].tolist() == [True, False]
    new_start = obs["image"][1].copy()
    env.step(random_chunk_actions(2, 2))  # sub-env 0 resets, sub-env 1 imagines its first chunk
    env.close()
    lengths = {p.name: len(read_video(p)) for p in env.video_paths}
    assert lengths == {
        "episode-env1-episode1.mp4": 1 + 8,
        "episode-env0-episode0.mp4": 1 + 16,
        "episode-env1-episode2.mp4": 1 + 8,
    }
    # Sub-env 0's episode 3 had only its start frame at close(): no 1-frame video.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(lengths)
    first = read_video(tmp_path / "episode-env1-episode2.mp4")[0]
    assert np.abs(first[:180].astype(int) - upscale(new_start, 4)[:180]).mean() < 6


def test_rejects_an_env_without_frames(checkpoint, never_success, tmp_path):
    env = make_env(checkpoint, never_success)
    with pytest.raises(ValueError, match="fps and min_video_size must be positive"):
        RecordEpisodeVideo(env, tmp_path, fps=0)
    wrapped = RecordEpisodeVideo(env, tmp_path)
    wrapped.reset(seed=0)
    env.return_frames = False
    with pytest.raises(RuntimeError, match="return_frames=True"):
        wrapped.step(random_chunk_actions(2))


def test_stop_writes_the_running_episodes_and_gives_the_env_back_as_it_was(checkpoint, never_success, tmp_path):
    inner = make_env(checkpoint, never_success)
    assert not inner.return_frames
    env = RecordEpisodeVideo(inner, tmp_path)
    env.reset(seed=0)
    env.step(random_chunk_actions(2, 0))
    env.stop()
    assert not inner.return_frames  # restored by the wrapper itself
    assert all(len(read_video(path)) == 1 + 8 for path in env.video_paths)
    _, _, _, _, info = inner.step(random_chunk_actions(2, 1))  # the env goes on, unwrapped and open
    assert "frames" not in info
