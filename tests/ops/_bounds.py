"""Out-of-bounds checks for Triton kernels run by the interpreter (``TRITON_INTERPRET=1``).

On a GPU an access outside its tensor reads another allocation's bytes (a wrong answer) or faults
("illegal memory access", which poisons the CUDA context for the rest of the process); the
interpreter reads host memory and usually neither faults nor tells. Inside :func:`checked_bounds`
every masked load and store of an interpreted kernel is checked: each address it touches must lie
inside the storage of one of that launch's tensor arguments, or :class:`OutOfBounds` names the
kernel, the access and how far outside it went.

    with checked_bounds() as log:
        chunk_linear_attention(q, k, v, cu_seqlens=cu)
    assert log.launches  # it saw the kernels
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np


class OutOfBounds(AssertionError):
    pass


@dataclasses.dataclass
class BoundsLog:
    launches: list[str] = dataclasses.field(default_factory=list)
    accesses: int = 0


def _storages(args) -> list[tuple[int, int]]:
    out = []
    for a in args:
        if isinstance(a, (tuple, list)):
            out += _storages(a)
        elif hasattr(a, "untyped_storage"):
            s = a.untyped_storage()
            out.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
    return out


@contextlib.contextmanager
def checked_bounds():
    """Check every interpreted load / store for the duration (see the module docstring)."""
    from triton.runtime import interpreter as itp

    log = BoundsLog()
    ranges: list[tuple[int, int]] = []
    kernel = [""]
    init, load, store = (itp.GridExecutor._init_args_hst, itp.InterpreterBuilder.create_masked_load,
                         itp.InterpreterBuilder.create_masked_store)

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = init(self, args_dev, kwargs)
        ranges[:] = _storages(list(args_hst) + list(kwargs_hst.values()))
        kernel[0] = getattr(self.fn, "__name__", repr(self.fn))
        log.launches.append(kernel[0])
        return args_hst, kwargs_hst

    def check(ptrs, mask, what):
        addr = np.asarray(ptrs.data, dtype=np.uint64)
        active = addr[np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)]
        if active.size == 0:
            return
        log.accesses += int(active.size)
        size = np.dtype(itp._get_np_dtype(ptrs.get_element_ty())).itemsize
        lo, hi = int(active.min()), int(active.max()) + size
        inside = np.zeros(active.shape, dtype=bool)
        for start, end in ranges:
            inside |= (active >= start) & (active + size <= end)
        if not inside.all():
            bad = int(active[~inside][0])
            near = min(ranges, key=lambda r: min(abs(bad - r[0]), abs(bad - r[1])))
            raise OutOfBounds(f"{kernel[0]}: {what} of {int((~inside).sum())} element(s) outside every tensor "
                              f"argument, first at {bad - near[0]:+d} B from the start of the nearest "
                              f"(storage of {near[1] - near[0]} B); accessed span [{lo}, {hi})")

    def masked_load(self, ptrs, mask, other, *a, **kw):
        check(ptrs, mask, "load")
        return load(self, ptrs, mask, other, *a, **kw)

    def masked_store(self, ptrs, value, mask, *a, **kw):
        check(ptrs, mask, "store")
        return store(self, ptrs, value, mask, *a, **kw)

    itp.GridExecutor._init_args_hst = init_args
    itp.InterpreterBuilder.create_masked_load = masked_load
    itp.InterpreterBuilder.create_masked_store = masked_store
    try:
        yield log
    finally:
        itp.GridExecutor._init_args_hst = init
        itp.InterpreterBuilder.create_masked_load = load
        itp.InterpreterBuilder.create_masked_store = store
