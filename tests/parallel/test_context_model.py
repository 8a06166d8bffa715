"""A tiny DeltaNet language model under context parallelism (2 gloo processes, float64): the
group's losses add up to the single-process loss and the group's summed parameter gradients
equal the single-process gradients. Layers: plain delta rule and gated DeltaProduct (n_h = 2),
both with short convolutions, whose windows reach into the previous rank (the halo exchange)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from deltanet.models import DeltaNetConfig, DeltaNetForCausalLM
from deltanet.parallel import exchange_halo, split_segment

from ._reference import assert_matches_reference, cp_targets, reference_step
from ._spawn import run_distributed


def _model(layer_types):
    torch.manual_seed(0)
    cfg = DeltaNetConfig(vocab_size=64, hidden_size=32, num_hidden_layers=len(layer_types), num_heads=2,
                         intermediate_size=64, layer_types=layer_types, num_householder=2,
                         delta_backend="torch", sliding_window=4)
    return DeltaNetForCausalLM(cfg).double()


def _model_matches(rank: int, R: int) -> None:
    B, T = 2, 16
    model = _model(["delta_net", "gated_delta_product"])
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (B, T), generator=gen)
    labels = x.clone()
    labels[0, 5] = labels[1, 11] = -100  # ignored targets: the group's token count must skip them

    ref_logits, ref_loss, ref_grads = reference_step(model, x, labels)

    out = model(input_ids=split_segment(x), labels=split_segment(cp_targets(labels)),
                context_parallel=dist.group.WORLD)
    torch.testing.assert_close(out.logits, split_segment(ref_logits), rtol=1e-10, atol=1e-10)
    assert_matches_reference(model, out.loss, ref_loss, ref_grads)


def _halo(rank: int, R: int) -> None:
    x = torch.arange(R * 2 * 5, dtype=torch.float64).view(2, R * 5, 1)
    mine = split_segment(x).clone().requires_grad_()
    h = exchange_halo(mine, 3)
    want = torch.zeros(2, 3, 1, dtype=torch.float64) if rank == 0 else x[:, rank * 5 - 3:rank * 5]
    torch.testing.assert_close(h, want)
    (h * (rank + 1)).sum().backward()
    # the rows this rank sent get the next rank's weight (rank + 2); the others none
    want_grad = torch.zeros_like(mine)
    if rank + 1 < R:
        want_grad[:, -3:] = rank + 2
    torch.testing.assert_close(mine.grad, want_grad)


def _cases(rank: int, R: int) -> None:
    _halo(rank, R)
    _model_matches(rank, R)


def test_model_context_parallel_matches_single_process():
    run_distributed(_cases, 2)
