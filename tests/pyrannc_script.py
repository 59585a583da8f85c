"""A RaNNC user's training script, unchanged but for its import line (RaNNC's tutorial model, gradient accumulation
as in RaNNC's own tests, the pyrannc calls users make). tests/test_pyrannc_compat.py launches it with torchrun on 2
ranks and compares what each rank saves with one process training the global batch.

    torchrun --nproc-per-node 2 pyrannc_script.py OUT_DIR
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

import rannc as pyrannc

BATCH_SIZE_PER_PROC, HIDDEN, LAYERS = 4, 16, 4
STEPS, ACCUMULATION, MAX_NORM, LR, MOMENTUM = 4, 2, 0.5, 0.05, 0.9
SEED = 0


class Net(nn.Module):
    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(layers)])

    def forward(self, x: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return F.mse_loss(x, tgt)


def build_net() -> Net:
    torch.manual_seed(SEED)
    return Net(HIDDEN, LAYERS)


def dataset(world_size: int) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(SEED + 1)
    size = world_size * BATCH_SIZE_PER_PROC * STEPS
    return torch.utils.data.TensorDataset(
        torch.randn(size, HIDDEN, generator=generator), torch.randn(size, HIDDEN, generator=generator)
    )


def loader(world_size: int, rank: int) -> torch.utils.data.DataLoader:
    data = dataset(world_size)
    sampler = torch.utils.data.distributed.DistributedSampler(
        data, num_replicas=world_size, rank=rank, shuffle=False
    )
    return torch.utils.data.DataLoader(data, batch_size=BATCH_SIZE_PER_PROC, sampler=sampler)


def main() -> None:
    out_dir = sys.argv[1]
    net = build_net()
    if pyrannc.get_rank() == 0:
        print(f"#Parameters={sum(p.numel() for p in net.parameters())}", flush=True)

    opt = optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    # pyrannc's defaults spelled out, as some scripts do
    model = pyrannc.RaNNCModule(
        net,
        opt,
        gather_inputs=True,
        enable_apex_amp=False,
        allreduce_amp_master_params=False,
        offload_params=False,
    )
    model.to(torch.device("cpu"))  # ignored, as in pyrannc

    losses, update_grads, norms = [], [], []
    for step, (x, tgt) in enumerate(loader(pyrannc.get_world_size(), pyrannc.get_rank())):
        run_update = (step + 1) % ACCUMULATION == 0
        loss = model(x, tgt)
        pyrannc.delay_grad_allreduce(not run_update)  # RaNNC's tests flip it between forward and backward
        loss.backward()
        if run_update:
            update_grads.append(
                {n: model.get_param_grad(n) for n, _ in model.named_parameters(from_global=True)}
            )
            norms.append(float(model.clip_grad_norm(MAX_NORM)))
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    pyrannc.barrier()

    params = {n: model.get_param(n) for n, _ in model.named_parameters(from_global=True)}
    global_params = dict(model.named_parameters(from_global=True))
    local_names = [n for n, _ in model.named_parameters()]
    state = model.state_dict(rank0_only=False)
    opt_state = opt.state_dict(from_global=True)
    deployment_file = f"{out_dir}/deployment.json"
    model.save_deployment(deployment_file)
    pyrannc.barrier()
    if pyrannc.get_rank() == 0:
        pyrannc.show_deployment(deployment_file, BATCH_SIZE_PER_PROC * pyrannc.get_world_size())

    pyrannc.clear()  # the plain model and optimizer are whole again on every rank
    after_clear = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt_after_clear = copy.deepcopy(opt.state_dict())

    loss = model(x, tgt)  # the module plans again
    loss.backward()
    opt.step()
    opt.zero_grad()
    final = model.state_dict(rank0_only=False)

    torch.save(
        {
            "world_size": pyrannc.get_world_size(),
            "losses": losses,
            "update_grads": update_grads,
            "norms": norms,
            "params": params,
            "global_params": global_params,
            "local_names": local_names,
            "state": state,
            "opt_state": opt_state,
            "after_clear": after_clear,
            "opt_after_clear": opt_after_clear,
            "final": final,
        },
        f"{out_dir}/rank{pyrannc.get_rank()}.pt",
    )
    print(f"Finished on rank{pyrannc.get_rank()}", flush=True)


if __name__ == "__main__":
    main()
