"""GSM on parameters sharded by FSDP2 (`fully_shard`, DTensor parameters): which ranks hold the other shards of a
model, the local shards a step works on, and the full tensors that the hard prune and the exports gather.

A sharded GSM ranks its local shards and sums the selection's counts over the ranks that shard the model
(all-reduces of a size independent of the model's: the radix select's two histograms, see
`gsm.selection.kth_largest_bits`, and on the CPU the number of candidates above the bound), so that every rank
finds the threshold unsharded GSM would find and keeps the same elements. Mesh dimensions that replicate the
parameters (HSDP's outer one) hold copies, whose counts are not summed.
"""
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # torch built without distributed support: nothing can be sharded
    DTensor = Replicate = Shard = distribute_tensor = None


def is_sharded(t: object) -> bool:
    """Whether `t` is a DTensor (a parameter, gradient or buffer that FSDP2 shards over ranks)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The part of `t` this rank holds (a view of the same memory): its local shard for a DTensor, else `t`."""
    return t.to_local() if is_sharded(t) else t


def _layout(p: Tensor) -> Tuple[object, Tuple[bool, ...]]:
    """A DTensor's mesh and, per mesh dimension, whether it shards (True) or replicates (False) the tensor;
    ValueError for a placement GSM cannot rank (a partial sum)."""
    kinds = []
    for placement in p.placements:
        if isinstance(placement, Shard):
            kinds.append(True)
        elif isinstance(placement, Replicate):
            kinds.append(False)
        else:
            raise ValueError(f"GSM cannot rank a DTensor placed as {placement}: its parameters must be sharded "
                             f"(Shard) or replicated (Replicate) on their mesh, as fully_shard places them")
    return p.device_mesh, tuple(kinds)


def count_reducer(params: Iterable[Tensor]) -> Optional[Callable[[Tensor], None]]:
    """For the parameters of one optimizer: None when none is a DTensor; else the function that sums a tensor of
    counts in place over the ranks that shard them (an all-reduce over each sharding mesh dimension). ValueError
    when DTensors and plain tensors are mixed, or the DTensors do not share one mesh and one placement kind
    per dimension: the counts would then count some elements twice or miss some."""
    params = list(params)
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return None
    if len(sharded) != len(params):
        raise ValueError(f"GSM: {len(sharded)} of the {len(params)} parameters are DTensors (sharded by FSDP2) and "
                         f"the others plain tensors; shard the whole model (fully_shard on its root too) so that "
                         f"GSM can count every element once")
    mesh, kinds = _layout(sharded[0])
    for p in sharded[1:]:
        other_mesh, other_kinds = _layout(p)
        if other_mesh != mesh or other_kinds != kinds:
            raise ValueError(f"GSM: the DTensor parameters lie on different meshes or placements ({mesh} "
                             f"{sharded[0].placements} and {other_mesh} {p.placements}); GSM ranks them together "
                             f"and needs one mesh and one placement kind per mesh dimension")
    groups = [mesh.get_group(dim) for dim, shards in enumerate(kinds) if shards and mesh.size(dim) > 1]

    def reduce(counts: Tensor) -> None:
        for group in groups:
            torch.distributed.all_reduce(counts, group=group)

    return reduce


def full(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor, gathered from the ranks (a collective: every rank must call it), else `t`."""
    return t.full_tensor() if is_sharded(t) else t


def full_tensors(tensors: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """{name: whole tensor} of a {name: tensor} mapping, gathering every DTensor (a collective, in the mapping's
    order: every rank must call it with the same names)."""
    return {name: full(t) for name, t in tensors.items()}


def local_part(whole: Tensor, like: Tensor) -> Tensor:
    """The part of the whole tensor `whole` that this rank holds of the DTensor `like` (`whole` itself for a plain
    tensor): `whole` distributed as `like` is, whose local shard is returned."""
    if not is_sharded(like):
        return whole
    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements).to_local()


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    distributed = torch.distributed
    return distributed.get_rank() if distributed.is_available() and distributed.is_initialized() else 0
