"""Code torch.export cannot capture, marked `rannc.opaque` (or named in `opaque_modules`), trained by rannc
exactly as one process trains the model as written.

One spawn of 2 ranks trains `opaque_models` in 2 stages x 2 microbatches (1F1B, SGD with momentum) and is
compared with one process at rtol 1e-5; it also checks that the model as written fails with a CaptureError that
names the function (or submodule) and the remedy. Single-process checks of the op are in
tests/capture/test_opaque_ops.py.
"""

from __future__ import annotations

from typing import Any

import opaque_models as om
import pytest
import torch
from distributed_helpers import run_workers

RTOL, ATOL = 1e-5, 1e-6

CASES = [
    om.OpaqueCase("token-functions-2stages", "token"),
    om.OpaqueCase("router-submodule-2stages", "router", opaque_modules=("router",)),
]
OP_NODES = {
    "token": ("opaque_models_zero_pad_tokens", "opaque_models_flip_negative_samples"),
    "router": ("module_router",),
}
_runs: dict[str, list[dict[str, Any]]] = {}


def rannc_runs(label: str) -> list[dict[str, Any]]:
    """Per rank, the case's results (one spawn of 2 ranks for all cases)."""
    if not _runs:
        per_rank = run_workers(om.run_opaque_cases, 2, CASES, timeout=420)
        for index, case in enumerate(CASES):
            _runs[case.label] = [per_rank[rank][index] for rank in range(2)]
    return _runs[label]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_trains_like_one_process(case: om.OpaqueCase) -> None:
    runs = rannc_runs(case.label)
    first = runs[0]
    assert first["stages"] == 2 and first["microbatches"] == 2
    # the opaque ops are inside the pipeline, with layers of the model in both stages
    holders = [
        k
        for k, nodes in enumerate(first["stage_nodes"])
        for op in OP_NODES[case.model]
        if any(n.startswith(op) for n in nodes)
    ]
    assert holders and all(len(nodes) > 1 for nodes in first["stage_nodes"]), first["stage_nodes"]
    reference = om.train_one_process(case)
    for rank, run in enumerate(runs):
        torch.testing.assert_close(
            run["losses"], reference["losses"], rtol=RTOL, atol=ATOL, msg=f"rank {rank}"
        )
    assert set(first["state"]) == set(reference["state"])
    for name, value in reference["state"].items():
        torch.testing.assert_close(first["state"][name], value, rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_model_as_written_names_the_code_and_the_remedy(case: om.OpaqueCase) -> None:
    for run in rannc_runs(case.label):
        message = run["capture_error"]
        assert message is not None, "the model as written was captured; expected a CaptureError"
        if case.model == "token":
            assert "Capture failed in zero_pad_tokens" in message and "opaque_models.py" in message
            assert "@rannc.opaque (above @torch.jit.script)" in message
        else:
            assert "Capture failed in Router.forward" in message
            assert 'opaque_modules = ["router"]' in message and "rannc.opaque(model.router)" in message
