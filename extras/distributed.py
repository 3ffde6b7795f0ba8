"""Data-parallel fine-tuning under torchrun: DDP over the adapters, optionally FSDP2 over the base.

Beyond the paper, which trains on one GPU; a student can skip this file. Under
`torchrun --nproc_per_node N train.py ...` every process trains on its share of each batch (DDP
all-reduces the adapters' gradients) and rank 0 does everything else: evaluation, merging,
quantization, checkpoints. With --fsdp each process keeps 1/N of the frozen base (FSDP2).
"""
import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel


def start(device: str) -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) this starts the process group: NCCL on
    CUDA, gloo on a CPU. Rank 0 may evaluate for hours while the others wait: a long timeout."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(hours=12))
    return dist.get_rank(), world


def local_device(device: str, rank: int) -> str:
    """Each process its own GPU (cuda:LOCAL_RANK); a CPU stays the CPU."""
    if not device.startswith("cuda"):
        return device
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    torch.cuda.set_device(device)
    return device


def stop():
    dist.destroy_process_group()


def barrier():
    dist.barrier()


def sum_over_ranks(value: float, device: str) -> float:
    total = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL: on the GPU
    dist.all_reduce(total)
    return total.item()


def broadcast_from_main(tensors, device: str):
    """Rank 0's values into these CPU tensors on every rank, in place (None entries skipped)."""
    for tensor in tensors:
        if tensor is not None:
            on_device = tensor.to(device)
            dist.broadcast(on_device, src=0)
            tensor.copy_(on_device.cpu())


def data_parallel(model):
    """DDP over the adapters: each rank holds the whole (frozen) base; only the trainable
    parameters are broadcast at the start and all-reduced in every backward."""
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return DistributedDataParallel(model)


def shard_frozen_base(model, device: str):
    """FSDP2 over the frozen base: each block (and the embedding, final norm and lm_head) keeps 1/N of
    its weights on this rank and gathers the rest for its forward and backward only. The adapters
    are left out of the shards (ignored_params): small, replicated, and all-reduced by DDP as without
    FSDP, so the optimizer, the checkpoints and --resume see ordinary tensors."""
    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (dist.get_world_size(),))
    adapters = {p for p in model.parameters() if p.requires_grad}
    for block in model.layers:
        fully_shard(block, mesh=mesh, ignored_params=adapters)
    fully_shard(model, mesh=mesh, ignored_params=adapters)  # the rest: embedding, final norm, lm_head
    for p in adapters:  # fully_shard moves what it shards to the mesh's device, not what it ignores
        p.data = p.data.to(device)
    return model
