"""OpenVLA-OFT policy: layout, parallel decoding, RL interface, LoRA, save/load (tiny model on the CPU)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from opensora_gym.checkpoint import save_sharded
from vla_policies import (
    LoraSettings,
    OpenVLAOFTConfig,
    OpenVLAOFTModel,
    OpenVLAOFTPolicy,
    build_prompt,
    checkpoint_shapes_match,
    preprocess_images,
    unnormalize,
)
from vla_policies.testing import write_tiny_checkpoint

TASKS = ["Pick up the black bowl and place it on the plate", "open the top drawer", "Stack"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_oft"), seed=0, add_value_head=True)


@pytest.fixture(scope="module")
def policy(tiny_folder):
    return OpenVLAOFTPolicy.from_pretrained(tiny_folder).eval()


def make_obs(n=3, seed=0, size=(40, 36)):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (n, *size, 3), generator=g, dtype=torch.uint8), "task": TASKS[:n]}


def model_logits(policy, obs, append_stop_token=False):
    pixel_values = preprocess_images(obs["image"], policy.image_config)
    input_ids, attention_mask = policy.prompt_tokenizer(list(obs["task"]))
    with torch.no_grad():
        return policy.model(pixel_values, input_ids, attention_mask, append_stop_token).action_logits


@pytest.mark.reference
def test_full_size_model_matches_the_released_manifest(reference_dir):
    manifest = json.loads((reference_dir / "manifest_openvla_oft_7b.json").read_text())
    with torch.device("meta"):
        model = OpenVLAOFTModel(OpenVLAOFTConfig())
    assert checkpoint_shapes_match(model, manifest) == []
    features = model.vision_backbone(torch.zeros(1, 6, 224, 224, device="meta"))
    assert tuple(features.shape) == (1, 256, 2176)  # 256 patches x (1024 DINOv2 + 1152 SigLIP)


def test_prompt_tokens_follow_the_reference_layout(policy):
    prompt = policy.prompt_tokenizer
    assert build_prompt("Open The Drawer") == "In: What action should the robot take to open the drawer?\nOut: "
    ids, mask = prompt(["ab", "abcd"])
    assert ids.shape == mask.shape == (2, ids.shape[1])
    # RLinf's layout: BOS in column 0, left padding between BOS and the prompt, the empty token last
    assert (ids[:, 0] == prompt.bos_token_id).all() and (mask[:, 0] == 1).all()
    assert mask[0].tolist() == [1, 0, 0] + [1] * (ids.shape[1] - 3) and mask[1].all()
    assert (ids[0, 1:3] == policy.model.config.pad_token_id).all()
    assert (ids[:, -1] == prompt.empty_token_id).all()
    assert prompt.bos_token_id not in ids[1, 1:].tolist()
    fixed_ids, fixed_mask = prompt(["ab", "abcd"], max_length=ids.shape[1] + 5)
    assert torch.equal(fixed_ids[:, 6:], ids[:, 1:]) and (fixed_mask[:, 1:6] == 0).all()
    with pytest.raises(ValueError, match=rf"max_length must be at least {ids.shape[1]} .*, got 3"):
        prompt(["ab", "abcd"], max_length=3)


def test_image_preprocessing_stacks_both_normalizations(policy):
    images = torch.full((2, 50, 70, 3), 255, dtype=torch.uint8)
    pixels = preprocess_images(images, policy.image_config)
    assert pixels.shape == (2, 6, 28, 28)
    torch.testing.assert_close(pixels[0, 0, 0, 0], torch.tensor((1 - 0.485) / 0.229))
    torch.testing.assert_close(pixels[0, 3:, 5, 5], torch.ones(3))  # SigLIP: (1 - 0.5) / 0.5


def test_act_returns_robot_unit_chunks_and_decoded_tokens(policy):
    out = policy.act(make_obs(), generator=torch.Generator().manual_seed(1))
    assert out.actions.shape == (3, 8, 7) and out.actions.dtype == torch.float32
    assert out.action_tokens.shape == (3, 56) and out.action_tokens.dtype == torch.int64
    assert out.logprobs.shape == (3, 56) and out.logprobs.dtype == torch.float32
    assert out.values.shape == (3, 1)
    vocab = policy.model.config.vocab_size
    assert out.action_tokens.min() >= vocab - 256 and out.action_tokens.max() < vocab
    normalized = policy.action_tokenizer.decode(out.action_tokens).reshape(3, 8, 7)
    torch.testing.assert_close(out.actions, unnormalize(normalized, policy.action_stats).float())
    assert out.actions[..., 6].abs().max() <= 1.0  # gripper is masked: stays normalized


def test_sampling_is_determined_by_the_generator(policy):
    obs = make_obs()
    a = policy.act(obs, generator=torch.Generator().manual_seed(7))
    b = policy.act(obs, generator=torch.Generator().manual_seed(7))
    c = policy.act(obs, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.action_tokens, b.action_tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.action_tokens, c.action_tokens)
    with pytest.raises(ValueError, match=r"torch\.Generator"):
        policy.act(obs)


def test_greedy_decoding_is_the_argmax_of_the_action_logits(policy):
    obs = make_obs()
    out = policy.act(obs, do_sample=False, temperature=0.5, top_k=3)
    logits = model_logits(policy, obs)
    expected = logits.argmax(-1) + policy.model.config.vocab_size - 256
    assert torch.equal(out.action_tokens, expected)
    # RLinf's greedy log-probs are those of the unscaled logits: temperature and top-k play no part.
    unscaled = torch.log_softmax(logits, dim=-1).amax(dim=-1)
    torch.testing.assert_close(out.logprobs, unscaled, rtol=0, atol=1e-6)
    assert (out.logprobs < 0).all()


@pytest.mark.parametrize(("temperature", "top_k"), [(1.6, -1), (0.7, 5)])
def test_act_logprobs_equal_evaluate_logprobs(policy, temperature, top_k):
    obs = make_obs()
    out = policy.act(obs, temperature=temperature, top_k=top_k, generator=torch.Generator().manual_seed(3))
    ev = policy.evaluate(obs, out.action_tokens, temperature=temperature, top_k=top_k)
    torch.testing.assert_close(ev.logprobs, out.logprobs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ev.values, out.values, rtol=0, atol=1e-6)
    assert torch.isfinite(out.logprobs).all()  # sampled tokens are inside the top-k
    assert ev.entropy.shape == (3, 56) and (ev.entropy > 0).all()
    if top_k > 0:
        assert (ev.entropy <= torch.log(torch.tensor(float(top_k))) + 1e-5).all()


def test_attention_is_bidirectional_and_padding_is_invisible(policy):
    obs = make_obs()
    with_stop, without_stop = model_logits(policy, obs, True), model_logits(policy, obs, False)
    # The stop token comes after every action position; it can only change them through non-causal attention.
    assert (with_stop - without_stop).abs().max() > 1e-4
    for append_stop_token, batched in [(True, with_stop), (False, without_stop)]:
        alone = model_logits(policy, {"image": obs["image"][2:], "task": obs["task"][2:]}, append_stop_token)
        torch.testing.assert_close(batched[2:], alone, rtol=1e-5, atol=1e-5)


def test_bad_observations_give_clear_errors(policy):
    obs = make_obs()
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\], got \(3, 40, 36\)"):
        policy.act({"image": obs["image"][..., 0], "task": obs["task"]}, do_sample=False)
    with pytest.raises(ValueError, match="3 images"):
        policy.act({"image": obs["image"], "task": TASKS[:2]}, do_sample=False)
    with pytest.raises(ValueError, match="uint8"):
        policy.act({"image": obs["image"].float(), "task": obs["task"]}, do_sample=False)
    with pytest.raises(ValueError, match=r"shape \(3, 56\), got \(3, 8, 7\)"):
        policy.evaluate(obs, torch.zeros(3, 8, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="ids in"):
        policy.evaluate(obs, torch.zeros(3, 56, dtype=torch.int64))


def test_missing_and_unknown_checkpoint_keys_are_named(tiny_folder, tmp_path):
    for path in tiny_folder.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("projector.fc3.bias")
    weights["projector.fc4.weight"] = torch.zeros(1)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=r"projector\.fc3\.bias.*projector\.fc4\.weight"):
        OpenVLAOFTPolicy.from_pretrained(tmp_path)


def test_sharded_weights_load_like_a_single_file(tiny_folder, tmp_path, policy):
    for path in tiny_folder.iterdir():
        if path.name != "model.safetensors":
            (tmp_path / path.name).write_bytes(path.read_bytes())
    weights = load_file(tiny_folder / "model.safetensors")
    total = sum(t.numel() * t.element_size() for t in weights.values())
    save_sharded(weights, tmp_path, max_shard_bytes=total // 3)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    sharded = OpenVLAOFTPolicy.from_pretrained(tmp_path).eval()
    obs = make_obs()
    torch.testing.assert_close(model_logits(sharded, obs), model_logits(policy, obs), rtol=0, atol=0)


def test_layer_scale_is_stored_as_scale_factor(tiny_folder):
    keys = set(load_file(tiny_folder / "model.safetensors"))
    assert "vision_backbone.featurizer.blocks.0.ls1.scale_factor" in keys
    assert not any(k.endswith(".gamma") for k in keys)


def test_lora_and_value_head_train_and_round_trip(tiny_folder, tmp_path):
    policy = OpenVLAOFTPolicy.from_pretrained(tiny_folder)
    policy.enable_lora(LoraSettings(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "fc1", "lm_head")))
    policy.gradient_checkpointing_enable()
    policy.train()
    obs = make_obs()
    tokens = policy.act(obs, generator=torch.Generator().manual_seed(0)).action_tokens
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("value_head.") for n in trainable)
    assert any(n.startswith("value_head.") for n in trainable)
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(3):
        ev = policy.evaluate(obs, tokens)
        policy_loss, value_loss = -ev.logprobs.mean(), (ev.values - 1.0).pow(2).mean()
        loss = policy_loss + value_loss
        optimizer.zero_grad()
        loss.backward()
        with_grad = {n for n, p in policy.model.named_parameters() if p.grad is not None}
        # The reference never runs the last ViT block nor SigLIP's pooling head (features come from block depth-2).
        unused = {n for n in trainable if "featurizer.blocks.2." in n or ".attn_pool." in n}
        assert with_grad == trainable - unused
        optimizer.step()
        losses.append((policy_loss.item(), value_loss.item()))
    assert losses[-1][0] < losses[0][0] and losses[-1][1] < losses[0][1]

    policy.eval()
    policy.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    reloaded = OpenVLAOFTPolicy.from_pretrained(tmp_path)
    for a, b in [(policy, reloaded)]:
        ev_a, ev_b = a.evaluate(obs, tokens), b.evaluate(obs, tokens)
        torch.testing.assert_close(ev_b.logprobs, ev_a.logprobs, rtol=0, atol=1e-6)
        torch.testing.assert_close(ev_b.values, ev_a.values, rtol=0, atol=1e-6)
    assert reloaded.unnorm_key == "libero_spatial_no_noops"


def test_bf16_loading_and_a_new_action_level_value_head(tiny_folder, tmp_path):
    sft_folder = write_tiny_checkpoint(tmp_path, seed=1, add_value_head=False)  # an SFT checkpoint: no critic
    policy = OpenVLAOFTPolicy.from_pretrained(
        sft_folder, dtype=torch.bfloat16, unnorm_key="libero_spatial", add_value_head=True, value_type="action_level"
    )
    out = policy.act(make_obs(2), generator=torch.Generator().manual_seed(0))
    assert policy.dtype == torch.bfloat16 and policy.unnorm_key == "libero_spatial_no_noops"
    assert out.logprobs.dtype == torch.float32 and out.values.shape == (2, 8)
    assert torch.isfinite(out.actions).all() and torch.isfinite(out.values).all()
    with pytest.raises(ValueError, match=r"value_head\.mlp\.4\.weight.*\(1, 128\), \(8, 128\)"):
        OpenVLAOFTPolicy.from_pretrained(tiny_folder, value_type="action_level")


def test_a_new_value_head_is_initialized_like_rlinf(tmp_path):
    sft_folder = write_tiny_checkpoint(tmp_path, seed=1, add_value_head=False)
    policy = OpenVLAOFTPolicy.from_pretrained(sft_folder, add_value_head=True, value_type="action_level", seed=3)
    # transformers' from_pretrained in the reference skips the head's Kaiming init: N(0, 0.02) weights, zero biases.
    std = policy.model.language_model.config.initializer_range
    layers = [m for m in policy.model.value_head.mlp if isinstance(m, torch.nn.Linear)]
    weights = torch.cat([layer.weight.flatten() for layer in layers])
    assert abs(weights.mean().item()) < 0.05 * std
    assert weights.std().item() == pytest.approx(std, rel=0.02)
    for layer in layers:
        assert layer.weight.std().item() == pytest.approx(std, rel=0.15)
        assert layer.bias is None or not layer.bias.any()
    again = OpenVLAOFTPolicy.from_pretrained(sft_folder, add_value_head=True, value_type="action_level", seed=3)
    assert torch.equal(again.model.value_head.mlp[0].weight, layers[0].weight)
