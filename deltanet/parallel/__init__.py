"""Parallelism across devices beyond data parallelism.

``context``: context (sequence) parallelism for the delta rule: one long sequence split over
the ranks of a process group, exact, exchanging only ``[K, K + V]`` state summaries.
"""

from .context import context_parallel_delta_rule, exchange_halo, gather_segments, split_segment

__all__ = ["context_parallel_delta_rule", "exchange_halo", "gather_segments", "split_segment"]
