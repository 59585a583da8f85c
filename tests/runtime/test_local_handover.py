"""Pieces a rank hands to itself (two chunks of one position, interleaved 1F1B) reach every chunk that reads them."""

from __future__ import annotations

import torch

from rannc.runtime.layout import SampleLayout
from rannc.runtime.routes import Route
from rannc.runtime.transfer import Transfer


def one_rank_transfer(stages: int) -> Transfer:
    """A Transfer of `stages` virtual stages all on rank 0 (every piece is handed over in memory: no messages)."""
    layout = SampleLayout(global_batch=4, microbatches=2, replicas=(1,) * stages)
    return Transfer(layout, [[0]] * stages, num_routes=2, symbol=None, device=torch.device("cpu"), rank=0)


def skip_route() -> Route:
    """A skip connection: stage 0's value, read by stages 1 and 2."""
    return Route("h0", 0, 0, (1, 2), batch_dim=0, shape=(2, 3), dtype=torch.float32, carries_grad=True)


def test_a_value_read_by_two_chunks_of_the_rank_reaches_both() -> None:
    # stages 1 and 2 both on this rank
    route = skip_route()
    transfer = one_rank_transfer(3)
    value = torch.arange(6.0).reshape(2, 3)
    transfer.post_activations([route], 1, 0, 0)
    transfer.post_activations([route], 2, 0, 0)
    transfer.send_activation(route, value, 0, 0)
    (first,) = transfer.recv_activations([route], 1, 0, 0)
    (second,) = transfer.recv_activations([route], 2, 0, 0)
    assert torch.equal(first, value) and torch.equal(second, value)
    assert first.data_ptr() != second.data_ptr() != value.data_ptr()  # each its own tensor, as if received


def test_gradients_sent_back_by_two_chunks_of_the_rank_add_up() -> None:
    route = skip_route()
    transfer = one_rank_transfer(3)
    transfer.post_grads([route], 0, 0, 0)
    transfer.send_grad(route, torch.ones(2, 3), 2, 0, 0)
    transfer.send_grad(route, torch.full((2, 3), 2.0), 1, 0, 0)
    (total,) = transfer.recv_grads([route], 0, 0, 0)
    assert torch.equal(total, torch.full((2, 3), 3.0))
