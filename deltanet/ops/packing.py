"""Packed-sequence metadata, built once per batch and handed to every layer and op.

A packed batch is ``B == 1`` with documents laid end to end along T, their boundaries given as
``cu_seqlens = [0, t_1, ..., T]`` (FlashAttention style). Every consumer needs something derived
from it: the delta-rule kernels a table of (sequence, chunk) pairs, the chunkwise PyTorch code,
the reference and linear attention the boundaries on the host, the short convolutions each
token's position inside its document, attention each token's document index. Reading
``cu_seqlens`` to the host is a device synchronisation; deriving the rest per layer repeats the
same small kernels several times per layer.

:class:`PackedSequences` holds all of it, validated, with exactly one host read
(:func:`read_offsets`) when built from a device tensor. The model builds one per forward; the
ops take it wherever they take ``cu_seqlens`` (a raw tensor is wrapped once at the op's entry),
and the autograd ops keep its device tensors for backward, which therefore reads nothing back.

Example::

    >>> p = PackedSequences.from_cu_seqlens(torch.tensor([0, 3, 5]), 5)
    >>> p.offsets, p.max_len, p.positions.tolist(), p.doc_ids.tolist()
    ((0, 3, 5), 3, [0, 1, 2, 0, 1], [0, 0, 0, 1, 1])
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

__all__ = ["CHUNK_SIZE", "PackedSequences", "as_packed", "check_cu_seqlens", "positions_in_documents", "read_offsets"]

CHUNK_SIZE = 64  # the Triton chunk kernels' chunk (``BT`` in delta_rule/chunk.py)


def _documents(cu_seqlens: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(doc_ids, positions)``, both ``[T]`` int64 on ``cu_seqlens``' device: each token's
    document index and its position inside that document. No host read."""
    pos = torch.arange(T, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:].to(pos.dtype), pos, right=True)
    return doc, pos - cu_seqlens.to(pos.dtype)[doc]


def positions_in_documents(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """Index of each token inside its document, ``[T]`` (``cu_seqlens = [0, ..., T]``); no host read.

    Example::

        >>> positions_in_documents(torch.tensor([0, 3, 5]), 5)
        tensor([0, 1, 2, 0, 1])
    """
    return _documents(cu_seqlens, T)[1]


def read_offsets(cu_seqlens: torch.Tensor) -> tuple[int, ...]:
    """``cu_seqlens`` on the host: the one device -> host read of a packed batch's metadata."""
    return tuple(cu_seqlens.tolist())


def check_cu_seqlens(cu_seqlens) -> None:
    """The checks that need no host read: a 1-D int32/int64 tensor of at least 2 entries."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a 1-D integer torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must have dtype int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with at least 2 entries [0, ..., T], got shape {tuple(cu_seqlens.shape)}"
        )


def _chunk_table(offsets: tuple[int, ...], chunk_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(table [chunks, 2] int32 = (sequence, chunk within it), first chunk of each sequence [N] int32)``,
    built on the host from the host offsets and copied to ``device`` (no read back)."""
    nts = [-(-(e - s) // chunk_size) for s, e in zip(offsets[:-1], offsets[1:])]
    table = [(n, c) for n, nt in enumerate(nts) for c in range(nt)]
    firsts = [0]
    for nt in nts[:-1]:
        firsts.append(firsts[-1] + nt)
    i32 = dict(dtype=torch.int32, device=device)
    return torch.tensor(table, **i32).view(-1, 2), torch.tensor(firsts, **i32)


@dataclass(frozen=True, eq=False)
class PackedSequences:
    """Documents packed along T (``B == 1``): their boundaries on the device and on the host, and
    what the layers derive from them. Build with :meth:`from_cu_seqlens`.

    Fields:
        cu_seqlens: ``[N + 1]`` int32 on the device, ``[0, ..., T]``.
        offsets: the same boundaries on the host (a tuple of ints).
        max_len: the longest document.
        doc_ids: ``[T]`` int64, the document of each token.
        positions: ``[T]`` int64, each token's position inside its document (conv masks, RoPE),
            counted from the document's true start (``lead`` tokens before this batch's first).
        chunk_table: ``[chunks, 2]`` int32, (sequence, chunk) of every ``CHUNK_SIZE``-token chunk
            (a chunk never crosses a document boundary).
        chunk_offsets: ``[N]`` int32, the first chunk of each sequence in ``chunk_table``.
        lead: how many positions of the first document precede the first token (0 except for a
            :meth:`segment` that starts inside a document).
    """

    cu_seqlens: torch.Tensor
    offsets: tuple[int, ...]
    max_len: int
    doc_ids: torch.Tensor
    positions: torch.Tensor
    chunk_table: torch.Tensor
    chunk_offsets: torch.Tensor
    # positions of the first document before this batch's first token: > 0 only for a segment of a
    # longer packed sequence (:meth:`segment`; context parallelism), whose first document began on
    # an earlier rank
    lead: int = 0
    # derived views (other chunk sizes, the interleaved steps of DeltaProduct), built on first use
    _derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def total_tokens(self) -> int:
        return self.offsets[-1]

    @property
    def num_seqs(self) -> int:
        return len(self.offsets) - 1

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, total_tokens: int) -> PackedSequences:
        """Validate ``cu_seqlens`` (1-D int32/int64, starts at 0, strictly increasing, ends at
        ``total_tokens``) and derive everything from it: one host read, the rest on its device.
        Raises ``TypeError`` / ``ValueError`` naming ``cu_seqlens``."""
        if isinstance(cu_seqlens, PackedSequences):
            if cu_seqlens.total_tokens != total_tokens:
                raise ValueError(f"cu_seqlens must end at T = {total_tokens}, got {cu_seqlens.total_tokens}")
            return cu_seqlens
        check_cu_seqlens(cu_seqlens)
        offsets = read_offsets(cu_seqlens)
        if offsets[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
        if offsets[-1] != total_tokens:
            raise ValueError(f"cu_seqlens must end at T = {total_tokens}, got {offsets[-1]}")
        if any(b <= a for a, b in zip(offsets[:-1], offsets[1:])):
            raise ValueError(f"cu_seqlens must be strictly increasing, got {list(offsets)}")
        return cls._build(cu_seqlens.to(torch.int32), offsets)

    @classmethod
    def _build(cls, cu: torch.Tensor, offsets: tuple[int, ...], lead: int = 0) -> PackedSequences:
        """From validated boundaries, ``cu`` (int32, device) equal to ``offsets`` (host)."""
        doc, pos = _documents(cu, offsets[-1])
        if lead:
            pos = pos + lead * (doc == 0)
        table, firsts = _chunk_table(offsets, CHUNK_SIZE, cu.device)
        return cls(cu_seqlens=cu, offsets=offsets, max_len=max(e - s for s, e in zip(offsets[:-1], offsets[1:])),
                   doc_ids=doc, positions=pos, chunk_table=table, chunk_offsets=firsts, lead=lead)

    def segment(self, lo: int, hi: int) -> PackedSequences:
        """The positions ``[lo, hi)`` as a packed batch of their own: the documents cut to the
        segment (boundaries relative to ``lo``), ``positions`` still counted from each document's
        true start, and ``lead`` the positions of the first document before ``lo``. What a
        context-parallel rank holding ``[lo, hi)`` of this sequence computes with. Built on the
        host from ``offsets`` (no read back), cached per ``(lo, hi)``.

        Example::

            >>> s = PackedSequences.from_cu_seqlens(torch.tensor([0, 3, 8]), 8).segment(2, 6)
            >>> s.offsets, s.lead, s.positions.tolist()
            ((0, 1, 4), 2, [2, 0, 1, 2])
        """
        T = self.total_tokens
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo < hi <= T):
            raise ValueError(f"a segment [lo, hi) needs 0 <= lo < hi <= {T}, got [{lo}, {hi})")
        key = ("segment", lo, hi)
        if key not in self._derived:
            first = bisect.bisect_right(self.offsets, lo) - 1  # the document holding lo
            last = bisect.bisect_left(self.offsets, hi)  # boundaries before it lie inside (lo, hi)
            offsets = (0, *(o - lo for o in self.offsets[first + 1:last]), hi - lo)
            cu = torch.tensor(offsets, dtype=torch.int32, device=self.device)
            self._derived[key] = PackedSequences._build(cu, offsets, lead=lo - self.offsets[first])
        return self._derived[key]

    def chunks(self, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chunk_table, chunk_offsets)`` for another chunk size (built once, no host read)."""
        if chunk_size == CHUNK_SIZE:
            return self.chunk_table, self.chunk_offsets
        key = ("chunks", chunk_size)
        if key not in self._derived:
            self._derived[key] = _chunk_table(self.offsets, chunk_size, self.device)
        return self._derived[key]

    def interleaved(self, steps: int) -> PackedSequences:
        """The same documents with every token expanded to ``steps`` consecutive steps
        (DeltaProduct's interleaved sequence): boundaries times ``steps``. Built once, no host read."""
        if steps == 1:
            return self
        key = ("interleaved", steps)
        if key not in self._derived:
            self._derived[key] = PackedSequences._build(self.cu_seqlens * steps, tuple(o * steps for o in self.offsets),
                                                        lead=self.lead * steps)
        return self._derived[key]


def as_packed(cu_seqlens: torch.Tensor | PackedSequences | None, total_tokens: int) -> PackedSequences | None:
    """``cu_seqlens`` as a :class:`PackedSequences` (validated; a raw tensor costs its one host
    read here), or None."""
    if cu_seqlens is None:
        return None
    return PackedSequences.from_cu_seqlens(cu_seqlens, total_tokens)
