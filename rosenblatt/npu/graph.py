"""GEMMs with dependencies in the fewest SUBMITs: a dependency graph run level by level.

A caller has products whose inputs it computes on the CPU from the results of other products
(what the matrices mean is its business). A :class:`GemmNode` names its prepared weights, its
input (an int8 array, or a callable that returns it once the node's dependencies are done) and
the nodes it depends on. :func:`submit_levels` puts every node in the earliest level after all of
its dependencies (longest-path layering): that is the fewest SUBMITs the dependencies allow,
because each dependency goes through the CPU (the caller's ``done`` and input callables run
between SUBMITs) and so cannot be a job-to-job dependency inside one SUBMIT.
:func:`run_gemm_graph` runs each level as one SUBMIT (:func:`~rosenblatt.npu.gemm.matmul_int8_batch`).

Within a level the order is node order: inputs are built in node order, the products' jobs are
submitted in node order (the driver runs one fd's jobs in submit order,
``hw_assumptions.JOBS_RUN_IN_SUBMIT_ORDER``) and ``done`` callbacks run in node order after the
level's SUBMIT completed, before the next level's inputs are built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import NPUPlanError
from .gemm import PreparedWeights, matmul_int8_batch


@dataclass
class GemmNode:
    """One product ``a @ weights`` of a graph. ``a``: int8 [M, K], or a callable returning it
    (called once every node of ``deps`` is done). ``deps``: indices of earlier nodes.
    ``done(c)``: called with the int32 result."""

    weights: PreparedWeights
    a: object
    deps: tuple = ()
    done: Callable[[np.ndarray], None] | None = None


def submit_levels(deps) -> list[list[int]]:
    """The nodes (given as their dependency tuples, node i's only on nodes < i) grouped into
    levels: level of a node = 1 + the highest level of its dependencies (0 without any). Each
    level is one SUBMIT; their number is the length of the longest dependency chain, the fewest
    SUBMITs possible when every dependency needs the CPU in between."""
    level: list[int] = []
    for i, ds in enumerate(deps):
        ds = tuple(ds)
        for d in ds:
            if not isinstance(d, (int, np.integer)) or not 0 <= d < i:
                raise NPUPlanError(f"node {i} depends on {d!r}: dependencies must be earlier nodes")
        level.append(1 + max((level[d] for d in ds), default=-1))
    out: list[list[int]] = [[] for _ in range(max(level, default=-1) + 1)]
    for i, lv in enumerate(level):
        out[lv].append(i)
    return out


def run_gemm_graph(nodes: list[GemmNode], device) -> list[np.ndarray]:
    """Run ``nodes`` level by level, one SUBMIT per level; returns the int32 results in node order."""
    results: list = [None] * len(nodes)
    for level in submit_levels([n.deps for n in nodes]):
        items = []
        for i in level:
            a = nodes[i].a() if callable(nodes[i].a) else nodes[i].a
            items.append((a, nodes[i].weights))
        for i, c in zip(level, matmul_int8_batch(items, device)):
            results[i] = c
            if nodes[i].done is not None:
                nodes[i].done(c)
    return results


__all__ = ["GemmNode", "run_gemm_graph", "submit_levels"]
