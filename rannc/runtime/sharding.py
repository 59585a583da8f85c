"""Sharded stages (ZeRO-2 and ZeRO-3): a stage's gradients, and with ZeRO-3 its parameters, divided among its
replicas.

Parameter-granular, as ZeRO-1 here (and fairscale's OSS / ShardedDDP): every parameter used by this stage only
has one owner among the stage's replicas (largest first, to the least loaded replica). The owner alone keeps its
optimizer state and steps it with the user's optimizer, which sees whole parameters, so any optimizer stays exact
(per-tensor norms included) and the optimizer's global state dicts and the checkpoints are ZeRO-1's. Parameters
are grouped into *units* (consecutive parameters in order of first use, about one block's bytes each), the
granularity of every collective below; a unit's buffer holds each replica's owned parameters back to back (its
*segment*) followed by one tag element, checked after every collective so that replicas that ever disagreed on
the order of collectives fail loudly instead of mixing parameters.

ZeRO-2: parameters whole on every replica; gradients accumulate over the microbatches as without sharding, and at
the step's last backward each unit's gradients are reduced to their owners (`OwnerReduce`, fed by the gradient
hooks of the overlapped reduce; one `reduce` per owner segment) instead of all-reduced. Non-owners keep no
gradient; after the optimizer step the owner broadcasts the new value (ZeRO-1's broadcast).

ZeRO-3: non-owners hold an empty placeholder. The stage graph is rewritten (`sharded_graph_module`) so that each
unit is gathered (one broadcast per owner segment) just before the first operation that uses it; the gathered
tensors are graph values, freed after their last use in forward. Autograd saves a handle instead of a gathered
parameter (`saved_tensors_hooks`) and gathers the unit again when backward needs it (at most GATHER_CACHE units
held). Each unit's gradients are reduced to their owners as soon as backward has produced them, every
microbatch, so no replica holds the stage's parameters or gradients whole. Collectives in backward follow
autograd's order, which is the same on every replica (the same graph, run by the same engine).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import operator
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.fx as fx

from ..errors import RanncError
from ..plan.types import ShardLevel
from .failures import guarded, wait_all
from .grad_sync import OverlappedReduce

GATHER_CACHE = 2  # units a ZeRO-3 backward keeps gathered (the one in use and the one before it)
_IN_FLIGHT = 2  # ZeRO-3 gradient reduces a backward lets run before waiting for the oldest


@dataclasses.dataclass(frozen=True)
class ShardAssignment:
    """Which parameters are sharded at which level, and their owners (every stage's)."""

    levels: dict[str, ShardLevel]  # canonical parameter name -> its stage's level (ZeRO-1, 2 or 3)
    owner: dict[str, int]  # canonical parameter name -> the rank that owns it

    @property
    def gathered(self) -> frozenset[str]:
        """Parameters held by their owner only (ZeRO-3)."""
        return frozenset(n for n, level in self.levels.items() if level.shards_parameters)


def assign_shards(
    stage_levels: Sequence[ShardLevel],
    stage_ranks: Sequence[Sequence[int]],
    rank_sets: dict[str, tuple[int, ...]],
    sizes: dict[str, int],
) -> ShardAssignment:
    """Owners of the parameters of every sharded stage with replicas (the same on every rank): the parameters
    held by exactly that stage's ranks, largest first, each to the replica owning the fewest bytes so far."""
    levels: dict[str, ShardLevel] = {}
    owner: dict[str, int] = {}
    for level, ranks in zip(stage_levels, stage_ranks):
        key = tuple(sorted(ranks))
        if not level.shards_optimizer or len(key) < 2:
            continue
        load = dict.fromkeys(key, 0)
        names = [name for name, held in rank_sets.items() if held == key]
        for name in sorted(names, key=lambda n: (-sizes.get(n, 0), n)):
            chosen = min(key, key=lambda r: (load[r], r))
            load[chosen] += sizes.get(name, 0)
            owner[name] = chosen
            levels[name] = level
    return ShardAssignment(levels, owner)


@dataclasses.dataclass(frozen=True)
class Unit:
    """Parameters gathered and reduced together, in order of first use; one dtype."""

    index: int
    names: tuple[str, ...]
    segments: tuple[
        tuple[str, ...], ...
    ]  # per replica (stage rank order): the names it owns, in `names` order


class _Place(NamedTuple):
    start: int
    numel: int
    shape: torch.Size


class _Layout:
    """Where each parameter and each replica's tag lie in a unit's flat buffer."""

    def __init__(self, unit: Unit, params: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> None:
        self.places: dict[str, _Place] = {}
        self.segments: list[tuple[int, int]] = []  # (start, end) per replica, the tag at end - 1
        offset = 0
        for names in unit.segments:
            start = offset
            for name in names:
                numel = shapes[name].numel()
                self.places[name] = _Place(offset, numel, shapes[name])
                offset += numel
            offset += 1  # the tag
            self.segments.append((start, offset))
        self.total = offset
        self.dtype = params[unit.names[0]].dtype
        self.tag = float(unit.index % 64 + 1)  # exact in every floating dtype


class _Saved(NamedTuple):
    """What autograd keeps of a gathered parameter it saves for backward (ZeRO-3): where it lies in its unit."""

    unit: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def stage_units(
    order: Sequence[str],
    params: dict[str, torch.Tensor],
    shapes: dict[str, torch.Size],
    owner: dict[str, int],
    ranks: Sequence[int],
    target_bytes: float,
) -> list[Unit]:
    """Consecutive parameters of `order` (first use first) of one dtype, each unit up to `target_bytes` (one
    parameter at least)."""
    units: list[Unit] = []
    current: list[str] = []
    size = 0.0

    def close() -> None:
        segments = tuple(tuple(n for n in current if owner[n] == rank) for rank in ranks)
        units.append(Unit(len(units), tuple(current), segments))

    for name in order:
        nbytes = shapes[name].numel() * params[name].dtype.itemsize
        if current and (size + nbytes > target_bytes or params[current[0]].dtype != params[name].dtype):
            close()
            current, size = [], 0.0
        current.append(name)
        size += nbytes
    if current:
        close()
    return units


class StageSharding:
    """One rank's part in its ZeRO-2/3 stage: the units, their collectives, and (ZeRO-3) gathering for autograd."""

    def __init__(
        self,
        level: ShardLevel,
        units: list[Unit],
        ranks: Sequence[int],
        rank: int,
        group: Any,
        params: dict[str, torch.Tensor],
        shapes: dict[str, torch.Size],
        device: torch.device,
    ) -> None:
        if not level.shards_gradients:
            raise ValueError(f"StageSharding is for ZeRO-2 and ZeRO-3 stages, not {level}")
        self.level = level
        self.units = units
        self.ranks = list(ranks)
        self.position = self.ranks.index(rank)
        self.group = group
        self.params = params  # canonical name -> the user's Parameter (empty on non-owners with ZeRO-3)
        self.shapes = shapes  # canonical name -> full shape
        self.layouts = [_Layout(unit, params, shapes) for unit in units]
        self.names = frozenset(name for unit in units for name in unit.names)
        self.mine = frozenset(name for unit in units for name in unit.segments[self.position])
        self.device = device
        # ZeRO-3: a leaf per unit its gathers hang from, so that each backward reaches every unit it used (one per
        # unit: a zero-bubble W pass reaches each unit's from that unit's own uses, not through the others)
        self.anchors = [torch.zeros((), device=device, requires_grad=True) for _ in units]
        self._live: dict[int, tuple[int, weakref.ref[torch.Tensor]]] = {}
        self._cache: collections.OrderedDict[int, torch.Tensor] = collections.OrderedDict()
        self._reduces: collections.deque[tuple[int, torch.Tensor, list[Any]]] = collections.deque()
        self._reduced: dict[str, torch.Tensor] = {}

    @property
    def gathers(self) -> bool:
        return self.level.shards_parameters

    # ---- collectives of one unit -------------------------------------------------------------------------
    def gather(self, index: int) -> torch.Tensor:
        """The unit's flat buffer with every replica's parameters (each owner broadcasts its segment)."""
        layout = self.layouts[index]
        flat = torch.empty(layout.total, dtype=layout.dtype, device=self.device)
        start, end = layout.segments[self.position]
        with torch.no_grad():
            for name in self.units[index].segments[self.position]:
                place = layout.places[name]
                flat[place.start : place.start + place.numel].copy_(self.params[name].reshape(-1))
            flat[end - 1] = layout.tag
        what = f"gathering parameter unit {index} of a ZeRO-3 stage"
        with guarded(lambda: what):
            works = [
                dist.broadcast(flat[lo:hi], src=src, group=self.group, async_op=True)
                for src, (lo, hi) in zip(self.ranks, layout.segments)
            ]
        wait_all(works, lambda: what)
        self._check_tags(flat, layout, [hi - 1 for _, hi in layout.segments], layout.tag, what)
        return flat

    def views(self, index: int, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every parameter of the unit as a view of its flat buffer (in `Unit.names` order)."""
        places = self.layouts[index].places
        return tuple(
            flat[p.start : p.start + p.numel].view(p.shape)
            for p in (places[name] for name in self.units[index].names)
        )

    def launch_reduce(self, index: int, grads: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[Any]]:
        """Start reducing the unit's gradients (`grads`, zeros where absent) to their owners: one `reduce`
        per owner segment. Returns the flat buffer (this rank's segment holds the sum once the works end)."""
        layout = self.layouts[index]
        flat = torch.zeros(layout.total, dtype=layout.dtype, device=self.device)
        with torch.no_grad():
            for name, grad in grads.items():
                place = layout.places[name]
                flat[place.start : place.start + place.numel].copy_(grad.reshape(-1))
            for _, end in layout.segments:
                flat[end - 1] = layout.tag
        what = f"reducing the gradients of parameter unit {index} to their owners"
        with guarded(lambda: what):
            works = [
                dist.reduce(flat[lo:hi], dst=dst, group=self.group, async_op=True)
                for dst, (lo, hi) in zip(self.ranks, layout.segments)
            ]
        return flat, works

    def owned_grads(self, index: int, flat: torch.Tensor, works: list[Any]) -> dict[str, torch.Tensor]:
        """Wait for a launched reduce; this rank's parameters' summed gradients (views of `flat`)."""
        what = f"reducing the gradients of parameter unit {index} to their owners"
        wait_all(works, lambda: what)
        layout = self.layouts[index]
        end = layout.segments[self.position][1]
        self._check_tags(flat, layout, [end - 1], layout.tag * len(self.ranks), what)
        places = layout.places
        return {
            name: flat[places[name].start : places[name].start + places[name].numel].view(places[name].shape)
            for name in self.units[index].segments[self.position]
        }

    def _check_tags(
        self, flat: torch.Tensor, layout: _Layout, where: list[int], expected: float, what: str
    ) -> None:
        got = flat[where].double().tolist()
        if any(value != expected for value in got):
            raise RanncError(
                f"the replicas of a sharded stage disagree on the order of their collectives while {what} "
                f"(unit tags {got}, expected {expected}); this is a rannc bug: report it, and set "
                "shard_stages='none' to train without sharding meanwhile"
            )

    # ---- ZeRO-3: the forward's gathers and autograd's saved parameters -----------------------------------
    def gathered_for_graph(self, index: int) -> tuple[torch.Tensor, ...]:
        """The unit's parameters for the stage graph, gathered now; their gradients are reduced in backward."""
        return _GatherUnit.apply(self.anchors[index], self, index)

    def saving(self) -> torch.autograd.graph.saved_tensors_hooks:
        """Around a ZeRO-3 forward that keeps graphs: autograd keeps handles, not gathered parameters."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _track(self, index: int, flat: torch.Tensor) -> None:
        key = id(flat)
        self._live[key] = (index, weakref.ref(flat, lambda _ref, key=key: self._live.pop(key, None)))

    def _pack(self, tensor: torch.Tensor) -> Any:
        base = tensor._base if tensor._base is not None else tensor
        entry = self._live.get(id(base))
        if entry is None or entry[1]() is not base:
            return tensor
        return _Saved(entry[0], tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())

    def _unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, _Saved):
            return saved
        flat = self._cache.get(saved.unit)
        if flat is None:
            flat = self._cache[saved.unit] = self.gather(saved.unit)
            while len(self._cache) > GATHER_CACHE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(saved.unit)
        return flat.as_strided(saved.size, saved.stride, saved.offset)

    def _unit_backward(self, index: int, grads: Sequence[torch.Tensor | None]) -> None:
        present = {name: g for name, g in zip(self.units[index].names, grads) if g is not None}
        flat, works = self.launch_reduce(index, present)
        self._reduces.append((index, flat, works))
        while len(self._reduces) > _IN_FLIGHT:
            self._settle_oldest()

    def _settle_oldest(self) -> None:
        index, flat, works = self._reduces.popleft()
        for name, grad in self.owned_grads(index, flat, works).items():
            total = self._reduced.get(name)
            self._reduced[name] = grad if total is None else total.add_(grad)

    def backward_done(self) -> dict[str, torch.Tensor]:
        """After one microbatch's backward: this rank's summed gradients of the units it reached; the units
        gathered again for it are released."""
        while self._reduces:
            self._settle_oldest()
        self._cache.clear()
        reduced, self._reduced = self._reduced, {}
        return reduced

    # ---- the step's gradients ------------------------------------------------------------------------------
    def owner_reduce(self, accumulated: dict[str, torch.Tensor]) -> OwnerReduce:
        """ZeRO-2: the step's reduce to the owners, fed by the last backward's gradient hooks."""
        buckets = [list(self.units[k].names) for k in reversed(range(len(self.units)))]
        return OwnerReduce(self, buckets, accumulated)

    def settle(self, pending: dict[str, torch.Tensor], reduced_already: bool) -> dict[str, torch.Tensor]:
        """Take the sharded parameters' gradients out of `pending` (a step's, scaled): this rank's owned
        gradients summed over the replicas. ZeRO-3 reduced them every microbatch; ZeRO-2 reduces them here
        unless an `OwnerReduce` did during the backward (`reduced_already`)."""
        grads = {name: pending.pop(name) for name in list(pending) if name in self.names}
        if self.gathers:
            return {name: grads.get(name, _zeros(self.params[name])) for name in self.mine}
        if reduced_already:
            return {}
        owned: dict[str, torch.Tensor] = {}
        for unit in self.units:
            present = {name: grads[name] for name in unit.names if name in grads}
            flat, works = self.launch_reduce(unit.index, present)
            owned.update(self.owned_grads(unit.index, flat, works))
        return owned


class OwnerReduce(OverlappedReduce):
    """ZeRO-2's step reduce: like OverlappedReduce (buckets are units, last first, launched in order as they
    become final), each unit reduced to its owners; `finish` returns this rank's owned gradients."""

    def __init__(
        self, sharding: StageSharding, buckets: list[list[str]], accumulated: dict[str, torch.Tensor]
    ) -> None:
        super().__init__(sharding.group, buckets, sharding.params, accumulated)
        self.sharding = sharding
        count = len(sharding.units)
        self.unit_of_bucket = [count - 1 - k for k in range(count)]
        self.works: list[tuple[int, torch.Tensor, list[Any]]] = []

    def _launch(self, k: int) -> None:
        index = self.unit_of_bucket[k]
        grads = {name: self.finals.pop(name) for name in self.buckets[k]}
        flat, works = self.sharding.launch_reduce(index, grads)
        self.launched.append((flat, None))
        self.works.append((index, flat, works))

    def finish(self) -> dict[str, torch.Tensor]:
        for k in range(len(self.launched), len(self.buckets)):
            for name in self.buckets[k]:
                if name not in self.finals:
                    total = self.accumulated.pop(name, None)
                    self.finals[name] = _zeros(self.params[name]) if total is None else total
            self._launch(k)
        owned: dict[str, torch.Tensor] = {}
        for index, flat, works in self.works:
            owned.update(self.sharding.owned_grads(index, flat, works))
        return owned


class _GatherUnit(torch.autograd.Function):
    """Gather a unit for the stage graph (forward); reduce its gradients to their owners (backward)."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, sharding: StageSharding, index: int) -> Any:
        ctx.sharding, ctx.index = sharding, index
        flat = sharding.gather(index)
        sharding._track(index, flat)
        return sharding.views(index, flat)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[None, None, None]:
        ctx.sharding._unit_backward(ctx.index, grads)
        return None, None, None


class _Gather(torch.nn.Module):
    """A call_module target of the rewritten stage graph: gathers one unit."""

    def __init__(self, sharding: StageSharding, index: int) -> None:
        super().__init__()
        self.sharding = sharding
        self.index = index

    def forward(self) -> tuple[torch.Tensor, ...]:
        return self.sharding.gathered_for_graph(self.index)


def first_use_order(module: fx.GraphModule, placeholders: dict[str, list[str]]) -> list[str]:
    """Canonical names of `placeholders` (name -> its placeholder nodes) by their first use in the graph."""
    position = {node.name: k for k, node in enumerate(module.graph.nodes)}
    nodes = {node.name: node for node in module.graph.nodes}

    def first(name: str) -> int:
        uses = [position[u.name] for p in placeholders[name] for u in nodes[p].users]
        return min(uses, default=len(position))

    return sorted(placeholders, key=lambda name: (first(name), name))


def sharded_graph_module(
    module: fx.GraphModule, placeholders: dict[str, list[str]], sharding: StageSharding
) -> fx.GraphModule:
    """The stage graph with each unit's parameters gathered just before their first use (ZeRO-3); the
    parameters' placeholders stay (unused), so it is called with the stage's usual arguments."""
    graph = copy.deepcopy(module.graph)
    nodes = {node.name: node for node in graph.nodes}
    position = {node: k for k, node in enumerate(graph.nodes)}
    root = torch.nn.Module()
    for unit in sharding.units:
        uses = [user for name in unit.names for p in placeholders[name] for user in nodes[p].users]
        if not uses:
            continue
        target = f"rannc_gather_{unit.index}"
        root.add_module(target, _Gather(sharding, unit.index))
        with graph.inserting_before(min(uses, key=position.__getitem__)):
            gathered = graph.call_module(target, ())
            for k, name in enumerate(unit.names):
                item = graph.call_function(operator.getitem, (gathered, k))
                for p in placeholders[name]:
                    nodes[p].replace_all_uses_with(item)
    graph.lint()
    return fx.GraphModule(root, graph)


def release_unowned(tensors: dict[str, torch.Tensor], names: Iterable[str]) -> None:
    """ZeRO-3: drop this rank's copy of parameters other replicas own (an empty placeholder stays)."""
    for name in names:
        tensor = tensors[name]
        tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)


def _zeros(param: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(param)
