"""One microbatch's backward split in two: its input gradients now (I), its parameter gradients later (W).

Zero-bubble pipelines (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024) send a stage's input gradients
to the stage before it as soon as they are known and compute the parameter gradients later, in what would be
bubbles. `input_grads` runs the I pass: `torch.autograd.grad` from the stage's outputs to its inputs only, keeping
the graph. The autograd nodes on some path to an input (the input path) run in I; a parameter's gradient flows
from its nodes up to the outputs, and where that way first meets the input path (the join) hooks catch the
gradient arriving there. `WeightGrads.compute` (the W pass) starts from the caught gradients (and from the outputs'
own gradients where a parameter's way reaches an output without meeting the input path) and runs only the nodes
between them and the parameters: nothing of I runs again, except the input path between two joins of one
parameter group (a weight used twice, one use feeding the other), where the later join's caught gradient replaces
what arrives there so that nothing is counted twice.

Example::

    outputs = stage(x)  # x: a received activation (requires grad), params: the stage's parameters
    grads_of_x, weights = input_grads(outputs, output_grads, [x], params)
    send(grads_of_x)  # the stage before goes on
    ...
    grads_of_params = weights.compute()  # in a later bubble; frees the graph
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

__all__ = ["WeightGrads", "input_grads"]


@dataclasses.dataclass
class _Group:
    """Parameters whose gradients start from the same joins (a parameter is in exactly one group)."""

    params: list[int]  # indices into WeightGrads.params
    joins: list[Node]  # nodes of the input path where the parameters' way meets it (gradients caught in I)
    roots: list[tuple[Node, int]]  # output edges reached without meeting the input path (their seeds)


@dataclasses.dataclass
class WeightGrads:
    """What an I pass leaves for its W pass: the parameters, their groups and the gradients caught at the
    joins. Holds the microbatch's autograd graph until `compute` (or `release`)."""

    params: list[torch.Tensor]  # the parameters, then the anchors (see `input_grads`)
    groups: list[_Group]
    caught: dict[Node, tuple[torch.Tensor | None, ...]]
    seeds: dict[tuple[Node, int], torch.Tensor]
    returned: int  # how many of `params` are parameters (gradients returned)

    def compute(self) -> list[torch.Tensor | None]:
        """The gradient of every parameter (None: not reached), one `torch.autograd.grad` per group; the
        parameters' tensor hooks fire as in a whole backward. Frees the graph."""
        found: list[torch.Tensor | None] = [None] * self.returned
        try:
            for group in self.groups:
                edges: list[GradientEdge] = []
                grads: list[torch.Tensor] = []
                for node in group.joins:
                    for slot, grad in enumerate(self.caught.get(node, ())):
                        if grad is not None:
                            edges.append(GradientEdge(node, slot))
                            grads.append(grad)
                for node, slot in group.roots:
                    edges.append(GradientEdge(node, slot))
                    grads.append(self.seeds[node, slot])
                if not edges:
                    continue
                handles = []
                if len(group.joins) > 1:  # a join fed by another: it gets what I caught there, once
                    handles = [
                        node.register_prehook(_replace_with(self.caught.get(node))) for node in group.joins
                    ]
                try:
                    results = torch.autograd.grad(
                        edges,
                        [self.params[k] for k in group.params],
                        grads,
                        retain_graph=True,  # groups may share input-path nodes between their joins
                        allow_unused=True,
                    )
                finally:
                    for handle in handles:
                        handle.remove()
                for k, grad in zip(group.params, results):
                    if k < self.returned:
                        found[k] = grad
        finally:
            self.release()
        return found

    def caught_tensors(self) -> list[torch.Tensor]:
        """The gradients the I pass caught for this W pass (what a microbatch keeps between them)."""
        return [grad for grads in self.caught.values() for grad in grads if grad is not None]

    def release(self) -> None:
        """Drop the graph and the caught gradients (W ran, or the call is abandoned)."""
        self.groups, self.caught, self.seeds = [], {}, {}


def _replace_with(
    caught: tuple[torch.Tensor | None, ...] | None,
):  # noqa: ANN202 - an autograd pre-hook
    def hook(grads: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
        return caught if caught is not None else tuple(None for _ in grads)

    return hook


def input_grads(
    outputs: Sequence[torch.Tensor],
    output_grads: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor] = (),
) -> tuple[list[torch.Tensor | None], WeightGrads]:
    """The I pass: the gradients of `inputs` (None: not reached) from `outputs` seeded with `output_grads`,
    and what the W pass needs for the gradients of `params` (leaves that require grad). `outputs` must require
    grad; the graph is kept for the W pass.

    `anchors`: leaves whose gradients nobody reads but whose uses' backwards must run in W, as a parameter's
    (ZeRO-3's gathers of a unit hang from the unit's anchor: their backward reduces the unit's gradients). An
    anchor used in several places (joins one of which feeds another) makes W run the input path between them."""
    seeds: dict[tuple[Node, int], torch.Tensor] = {}
    for tensor, grad in zip(outputs, output_grads):
        edge = get_gradient_edge(tensor)
        key = (edge.node, edge.output_nr)
        seeds[key] = grad if key not in seeds else seeds[key] + grad
    roots = {node for node, _ in seeds}
    consumers = _consumers(roots)
    input_nodes = {get_gradient_edge(t).node for t in inputs}
    on_input_path = _upstream(input_nodes & consumers.keys(), consumers)
    leaves = [*params, *anchors]
    groups = _groups([get_gradient_edge(leaf).node for leaf in leaves], seeds, on_input_path, consumers)
    joins = list({node: None for group in groups for node in group.joins})
    caught: dict[Node, tuple[torch.Tensor | None, ...]] = {}

    def catcher(node: Node):  # noqa: ANN202 - an autograd pre-hook
        def hook(grads: tuple[torch.Tensor | None, ...]) -> None:
            caught[node] = tuple(grads)

        return hook

    handles = [node.register_prehook(catcher(node)) for node in joins]
    try:
        reached = [k for k, t in enumerate(inputs) if get_gradient_edge(t).node in on_input_path]
        found: list[torch.Tensor | None] = [None] * len(inputs)
        if reached:
            results = torch.autograd.grad(
                list(outputs),
                [inputs[k] for k in reached],
                list(output_grads),
                retain_graph=True,
                allow_unused=True,
            )
            for k, grad in zip(reached, results):
                found[k] = grad
    finally:
        for handle in handles:
            handle.remove()
    return found, WeightGrads(leaves, groups, caught, seeds, len(params))


def _consumers(roots: set[Node]) -> dict[Node, list[Node]]:
    """Every node reachable from `roots` (through next_functions) -> the nodes that feed it a gradient."""
    consumers: dict[Node, list[Node]] = {root: [] for root in roots}
    queue = collections.deque(roots)
    while queue:
        node = queue.popleft()
        for child, _ in node.next_functions:
            if child is None:
                continue
            if child not in consumers:
                consumers[child] = []
                queue.append(child)
            consumers[child].append(node)
    return consumers


def _upstream(starts: set[Node], consumers: dict[Node, list[Node]]) -> set[Node]:
    """`starts` and every node from which one of them is reachable (the nodes a gradient to them runs through)."""
    seen = set(starts)
    queue = collections.deque(starts)
    while queue:
        for parent in consumers[queue.popleft()]:
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return seen


def _groups(
    starts: Sequence[Node],
    seeds: dict[tuple[Node, int], torch.Tensor],
    on_input_path: set[Node],
    consumers: dict[Node, list[Node]],
) -> list[_Group]:
    """The parameter groups: parameters (their nodes `starts`) joined by a shared join or output node. Orders
    follow the graph (not hashes), so that every run sums gradients in the same order."""
    roots = {node for node, _ in seeds}
    # param index -> joins, outputs met off the input path (dicts as ordered sets)
    reach: dict[int, tuple[dict[Node, None], dict[Node, None]]] = {}
    for k, node in enumerate(starts):
        if node not in consumers:
            continue  # not used by this microbatch's graph
        joins: dict[Node, None] = {}
        ends: dict[Node, None] = {}
        seen = {node}
        queue = collections.deque([node])
        while queue:
            current = queue.popleft()
            if current in on_input_path:
                joins[current] = None
                continue
            if current in roots:
                ends[current] = None  # an output's own gradient feeds it (and maybe more from above)
            for parent in consumers[current]:
                if parent not in seen:
                    seen.add(parent)
                    queue.append(parent)
        reach[k] = (joins, ends)
    leader = {k: k for k in reach}  # union-find of parameters over the nodes they start from

    def find(k: int) -> int:
        while leader[k] != k:
            leader[k] = leader[leader[k]]
            k = leader[k]
        return k

    owner: dict[Node, int] = {}
    for k, (joins, ends) in reach.items():
        for node in [*joins, *ends]:
            if node in owner:
                leader[find(k)] = find(owner[node])
            else:
                owner[node] = k
    members: dict[int, list[int]] = {}
    for k in reach:
        members.setdefault(find(k), []).append(k)
    groups = []
    for indices in members.values():
        joins = {node: None for k in indices for node in reach[k][0]}
        ends = {node: None for k in indices for node in reach[k][1]}
        slots = [(node, slot) for node, slot in seeds if node in ends]
        groups.append(_Group(params=indices, joins=list(joins), roots=slots))
    return groups
