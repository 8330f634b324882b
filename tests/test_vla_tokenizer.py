"""Known-answer tests for the action tokenizer and BOUNDS_Q99 un-normalization (reference rules)."""

import numpy as np
import pytest
import torch

from vla_policies import ActionTokenizer, resolve_unnorm_key, unnormalize

VOCAB = 32000  # Llama-2 without the padding to 32064
STEP = 2.0 / 255.0  # bin width of linspace(-1, 1, 256)


def test_decode_first_last_and_middle_bins():
    tok = ActionTokenizer(VOCAB)
    ids = torch.tensor([31999, 31998, 31872, 31745, 31744])
    expected = torch.tensor([-1 + STEP / 2, -1 + 1.5 * STEP, 0.0, 1 - STEP / 2, 1 - STEP / 2], dtype=torch.float64)
    torch.testing.assert_close(tok.decode(ids), expected, rtol=0, atol=1e-12)


def test_decode_clips_ids_outside_the_action_range():
    tok = ActionTokenizer(VOCAB)
    # 32000 (the pad id) gives bin 0 -> clipped to the first centre; small ids clip to the last centre.
    out = tok.decode(np.array([[32000, 32063], [0, 100]]))
    assert out.shape == (2, 2)
    assert torch.all(out[0] == -1 + STEP / 2)
    assert torch.all(out[1] == tok.bin_centers[-1])


def test_decode_matches_reference_numpy_rule_on_all_action_ids():
    tok = ActionTokenizer(VOCAB)
    ids = np.arange(VOCAB - 256, VOCAB)
    bins = np.linspace(-1, 1, 256)
    centers = (bins[:-1] + bins[1:]) / 2.0
    reference = centers[np.clip(VOCAB - ids - 1, 0, centers.shape[0] - 1)]
    np.testing.assert_array_equal(tok.decode(ids).numpy(), reference)


def test_encode_known_answers_and_clipping():
    tok = ActionTokenizer(VOCAB)
    ids = tok.encode(torch.tensor([-1.0, 1.0, 0.0, -5.0, 5.0]))
    assert ids.tolist() == [31999, 31744, 31872, 31999, 31744]
    assert ids.dtype == torch.int64


def test_encode_is_the_inverse_of_decode_on_bin_centres():
    tok = ActionTokenizer(VOCAB, n_bins=256)
    centres = tok.bin_centers
    torch.testing.assert_close(tok.decode(tok.encode(centres)), centres, rtol=0, atol=0)
    small = ActionTokenizer(vocab_size=300, n_bins=8)
    torch.testing.assert_close(small.decode(small.encode(small.bin_centers)), small.bin_centers, rtol=0, atol=0)


def test_decode_rejects_float_ids():
    with pytest.raises(TypeError, match="integers"):
        ActionTokenizer(VOCAB).decode(torch.tensor([1.0]))


def test_unnormalize_bounds_q99_with_mask():
    stats = {"q01": [-1.0, 0.0, 2.0], "q99": [1.0, 2.0, 4.0], "mask": [True, True, False]}
    actions = torch.tensor([[0.0, -1.0, 0.25], [1.0, 1.0, -1.0]])
    out = unnormalize(actions, stats)
    expected = torch.tensor(
        [[0.5 * (2 + 1e-8) - 1.0, 0.0, 0.25], [(2 + 1e-8) - 1.0, 2 + 1e-8, -1.0]], dtype=torch.float64
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_unnormalize_default_mask_is_all_true():
    out = unnormalize(np.zeros((4, 8, 2)), {"q01": [0.0, -2.0], "q99": [2.0, 2.0]})
    assert out.shape == (4, 8, 2)
    torch.testing.assert_close(out[0, 0], torch.tensor([1.0 + 5e-9, 5e-9], dtype=torch.float64))


def test_unnormalize_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="last dimension 2"):
        unnormalize(torch.zeros(3, 7), {"q01": [0.0, 0.0], "q99": [1.0, 1.0]})


def test_resolve_unnorm_key_no_noops_fallback_and_errors():
    stats = {"libero_spatial_no_noops": {}, "libero_goal": {}}
    assert resolve_unnorm_key(stats, "libero_spatial") == "libero_spatial_no_noops"
    assert resolve_unnorm_key(stats, "libero_goal") == "libero_goal"
    assert resolve_unnorm_key({"only": {}}, None) == "only"
    with pytest.raises(ValueError, match="pass unnorm_key"):
        resolve_unnorm_key(stats, None)
    with pytest.raises(KeyError, match="libero_10"):
        resolve_unnorm_key(stats, "libero_10")
