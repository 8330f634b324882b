import numpy as np
import pytest
import torch

from opensora_gym.data import TrajectoryDataset, save_trajectory
from opensora_gym.env import OpenSoraLiberoEnv
from opensora_gym.starts import GIVEN_START, Start, StartSampler

NUM_EPISODES = 5


@pytest.fixture
def dataset(tmp_path):
    """Five one-frame trajectories: episode e's frame is filled with e and its task is `task e`."""
    for e in range(NUM_EPISODES):
        frame = {
            "image": np.full((6, 8, 3), e, dtype=np.uint8),
            "delta_action": np.zeros(7),
            "instruction": f"task {e}",
        }
        save_trajectory(tmp_path / f"traj{e}.npy", [frame])
    return TrajectoryDataset(tmp_path)


def episodes(starts: list[Start]) -> list[int]:
    return [s.episode_index for s in starts]


def expected_draws(seed: int, count: int, num_episodes: int = NUM_EPISODES) -> list[int]:
    """What the sampler draws: one `torch.randint` over the trajectories per draw, from a generator seeded `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return [int(torch.randint(num_episodes, (1,), generator=generator)) for _ in range(count)]


# ------------------------------------------------------------------------------------------ group draws


def test_each_group_starts_from_its_draw(dataset):
    sampler = StartSampler(dataset, num_envs=6, group_size=2)
    sampler.seed(3)
    first, second, third = expected_draws(3, 3)
    assert episodes(sampler.next_starts(range(6))) == [first, first, second, second, third, third]


def test_a_member_that_ends_later_still_shares_its_groups_next_start(dataset):
    sampler = StartSampler(dataset, num_envs=4, group_size=2)
    sampler.seed(0)
    draws = expected_draws(0, 4)
    sampler.next_starts(range(4))  # draws 0 (group 0) and 1 (group 1)
    assert episodes(sampler.next_starts([1])) == [draws[2]]  # group 0's second episode: the third draw
    assert episodes(sampler.next_starts([3, 2])) == [draws[3], draws[3]]
    assert episodes(sampler.next_starts([0])) == [draws[2]]  # the same second episode as its group mate


def test_seed_starts_the_draws_over(dataset):
    sampler = StartSampler(dataset, num_envs=2)
    sampler.seed(7)
    before = episodes(sampler.next_starts([0, 1]) + sampler.next_starts([1]))
    sampler.seed(7)
    assert episodes(sampler.next_starts([0, 1]) + sampler.next_starts([1])) == before == expected_draws(7, 3)


def test_chosen_and_given_starts_take_no_draw(dataset):
    sampler = StartSampler(dataset, num_envs=2)
    sampler.seed(1)
    chosen, given = sampler.check_options({"episode_indices": [4, 2]})
    assert given is None and episodes(sampler.next_starts([1, 0], chosen)) == [2, 4]
    images = np.zeros((2, 3, 3, 3), dtype=np.uint8)
    _, given = sampler.check_options({"start_images": images, "start_tasks": ["a", "b"]})
    assert sampler.next_starts([1], given=given) == [given[1]]
    assert episodes(sampler.next_starts([0, 1])) == expected_draws(1, 2)


# ------------------------------------------------------------------------------------------ start frames


def test_a_start_is_the_trajectorys_first_frame_read_once(dataset, monkeypatch):
    reads = []
    read = dataset.images
    monkeypatch.setattr(dataset, "images", lambda e: reads.append(e) or read(e))
    sampler = StartSampler(dataset, num_envs=2)
    start, again = sampler.next_starts([0, 1], [3, 3])
    assert start.task == "task 3" and start.image.shape == (6, 8, 3) and (start.image == 3).all()
    assert again.frames is start.frames and reads == [3]


@pytest.fixture
def long_dataset(tmp_path):
    """Trajectories of 10 and 3 frames: frame t of episode e is filled with 10 * e + t."""
    for e, length in enumerate((10, 3)):
        frames = [
            {"image": np.full((2, 2, 3), 10 * e + t, np.uint8), "delta_action": np.zeros(7), "instruction": "t"}
            for t in range(length)
        ]
        save_trajectory(tmp_path / f"traj{e}.npy", frames)
    return TrajectoryDataset(tmp_path)


@pytest.mark.parametrize(
    ("start_frame", "long", "short"),
    [
        # The condition: the start frame last, the recorded frames before it, frame 0 repeated before frame 0.
        (0, [0, 0, 0, 0], [10, 10, 10, 10]),
        (2, [0, 0, 1, 2], [10, 10, 11, 12]),
        (7, [4, 5, 6, 7], [10, 10, 11, 12]),  # past the short trajectory's end: its last frame
        ("end-0", [6, 7, 8, 9], [10, 10, 11, 12]),
        ("end-4", [2, 3, 4, 5], [10, 10, 10, 10]),  # before the short trajectory's frame 0: frame 0
    ],
)
def test_a_later_start_carries_its_recorded_frames_before(long_dataset, start_frame, long, short):
    sampler = StartSampler(long_dataset, num_envs=2, start_frame=start_frame, context=4)
    starts = sampler.next_starts([0, 1], [0, 1])
    assert [start.condition(4)[:, 0, 0, 0].tolist() for start in starts] == [long, short]
    assert [int(start.image[0, 0, 0]) for start in starts] == [long[-1], short[-1]]


def test_a_given_start_fills_the_condition_with_its_frame(dataset):
    images = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3)
    options = {"start_images": images, "start_tasks": ["a", "b"]}
    _, given = StartSampler(dataset, num_envs=2, context=4).check_options(options)
    np.testing.assert_array_equal(given[1].condition(4), np.repeat(images[1:], 4, axis=0))


def test_random_start_frames_are_drawn_per_group_draw_and_carry_their_recorded_frames(long_dataset):
    sampler = StartSampler(long_dataset, num_envs=4, group_size=2, start_frame="random", context=4)
    sampler.seed(5)
    # The draws: a trajectory, then a frame of it, from the same generator (the long trajectory has 10 frames).
    generator = torch.Generator().manual_seed(5)
    expected = []
    for _ in range(4):
        episode = int(torch.randint(2, (1,), generator=generator))
        expected.append((episode, int(torch.randint((10, 3)[episode], (1,), generator=generator))))
    starts = sampler.next_starts(range(4)) + sampler.next_starts([1, 0])
    drawn = [(start.episode_index, int(start.image[0, 0, 0]) - 10 * start.episode_index) for start in starts]
    assert drawn == [expected[0], expected[0], expected[1], expected[1], expected[2], expected[2]]
    for start in starts:  # the recorded frames up to the drawn one, the first repeated before frame 0
        frame = int(start.image[0, 0, 0]) - 10 * start.episode_index
        before = [10 * start.episode_index + max(t, 0) for t in range(frame - 3, frame + 1)]
        assert start.condition(4)[:, 0, 0, 0].tolist() == before
    many = StartSampler(long_dataset, num_envs=2, start_frame="random")
    many.seed(0)
    frames = {int(start.image[0, 0, 0]) for _ in range(40) for start in many.next_starts([0, 1])}
    assert frames == set(range(10)) | {10, 11, 12}  # every frame of both trajectories comes up
    chosen = many.next_starts([0, 1], [1, 1])  # chosen trajectories draw their frames
    assert {start.episode_index for start in chosen} == {1}


@pytest.mark.parametrize("start_frame", [-1, "end", "end--2", "end-2.5", "last", "Random", 1.0, True, None])
def test_a_bad_start_frame_is_rejected(dataset, start_frame):
    with pytest.raises(ValueError, match=rf"start_frame must be a frame index >= 0, 'end-K' .* got {start_frame!r}"):
        StartSampler(dataset, num_envs=2, start_frame=start_frame)


def test_given_starts_keep_their_frames_and_tasks(dataset):
    sampler = StartSampler(dataset, num_envs=2)
    images = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    _, given = sampler.check_options({"start_images": images, "start_tasks": np.array(["open", "close"])})
    assert [s.episode_index for s in given] == [GIVEN_START, GIVEN_START] == [-1, -1]
    assert [s.task for s in given] == ["open", "close"] and all(type(s.task) is str for s in given)
    np.testing.assert_array_equal(given[1].image, images[1])


# ------------------------------------------------------------------------------------------ checks


def test_options_without_starts_choose_nothing(dataset):
    sampler = StartSampler(dataset, num_envs=2)
    assert sampler.check_options({}) == (None, None)
    assert sampler.check_options({"episode_indices": None, "reset_mask": np.array([True, False])}) == (None, None)
    assert sampler.check_options({"episode_indices": np.array([0, 4])}) == ([0, 4], None)


IMAGES = np.zeros((2, 8, 8, 3), np.uint8)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"episode_indices": [0, 5]}, ValueError, r"episode_indices must lie in \[0, 4\] \(5 trajectories\)"),
        ({"episode_indices": [0]}, ValueError, r"episode_indices must be 2 integers .* got shape \(1,\)"),
        ({"episode_indices": [0.0, 1.0]}, ValueError, "of float64"),
        ({"start_tasks": ["a", "b"]}, ValueError, "start_images and start_tasks come together"),
        ({"start_images": IMAGES, "start_tasks": ["a", "b"], "episode_indices": [0, 1]}, ValueError, "give one"),
        ({"start_images": IMAGES.astype(np.float32), "start_tasks": ["a", "b"]}, TypeError, "got float32"),
        ({"start_images": IMAGES[:, :, :, :1], "start_tasks": ["a", "b"]}, ValueError, r"\(2, H, W, 3\)"),
        ({"start_images": IMAGES, "start_tasks": ["a"]}, ValueError, "start_tasks must be 2 instructions"),
        ({"start_images": IMAGES, "start_tasks": [b"a", "b"]}, TypeError, r"non-empty strings, got \['bytes'"),
    ],
)
def test_bad_options_are_rejected(dataset, options, error, message):
    with pytest.raises(error, match=message):
        StartSampler(dataset, num_envs=2).check_options(options)


def test_group_size_must_divide_the_sub_envs(dataset):
    with pytest.raises(ValueError, match=r"group_size must be a positive divisor of num_envs \(4\), got 3"):
        StartSampler(dataset, num_envs=4, group_size=3)


def test_the_env_starts_from_its_sampler(checkpoint, world_model):
    env = OpenSoraLiberoEnv(4, checkpoint=checkpoint, world_model=world_model, image_size=64, group_size=2)
    assert env.start_sampler.dataset is env.dataset and env.start_sampler.group_size == 2
    _, info = env.reset(seed=9)
    first, second = expected_draws(9, 2, len(env.dataset))
    assert info["episode_index"].tolist() == [first, first, second, second]
    assert list(info["task"]) == [env.dataset.start_frame(e)[1] for e in (first, first, second, second)]
