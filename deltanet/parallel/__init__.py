"""Parallelism across devices beyond data parallelism.

``context``: context (sequence) parallelism for the delta rule: one long sequence split over
the ranks of a process group, exact, exchanging only ``[K, K + V]`` state summaries; also
additive linear attention, and packed documents (``cu_seqlens``) spanning ranks.
``halo``: where each rank's segment sits (``SegmentLayout``) and the rows a causal window
(short convolution, attention) reaches from the earlier ranks, stopping at document starts.
``attention``: context parallelism for causal full and sliding-window softmax attention, exact,
exchanging the keys/values each segment's queries reach before it (a halo, possibly over several ranks).
"""

from .attention import context_parallel_attention
from .context import context_parallel_delta_rule, context_parallel_linear_attention, gather_segments, split_segment
from .halo import SegmentLayout, exchange_halo, exchange_kv_halo

__all__ = ["SegmentLayout", "context_parallel_attention", "context_parallel_delta_rule",
           "context_parallel_linear_attention", "exchange_halo",
           "exchange_kv_halo", "gather_segments", "split_segment"]
