"""The single-process reference a context-parallel model test compares against, and the check.

A test builds the model in every rank, takes :func:`reference_step` on the whole batch, runs its
own segment under context parallelism with :func:`cp_targets`, then :func:`assert_matches_reference`
backpropagates that segment's loss and compares the all-reduced loss and gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist


def reference_step(model, x: torch.Tensor, labels: torch.Tensor, **kw):
    """``(logits, loss, grads)`` of one process over the whole batch (``kw``: e.g. the packed
    documents' ``cu_seqlens``); leaves the grads cleared. The logits come from a no-grad forward:
    training forwards use the fused loss and return none."""
    with torch.no_grad():
        logits = model(input_ids=x, **kw).logits
    loss = model(input_ids=x, labels=labels, **kw).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return logits, loss.detach(), grads


def cp_targets(labels: torch.Tensor) -> torch.Tensor:
    """Labels as context parallelism takes them: already shifted (position t's target is
    ``labels[t + 1]``); the last position has no target."""
    return torch.cat([labels[:, 1:], torch.full((labels.shape[0], 1), -100)], dim=1)


def assert_matches_reference(model, loss: torch.Tensor, ref_loss: torch.Tensor, ref_grads: dict,
                             case: str = "") -> None:
    """Backpropagate this rank's segment ``loss``; the loss summed over ranks and each parameter's
    gradient summed over ranks (each rank holds the gradient of its own uses) equal the reference."""
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total, ref_loss, rtol=1e-10, atol=1e-12)
    prefix = f"{case}: " if case else ""
    for n, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-9, atol=1e-12, msg=lambda m: f"{prefix}{n}: {m}")
