"""Tests of the frame-wise video VAE, on a tiny random-weight diffusers AutoencoderKL."""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from einops import rearrange
from safetensors.torch import load_file, save_file

from opensora_gym.models.vae import SDXL_SCALING_FACTOR, VideoVAE
from opensora_gym.presets import tiny_vae_config

# Four resolution levels make the downsampling 8x, as in the SDXL VAE; widths are tiny for speed.
TINY_CONFIG = tiny_vae_config()


@pytest.fixture(scope="module")
def vae() -> VideoVAE:
    # diffusers' weight initialisers draw from the global RNG: seed a forked copy, restored on exit.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = VideoVAE.from_config(TINY_CONFIG).eval()
    # Random init leaves the posterior std near 1 for every entry; a logvar bias spreads it so that a
    # wrong noise-to-entry pairing shows up.
    with torch.no_grad():
        model.autoencoder.quant_conv.bias[4:] = torch.tensor([-3.0, -1.0, 0.0, 1.0])
    return model


def _video(batch: int, frames: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random video in [-1, 1], shape [B, 3, T, H, W]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, size, generator=generator) * 2 - 1


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_properties(vae):
    assert vae.latent_channels == 4
    assert vae.downsample_factor == 8
    assert vae.dtype == torch.float32
    assert vae.device == torch.device("cpu")
    assert vae.scaling_factor == SDXL_SCALING_FACTOR == 0.13025
    assert vae.micro_batch_size == 64
    assert isinstance(vae.autoencoder, AutoencoderKL)


@torch.no_grad()
@pytest.mark.parametrize("size", [16, 32])
def test_encode_decode_shapes(vae, size):
    frames = _video(2, 3, size)
    latents = vae.encode(frames, generator=_seeded(0))
    assert latents.shape == (2, 4, 3, size // 8, size // 8)
    assert latents.dtype == torch.float32
    assert vae.decode(latents).shape == (2, 3, 3, size, size)


@torch.no_grad()
def test_encode_matches_diffusers_posterior_sample(vae):
    """Same math as the reference: latent_dist.sample() * 0.13025 on the (B T) folded frames."""
    frames = _video(2, 3)
    latents = vae.encode(frames, generator=_seeded(7))
    folded = rearrange(frames, "b c t h w -> (b t) c h w")
    posterior = vae.autoencoder.encode(folded).latent_dist
    expected = posterior.sample(generator=_seeded(7)) * 0.13025
    torch.testing.assert_close(latents, rearrange(expected, "(b t) c h w -> b c t h w", b=2), rtol=0, atol=0)


@torch.no_grad()
def test_decode_matches_diffusers(vae):
    latents = torch.randn(2, 4, 3, 4, 4, generator=_seeded(1))
    frames = vae.decode(latents)
    folded = rearrange(latents, "b c t h w -> (b t) c h w")
    expected = vae.autoencoder.decode(folded / 0.13025).sample
    torch.testing.assert_close(frames, rearrange(expected, "(b t) c h w -> b c t h w", b=2), rtol=0, atol=0)


@torch.no_grad()
def test_micro_batch_size_does_not_change_results(vae):
    frames = _video(2, 3)
    whole = VideoVAE(vae.autoencoder, micro_batch_size=64)
    single = VideoVAE(vae.autoencoder, micro_batch_size=1)
    latents = whole.encode(frames, generator=_seeded(3))
    torch.testing.assert_close(single.encode(frames, generator=_seeded(3)), latents)
    generators = [_seeded(4), _seeded(5)]
    torch.testing.assert_close(
        single.encode(frames, generator=[_seeded(4), _seeded(5)]), whole.encode(frames, generator=generators)
    )
    torch.testing.assert_close(single.decode(latents), whole.decode(latents))


@torch.no_grad()
def test_sample_false_is_the_posterior_mean(vae):
    frames = _video(1, 2)
    first = vae.encode(frames, sample=False)
    torch.testing.assert_close(vae.encode(frames, sample=False), first, rtol=0, atol=0)
    mean = vae.autoencoder.encode(rearrange(frames, "b c t h w -> (b t) c h w")).latent_dist.mean
    torch.testing.assert_close(first, rearrange(mean * 0.13025, "(b t) c h w -> b c t h w", b=1))
    assert not torch.allclose(vae.encode(frames, generator=_seeded(0)), first)


@torch.no_grad()
def test_generator_seed_controls_the_noise(vae):
    frames = _video(2, 2)
    state = torch.random.get_rng_state()
    same_a = vae.encode(frames, generator=_seeded(11))
    same_b = vae.encode(frames, generator=_seeded(11))
    other = vae.encode(frames, generator=_seeded(12))
    unseeded_a = vae.encode(frames)
    unseeded_b = vae.encode(frames)
    torch.testing.assert_close(same_a, same_b, rtol=0, atol=0)
    assert not torch.allclose(same_a, other)
    assert not torch.allclose(unseeded_a, unseeded_b)
    assert torch.equal(torch.random.get_rng_state(), state), "encode must not touch the global RNG"


@torch.no_grad()
def test_per_item_generators_make_items_independent(vae):
    frames = _video(3, 2)
    batched = vae.encode(frames, generator=[_seeded(20), _seeded(21), _seeded(22)])
    alone = vae.encode(frames[1:2], generator=[_seeded(21)])
    torch.testing.assert_close(batched[1:2], alone)
    reordered = vae.encode(frames[[2, 1]], generator=[_seeded(22), _seeded(21)])
    torch.testing.assert_close(reordered, batched[[2, 1]])
    # Item b's noise is one [T, C, h, w] draw from generator b.
    mean = vae.encode(frames[1:2], sample=False) / SDXL_SCALING_FACTOR
    posterior = vae.autoencoder.encode(rearrange(frames[1:2], "b c t h w -> (b t) c h w")).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=_seeded(21))
    expected = mean + rearrange(posterior.std * noise, "(b t) c h w -> b c t h w", b=1)
    torch.testing.assert_close(alone, expected * SDXL_SCALING_FACTOR)


@torch.no_grad()
def test_one_generator_per_item_equals_a_shared_one_for_one_item(vae):
    frames = _video(1, 3)
    torch.testing.assert_close(
        vae.encode(frames, generator=[_seeded(5)]), vae.encode(frames, generator=_seeded(5)), rtol=0, atol=0
    )


def test_encode_is_differentiable(vae):
    frames = _video(1, 2).requires_grad_(True)
    vae.decode(vae.encode(frames, sample=False)).square().mean().backward()
    assert frames.grad is not None and frames.grad.abs().sum() > 0


@torch.no_grad()
def test_save_and_load_round_trip(vae, tmp_path):
    vae.save_pretrained(tmp_path / "vae")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    loaded = VideoVAE.from_pretrained(tmp_path / "vae", micro_batch_size=2).eval()
    assert loaded.micro_batch_size == 2
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["block_out_channels"] == [8, 8, 8, 8]
    frames = _video(2, 2)
    latents = vae.encode(frames, generator=_seeded(9))
    torch.testing.assert_close(loaded.encode(frames, generator=_seeded(9)), latents, rtol=0, atol=0)
    torch.testing.assert_close(loaded.decode(latents), vae.decode(latents), rtol=0, atol=0)


def test_from_pretrained_torch_dtype(vae, tmp_path):
    vae.save_pretrained(tmp_path)
    assert VideoVAE.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("missing", ["config.json", "diffusion_pytorch_model.safetensors"])
def test_missing_files_are_named(vae, tmp_path, missing):
    vae.save_pretrained(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing) as error:
        VideoVAE.from_pretrained(tmp_path)
    assert "vae/config.json" in str(error.value)
    assert "vae/diffusion_pytorch_model.safetensors" in str(error.value)


def test_weights_with_missing_or_extra_keys_are_named(vae, tmp_path):
    vae.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["decoder.conv_out.bias"]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"model\.safetensors does not match .*config\.json") as error:
        VideoVAE.from_pretrained(tmp_path)
    assert "1 missing keys (first: ['decoder.conv_out.bias'])" in str(error.value)
    assert "1 unexpected keys (first: ['extra.weight'])" in str(error.value)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does_not_exist.*vae/config\.json"):
        VideoVAE.from_pretrained(tmp_path / "does_not_exist")


@torch.no_grad()
@pytest.mark.parametrize(
    ("method", "shape", "message"),
    [
        (
            "encode",
            (3, 2, 32, 32),
            r"frames must have shape \[B, C, T, H, W\] with C = 3, got \(3, 2, 32, 32\)",
        ),
        ("encode", (1, 4, 2, 32, 32), r"with C = 3, got \(1, 4, 2, 32, 32\)"),
        ("encode", (1, 3, 2, 30, 32), r"multiples of 8.*got \(30, 32\)"),
        (
            "decode",
            (1, 3, 2, 4, 4),
            r"latents must have shape \[B, C, T, h, w\] with C = 4, got \(1, 3, 2, 4, 4\)",
        ),
        ("decode", (4, 2, 4, 4), r"with C = 4, got \(4, 2, 4, 4\)"),
    ],
)
def test_wrong_shapes_raise(vae, method, shape, message):
    with pytest.raises(ValueError, match=message):
        getattr(vae, method)(torch.zeros(shape))


def test_bad_arguments_raise(vae):
    frames = _video(2, 1)
    with pytest.raises(ValueError, match=r"one torch\.Generator per batch item \(2\), got 1"):
        vae.encode(frames, generator=[_seeded(0)])
    with pytest.raises(TypeError, match="generator must be"):
        vae.encode(frames, generator=0)
    with pytest.raises(ValueError, match="micro_batch_size must be a positive int, got 0"):
        VideoVAE(vae.autoencoder, micro_batch_size=0)
    with pytest.raises(ValueError, match="scaling_factor must be a positive number"):
        VideoVAE(vae.autoencoder, scaling_factor=-1.0)
    with pytest.raises(TypeError, match=r"frames must be a floating-point tensor, got torch\.uint8"):
        vae.encode(torch.zeros(1, 3, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="AutoencoderKL"):
        VideoVAE(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_bfloat16(vae):
    half = VideoVAE(AutoencoderKL.from_config(vae.autoencoder.config)).to(torch.bfloat16)
    half.autoencoder.load_state_dict(vae.autoencoder.state_dict())
    assert half.dtype == torch.bfloat16
    frames = _video(1, 2)
    latents = half.encode(frames, sample=False)  # float32 input is cast to the module dtype
    assert latents.dtype == torch.bfloat16
    reference = vae.encode(frames, sample=False)
    assert (latents.float() - reference).abs().max() < 0.05 * reference.abs().max()
    decoded = half.decode(latents)
    assert decoded.dtype == torch.bfloat16 and decoded.shape == (1, 3, 2, 32, 32)
    assert torch.isfinite(decoded).all()
    sampled = half.encode(frames, generator=_seeded(0))
    assert sampled.dtype == torch.bfloat16 and torch.isfinite(sampled).all()


@torch.no_grad()
def test_channels_last_compiled_decoder_decodes_the_same(vae):
    # The "eager" backend traces the decoder as torch.compile does, without building kernels (CPU CI).
    with torch.random.fork_rng():
        torch.manual_seed(0)
        fast = VideoVAE.from_config(TINY_CONFIG).eval()
    fast.load_state_dict(vae.state_dict())
    fast.compile_decoder(backend="eager")
    latents = torch.randn(2, 4, 3, 4, 4, generator=_seeded(1))
    torch.testing.assert_close(fast.decode(latents), vae.decode(latents), rtol=1e-5, atol=1e-5)
