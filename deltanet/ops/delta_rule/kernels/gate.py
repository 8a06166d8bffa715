"""The gate of the gated delta rule: within-chunk cumulative sums of the log decay.

Forward: ``G[t] = g[t0] + ... + g[t]`` for token ``t`` of a chunk starting at ``t0`` (fp32,
whatever g's dtype). Every gated stage reads G, never g: the chunk forms need only differences
``G_i - G_j`` inside a chunk and ``G`` at the chunk's last token (README.md derives them).

Backward: ``dg[t] = dG[t] + ... + dG[t_last]``, the same sum in reverse within the chunk
(``REVERSE``), over the per-token terms of the gradient of g (README.md §7).
"""

import triton
import triton.language as tl

from .wy import _chunk_base


@triton.jit
def chunk_cumsum_kernel(g, gc, cu_seqlens, chunk_table, H: tl.constexpr, BT: tl.constexpr,
                        REVERSE: tl.constexpr = False):
    """Grid ``(chunks, H)``; ``g, gc: [TT, H]``."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    row, n = _chunk_base(cu_seqlens, chunk_table, i_t, i_h, H, BT)
    rt = tl.arange(0, BT)
    mt = rt < n
    b_g = tl.load(g + row + rt * H, mask=mt, other=0.0).to(tl.float32)
    if REVERSE:  # sum over s >= t: the total minus the sum over s < t
        b_c = tl.sum(b_g, 0) - tl.cumsum(b_g, 0) + b_g
    else:
        b_c = tl.cumsum(b_g, 0)
    tl.store(gc + row + rt * H, b_c, mask=mt)
