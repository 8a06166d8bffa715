"""What the Triton chunk op keeps for its backward: the switch, and its hand-over to checkpointing.

By default a differentiable call keeps, besides its inputs, the chunks' ``(I + A)^-1`` (``Ai``,
fp32, 64 values per token and head) and the pseudo-values ``v_new`` (the size of v): the backward
then skips the UT transform's solve and the ``W S`` products of the state pass. Inside
:func:`wy_recomputed_in_backward` it keeps only its inputs (for the gated rule ``g`` in ``G``'s
place) and its backward reruns the forward's first two kernels (less memory: a model holds
``Ai`` and ``v_new`` per layer until its backward reaches it; a slower backward). The switch is
read when the forward runs. The DeltaNet mixers make their training calls inside it by default
(``DeltaNetMixer.recompute_wy``: in a model the memory measured worth more than the time). No
Triton import here: the switch exists where the kernels do not.
"""

from __future__ import annotations

import contextlib

__all__ = ["KEEP_WY_FOR_BACKWARD", "checkpoint_kwargs", "wy_recomputed_in_backward"]

KEEP_WY_FOR_BACKWARD = True


@contextlib.contextmanager
def wy_recomputed_in_backward(enabled: bool = True):
    """Triton chunk calls inside keep only their inputs for backward (``KEEP_WY_FOR_BACKWARD = not
    enabled``), which reruns the UT transform and the state pass. Gradients equal up to rounding.

    Example::

        >>> with wy_recomputed_in_backward():
        ...     loss = model(ids, labels=ids).loss   # the forward decides what is kept
        >>> loss.backward()
    """
    global KEEP_WY_FOR_BACKWARD
    saved, KEEP_WY_FOR_BACKWARD = KEEP_WY_FOR_BACKWARD, not enabled
    try:
        yield
    finally:
        KEEP_WY_FOR_BACKWARD = saved


def _recompute_contexts():
    return contextlib.nullcontext(), wy_recomputed_in_backward(True)


def checkpoint_kwargs() -> dict:
    """Extra ``torch.utils.checkpoint`` arguments for a region that may call the chunk op: with the
    switch on when the forward runs, the rerun in backward (outside any ``with`` block by then) makes
    the same choice, so its saved tensors match the forward's. Empty by default."""
    return {} if KEEP_WY_FOR_BACKWARD else {"context_fn": _recompute_contexts}
