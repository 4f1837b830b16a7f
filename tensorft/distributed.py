"""Sharded training: FSDP2 sharding, a report of what is really sharded, decisions every rank
shares.

Gathering and loading an adapter in each layout (plain tensors, FSDP2 DTensors, ZeRO-3
parameters) belongs to the core, in tensorft/saving.py (re-exported here): saving and loading
an adapter never imports this training module.
"""

from __future__ import annotations

import torch
from torch import nn

from .model import adapter_parameters, unwrap
# Gathering and loading an adapter in any of these layouts is the core's (tensorft.save and
# load_adapter_weights use them without importing this training module).
from .saving import _is_dtensor, _is_zero3, full_adapter_state, load_full_adapter_state  # noqa: F401


def is_fsdp2(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks a model declares unsplittable (``_no_split_modules``): the units
    FSDP shards and gathers one at a time."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_fsdp2(model: nn.Module) -> nn.Module:
    """FSDP2 (``fully_shard``) over every decoder layer, then the root.

    Applied after the adapter is attached, so adapter parameters are sharded like the rest:
    per-layer factors with their layer, the CP tensor's shared factors with the root (gathered
    once per forward)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} declares no _no_split_modules; cannot pick FSDP units")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    root = getattr(model, "tensorft", None)  # a kind's own units (ttmoe: the router, trained by an aux loss)
    for unit in getattr(root.kind, "fsdp_units", lambda root: [])(root) if root is not None else []:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    will_shard_itself(model)
    return model


def reshard(model: nn.Module) -> None:
    """Free every FSDP2 unit's gathered parameters. Forward passes without a backward (DPO's
    reference pass) leave the root gathered; a checkpoint saved later then read freed storage."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def will_shard_itself(model: nn.Module) -> None:
    """Tell the Trainer (read when it is built) that the model owns its placement and gradient
    reduction, the contract transformers uses for models it shards at load time: no DDP
    wrapper, no ``.to(device)`` of the whole unsharded model."""
    model._is_distributed_loading_by_transformers = True


def sharding_report(model: nn.Module) -> dict:
    """How many elements of the adapter and of the base this rank holds, against their full
    sizes: shows whether parameters really are partitioned (several launch paths fall back
    to full replicas without a word)."""
    model = unwrap(model)
    adapter_ids = {id(p) for p in adapter_parameters(model).values()}
    report = {"adapter": {"full": 0, "local": 0, "sharded_tensors": 0, "tensors": 0},
              "base": {"full": 0, "local": 0, "sharded_tensors": 0, "tensors": 0}}
    for p in model.parameters():
        if _is_zero3(p):
            full, local = p.ds_numel, p.ds_tensor.numel()
        elif _is_dtensor(p):
            full, local = p.numel(), p.to_local().numel()
        else:
            full = local = p.numel()
        part = report["adapter" if id(p) in adapter_ids else "base"]
        part["full"] += full
        part["local"] += local
        part["tensors"] += 1
        part["sharded_tensors"] += int(local < full)
    return report


def decided_by_main(decide):
    """``decide()`` on rank 0, its result on every rank: a decision every rank must share (which
    checkpoint to resume from) must not rest on each rank's own view of a shared filesystem,
    which can lag (NFS attribute caches, a checkpoint's marker written a moment ago)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decide()
    box = [decide() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)  # gloo and nccl both: a pickled object
    return box[0]
