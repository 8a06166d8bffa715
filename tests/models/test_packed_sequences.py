"""Packed documents through the whole model: ``cu_seqlens`` is read to the host once per forward
(``PackedSequences.from_cu_seqlens``) and never in backward, whatever the layer mix, backend or
activation checkpointing; a ``PackedSequences`` given to the model yields bitwise the outputs
and gradients of the raw tensor.

Before, a forward + backward of this mix read it 10 times with the Triton delta-rule backend (in
forward each delta layer's checks and chunk index, and linear attention; in backward each delta
layer's chunk index again), 4 times with the PyTorch backend, and on CUDA twice more per forward
(FlexAttention's block mask in each attention layer); checkpointed layers read it again in backward.
"""

from __future__ import annotations

import pytest
import torch

import tests.ops._triton_common  # noqa: F401  (TRITON_INTERPRET=1 on CPU before the kernels load)
from deltanet.models import DeltaNetConfig, DeltaNetForCausalLM
from deltanet.ops import PackedSequences
from deltanet.ops import packing
from tests.utils import count_host_reads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TYPES = ["delta_net", "sliding_attention", "full_attention", "linear_attention", "gated_delta_net",
         "gated_delta_product"]
BOUNDS = [0, 66, 67, 80]  # a two-chunk document, a one-token one (shorter than the conv and window)


def _model(backend: str, checkpointing: str = "none") -> DeltaNetForCausalLM:
    # one head of 16: the Triton kernels run in the interpreter on CPU, one program at a time
    cfg = DeltaNetConfig(vocab_size=50, hidden_size=16, num_hidden_layers=len(TYPES), num_heads=1,
                         intermediate_size=32, layer_types=TYPES, sliding_window=6, num_householder=2,
                         delta_backend=backend, activation_checkpointing=checkpointing, pad_token_id=0,
                         bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    return DeltaNetForCausalLM(cfg).to(DEVICE).train()


def _ids():
    return torch.randint(1, 50, (1, BOUNDS[-1]), generator=torch.Generator().manual_seed(0)).to(DEVICE)


# Checkpointing reruns the layers in backward; the Triton backend (interpreted on CPU) once, for time.
@pytest.mark.parametrize("backend, checkpointing", [("triton", "none"), ("torch", "none"), ("torch", "mixer"),
                                                     ("torch", "block")])
def test_one_host_read_per_forward_none_in_backward(backend, checkpointing, monkeypatch):
    model = _model(backend, checkpointing)
    ids = _ids()
    calls = []
    read = packing.read_offsets
    monkeypatch.setattr(packing, "read_offsets", lambda cu: calls.append(cu) or read(cu))
    with count_host_reads() as fwd:
        loss = model(ids, labels=ids, cu_seqlens=torch.tensor(BOUNDS, device=DEVICE)).loss
    with count_host_reads() as bwd:
        loss.backward()
    assert sum(fwd.values()) == 1, fwd
    assert len(calls) == 1 and calls[0].tolist() == BOUNDS  # the one read: the model's PackedSequences
    assert sum(bwd.values()) == 0, bwd  # block checkpointing reruns every layer here: still no read


def test_the_object_gives_the_raw_tensors_outputs_and_grads_bitwise():
    # (the Triton ops alike: tests/ops/test_packing.py)
    model = _model("torch")
    ids = _ids()
    cu = torch.tensor(BOUNDS, device=DEVICE)

    def run(c):
        model.zero_grad()
        out = model(ids, labels=ids, cu_seqlens=c)
        out.loss.backward()  # training: the fused loss, no logits
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_raw, grads_raw = run(cu)
    with count_host_reads() as reads:
        loss_obj, grads_obj = run(PackedSequences.from_cu_seqlens(cu, BOUNDS[-1]))
    assert sum(reads.values()) == 1, reads  # building the object; the model then reads nothing
    assert torch.equal(loss_raw, loss_obj)
    with torch.no_grad():
        obj = PackedSequences.from_cu_seqlens(cu, BOUNDS[-1])
        assert torch.equal(model(ids, cu_seqlens=cu).logits, model(ids, cu_seqlens=obj).logits)
    for name, g in grads_raw.items():
        assert torch.equal(g, grads_obj[name]), name


def test_an_object_must_match_the_batch():
    model = _model("torch").eval()
    ids = _ids()
    short = PackedSequences.from_cu_seqlens(torch.tensor([0, 40, 79], device=DEVICE), 79)
    with pytest.raises(ValueError, match="cu_seqlens must end at T = 80, got 79"):
        model(ids, cu_seqlens=short)
