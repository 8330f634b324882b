"""An inductor heuristic for the compiled DiT blocks: the per-head RMS norms as one-pass (persistent) reductions.

Inductor normalizes a row in one pass (a persistent reduction: the row stays in registers) only when it is short:
up to 1024 elements when it can tell the reduction runs along the innermost dimension, up to 64 otherwise. The
spatial blocks' QK-norms (72 channels per head at the released size, read from the `qkv` output and written in the
attention kernel's layout) fall in the second case, so each became a looped reduction that reads its rows twice:
0.19 s a chunk step each for the queries and the keys on an H200 at the recipe's 64 envs, against 0.044 s each as
persistent reductions (README, "Speed"). `one_pass_short_rows` lets every reduction of at most `MAX_ONE_PASS_ROW`
elements run in one pass while inductor's own rule decides the others (the blocks' 1152-wide layer norms were
slower as one-pass reductions, 0.35 s against 0.09-0.17 s each).

It is a choice of generated code, not of arithmetic: both forms sum the row in float32. It uses inductor's
`InductorChoices` hook, whose interface is private to torch: where it is missing, the context does nothing.
Inductor's FX graph cache does not key on this choice, so a process can reuse a block graph cached without it
(correct, only not faster); `benchmarks/env_step.py` turns that cache off.
"""

from __future__ import annotations

import contextlib

try:
    from torch._inductor import config as _inductor_config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V
except ImportError:  # a torch without the hook: compiled blocks keep inductor's own choices
    InductorChoices = None

# Reductions of at most this many elements run in one pass (a head's channels; the layer norms' rows are wider).
MAX_ONE_PASS_ROW = 128

if InductorChoices is not None:

    class OnePassShortRows(InductorChoices):
        """Inductor's choices, except that reductions of at most `MAX_ONE_PASS_ROW` elements are persistent."""

        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction) -> bool:
            if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
                return True
            if cooperative_reduction or not _inductor_config.triton.persistent_reductions:
                return False
            return V.graph.sizevars.statically_known_leq(features.reduction_numel, MAX_ONE_PASS_ROW)


def one_pass_short_rows() -> contextlib.AbstractContextManager:
    """A context in which inductor compiles with `OnePassShortRows` (nothing where torch lacks the hook)."""
    if InductorChoices is None:
        return contextlib.nullcontext()
    return V.set_choices_handler(OnePassShortRows())
