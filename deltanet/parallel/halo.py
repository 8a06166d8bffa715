"""Segments of one sequence over the ranks of a process group, and the halos between them.

Rank ``r`` holds the positions ``[o_r, o_r + T_r)`` (``o_r`` the sum of the earlier segments'
lengths; :class:`SegmentLayout`, gathered once per forward, tells every rank every length).
A layer whose output at a position reads a window of earlier positions (a causal short
convolution, sliding-window or full attention) needs the rows just before its segment: the
last ``h_r = min(window - 1, o_r)`` positions (``window=None``: all ``o_r``), which span several
earlier ranks when the window is longer than a segment. Each pair ``s < r`` agrees without
talking on the rows of segment ``s`` that ``r`` needs, and one batch of point-to-point sends and
receives moves exactly those rows; the halo is their concatenation in rank order, a contiguous
run of positions (a rank's rows are passed over entirely only when the window reaches past its
whole segment).

Packed documents (``SegmentLayout.documents``, the whole sequence's boundaries): a window never
reaches past the start of the document holding the segment's first position, so
``h_r = min(window - 1, lead_r)`` with ``lead_r`` the positions of that document before the
segment (0 when a document starts exactly at ``o_r``); rows of earlier documents are never sent.

Backward: the halo's gradient travels the reverse way (one batch of point-to-point operations)
and adds to the gradient of the rows each rank sent, so every row gets the gradient of every
later use, on the rank that owns it.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools

import torch
import torch.distributed as dist

from ..ops.packing import PackedSequences

__all__ = ["SegmentLayout", "check_layer_documents", "exchange_conv_halos", "exchange_halo", "exchange_kv_halo",
           "segment_group"]


@dataclasses.dataclass(frozen=True)
class SegmentLayout:
    """Where every rank's segment sits in the sequence: the context-parallel ``group``, this
    ``rank`` and every rank's segment ``lengths`` (host ints). Built once per forward by
    :meth:`gather` (one small all-gather) and handed to every layer.

    Example (under ``torchrun --nproc-per-node 2``, segments of 5 and 4 tokens)::

        >>> layout = SegmentLayout.gather(None, length=5 if rank == 0 else 4, batch=1, device=dev)
        >>> layout.lengths, layout.offsets, layout.start      # on rank 1
        ((5, 4), (0, 5), 5)

    ``documents``: packed documents (``B == 1``), the WHOLE sequence's boundaries as a
    :class:`~deltanet.ops.packing.PackedSequences` (every rank holds the same); then
    ``local_documents`` is this rank's segment of them (:meth:`PackedSequences.segment`), which
    the layers compute with, and the halos stop at document starts.
    """

    group: dist.ProcessGroup | None
    rank: int
    lengths: tuple[int, ...]
    documents: PackedSequences | None = None

    @classmethod
    def gather(cls, group, length: int, batch: int, device, documents=None) -> "SegmentLayout":
        """All-gather ``(length, batch)`` over ``group``; ranks disagreeing on the batch size
        raise ``ValueError`` on every rank (their messages would not match otherwise).
        ``documents``: the whole sequence's ``cu_seqlens`` (a tensor or ``PackedSequences``;
        ``batch`` must be 1); they must end at the sum of the segment lengths, and every rank
        must pass the same (checked: differing boundaries would silently mix documents)."""
        R, rank = group_rank(group)
        group = dist.group.WORLD if group is None else group  # None would read as "no context parallelism"
        mine = torch.tensor([int(length), int(batch)], dtype=torch.int64, device=device)
        if R == 1:
            lengths = (int(length),)
        else:
            parts = [torch.empty_like(mine) for _ in range(R)]
            dist.all_gather(parts, mine, group=group)
            rows = torch.stack(parts).tolist()
            if len({b for _, b in rows}) != 1:
                raise ValueError(f"the batch size differs across the context-parallel ranks: {[b for _, b in rows]}")
            lengths = tuple(n for n, _ in rows)
        if documents is None:
            return cls(group, rank, lengths)
        if batch != 1:
            raise ValueError(f"packed documents (cu_seqlens) need batch size 1, got {batch}")
        packed = PackedSequences.from_cu_seqlens(documents, sum(lengths))
        if R > 1:
            _check_same_documents(packed, group)
        return cls(group, rank, lengths, packed)

    @property
    def world_size(self) -> int:
        return len(self.lengths)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Each segment's first position in the whole sequence."""
        out, acc = [], 0
        for n in self.lengths:
            out.append(acc)
            acc += n
        return tuple(out)

    @property
    def start(self) -> int:
        """This rank's first position in the whole sequence (its RoPE offset)."""
        return self.offsets[self.rank]

    @property
    def length(self) -> int:
        return self.lengths[self.rank]

    @functools.cached_property
    def leads(self) -> tuple[int, ...]:
        """Per rank, how many positions before its segment a causal window may reach: all of
        them, or with ``documents`` those of the document holding the segment's first position
        (from the host boundaries; computed once per layout)."""
        if self.documents is None:
            return self.offsets
        bounds = self.documents.offsets
        return tuple(o - bounds[bisect.bisect_right(bounds, o) - 1] for o in self.offsets)

    @property
    def local_documents(self) -> PackedSequences | None:
        """This rank's segment of ``documents`` (None without documents)."""
        if self.documents is None:
            return None
        return self.documents.segment(self.start, self.start + self.length)

    def halo_width(self, window: int | None, rank: int | None = None) -> int:
        """``h_r``: the positions before rank ``rank``'s segment (default: this rank's) that a
        causal window of ``window`` positions (None: unbounded) reaches."""
        lead = self.leads[self.rank if rank is None else rank]
        return lead if window is None else min(window - 1, lead)

    def halo_rows(self, src: int, dst: int, window: int | None) -> tuple[int, int] | None:
        """The local rows ``[lo, hi)`` of segment ``src`` that rank ``dst`` needs (``src < dst``),
        or None: the part of ``[o_dst - h_dst, o_dst)`` inside segment ``src``."""
        offs = self.offsets
        h = self.halo_width(window, dst)
        lo, hi = max(offs[dst] - h - offs[src], 0), self.lengths[src]
        return (lo, hi) if src < dst and lo < hi else None


def _check_same_documents(packed: PackedSequences, group) -> None:
    """Every rank must describe the same documents: compare the boundaries' count and a
    position-weighted checksum (host ints, no device read beyond the one ``packed`` made)."""
    offs = packed.offsets
    mine = torch.tensor([len(offs), sum(offs), sum(i * o for i, o in enumerate(offs))], dtype=torch.int64,
                        device=packed.device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    if any(not torch.equal(p, mine) for p in parts):
        raise ValueError("cu_seqlens (the whole sequence's document boundaries) differs across the "
                         "context-parallel ranks; every rank must pass the same")


def group_rank(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("context parallelism needs an initialised torch.distributed process group")
    return dist.get_world_size(group), dist.get_rank(group)


def _peer(group, r: int) -> int:
    return dist.get_global_rank(group, r) if group is not None else r


def _exchange(sends, recvs, group) -> None:
    """One batch of point-to-point operations: ``sends``/``recvs`` are ``(group rank, tensor)``."""
    ops = [dist.P2POp(dist.isend, t, _peer(group, p), group=group) for p, t in sends]
    ops += [dist.P2POp(dist.irecv, t, _peer(group, p), group=group) for p, t in recvs]
    for req in dist.batch_isend_irecv(ops) if ops else []:
        req.wait()


class _KVHalo(torch.autograd.Function):
    """``kv [B, T_r, ...]`` -> the halo ``[B, h_r, ...]``: the rows of the earlier ranks this
    rank's window reaches, in position order. Backward returns each piece's gradient to its
    owner, which adds it to the gradient of the rows it sent."""

    @staticmethod
    def forward(ctx, kv: torch.Tensor, layout: SegmentLayout, window: int | None) -> torch.Tensor:
        me, R = layout.rank, layout.world_size
        recv = [(s, rows) for s in range(me) if (rows := layout.halo_rows(s, me, window))]
        send = [(r, rows) for r in range(me + 1, R) if (rows := layout.halo_rows(me, r, window))]
        ctx.layout, ctx.recv, ctx.send, ctx.shape = layout, recv, send, kv.shape
        bufs = [kv.new_empty(kv.shape[0], hi - lo, *kv.shape[2:]) for _, (lo, hi) in recv]
        _exchange([(r, kv[:, lo:hi].contiguous()) for r, (lo, hi) in send],
                  [(s, b) for (s, _), b in zip(recv, bufs)], layout.group)
        if not bufs:
            return kv.new_zeros(kv.shape[0], 0, *kv.shape[2:])
        return torch.cat(bufs, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        pieces = grad.split([hi - lo for _, (lo, hi) in ctx.recv], dim=1) if ctx.recv else []
        back = [grad.new_empty(grad.shape[0], hi - lo, *grad.shape[2:]) for _, (lo, hi) in ctx.send]
        _exchange([(s, p.contiguous()) for (s, _), p in zip(ctx.recv, pieces)],
                  [(r, b) for (r, _), b in zip(ctx.send, back)], ctx.layout.group)
        dkv = grad.new_zeros(ctx.shape)
        for (_, (lo, hi)), b in zip(ctx.send, back):
            dkv[:, lo:hi] += b  # several later ranks may have seen the same rows
        return dkv, None, None


def as_layout(context_parallel, length: int, batch: int, device, documents=None) -> SegmentLayout:
    """A :class:`SegmentLayout` as given (checked against this segment's length), or gathered
    over a process group (with ``documents``, the whole sequence's ``cu_seqlens``)."""
    if isinstance(context_parallel, SegmentLayout):
        if context_parallel.length != length:
            raise ValueError(f"the segment layout says this rank holds {context_parallel.length} positions, "
                             f"the inputs have {length}")
        if documents is not None:
            raise ValueError("give the packed documents either as cu_seqlens or in the SegmentLayout "
                             "(SegmentLayout.gather(..., documents=cu_seqlens)), not both")
        return context_parallel
    return SegmentLayout.gather(context_parallel, length, batch, device, documents=documents)


def check_layer_documents(context_parallel, cu_seqlens) -> None:
    """A layer under context parallelism takes packed documents only as the model hands them
    down: ``cu_seqlens`` is its ``SegmentLayout``'s ``local_documents`` (a bare process group
    cannot tell where this segment sits among the documents)."""
    if cu_seqlens is None or context_parallel is None:
        return
    if not isinstance(context_parallel, SegmentLayout) or cu_seqlens is not context_parallel.local_documents:
        raise ValueError("under context_parallel, a layer's cu_seqlens must be the local_documents of the "
                         "SegmentLayout it is given (SegmentLayout.gather(..., documents=<the whole sequence's "
                         "cu_seqlens>)); the model builds both")


def exchange_kv_halo(kv: torch.Tensor, window: int | None, layout: SegmentLayout) -> torch.Tensor:
    """``kv [B, T_r, ...]`` (e.g. this rank's keys and values) -> the rows of the earlier ranks
    that a causal window of ``window`` positions (itself included) reaches from this segment: the
    last ``layout.halo_width(window)`` positions before it (``min(window - 1, start)``; ``window=None``:
    all ``start`` of them; with documents, none before the start of the segment's first document),
    ``[B, h_r, ...]``, differentiable (gradients return to the owning ranks). Every rank of the
    group must call it."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if kv.shape[1] != layout.length:
        raise ValueError(f"kv holds {kv.shape[1]} positions, the layout {layout.length}")
    return _KVHalo.apply(kv, layout, window)


def exchange_halo(x: torch.Tensor, width: int, group: dist.ProcessGroup | None = None, *,
                  layout: SegmentLayout | None = None) -> torch.Tensor:
    """``x [B, T_r, ...]`` -> the ``width`` rows before this rank's segment ``[B, width, ...]``,
    zeros where they would precede the sequence (the first rank: all zeros), differentiable:
    what a causal short convolution of width ``width + 1`` needs from before the segment (its
    ``state`` argument). The rows may come from several earlier ranks when segments are shorter
    than ``width``. ``layout``: a :class:`SegmentLayout` built once per forward (otherwise one
    all-gather of the segment lengths over ``group`` per call)."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"halo width must be a positive int, got {width!r}")
    layout = as_layout(layout if layout is not None else group, x.shape[1], x.shape[0], x.device)
    halo = exchange_kv_halo(x, width + 1, layout)
    if halo.shape[1] < width:  # the sequence starts inside the window: zero rows before it
        halo = torch.cat([halo.new_zeros(x.shape[0], width - halo.shape[1], *x.shape[2:]), halo], dim=1)
    return halo


def segment_group(context_parallel):
    """The process group of ``context_parallel`` (a group, or a :class:`SegmentLayout` built over one)."""
    return context_parallel.group if isinstance(context_parallel, SegmentLayout) else context_parallel


def exchange_conv_halos(tensors, width: int, context_parallel) -> tuple:
    """:func:`exchange_halo` of each of ``tensors`` (``[B, T_r, C_i]``, one segment): the ``width``
    rows before it that a short convolution's window reaches. ``context_parallel``: a process group
    or a :class:`SegmentLayout`; a bare group's layout is gathered once for all the tensors."""
    x = tensors[0]
    layout = as_layout(context_parallel, x.shape[1], x.shape[0], x.device)
    return tuple(exchange_halo(t, width, layout=layout) for t in tensors)
