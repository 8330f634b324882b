"""The update follows RLinf's embodied actor: every chunk step goes into a shuffled global batch, a fixed number of
optimizer steps, and the embodied aggregation (or the token-mean option), checked against a hand computation on a
tiny OpenVLA-OFT with a recorded batch where most rows are masked."""

import copy
import dataclasses

import pytest
import torch
from einops import rearrange

from trainers.build import build_optimizer
from trainers.config import ActorConfig, AlgorithmConfig, OptimConfig, RolloutConfig
from trainers.update import PolicyUpdater, UpdateData
from vla_policies.openvla_oft import OpenVLAOFTPolicy
from vla_policies.testing import write_tiny_checkpoint

ROWS, GLOBAL, MICRO, EPOCHS, MAX_STEPS = 12, 6, 2, 2, 24


@pytest.fixture(scope="module")
def tiny_oft(tmp_path_factory):
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("oft") / "policy", seed=0)
    return OpenVLAOFTPolicy.from_pretrained(folder, append_stop_token=False)


def recorded_batch(policy: OpenVLAOFTPolicy) -> UpdateData:
    """12 chunk steps (3 steps x 4 trajectories, time-major) of which 6 are fully masked.

    Trajectory 0 runs 24 valid actions, 1 ends after 12 (mid-chunk), 2 after 8, 3 is a filtered GRPO group.
    """
    g = torch.Generator().manual_seed(0)
    obs = {"image": torch.randint(0, 256, (ROWS, 32, 32, 3), dtype=torch.uint8, generator=g), "task": ["stack"] * ROWS}
    out = policy.act(obs, generator=g, temperature=1.6)
    valid_actions = torch.tensor([24, 12, 8, 8])  # per trajectory, counted before the filter
    action = torch.arange(3)[:, None, None] * 8 + torch.arange(8)[None, None, :]  # [T, 1, A] action index
    mask = action < valid_actions[None, :, None]  # [T, B, A]
    mask[:, 3] = False  # the filtered group keeps its count but loses its entries
    advantages = torch.where(mask, torch.tensor([1.0, -0.5, 2.0, 0.0])[None, :, None], 0.0)
    return UpdateData(
        images=obs["image"],
        tasks=obs["task"],
        action_tokens=out.action_tokens,
        # Rollout log-probs a little off the current ones, so that some ratios clip.
        logprobs=out.logprobs + 0.3 * torch.randn(out.logprobs.shape, generator=g),
        advantages=rearrange(advantages, "t b a -> (t b) a"),
        mask=rearrange(mask, "t b a -> (t b) a"),
        loss_mask_sum=valid_actions.float()[None, :, None].expand(3, -1, 1).reshape(ROWS, 1),
        returns=None,
        values=None,
    )


def hand_loss(policy, data: UpdateData, rows: torch.Tensor, aggregation: str) -> torch.Tensor:
    """RLinf's clipped loss of one global batch, written out: embodied = mean over every entry of the global batch
    (masked rows included) of loss * mask * max_steps / trajectory length; token_mean = mean over valid tokens."""
    obs = {"image": data.images[rows], "task": [data.tasks[i] for i in rows.tolist()]}
    logprobs = policy.evaluate(obs, data.action_tokens[rows], temperature=1.6).logprobs  # [m, 56]
    ratio = torch.exp(logprobs - data.logprobs[rows])
    advantages = data.advantages[rows].repeat_interleave(7, dim=1)  # [m, 56]: one advantage per action's tokens
    mask = data.mask[rows].repeat_interleave(7, dim=1).float()
    per_token = torch.max(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.28))
    if aggregation == "embodied":
        return (per_token * mask * MAX_STEPS / data.loss_mask_sum[rows]).mean()
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("aggregation", ["embodied", "token_mean"])
def test_update_takes_fixed_steps_with_rlinf_gradients(tiny_oft, aggregation):
    policy = copy.deepcopy(tiny_oft)
    data = recorded_batch(policy)
    algorithm = AlgorithmConfig(update_epoch=EPOCHS, clip_ratio_c=None, loss_aggregation=aggregation)
    actor = ActorConfig(optim=OptimConfig(clip_grad=1e6), micro_batch_size=MICRO, global_batch_size=GLOBAL, seed=7)
    optimizer = build_optimizer(policy, actor)
    updater = PolicyUpdater(policy, optimizer, algorithm, actor, RolloutConfig(temperature_train=1.6), MAX_STEPS)
    params = [p for group in updater.optimizer.param_groups for p in group["params"]]
    recorded = []  # (weights before the step, gradient of the step; None where a weight has no gradient)
    updater.optimizer.register_step_pre_hook(
        lambda *_: recorded.append(([p.detach().clone() for p in params], [p.grad for p in params]))
    )
    evaluated_rows = []
    evaluate = policy.evaluate
    policy.evaluate = lambda obs, *args, **kwargs: (
        evaluated_rows.append(len(obs["task"])) or evaluate(obs, *args, **kwargs)
    )

    metrics = updater.update(data)

    # ROWS / GLOBAL optimizer steps per epoch, masked rows included, as RLinf's fixed schedule.
    assert len(recorded) == EPOCHS * ROWS // GLOBAL
    # Only the 6 rows with a valid entry run through the policy, each once per epoch.
    assert sum(evaluated_rows) == EPOCHS * int(data.mask.any(dim=1).sum()) == EPOCHS * 6
    assert metrics["actor/grad_norm"] > 0
    # Each step's gradient against the hand computation of its global batch, done in float32 and in float64. Ours
    # accumulates micro-batches and the hand computation takes the batch at once, so in float32 they differ by
    # rounding (summation order): ours must be as close to the float64 gradient as the float32 hand computation is.
    order = torch.randperm(ROWS, generator=torch.Generator().manual_seed(actor.seed))  # RLinf: seed + rank
    references = [copy.deepcopy(tiny_oft).to(dtype) for dtype in (torch.float32, torch.float64)]
    for step, (weights, gradients) in enumerate(recorded):
        rows = order[(step % 2) * GLOBAL : (step % 2 + 1) * GLOBAL]
        hand = []
        for reference in references:
            reference_params = [p for n, p in reference.named_parameters() if p.requires_grad]
            with torch.no_grad():
                for target, source in zip(reference_params, weights, strict=True):
                    target.copy_(source)
            reference.zero_grad(set_to_none=True)
            hand_loss(reference, data, rows, aggregation).backward()
            hand.append([p.grad for p in reference_params])
        for ours, hand32, hand64 in zip(gradients, *hand, strict=True):
            assert (ours is None) == (hand32 is None) == (hand64 is None)
            if ours is not None:
                error = (ours.double() - hand64).abs().max()
                hand_error = (hand32.double() - hand64).abs().max()
                assert error <= 2 * hand_error + 1e-6 * hand64.abs().max(), (step, tuple(ours.shape))


def test_rows_must_fill_whole_global_batches(tiny_oft):
    data = recorded_batch(tiny_oft)
    actor = ActorConfig(micro_batch_size=MICRO, global_batch_size=8)
    policy = copy.deepcopy(tiny_oft)
    updater = PolicyUpdater(
        policy, build_optimizer(policy, actor), AlgorithmConfig(), actor, RolloutConfig(), MAX_STEPS
    )
    with pytest.raises(ValueError, match=r"12 chunk steps on this rank, which must be a positive multiple of .* = 8"):
        updater.update(data)


def test_a_global_batch_without_valid_rows_still_steps_the_optimizer(tiny_oft):
    policy = copy.deepcopy(tiny_oft)
    data = dataclasses.replace(recorded_batch(policy), mask=torch.zeros(ROWS, 8, dtype=torch.bool))
    actor = ActorConfig(micro_batch_size=MICRO, global_batch_size=GLOBAL)
    algorithm = AlgorithmConfig(loss_aggregation="embodied")
    updater = PolicyUpdater(policy, build_optimizer(policy, actor), algorithm, actor, RolloutConfig(), MAX_STEPS)
    steps = []
    updater.optimizer.register_step_pre_hook(lambda *_: steps.append(1))
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    metrics = updater.update(data)
    # As RLinf: a zero gradient, but the optimizer steps on schedule (here AdamW's weight decay moves the weights).
    assert len(steps) == ROWS // GLOBAL and metrics["actor/grad_norm"] == 0.0
    decay = 1 - actor.optim.lr * actor.optim.weight_decay
    weight = "model.language_model.model.embed_tokens.weight"
    torch.testing.assert_close(dict(policy.named_parameters())[weight].detach(), before[weight] * decay ** len(steps))
