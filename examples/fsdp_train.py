"""Train a small MLP with FSDP2 and rmsprop.RMSprop, checkpointing with torch.distributed.checkpoint.

    torchrun --nproc_per_node 2 examples/fsdp_train.py                  # CPU (gloo) or GPUs (nccl)
    torchrun --nproc_per_node 2 examples/fsdp_train.py --checkpoint ckpt  # save; rerun to resume
    torchrun --nproc_per_node 2 examples/fsdp_train.py --cpu-offload     # needs GPUs

Each rank trains on its own shard of the data; FSDP2 shards parameters, gradients and optimizer
state across ranks, and RMSprop updates each rank's local shard (on the CPU with the fused
kernel). With --cpu-offload, parameters and the optimizer step live on the CPU while forward and
backward run on the GPU: exactly where the fused CPU kernel pays off.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

import rmsprop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="save here at the end; resume if it exists"
    )
    parser.add_argument("--cpu-offload", action="store_true", help="FSDP2 CPU offload (requires CUDA)")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    if args.cpu_offload and not use_cuda:
        raise SystemExit("--cpu-offload needs GPUs: FSDP2 offloads from an accelerator to the CPU")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial model on every rank
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 1),
    ).to(device)
    policy = {"offload_policy": CPUOffloadPolicy()} if args.cpu_offload else {}
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, **policy)
    fully_shard(model, **policy)
    optimizer = rmsprop.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, momentum=0.9, centered=True)

    start = 0
    if args.checkpoint is not None and args.checkpoint.exists():
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=str(args.checkpoint))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = int(state["step"])
        if rank == 0:
            print(f"resumed from {args.checkpoint} at step {start}")

    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    teacher = torch.Generator().manual_seed(7)
    w_true = torch.randn(32, 1, generator=teacher)
    for step in range(start, start + args.steps):
        x = torch.randn(64, 32, generator=data)
        y = torch.tanh(x @ w_true)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x.to(device)), y.to(device))
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 10 == 0 or step == start + args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}  (rank 0 of {world})")

    if args.checkpoint is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save(
            {"model": model_sd, "optim": optim_sd, "step": torch.tensor(start + args.steps)},
            checkpoint_id=str(args.checkpoint),
        )
        if rank == 0:
            print(f"saved {args.checkpoint}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
