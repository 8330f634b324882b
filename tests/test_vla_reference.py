"""Parity of OpenVLA-OFT with the reference (RLinf's RL model on openvla-oft's prismatic backbone).

``$REFERENCE_DIR/vla/`` is a tiny checkpoint folder written by the reference classes, with the reference's
outputs in ``case.safetensors`` and, in ``meta.json``, what each tensor means, the settings that made it
(tasks, temperatures, top-k, prompt length, value type, dataset) and its tolerance. Everything here is read
from those files, so the tests hold for any case made the same way.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vla_policies import OpenVLAOFTPolicy, preprocess_images

pytestmark = pytest.mark.reference


@dataclass(frozen=True)
class VLAReference:
    """The reference folder's settings (``meta.json``), outputs (``case.safetensors``) and the policy loaded from it."""

    meta: dict
    case: dict[str, torch.Tensor]
    policy: OpenVLAOFTPolicy

    @property
    def obs(self) -> dict:
        """The env observation the reference outputs were computed for."""
        return {"image": self.case["images"], "task": self.meta["tasks"]}

    def assert_close(self, actual: torch.Tensor, name: str, tolerance: str) -> None:
        """Compare with ``case[name]`` within ``meta["tolerances"][tolerance]`` (float64 comparison)."""
        expected = self.case[name]
        tol = self.meta["tolerances"][tolerance]
        if tol == "exact":
            assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype}, reference {expected.dtype}"
            assert torch.equal(actual.cpu(), expected), f"{name} differs from the reference"
            return
        torch.testing.assert_close(
            actual.detach().cpu().double(),
            expected.double(),
            rtol=tol.get("rtol", 0.0),
            atol=tol["atol"],
            msg=lambda m: f"{name}: {m}",
        )


@pytest.fixture(scope="module")
def vla(reference_dir: Path) -> VLAReference:
    folder = reference_dir / "vla"
    if not folder.is_dir():
        pytest.skip(f"no OpenVLA-OFT reference folder at {folder}")
    meta = json.loads((folder / "meta.json").read_text())
    # As the published recipe builds the policy (the preset opensora_libero_spatial_grpo_openvlaoft): float32
    # here, RLinf's sequence without stop token, value type and dataset of the case.
    policy = OpenVLAOFTPolicy.from_pretrained(
        folder, value_type=meta["value_type"], unnorm_key=meta["unnorm_key"], append_stop_token=False
    )
    return VLAReference(meta, load_file(folder / "case.safetensors"), policy.eval())


def test_vla_pixel_values(vla):
    vla.assert_close(preprocess_images(vla.case["images"], vla.policy.image_config), "pixel_values", "pixel_values")


def test_vla_prompt_ids_and_mask_in_rlinf_layout(vla):
    input_ids, attention_mask = vla.policy.prompt_tokenizer(vla.meta["tasks"], max_length=vla.meta["max_prompt_length"])
    vla.assert_close(input_ids, "rlinf_input_ids", "prompt_ids")
    vla.assert_close(attention_mask, "rlinf_attention_mask", "prompt_ids")
    vla.assert_close(attention_mask[:, 1:].sum(dim=1), "prompt_lengths", "prompt_ids")


@pytest.mark.parametrize(("name", "append_stop_token"), [("logits_rlinf", False), ("logits_oft_stop", True)])
@pytest.mark.parametrize("fixed_prompt_length", [True, False])
def test_vla_logits_of_both_sequence_layouts(vla, name, append_stop_token, fixed_prompt_length):
    # logits_oft_stop came from batch-1 calls without padding: a padded batch must give the same, at any padding.
    max_length = vla.meta["max_prompt_length"] if fixed_prompt_length else None
    input_ids, attention_mask = vla.policy.prompt_tokenizer(vla.meta["tasks"], max_length=max_length)
    pixel_values = preprocess_images(vla.case["images"], vla.policy.image_config)
    with torch.no_grad():
        out = vla.policy.model(pixel_values, input_ids, attention_mask, append_stop_token=append_stop_token)
    vla.assert_close(out.action_logits, name, "logits")


def test_vla_policy_logits_use_rlinf_layout(vla):
    with torch.no_grad():
        logits, _ = vla.policy.action_logits(vla.obs)
    vla.assert_close(logits, "logits_rlinf", "logits")
    assert tuple(vla.meta["action_token_range"]) == vla.policy.token_range


def test_vla_greedy_rollout(vla):
    # RLinf reports the log-probs of the unscaled logits when decoding greedily: the temperature must not matter.
    sampling = vla.meta["sampling"]
    out = vla.policy.act(
        vla.obs, do_sample=False, temperature=sampling["sampled_temperature"], top_k=sampling["top_k_sampled"]
    )
    vla.assert_close(out.action_tokens, "greedy_tokens", "tokens")
    vla.assert_close(vla.policy.action_tokenizer.decode(out.action_tokens), "greedy_normalized", "normalized_actions")
    vla.assert_close(out.actions, "greedy_actions", "actions")
    vla.assert_close(out.logprobs, "greedy_logprobs_t1", "logprobs")
    vla.assert_close(out.values, "values_rollout", "values")


def test_vla_training_logprobs_entropy_and_values(vla):
    sampling = vla.meta["sampling"]
    for temperature in sampling["temperatures"]:
        with torch.no_grad():
            ev = vla.policy.evaluate(
                vla.obs, vla.case["fixed_tokens"], temperature=temperature, top_k=sampling["top_k_scored"]
            )
        vla.assert_close(ev.logprobs, f"logprobs_t{temperature}", "logprobs")
        vla.assert_close(ev.entropy, f"entropy_t{temperature}", "entropy")
        vla.assert_close(ev.values, "values", "values")


def test_vla_top_k_rollout_logprobs_of_sampled_tokens(vla):
    # RLinf's rollout takes top-k over the action ids; `evaluate` scores with that rule (see Policy.evaluate).
    sampling = vla.meta["sampling"]
    with torch.no_grad():
        ev = vla.policy.evaluate(
            vla.obs,
            vla.case["sampled_tokens_topk"],
            temperature=sampling["sampled_temperature"],
            top_k=sampling["top_k_sampled"],
        )
    vla.assert_close(ev.logprobs, "sampled_logprobs_topk", "logprobs")


def test_vla_value_features_and_head(vla):
    input_ids, attention_mask = vla.policy.prompt_tokenizer(vla.meta["tasks"], max_length=vla.meta["max_prompt_length"])
    with torch.no_grad():
        out = vla.policy.model(vla.case["pixel_values"], input_ids, attention_mask)
        values = vla.policy.model.value_head(out.value_features)
    vla.assert_close(out.value_features, "value_features", "values")
    vla.assert_close(values, "values", "values")
