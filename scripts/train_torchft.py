"""ShardedShampoo under torchft: one replica group of a fault-tolerant job (FSDP2 over the
group's ranks when it has more than one), on CPUs with gloo.

Start torchft's lighthouse once, then each replica group with torchrun, as many as you like,
each with its own ``--group`` (kill one with Ctrl-C and start it again: it recovers the model
and optimizer from a live group and goes on with them):

    torchft_lighthouse --min_replicas 1 --join_timeout_ms 1000 &
    TORCHFT_LIGHTHOUSE=http://localhost:29510 torchrun --nproc_per_node 2 --master_port 29600 \\
        scripts/train_torchft.py --group 0
    TORCHFT_LIGHTHOUSE=http://localhost:29510 torchrun --nproc_per_node 2 --master_port 29601 \\
        scripts/train_torchft.py --group 1

Each group trains a small network on data of its own (by step and group), and prints its
loss, the groups in the step's quorum and whether the step was committed.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torchft import DistributedDataParallel, Manager, ProcessGroupGloo
from torchft.optim import OptimizerWrapper

from sharded_shampoo import ShardedShampoo
from sharded_shampoo.integrations.torchft import average_across_groups, replica_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", type=int, required=True, help="this replica group's id")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.manual_seed(0)  # every group starts from the same model
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 10))
    if size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (size,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = ShardedShampoo(model.parameters(), lr=args.lr, precondition_frequency=10)
    state_dict, load_state_dict = replica_state(model, opt)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=datetime.timedelta(seconds=10)),
        min_replica_size=1,
        state_dict=state_dict,
        load_state_dict=load_state_dict,
        replica_id=f"train_torchft_{args.group}",
        timeout=datetime.timedelta(seconds=30),
    )
    if size > 1:
        average_across_groups(model, manager)
    else:
        model = DistributedDataParallel(manager, model)
    optimizer = OptimizerWrapper(manager, opt)
    target = torch.nn.Linear(32, 10)  # the function to learn, the same for every group
    while manager.current_step() < args.steps:
        optimizer.zero_grad()  # the quorum: a restarted group recovers here
        step = manager.current_step()
        gen = torch.Generator().manual_seed(1000 * step + 10 * args.group + rank)
        x = torch.randn(64, 32, generator=gen)
        with torch.no_grad():
            y = target(x).argmax(1)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if rank == 0 and step % 10 == 0:
            committed = manager.current_step() > step
            print(
                f"group {args.group} step {step} loss {loss.item():.4f} "
                f"groups {manager.num_participants()} committed {committed}",
                flush=True,
            )
    manager.shutdown(wait=False)


if __name__ == "__main__":
    main()
