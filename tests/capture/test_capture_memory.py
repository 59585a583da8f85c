"""What a capture leaves alive: only the nodes of the captured graph (fx keeps erased nodes in its name
table, and export's last trace in a module-level map, unless rannc lets go of them)."""

from __future__ import annotations

import gc

import torch
import transformers
from torch import fx

from rannc.capture import capture


def _nodes_of(graph: fx.Graph) -> list[fx.Node]:
    return [
        obj for obj in gc.get_objects() if type(obj) is fx.Node and obj.graph is graph and obj.op != "root"
    ]


def test_capture_keeps_no_erased_node_alive() -> None:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=2, n_positions=32, vocab_size=128, use_cache=False
    )
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    ids = torch.zeros(2, 32, dtype=torch.long, device="meta")
    captured = capture(model, (), {"input_ids": ids, "labels": ids})
    gc.collect()
    graph = captured.gm.graph
    alive = _nodes_of(graph)
    live = set(graph.nodes)
    # the exported graph had several times more nodes (symbolic shape checks) before rannc dropped them
    assert len(live) > 50
    assert [n.name for n in alive if n not in live] == []
    names = [n.name for n in live]
    assert len(names) == len(set(names))
