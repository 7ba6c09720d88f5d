"""The training loop on several processes, launched by `torchrun` (one process per GPU, or several
CPU processes): DDP replicates the model and averages gradients; FSDP2 (`fully_shard`) shards
weights, gradients and optimizer state across processes and gathers each block only while it runs.

    torchrun --nproc-per-node 2 -m plinth pretrain recipes/pretrain-tiny.yaml --dist ddp
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m plinth pretrain recipes/my-run.yaml --dist fsdp2

The recipe's `batch_size` is the global micro-batch: every process builds the same global batch
(the loader is a pure function of seed and step) and takes its own contiguous rows, so a run on N
processes sees exactly the data of a single-process run and its loss curve is the same up to
float summation order. Only rank 0 logs and writes; checkpoints hold full (unsharded) weights and
optimizer state, gathered with torch.distributed.checkpoint's state-dict helpers, so a checkpoint
from any world size is a normal plinth model and resumes on any other world size.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from plinth.errors import PlinthError

MODES = ("none", "ddp", "fsdp2")


@dataclass
class Dist:
    mode: str = "none"
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ---- data -------------------------------------------------------------------------------
    def rows(self, batch):
        """This process's share of a global micro-batch: a tensor, or a tuple of tensors with one
        row each per example (an image+text model's token ids and images)."""
        if isinstance(batch, tuple):
            return tuple(self.rows(part) for part in batch)
        per = batch.shape[0] // self.world
        return batch[self.rank * per:(self.rank + 1) * per].to(self.device)

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    # ---- model ------------------------------------------------------------------------------
    def wrap(self, model):
        """The model the loop trains: as is, in DDP, or sharded in place by FSDP2 (each block its
        own unit, so only one block's full weights exist at a time, then the rest at the root)."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.mode == "fsdp2":
            from torch.distributed.fsdp import fully_shard
            for block in model.layers:
                fully_shard(block)
            fully_shard(model)
        return model

    @staticmethod
    def inner(model):
        """The Transformer itself (DDP hides it in `.module`; FSDP2 shards it in place)."""
        return getattr(model, "module", model)

    def gradient_sync(self, model, enabled: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if self.mode == "ddp" and not enabled:
            return model.no_sync()
        if self.mode == "fsdp2":
            model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    @property
    def loss_scale(self) -> int:
        """DDP and FSDP2 average gradients over processes; the loop's loss is a sum over the
        global batch, so each process's share is scaled back up by the world size."""
        return self.world

    # ---- state ------------------------------------------------------------------------------
    def full_state(self, model, optimizer) -> tuple[dict | None, dict]:
        """Full weights (None where the model holds them whole) and optimizer state; a collective
        under FSDP2, so every rank must call it."""
        if self.mode != "fsdp2":
            return None, optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer(self, model, optimizer, state: dict):
        if self.mode != "fsdp2":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.mode != "none" and dist.is_initialized():
            dist.destroy_process_group()


def setup(mode: str, batch_size: int) -> Dist:
    """Join the process group torchrun started (gloo on CPU, NCCL on GPU); check the batch splits."""
    if mode not in MODES:
        raise PlinthError(f"--dist {mode!r}; choose one of {', '.join(MODES)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none":
        if world > 1:
            raise PlinthError(f"torchrun started {world} processes but --dist is none; pass --dist ddp or --dist fsdp2")
        return Dist(device=torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if "RANK" not in os.environ:
        raise PlinthError(f"--dist {mode} needs processes started by torchrun, e.g. "
                          f"torchrun --nproc-per-node 2 -m plinth pretrain RECIPE --dist {mode}")
    if batch_size % world:
        raise PlinthError(f"batch_size={batch_size} does not split over {world} processes; "
                          f"make it a multiple of {world}")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Dist(mode, dist.get_rank(), dist.get_world_size(), device)
