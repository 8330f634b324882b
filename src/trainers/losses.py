"""PPO/GRPO losses: clipped policy loss, clipped value loss, KL penalty, and their two aggregations.

The formulas and the logged metrics follow RLinf's ``compute_ppo_actor_loss`` and
``compute_ppo_critic_loss`` (the losses behind the RLinf-OpenSora checkpoints); the parity tests in
``tests/test_losses.py`` check them against the reference vectors. A loss is aggregated in one of two ways:

- token-mean (``masked_mean``): the sum over valid entries divided by the number of valid entries, where a
  mask that broadcasts (for example ``[B, chunks, 1]`` against ``[B, chunks, tokens]``) counts every token
  it covers;
- embodied (``masked_mean_ratio``, what RLinf's embodied actor computes when it passes
  ``max_episode_steps`` and ``loss_mask_sum``): the mean over *all* entries of
  ``value * mask / (loss_mask_sum / max_episode_steps)``, where ``loss_mask_sum`` is the number of valid
  actions of the entry's trajectory. Every trajectory then weighs in proportion to ``max_episode_steps``,
  whatever its length, and the denominator is the number of entries, valid or not.

The primitives' metrics are detached 0-dim tensors (never Python numbers). Two steps wait for the device:
checking that a non-bool mask holds only 0 and 1 (pass bool masks to skip it) and the boolean selection of
the explained-variance statistics, kept because it reproduces RLinf's sums to the bit.

``policy_loss`` is the policy term that GRPO (``trainers.grpo``) and PPO (``trainers.ppo``) share: the clipped
loss of a micro-batch (``LossInputs``) with the entropy bonus and the KL penalty, and its metrics as logged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainers.config import AlgorithmConfig

__all__ = [
    "ACTOR_METRICS",
    "LossInputs",
    "actor_loss",
    "critic_loss",
    "huber_loss",
    "kl_penalty",
    "masked_mean",
    "masked_mean_ratio",
    "policy_loss",
]

# The metrics of `actor_loss` that are logged, as `actor/<name>`.
ACTOR_METRICS = ("policy_loss", "approx_kl", "clip_fraction", "clipped_ratio", "ratio", "dual_clip_fraction")

_FLOAT_DTYPES = (torch.float32, torch.float64)


def _check_float(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be float32 or float64 (exp of log-ratios is unstable in low precision), "
            f"got {tensor.dtype}; cast with .float()"
        )


def _check_shape(name: str, tensor: torch.Tensor, shape: torch.Size) -> None:
    if tensor.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def _broadcast_to(name: str, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Expands ``tensor`` to ``shape``; it must broadcast without changing ``shape``."""
    try:
        broadcast = torch.broadcast_shapes(tensor.shape, shape)
    except RuntimeError:
        broadcast = None
    if broadcast != shape:
        raise ValueError(
            f"{name} must have shape {tuple(shape)} or one that broadcasts to it "
            f"(e.g. {(*shape[:-1], 1)}), got {tuple(tensor.shape)}"
        )
    return tensor.expand(shape)


def _valid_mask(mask: torch.Tensor | None, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Returns a bool mask of ``shape`` on ``device``; ``None`` means every entry is valid."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    mask = mask.to(device)
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(
                f"mask must be a bool tensor or hold only 0 and 1, got dtype {mask.dtype} with other "
                "values; pass a bool mask (True = valid)"
            )
        mask = mask != 0
    return _broadcast_to("mask", mask, shape)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is true (token-mean).

    Masked entries are excluded with ``where``, not multiplied by 0, so ``inf``/``nan`` in padding
    cannot leak in. An all-false mask gives 0 (with a zero gradient), as in RLinf.

    Args:
        x: Values of any shape ``S``.
        mask: Bool (or 0/1) mask of shape ``S`` or one that broadcasts to it; ``None`` averages
            every entry. A broadcast mask counts every entry of ``x`` it covers.

    Returns:
        0-dim tensor.

    Raises:
        ValueError: If the mask does not broadcast to ``x``.
    """
    if mask is None:
        return x.mean()
    valid = _valid_mask(mask, x.shape, x.device)  # [*S]
    return torch.where(valid, x, 0.0).sum() / valid.sum().clamp(min=1)


def masked_mean_ratio(
    x: torch.Tensor, mask: torch.Tensor | None, loss_mask_sum: torch.Tensor, max_episode_steps: int
) -> torch.Tensor:
    """RLinf's embodied aggregation: mean over all entries of ``x * mask / (loss_mask_sum / max_episode_steps)``.

    Masked entries contribute exactly 0 (selected with ``where``, so ``inf``/``nan`` there cannot leak into
    the value or the gradient) but still count in the denominator, the number of entries of ``x``.

    Args:
        x: Values of any shape ``S``.
        mask: Bool (or 0/1) mask of shape ``S`` or one that broadcasts to it; ``None`` means all valid.
        loss_mask_sum: The number of valid actions of each entry's trajectory, shape ``S`` or broadcastable
            to it; must be positive on valid entries.
        max_episode_steps: The env's episode limit in actions (positive).

    Returns:
        0-dim tensor.

    Raises:
        ValueError: On shapes that do not broadcast, a non-positive ``max_episode_steps``, or a
            non-positive ``loss_mask_sum`` on a valid entry.
    """
    if max_episode_steps <= 0:
        raise ValueError(f"max_episode_steps must be positive, got {max_episode_steps}")
    valid = _valid_mask(mask, x.shape, x.device)  # [*S]
    counts = _broadcast_to("loss_mask_sum", loss_mask_sum.to(x.device), x.shape)  # [*S]
    if bool((valid & (counts <= 0)).any()):
        raise ValueError("loss_mask_sum must be positive wherever the mask is valid (a trajectory's valid actions)")
    # RLinf's order of operations: x / (loss_mask_sum / max_episode_steps); masked entries divide by 1.
    ratio = torch.where(valid, counts, max_episode_steps).to(x.dtype) / max_episode_steps  # [*S]
    return torch.where(valid, x / ratio, 0.0).mean()


def _aggregate(
    x: torch.Tensor, valid: torch.Tensor, loss_mask_sum: torch.Tensor | None, max_episode_steps: int | None
) -> torch.Tensor:
    """``masked_mean_ratio`` when both embodied arguments are given, else ``masked_mean``."""
    if (loss_mask_sum is None) != (max_episode_steps is None):
        raise ValueError(
            "the embodied aggregation needs both loss_mask_sum and max_episode_steps (or neither for the "
            f"token-mean), got loss_mask_sum={'set' if loss_mask_sum is not None else None}, "
            f"max_episode_steps={max_episode_steps}"
        )
    if loss_mask_sum is None:
        return masked_mean(x, valid)
    return masked_mean_ratio(x, valid, loss_mask_sum, max_episode_steps)


def huber_loss(error: torch.Tensor, delta: float) -> torch.Tensor:
    """Elementwise Huber loss: ``0.5 e^2`` for ``|e| < delta``, else ``delta * (|e| - 0.5 delta)``.

    Args:
        error: Errors of any shape.
        delta: Positive threshold between the quadratic and the linear part.

    Returns:
        Tensor of the shape of ``error``.
    """
    if delta <= 0:
        raise ValueError(f"huber delta must be positive, got {delta}")
    abs_error = error.abs()
    return torch.where(abs_error < delta, 0.5 * error**2, delta * (abs_error - 0.5 * delta))


def actor_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float | None = None,
    loss_mask_sum: torch.Tensor | None = None,
    max_episode_steps: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped policy loss with asymmetric clipping and optional dual clip.

    With ``rho = exp(logprobs - old_logprobs)`` and advantage ``A``, the per-token loss is
    ``max(-A rho, -A clip(rho, 1 - clip_ratio_low, 1 + clip_ratio_high))``; dual clip (Ye et al.,
    2020) caps it at ``clip_ratio_c * |A|``, which only ever binds for ``A < 0`` (for ``A > 0`` the
    clipped loss is negative).

    Args:
        logprobs: ``[B, ...]`` log-probs of the taken actions under the current policy, e.g.
            ``[B, chunks, tokens]`` for token-level OpenVLA-OFT actions.
        old_logprobs: Log-probs under the rollout policy, same shape as ``logprobs``.
        advantages: Advantages, the shape of ``logprobs`` or one that broadcasts to it (e.g.
            ``[B, chunks, 1]`` for one advantage per chunk).
        mask: Bool (or 0/1) mask of valid tokens, the shape of ``logprobs`` or broadcastable to it;
            ``None`` means all valid.
        clip_ratio_low: Lower clip, ratio floor ``1 - clip_ratio_low``; in ``[0, 1)``.
        clip_ratio_high: Upper clip, ratio ceiling ``1 + clip_ratio_high``; ``>= 0``.
        clip_ratio_c: Dual-clip constant, ``> 1``, or ``None`` to disable dual clip.
        loss_mask_sum: With ``max_episode_steps``, switches the loss to the embodied aggregation
            (``masked_mean_ratio``): each entry's trajectory's number of valid actions, the shape of
            ``logprobs`` or broadcastable to it. ``None``: token-mean.
        max_episode_steps: The env's episode limit in actions, for the embodied aggregation.

    Returns:
        ``(loss, metrics)``: the 0-dim loss (with gradient) and detached 0-dim metrics, keyed by
        the names RLinf logs under ``actor/``:

        - ``policy_loss``: the loss value; ``policy_loss_abs``: ``|per-token loss|``, aggregated like
          the loss. The other metrics are token-means in both aggregations, as in RLinf.
        - ``ratio``, ``ratio_abs``: token-means of ``rho`` and ``|rho - 1|``.
        - ``clipped_ratio``: token-mean of ``clip(rho)`` (a mean ratio, not a fraction).
        - ``dual_cliped_ratio`` (RLinf's spelling): token-mean of ``rho`` on dual-clipped tokens, 0
          elsewhere.
        - ``clip_fraction``: fraction of valid tokens where the clipped term is the larger loss.
        - ``dual_clip_fraction``: fraction of valid tokens where dual clip binds (not in RLinf's
          PPO loss; its decoupled PPO loss logs it).
        - ``approx_kl``: ``-mean(log rho)``, the k1 estimate of KL(old || current).

    Raises:
        ValueError: On shape or dtype mismatches, or clip parameters out of range.
    """
    shape = logprobs.shape
    _check_shape("old_logprobs", old_logprobs, shape)
    for name, tensor in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages)):
        _check_float(name, tensor)
    advantages = _broadcast_to("advantages", advantages, shape)
    valid = _valid_mask(mask, shape, logprobs.device)
    if not 0.0 <= clip_ratio_low < 1.0:
        raise ValueError(f"clip_ratio_low must lie in [0, 1), got {clip_ratio_low}")
    if clip_ratio_high < 0.0:
        raise ValueError(f"clip_ratio_high must be >= 0, got {clip_ratio_high}")
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (or None to disable dual clip), got {clip_ratio_c}")

    # Padding is zeroed before exp as well as after: an inf log-prob there would otherwise give
    # exp(inf) = inf, and 0 * inf = nan in the backward pass even though the forward drops it.
    log_ratio = torch.where(valid, logprobs - old_logprobs, 0.0)
    ratio = torch.where(valid, torch.exp(log_ratio), 0.0)
    clipped_ratio = torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * clipped_ratio
    per_token = torch.max(loss_unclipped, loss_clipped)
    if clip_ratio_c is not None:
        loss_dual = clip_ratio_c * advantages.abs()
        dual_clipped = (loss_dual < per_token).detach() & valid
        per_token = torch.min(per_token, loss_dual)
    else:
        dual_clipped = torch.zeros_like(valid)
    loss = _aggregate(per_token, valid, loss_mask_sum, max_episode_steps)

    with torch.no_grad():
        num_valid = valid.sum().clamp(min=1)
        clipped = (loss_unclipped < loss_clipped) & valid
        metrics = {
            "policy_loss": loss.detach(),
            "policy_loss_abs": _aggregate(per_token.abs(), valid, loss_mask_sum, max_episode_steps),
            "ratio": masked_mean(ratio, valid),
            "ratio_abs": masked_mean((ratio - 1).abs(), valid),
            "clipped_ratio": masked_mean(clipped_ratio, valid),
            "dual_cliped_ratio": masked_mean(torch.where(dual_clipped, ratio, 0.0), valid),
            "clip_fraction": clipped.sum() / num_valid,
            "dual_clip_fraction": dual_clipped.sum() / num_valid,
            "approx_kl": -log_ratio.sum() / num_valid,
        }
    return loss, {key: value.detach() for key, value in metrics.items()}


def _explained_variance_stats(
    returns: torch.Tensor, values: torch.Tensor, valid: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Sufficient statistics of explained variance (they sum across micro-batches) and its value."""
    # Boolean selection (not where) keeps RLinf's summation order, so the sums match it to the bit.
    returns = returns.detach().float()[valid]  # [N]
    errors = returns - values.detach().float()[valid]  # [N]
    count = torch.tensor(float(returns.numel()), device=returns.device)
    returns_sum, returns_sq_sum = returns.sum(), (returns * returns).sum()
    errors_sum, errors_sq_sum = errors.sum(), (errors * errors).sum()
    returns_var = returns_sq_sum - returns_sum * returns_sum / count
    errors_var = errors_sq_sum - errors_sum * errors_sum / count
    defined = (count >= 2) & (returns_var != 0)
    explained_variance = torch.where(defined, 1 - errors_var / returns_var, float("nan"))
    return {
        "explained_variance": explained_variance,
        "explained_variance_count": count,
        "explained_variance_returns_sum": returns_sum,
        "explained_variance_returns_sq_sum": returns_sq_sum,
        "explained_variance_errors_sum": errors_sum,
        "explained_variance_errors_sq_sum": errors_sq_sum,
    }


def critic_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor | None,
    value_clip: float,
    huber_delta: float,
    loss_mask_sum: torch.Tensor | None = None,
    max_episode_steps: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped value loss with a Huber error.

    ``V_clip = V_old + clip(V - V_old, -value_clip, value_clip)``; the per-entry loss is
    ``max(huber(R - V), huber(R - V_clip))``.

    Args:
        values: ``[B, ...]`` current value predictions, e.g. ``[B, chunks]``.
        old_values: Value predictions at rollout time, same shape.
        returns: Return targets, same shape.
        mask: Bool (or 0/1) mask of valid entries, same shape or broadcastable; ``None`` = all valid.
        value_clip: Positive clip range of the value update.
        huber_delta: Positive Huber threshold.
        loss_mask_sum: With ``max_episode_steps``: the embodied aggregation (see ``actor_loss``);
            ``None``: token-mean.
        max_episode_steps: The env's episode limit in actions, for the embodied aggregation.

    Returns:
        ``(loss, metrics)``: the 0-dim loss (with gradient) and detached 0-dim metrics:

        - ``value_loss``: the loss value.
        - ``value_clip_ratio``: RLinf's metric, kept for parity: the fraction of *all* entries
          (mask ignored) with ``|V_clip - V_old| > value_clip``. Since ``V_clip - V_old`` is
          clamped to ``value_clip``, it only exceeds it by float rounding, so this is not the
          fraction of clipped values; use ``value_clip_fraction`` for that.
        - ``value_clip_fraction``: fraction of valid entries with ``|V - V_old| > value_clip``.
        - ``explained_variance`` over valid entries (nan if fewer than 2 or constant returns), and
          its sufficient statistics ``explained_variance_{count, returns_sum, returns_sq_sum,
          errors_sum, errors_sq_sum}`` for summing across micro-batches.

    Raises:
        ValueError: On shape or dtype mismatches, or non-positive ``value_clip``/``huber_delta``.
    """
    shape = values.shape
    _check_shape("old_values", old_values, shape)
    _check_shape("returns", returns, shape)
    for name, tensor in (("values", values), ("old_values", old_values), ("returns", returns)):
        _check_float(name, tensor)
    valid = _valid_mask(mask, shape, values.device)
    if value_clip <= 0:
        raise ValueError(f"value_clip must be positive, got {value_clip}")
    if huber_delta <= 0:
        raise ValueError(f"huber_delta must be positive, got {huber_delta}")

    values_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    per_entry = torch.max(huber_loss(returns - values, huber_delta), huber_loss(returns - values_clipped, huber_delta))
    loss = _aggregate(per_entry, valid, loss_mask_sum, max_episode_steps)

    with torch.no_grad():
        metrics = {
            "value_loss": loss.detach(),
            "value_clip_ratio": ((values_clipped - old_values).abs() > value_clip).float().mean(),
            "value_clip_fraction": masked_mean(((values - old_values).abs() > value_clip).float(), valid),
            **_explained_variance_stats(returns, values, valid),
        }
    return loss, {key: value.detach() for key, value in metrics.items()}


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-mean KL(current || reference) with the low-variance "k3" estimator (Schulman, 2020).

    Per token, with ``d = ref_logprobs - logprobs``: ``exp(d) - d - 1`` (non-negative, unbiased for
    samples from the current policy). As in RLinf's ``low_var_kl``, ``d`` is clamped to
    ``[-20, 20]`` and the estimate to at most 10, which also stops the gradient on such outliers.

    Args:
        logprobs: ``[B, ...]`` log-probs of the sampled actions under the current policy.
        ref_logprobs: Log-probs of the same actions under the reference policy, same shape.
        mask: Bool (or 0/1) mask of valid tokens, same shape or broadcastable; ``None`` = all valid.

    Returns:
        0-dim tensor (with gradient): add ``beta * kl_penalty(...)`` to the actor loss.

    Raises:
        ValueError: On shape or dtype mismatches.
    """
    _check_shape("ref_logprobs", ref_logprobs, logprobs.shape)
    _check_float("logprobs", logprobs)
    _check_float("ref_logprobs", ref_logprobs)
    log_ratio = torch.clamp(ref_logprobs - logprobs, min=-20.0, max=20.0)
    per_token = torch.clamp(torch.exp(log_ratio) - log_ratio - 1, max=10.0)
    return masked_mean(per_token, mask)


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch as the losses see it: m rows, A actions of D tokens, R advantages and V values per chunk.

    Attributes:
        logprobs: [m, A, D] float32 log-probs of the taken tokens under the current policy (with gradient).
        old_logprobs: [m, A, D] float32 log-probs at rollout time.
        entropy: [m, A, D] float32 entropy of each token's distribution (with gradient).
        ref_logprobs: [m, A, D] float32 log-probs under the KL reference, or None (`kl_beta` = 0).
        advantages: [m, R, 1] float32; R = A or 1 broadcasts over the tokens.
        mask: [m, R, 1] bool, the valid entries.
        loss_mask_sum: [m, 1] float32, the number of valid actions of each row's trajectory.
        values: [m, V] float32 current values (with gradient), or None without a value head.
        old_values: [m, V] float32 values at rollout time, or None.
        returns: [m, R] float32 value targets, or None.
        max_episode_steps: the `embodied` aggregation's scale; None aggregates as the token-mean.
        row_share: the rows of this micro-batch over `actor.micro_batch_size` under the `embodied` aggregation
            (its means run over a whole micro-batch; the rows left out are fully masked and add 0), else 1.
        critic_warmup: during `actor.optim.critic_warmup_steps`: the policy's terms are 0 (as RLinf's).
    """

    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    entropy: torch.Tensor
    ref_logprobs: torch.Tensor | None
    advantages: torch.Tensor
    mask: torch.Tensor
    loss_mask_sum: torch.Tensor
    values: torch.Tensor | None
    old_values: torch.Tensor | None
    returns: torch.Tensor | None
    max_episode_steps: int | None
    row_share: float
    critic_warmup: bool = False


def policy_loss(inputs: LossInputs, algorithm: AlgorithmConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped policy loss minus `entropy_bonus` x the entropy plus `kl_beta` x the KL to the reference.

    Args:
        inputs: the micro-batch.
        algorithm: the clip ratios, `entropy_bonus` and `kl_beta`.

    Returns:
        ``(loss, metrics)``: the 0-dim loss (with gradient) and its metrics as logged under ``train/``:
        ``actor/<name>`` for each of ``ACTOR_METRICS``, ``entropy_loss`` (the token-mean entropy, logged even
        without a bonus) and ``actor/kl`` (with ``kl_beta > 0``). Under `inputs.critic_warmup` the loss and
        ``actor/policy_loss`` are 0; the other metrics are still measured.
    """
    embodied: dict[str, object] = {}
    if inputs.max_episode_steps is not None:
        embodied = {"max_episode_steps": inputs.max_episode_steps, "loss_mask_sum": inputs.loss_mask_sum[:, :, None]}
    loss, actor_metrics = actor_loss(
        inputs.logprobs,
        inputs.old_logprobs,
        inputs.advantages,
        inputs.mask,
        algorithm.clip_ratio_low,
        algorithm.clip_ratio_high,
        algorithm.clip_ratio_c,
        **embodied,
    )
    loss = loss * inputs.row_share
    metrics = {f"actor/{key}": float(actor_metrics[key]) for key in ACTOR_METRICS}
    metrics["actor/policy_loss"] *= inputs.row_share
    entropy = masked_mean(inputs.entropy, inputs.mask)
    metrics["entropy_loss"] = float(entropy.detach())
    if algorithm.entropy_bonus > 0:
        loss = loss - algorithm.entropy_bonus * entropy
    if algorithm.kl_beta > 0:
        kl = kl_penalty(inputs.logprobs, inputs.ref_logprobs, inputs.mask)
        metrics["actor/kl"] = float(kl.detach())
        loss = loss + algorithm.kl_beta * kl
    if inputs.critic_warmup:
        loss = torch.zeros((), device=loss.device)
        metrics["actor/policy_loss"] = 0.0
    return loss, metrics
