"""Gradient allreduce buckets: large contiguous gradients alone (reduced in place), small ones packed up to the
bucket size, in order."""

from __future__ import annotations

import torch

from rannc.runtime.grad_sync import BUCKET_BYTES, _buckets


def test_large_gradients_are_reduced_alone_and_small_ones_packed() -> None:
    floats = BUCKET_BYTES // 4
    grads = {
        "a": torch.zeros(floats // 4),
        "b": torch.zeros(floats // 4),
        "big": torch.zeros(floats),
        "c": torch.zeros(floats // 2),
        "d": torch.zeros(floats // 2 + 1),  # would overflow the bucket holding c
        "e": torch.zeros(3),
        "wide": torch.zeros(2, floats).t(),  # large but not contiguous: packed (copied) like a small one
    }
    assert _buckets(list(grads), grads) == [["a", "b"], ["big"], ["c"], ["d", "e"], ["wide"]]
    for bucket in _buckets(list(grads), grads):
        size = sum(grads[n].numel() * grads[n].element_size() for n in bucket)
        assert len(bucket) == 1 or size <= BUCKET_BYTES


def test_every_gradient_is_in_exactly_one_bucket_in_order() -> None:
    sizes = [5, BUCKET_BYTES // 4, 7, 1, BUCKET_BYTES // 8, BUCKET_BYTES // 8 + 1, 2]
    grads = {f"p{i}": torch.zeros(n) for i, n in enumerate(sizes)}
    flat = [name for bucket in _buckets(list(grads), grads) for name in bucket]
    assert flat == list(grads)
