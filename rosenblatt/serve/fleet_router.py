"""The fleet's request router: Ray Serve's own routing, told each board's slot occupancy.

Each board replica reports ``{"slots", "running", "queued"}`` through Ray Serve's routing stats
(``record_routing_stats``, polled every second). The replicas with a free slot in their last
report come first, the full ones after; within a rank Ray Serve's router takes the replica with
the fewest requests in flight (its own up-to-date count, bounded by ``max_ongoing_requests``).
So a board whose slots were all taken at its last report gets work only when no other board
has room. Requests that no replica accepts wait in the router, first come first served.

This module imports ray (Ray Serve sends it to the routers by value); only
:mod:`rosenblatt.serve.fleet` imports it.
"""

from __future__ import annotations

import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


def free_slots(replica: RunningReplica) -> int | None:
    """Free slots in the replica's last report (None before its first)."""
    stats = replica.routing_stats or {}
    try:
        return int(stats["slots"]) - int(stats["running"]) - int(stats["queued"])
    except (KeyError, TypeError, ValueError):
        return None


class SlotRouter(FIFOMixin, RequestRouter):
    """Two ranks: the replicas with a free slot in their last report (or no report yet), then
    the full ones."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        free, full = [], []
        for r in candidate_replicas:
            n = free_slots(r)
            (full if n is not None and n <= 0 else free).append(r)
        random.shuffle(free)            # ties in the in-flight count: no board favoured
        random.shuffle(full)
        return [rank for rank in (free, full) if rank]
