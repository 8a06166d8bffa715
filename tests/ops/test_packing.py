"""``PackedSequences``: packed-document metadata validated and read to the host once per batch.

Its fields against their definitions written out with loops, its validation against the op's
messages, and every op that takes ``cu_seqlens`` (the delta rule on each backend, DeltaProduct,
attention, linear attention, the short convolution): the object gives bitwise the results of
the raw tensor, with no host read at all, and a raw tensor costs exactly one read per call,
none in backward.
"""

from __future__ import annotations

import pytest
import torch

from tests.ops._triton_common import DEVICE, ON_GPU

from deltanet.layers import ShortConvolution, linear_attention
from deltanet.layers.conv import positions_in_documents
from deltanet.ops import PackedSequences, delta_product, delta_rule
from deltanet.ops.attention import causal_attention
from deltanet.ops.packing import CHUNK_SIZE
from tests.utils import count_host_reads, make_inputs

BOUNDS = [0, 1, 64, 65, 200, 203]  # a one-token document, one of exactly a chunk, one of 2+ chunks


def _loops(bounds: list[int], chunk: int):
    """doc ids, positions, (sequence, chunk) rows and each sequence's first row, by loops."""
    doc, pos, rows, firsts = [], [], [], []
    for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        doc += [n] * (e - s)
        pos += list(range(e - s))
        firsts.append(len(rows))
        rows += [[n, c] for c in range(-(-(e - s) // chunk))]
    return doc, pos, rows, firsts


def test_fields_match_their_definitions():
    cu = torch.tensor(BOUNDS, device=DEVICE)
    p = PackedSequences.from_cu_seqlens(cu, BOUNDS[-1])
    assert p.offsets == tuple(BOUNDS) and p.num_seqs == 5 and p.total_tokens == 203 and p.max_len == 135
    assert p.cu_seqlens.dtype == torch.int32 and p.cu_seqlens.tolist() == BOUNDS
    doc, pos, rows, firsts = _loops(BOUNDS, CHUNK_SIZE)
    assert p.doc_ids.tolist() == doc
    assert p.positions.tolist() == pos
    assert torch.equal(p.positions, positions_in_documents(cu, BOUNDS[-1]))  # RoPE positions as before
    assert p.chunk_table.dtype == p.chunk_offsets.dtype == torch.int32
    assert p.chunk_table.tolist() == rows and p.chunk_offsets.tolist() == firsts
    table, offsets = p.chunks(16)
    _, _, rows16, firsts16 = _loops(BOUNDS, 16)
    assert table.tolist() == rows16 and offsets.tolist() == firsts16
    assert p.chunks(16)[0] is table and p.chunks(CHUNK_SIZE)[0] is p.chunk_table  # built once


def test_interleaved_steps_scale_the_boundaries_once():
    p = PackedSequences.from_cu_seqlens(torch.tensor([0, 3, 5], device=DEVICE), 5)
    with count_host_reads() as reads:
        q = p.interleaved(2)
    assert sum(reads.values()) == 0, reads
    assert q.offsets == (0, 6, 10) and q.cu_seqlens.tolist() == [0, 6, 10]
    assert q.positions.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert p.interleaved(2) is q and p.interleaved(1) is p


def test_segment_cuts_the_documents_and_keeps_their_positions():
    """A context-parallel rank's view of ``[lo, hi)``: local boundaries, positions counted from
    each document's true start, ``lead`` the first document's positions before ``lo``."""
    p = PackedSequences.from_cu_seqlens(torch.tensor(BOUNDS, device=DEVICE), BOUNDS[-1])
    cuts = ((0, 203), (3, 40), (4, 60), (60, 61), (50, 203), (136, 140))
    with count_host_reads() as reads:  # built from the host offsets
        views = [p.segment(lo, hi) for lo, hi in cuts]
    assert sum(reads.values()) == 0, reads
    for (lo, hi), s in zip(cuts, views):
        inside = [b - lo for b in BOUNDS if lo < b < hi]
        assert s.offsets == (0, *inside, hi - lo) and s.cu_seqlens.tolist() == list(s.offsets)
        first = max(b for b in BOUNDS if b <= lo)
        assert s.lead == lo - first
        assert s.positions.tolist() == p.positions[lo:hi].tolist()
        assert s.doc_ids.tolist() == (p.doc_ids[lo:hi] - p.doc_ids[lo]).tolist()
        assert p.segment(lo, hi) is s  # built once
        assert s.interleaved(3).lead == 3 * s.lead
    for lo, hi in ((-1, 4), (4, 4), (5, 204), (2.0, 4)):
        with pytest.raises(ValueError, match="a segment"):
            p.segment(lo, hi)


def test_attention_over_documents_with_fewer_queries_than_keys():
    """``cu_seqlens`` describes the keys; the queries are the last ``Tq`` (a context-parallel segment
    after its halo): the same rows as the full square call."""
    cu = torch.tensor([0, 3, 9, 10, 16])
    q, k, v = torch.randn(3, 1, 16, 2, 4, dtype=torch.float64).unbind(0)
    for window in (None, 2, 5):
        want = causal_attention(q, k, v, window=window, cu_seqlens=cu, use_flex=False)[:, -7:]
        got = causal_attention(q[:, -7:], k, v, window=window, cu_seqlens=cu, use_flex=False)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


BAD = {
    "float": (torch.tensor([0.0, 4.0, 12.0]), TypeError, "cu_seqlens must have dtype int32 or int64"),
    "list": ([0, 4, 12], TypeError, "cu_seqlens must be a 1-D integer torch.Tensor"),
    "2d": (torch.tensor([[0, 12]]), ValueError, "cu_seqlens must be 1-D"),
    "short": (torch.tensor([0]), ValueError, "at least 2 entries"),
    "start": (torch.tensor([1, 4, 12]), ValueError, "cu_seqlens must start at 0"),
    "end": (torch.tensor([0, 4, 11]), ValueError, "cu_seqlens must end at T = 12"),
    "decreasing": (torch.tensor([0, 6, 4, 12]), ValueError, "strictly increasing"),
    "empty_doc": (torch.tensor([0, 4, 4, 12]), ValueError, "strictly increasing"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_validation_gives_the_ops_messages(case):
    cu, err, msg = BAD[case]
    with pytest.raises(err, match=msg):
        PackedSequences.from_cu_seqlens(cu, 12)
    x = torch.randn(1, 12, 1, 4)
    with pytest.raises(err, match=msg):  # the op's own check, which builds the object
        delta_rule(x, x, x, torch.rand(1, 12, 1), cu_seqlens=cu, backend="torch")


def test_an_object_of_another_length_is_rejected():
    p = PackedSequences.from_cu_seqlens(torch.tensor([0, 4, 10]), 10)
    x = torch.randn(1, 12, 2, 4)
    with pytest.raises(ValueError, match="cu_seqlens must end at T = 12, got 10"):
        delta_rule(x, x, x, torch.rand(1, 12, 2), cu_seqlens=p, backend="torch")
    with pytest.raises(ValueError, match="cu_seqlens must end at T = 12, got 10"):
        causal_attention(x, x, x, cu_seqlens=p)
    with pytest.raises(ValueError, match="cu_seqlens must end at T = 12, got 10"):
        linear_attention(x, x, x, cu_seqlens=p)
    with pytest.raises(ValueError, match="cu_seqlens must end at T = 12, got 10"):
        ShortConvolution(8)(x.flatten(2), cu_seqlens=p)
    with pytest.raises(ValueError, match="cu_seqlens requires B == 1"):
        delta_rule(x.expand(2, -1, -1, -1), x.expand(2, -1, -1, -1), x.expand(2, -1, -1, -1),
                   torch.rand(2, 12, 2), cu_seqlens=p, backend="torch")


def _delta_run(fn, inp, g, cu, **kw):
    """``fn`` on fresh leaves; returns (o, S, grads) after one backward, and the host reads of the
    forward and of the backward."""
    leaves = {n: x.detach().clone().requires_grad_() for n, x in inp.items() if x is not None}
    if g is not None:
        leaves["g"] = g.detach().clone().requires_grad_()
    with count_host_reads() as fwd:
        o, S = fn(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], g=leaves.get("g"),
                  initial_state=leaves["initial_state"], output_final_state=True, cu_seqlens=cu, **kw)
    loss = (o.double() ** 2).sum() + S.double().sum()
    with count_host_reads() as bwd:
        loss.backward()
    grads = {n: x.grad for n, x in leaves.items()}
    return (o.detach(), S.detach(), grads), fwd, bwd


BACKENDS = ["triton", "recurrent", "torch", "reference"]


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_rule_reads_cu_seqlens_once_and_the_object_never(backend, gated):
    T = 80 if backend != "recurrent" or ON_GPU else 40
    bounds = [0, 9, 10, T]  # a one-token document; at T = 80 one of 70 tokens (two chunks)
    inp = make_inputs(1, T, 2, 16, 8, dtype=torch.float32, device=DEVICE, initial_state=True, N=3, seed=3)
    g = -torch.rand(1, T, 2, device=DEVICE) if gated else None
    cu = torch.tensor(bounds, device=DEVICE)

    raw, fwd, bwd = _delta_run(delta_rule, inp, g, cu, backend=backend)
    # before: the Triton chunk op read cu_seqlens 3 times per call (its checks, the chunk index
    # in forward and again in backward)
    assert sum(fwd.values()) == 1, fwd
    assert sum(bwd.values()) == 0, bwd

    packed = PackedSequences.from_cu_seqlens(cu, T)
    obj, fwd, bwd = _delta_run(delta_rule, inp, g, packed, backend=backend)
    assert sum(fwd.values()) + sum(bwd.values()) == 0, (fwd, bwd)
    for a, b in zip(raw[:2], obj[:2]):
        assert torch.equal(a, b)
    for name in raw[2]:
        assert torch.equal(raw[2][name], obj[2][name]), name


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_delta_product_takes_the_object(backend):
    T, n_h = 70, 2
    bounds = [0, 5, T]
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, T, 2, 16, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(1, T, n_h, 2, 16, generator=gen), dim=-1)
    v, beta = torch.randn(1, T, n_h, 2, 8, generator=gen), torch.rand(1, T, n_h, 2, generator=gen)
    g = -torch.rand(1, T, 2, generator=gen)
    args = [x.to(DEVICE) for x in (q, k, v, beta, g)]
    cu = torch.tensor(bounds, device=DEVICE)
    packed = PackedSequences.from_cu_seqlens(cu, T)

    def run(c):
        leaves = [x.clone().requires_grad_() for x in args]
        o, S = delta_product(*leaves[:4], g=leaves[4], output_final_state=True, cu_seqlens=c, backend=backend)
        ((o ** 2).sum() + S.sum()).backward()
        return [o.detach(), S.detach()] + [x.grad for x in leaves]

    expected = run(cu)
    with count_host_reads() as reads:
        got = run(packed)
    assert sum(reads.values()) == 0, reads
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_layers_take_the_object_bitwise_and_read_nothing():
    torch.manual_seed(0)
    T = 23
    cu = torch.tensor([0, 3, 11, T])
    packed = PackedSequences.from_cu_seqlens(cu, T)
    conv = ShortConvolution(6, kernel_size=4).double()
    x = torch.randn(1, T, 6, dtype=torch.float64)
    q, k, v = torch.randn(3, 1, T, 2, 8, dtype=torch.float64).unbind(0)

    def outputs(c):
        return [conv(x, cu_seqlens=c)[0], causal_attention(q, k, v, cu_seqlens=c),
                causal_attention(q, k, v, window=4, cu_seqlens=c, use_flex=False),
                *linear_attention(q, k, v, cu_seqlens=c)]

    expected = outputs(cu)
    with count_host_reads() as reads:
        got = outputs(packed)
    assert sum(reads.values()) == 0, reads
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_chunk_op_with_its_chunk_table_passes_opcheck():
    """The registered op's schema with the chunk table (what chunk_delta_rule passes)."""
    inp = make_inputs(1, 70, 1, 16, 16, initial_state=True, N=2, dtype=torch.float32, device=DEVICE)
    p = PackedSequences.from_cu_seqlens(torch.tensor([0, 5, 70], device=DEVICE), 70)
    args = (inp["q"], inp["k"], inp["v"], inp["beta"], 16 ** -0.5, inp["initial_state"], True, p.cu_seqlens,
            None, None, p.chunk_table, p.chunk_offsets)  # g, kernel_config, the chunk table
    torch.library.opcheck(torch.ops.deltanet.chunk_delta_rule_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
