"""SmallCNNPolicy: same RL interface as OpenVLA-OFT, and it learns."""

from dataclasses import replace

import pytest
import torch

from vla_policies import SmallCNNPolicy, SmallPolicyConfig

STATS = {"q01": [-1.0] * 7, "q99": [3.0] * 7, "mask": [True] * 6 + [False]}


def make_obs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 48, 48, 3), generator=g, dtype=torch.uint8)
    return {"image": images, "task": [f"task {i}" for i in range(n)]}


def test_act_shapes_determinism_and_logprob_equality():
    policy = SmallCNNPolicy(SmallPolicyConfig(image_size=32, action_stats=STATS), torch.Generator().manual_seed(0))
    obs = make_obs()
    a = policy.act(obs, generator=torch.Generator().manual_seed(5), top_k=20)
    b = policy.act(obs, generator=torch.Generator().manual_seed(5), top_k=20)
    assert a.actions.shape == (4, 8, 7) and a.action_tokens.shape == (4, 56) and a.values.shape == (4, 1)
    assert torch.equal(a.action_tokens, b.action_tokens)
    assert a.actions[..., :6].min() >= -1.0 and a.actions[..., :6].max() <= 3.0
    ev = policy.evaluate(obs, a.action_tokens, top_k=20)
    torch.testing.assert_close(ev.logprobs, a.logprobs, rtol=0, atol=1e-6)
    greedy = policy.act(obs, do_sample=False)
    logits, _ = policy._forward(obs)
    assert torch.equal(greedy.action_tokens, logits.argmax(-1))


def test_bad_tokens_and_observations_are_clear_errors():
    policy = SmallCNNPolicy(SmallPolicyConfig(image_size=16, channels=(4,)))
    with pytest.raises(ValueError, match=r"shape \(4, 56\)"):
        policy.evaluate(make_obs(), torch.zeros(4, 55, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"keys \"image\" and \"task\""):
        policy.act({"image": make_obs()["image"]}, do_sample=False)
    with pytest.raises(ValueError, match="value_type"):
        SmallPolicyConfig(value_type="token_level")


@pytest.mark.learning
def test_policy_gradient_raises_the_reward_and_round_trips(tmp_path):
    """REINFORCE towards a target bin must raise the mean reward within a few steps."""
    policy = SmallCNNPolicy(SmallPolicyConfig(image_size=16, channels=(8, 8)), torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    obs, g = make_obs(64), torch.Generator().manual_seed(1)
    rewards = []
    for _ in range(40):
        out = policy.act(obs, temperature=1.0, generator=g)
        reward = -(out.actions - 0.5).abs().mean(dim=(1, 2))  # [N]
        ev = policy.evaluate(obs, out.action_tokens, temperature=1.0)
        advantage = reward - reward.mean()
        loss = -(advantage[:, None] * ev.logprobs).mean() + (ev.values[:, 0] - reward).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rewards.append(reward.mean().item())
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.02
    policy.save_pretrained(tmp_path)
    reloaded = SmallCNNPolicy.from_pretrained(tmp_path)
    tokens = policy.act(obs, do_sample=False).action_tokens
    torch.testing.assert_close(reloaded.evaluate(obs, tokens).logprobs, policy.evaluate(obs, tokens).logprobs)


def test_a_value_head_the_weights_lack_is_newly_initialized_for_ppo(tmp_path):
    """Behaviour cloning saves no critic; PPO from that folder gets a new value head from its seed."""
    config = SmallPolicyConfig(image_size=16, channels=(8,), hidden_size=32, add_value_head=False)
    bc = SmallCNNPolicy(config, torch.Generator().manual_seed(3))
    bc.save_pretrained(tmp_path)
    obs = make_obs()
    ppo = SmallCNNPolicy.from_pretrained(tmp_path, add_value_head=True, seed=7)
    again = SmallCNNPolicy.from_pretrained(tmp_path, add_value_head=True, seed=7)
    other = SmallCNNPolicy.from_pretrained(tmp_path, add_value_head=True, seed=8)
    tokens = bc.act(obs, do_sample=False).action_tokens
    torch.testing.assert_close(ppo.evaluate(obs, tokens).logprobs, bc.evaluate(obs, tokens).logprobs, rtol=0, atol=0)
    values = ppo.evaluate(obs, tokens).values
    assert values.shape == (4, 1) and torch.isfinite(values).all()
    assert torch.equal(values, again.evaluate(obs, tokens).values)
    assert not torch.equal(values, other.evaluate(obs, tokens).values)
    expected = SmallCNNPolicy(replace(config, add_value_head=True))  # its head as every new head starts
    expected.value_head.reset_parameters(torch.Generator().manual_seed(7))
    for name, tensor in expected.value_head.state_dict().items():
        assert torch.equal(ppo.value_head.state_dict()[name], tensor), name
    per_action = SmallCNNPolicy.from_pretrained(tmp_path, add_value_head=True, value_type="action_level")
    assert per_action.evaluate(obs, tokens).values.shape == (4, 8)
    assert SmallCNNPolicy.from_pretrained(tmp_path).value_head is None  # nothing asked: loaded as saved

    ppo.save_pretrained(tmp_path / "ppo")
    reloaded = SmallCNNPolicy.from_pretrained(tmp_path / "ppo", seed=99)  # a saved head is loaded, not replaced
    assert torch.equal(reloaded.evaluate(obs, tokens).values, values)
    with pytest.raises(ValueError, match="value_type 'action_level' differs from the saved value head's"):
        SmallCNNPolicy.from_pretrained(tmp_path / "ppo", value_type="action_level")
    with pytest.raises(KeyError, match=r"unexpected \['value_head"):
        SmallCNNPolicy.from_pretrained(tmp_path / "ppo", add_value_head=False)
