import pytest
import torch

from opensora_gym.models.stdit3 import STDiT3, STDiT3Config
from opensora_gym.rectified_flow import RectifiedFlowConfig, RectifiedFlowSampler, draw_noise, timestep_transform


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return STDiT3(STDiT3Config(depth=1, hidden_size=32, num_heads=4)).eval()


def condition_and_actions(batch, seed=0, latent=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 4, latent, latent, generator=g), torch.rand(batch, 8, 7, generator=g) * 2 - 1


@pytest.mark.reference
def test_samples_match_reference(stdit3_reference):
    meta, case, model = stdit3_reference.meta, stdit3_reference.case, stdit3_reference.model
    settings = meta["sampler"]
    assert settings["condition_frames"] == case["z_cond"].shape[2]
    assert settings["predicted_frames"] == case["z_noise"].shape[2]
    sampler = RectifiedFlowSampler(
        RectifiedFlowConfig(
            num_sampling_steps=settings["num_sampling_steps"],
            num_timesteps=settings["num_timesteps"],
            use_timestep_transform=settings["use_timestep_transform"],
        )
    )
    kwargs = meta["model_kwargs"]
    samples = sampler.sample(
        model, case["z_cond"], case["actions"], height=kwargs["height"], width=kwargs["width"], noise=case["z_noise"]
    )
    assert samples.shape == case["samples"].shape
    assert (samples - case["samples"]).abs().max().item() <= 1e-3
    assert torch.equal(samples[:, :, : case["z_cond"].shape[2]], case["z_cond"])


@pytest.mark.reference
def test_timestep_transform_matches_reference(stdit3_reference):
    meta, case = stdit3_reference.meta, stdit3_reference.case
    outputs = [k for k in case if k.startswith("transform_t_out_")]
    assert outputs
    for key in outputs:
        height, width = (int(v) for v in key.removeprefix("transform_t_out_").split("x"))
        out = timestep_transform(case["transform_t_in"], height, width, meta["model_kwargs"]["num_frames"])
        assert (out - case[key]).abs().max().item() <= 1e-3, key


def test_transform_known_values():
    t = torch.tensor([1000.0, 500.0, 0.0])
    # 256 x 256 with the fixed temporal factor 4: ratio sqrt(1/4) * sqrt(4) = 1, the identity.
    torch.testing.assert_close(timestep_transform(t, 256, 256, 12), t)
    # 64 x 64: ratio 1/8 * 2 = 1/4, so t = 0.5 -> 0.25 * 0.5 / (1 - 0.75 * 0.5) = 0.2.
    torch.testing.assert_close(timestep_transform(t, 64, 64, 12), torch.tensor([1000.0, 200.0, 0.0]))
    # A single frame has temporal factor 1: ratio 1/8, t = 0.5 -> (1/16) / (1 - 7/16) = 1/9.
    torch.testing.assert_close(timestep_transform(t[1:2], 64, 64, 1), torch.tensor([1000.0 / 9]))


def test_timesteps_schedule():
    sampler = RectifiedFlowSampler(RectifiedFlowConfig(num_sampling_steps=4, use_timestep_transform=False))
    torch.testing.assert_close(sampler.timesteps(256, 256, 12), torch.tensor([1000.0, 750.0, 500.0, 250.0]))


def test_condition_frames_held_clean_and_generator_seeds(tiny_model):
    sampler = RectifiedFlowSampler(RectifiedFlowConfig(num_sampling_steps=3))
    cond, actions = condition_and_actions(2)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return sampler.sample(tiny_model, cond, actions, height=32, width=32, generator=generator)

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a[:, :, :4], cond)
    assert torch.equal(a, b)
    assert not torch.allclose(a[:, :, 4:], c[:, :, 4:])


def test_per_item_generators_make_items_independent_of_the_batch(tiny_model):
    sampler = RectifiedFlowSampler(RectifiedFlowConfig(num_sampling_steps=2))
    cond, actions = condition_and_actions(3)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    batch = sampler.sample(tiny_model, cond, actions, height=32, width=32, generator=gens)
    alone = sampler.sample(
        tiny_model, cond[2:], actions[2:], height=32, width=32, generator=[torch.Generator().manual_seed(12)]
    )
    torch.testing.assert_close(batch[2:], alone, rtol=1e-5, atol=1e-5)


def test_draw_noise_rejects_wrong_generator_count():
    with pytest.raises(ValueError, match=r"one generator per batch item \(3\), got 2"):
        draw_noise((3, 4), [torch.Generator(), torch.Generator()])


def test_noise_of_wrong_shape_is_rejected(tiny_model):
    cond, actions = condition_and_actions(1)
    with pytest.raises(ValueError, match=r"noise must have shape \(1, 4, 8, 4, 4\)"):
        RectifiedFlowSampler().sample(tiny_model, cond, actions, height=32, width=32, noise=torch.zeros(1, 4, 7, 4, 4))


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_sampling_steps": 0},
        {"num_timesteps": 0},
        {"transform_scale": 0.0},
        {"micro_batch_size": 0},
        {"condition_timestep": 14.0},
        {"condition_timestep": 1000.0},
        {"action_guidance": -0.5},
        {"action_guidance": float("nan")},
    ],
)
def test_config_rejects_bad_values(overrides):
    with pytest.raises(ValueError):
        RectifiedFlowConfig(**overrides)


@pytest.mark.parametrize("micro_batch_size", [2, 5, 8])
def test_micro_batches_give_the_whole_batch_samples(tiny_model, micro_batch_size):
    # Padded micro-batches (the static shapes of compiled blocks) leave every item's sample as it is; batch sizes
    # that autoreset leaves (here 5) need not be multiples of the micro-batch.
    cond, actions = condition_and_actions(5)
    config = RectifiedFlowConfig(num_sampling_steps=2)
    whole = RectifiedFlowSampler(config).sample(
        tiny_model, cond, actions, height=32, width=32, generator=[torch.Generator().manual_seed(i) for i in range(5)]
    )
    micro = RectifiedFlowSampler(RectifiedFlowConfig(num_sampling_steps=2, micro_batch_size=micro_batch_size)).sample(
        tiny_model, cond, actions, height=32, width=32, generator=[torch.Generator().manual_seed(i) for i in range(5)]
    )
    assert micro.shape == whole.shape
    torch.testing.assert_close(micro, whole, rtol=1e-5, atol=1e-5)


def test_condition_timestep_samples_from_noised_condition_frames_told_their_level(tiny_model):
    cond, actions = condition_and_actions(2)
    sampler = RectifiedFlowSampler(RectifiedFlowConfig(num_sampling_steps=3, condition_timestep=200.0))

    def run(seed):
        return sampler.sample(
            tiny_model, cond, actions, height=32, width=32, generator=torch.Generator().manual_seed(seed)
        )

    a, b = run(1), run(1)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :, :4], cond)  # the returned condition frames stay clean
    # By hand: the starting noise first, then the condition frames' noise, from the same generator.
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 8, 4, 4, generator=generator)
    noised = 0.8 * cond + 0.2 * torch.randn(cond.shape, generator=generator)
    cache = tiny_model.condition_cache(noised, 32, 32, 200.0)
    expected = sampler._integrate(tiny_model, cache, actions, z, sampler.timesteps(32, 32, 12), 32, 32)
    torch.testing.assert_close(a[:, :, 4:], expected, rtol=1e-5, atol=1e-5)
    clean = RectifiedFlowSampler(RectifiedFlowConfig(num_sampling_steps=3)).sample(
        tiny_model, cond, actions, height=32, width=32, generator=torch.Generator().manual_seed(1)
    )
    assert not torch.allclose(a[:, :, 4:], clean[:, :, 4:], atol=1e-4)


def test_action_guidance_extrapolates_from_the_velocity_without_actions(tiny_model):
    cond, actions = condition_and_actions(3)
    noise = torch.randn(3, 4, 8, 4, 4, generator=torch.Generator().manual_seed(3))

    def run(guidance, acts=actions):
        sampler = RectifiedFlowSampler(RectifiedFlowConfig(num_sampling_steps=3, action_guidance=guidance))
        return sampler.sample(tiny_model, cond, acts, height=32, width=32, noise=noise)[:, :, 4:]

    plain = RectifiedFlowSampler(RectifiedFlowConfig(num_sampling_steps=3))
    assert torch.equal(run(1.0), plain.sample(tiny_model, cond, actions, height=32, width=32, noise=noise)[:, :, 4:])
    # By hand: each Euler step moves along v_none + w * (v - v_none).
    steps = plain.timesteps(32, 32, 12)
    cache = tiny_model.condition_cache(cond, 32, 32)
    z, drop = noise.clone(), torch.ones(3, dtype=torch.bool)
    for t, t_next in zip(steps, [*steps[1:], torch.tensor(0.0)], strict=True):
        v = tiny_model.forward_generated(z, t.expand(3), actions, cache, 32, 32)[:, :4]
        v_none = tiny_model.forward_generated(z, t.expand(3), actions, cache, 32, 32, drop)[:, :4]
        z = z + (v_none + 2.5 * (v - v_none)) * ((t - t_next) / 1000)
    torch.testing.assert_close(run(2.5), z, rtol=1e-5, atol=1e-5)
    other = torch.rand(actions.shape, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(run(0.0), run(0.0, other), rtol=1e-6, atol=1e-6)  # w = 0: the actions are ignored
    assert not torch.allclose(run(2.5), run(1.0), atol=1e-4)
