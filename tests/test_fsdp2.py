"""GSM on a model sharded by FSDP2 (fully_shard, DTensor parameters) on CPU with gloo, 2 and 3 ranks: the ranks
agree on the global threshold, and the full parameters after several steps equal those of unsharded GSM given
the same gradients, bit for bit (gradients set by hand, so that no reduction over ranks rounds them; and, on 2
ranks, gradients of a training loop through FSDP2, whose mean of two equal gradients is exact); the hard prune's
mask and the exports gather the shards."""
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import free_port
from gsm import GSM, load_mask, load_sparse, save_mask, save_sparse
from gsm.pruning import apply_mask_to_weights, mask_count
from script_runs import REPO_ROOT

RATIO = 0.1


def _model() -> nn.Module:
    """Layers whose first dimensions (7, 5, 3, 11) split unevenly over 2 and 3 ranks (some shards are empty on 3
    ranks for the 1-row head), a conv among them."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 7, 3), nn.Flatten(), nn.Linear(7 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 11),
                         nn.ReLU(), nn.Linear(11, 1))


def _groups(model: nn.Module):
    """Two param groups: the matrices (prunable, weight decay, Nesterov) and the biases (their own lr)."""
    weights = [p for p in model.parameters() if p.dim() > 1]
    biases = [p for p in model.parameters() if p.dim() <= 1]
    return [{"params": weights, "weight_decay": 1e-3, "nesterov": True},
            {"params": biases, "lr": 0.05, "weight_decay": 0.0}]


# Gradient scales by step: drops of 2x and 200x make the threshold fall below the bound from the last ones (the
# ranks retry from a lower bound together, then from none), and a rise brings many candidates.
SCALES = (1.0, 1.0, 0.5, 0.005, 1.0, 1.0)


def _gradients(model: nn.Module, step: int):
    """The same whole gradient of every parameter on every rank: random, with ties, and sometimes zero."""
    generator = torch.Generator().manual_seed(100 + step)
    grads = []
    for p in model.parameters():
        g = torch.randn(p.shape, generator=generator) * SCALES[step]
        g[..., ::5] = 0.25 * SCALES[step]  # ties in the metric where the weights tie too
        grads.append(g)
    return grads


def _worker(rank: int, world_size: int, port: int, out: str, mesh_shape) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        _check(rank, world_size, Path(out), mesh_shape)
    except BaseException:
        (Path(out) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _check(rank: int, world_size: int, out: Path, mesh_shape) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    # A 2-D mesh makes HSDP: parameters replicated over its first dimension, sharded over its second.
    mesh = None if mesh_shape is None else init_device_mesh("cpu", mesh_shape,
                                                          mesh_dim_names=("replicate", "shard"))
    reference, model = _model(), _model()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    common = dict(lr=0.1, momentum=0.9, nonzero_ratio=RATIO)
    unsharded = GSM(_groups(reference), fused=False, **common)
    shard_opt = GSM(_groups(model), **common)
    assert shard_opt.num_prunable == unsharded.num_prunable and shard_opt.keep_count == unsharded.keep_count

    for step in range(len(SCALES)):
        for p, q, g in zip(reference.parameters(), model.parameters(), _gradients(reference, step)):
            p.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), q.device_mesh, q.placements)
        unsharded.step()
        shard_opt.step()
        assert shard_opt.last_threshold.item() == unsharded.last_threshold.item()
        assert shard_opt.num_active == unsharded.num_active
        # The ranks narrow the search to the metrics above a bound, together; after the 200x drop, to none.
        searched = shard_opt._selection._generic_search.last_searched
        assert (searched == shard_opt.num_prunable) == (step in (0, 3)), (step, searched)
        for (name, p), q in zip(reference.named_parameters(), model.parameters()):
            assert torch.equal(q.full_tensor(), p.detach()), (step, name)
    for p, q in zip(reference.parameters(), model.parameters()):
        buffer = shard_opt.state[q]["momentum_buffer"]
        assert isinstance(buffer, DTensor) and torch.equal(buffer.full_tensor(), unsharded.state[p]["momentum_buffer"])

    # A resume: the sharded state (DTensor momentum buffers) loads into a new optimizer, which goes on alike.
    resumed = GSM(_groups(model), **common)
    resumed.load_state_dict(shard_opt.state_dict())
    shard_opt = resumed

    if world_size == 2 and mesh_shape is None:
        # A training loop: FSDP2 computes the gradients (every rank the same batch, so that their mean is the
        # gradient itself, exactly for two ranks) and GSM steps on its sharded parameters.
        generator = torch.Generator().manual_seed(7)
        for step in range(3):
            x = torch.randn(4, 2, 6, 6, generator=generator)
            for net, optimizer in ((reference, unsharded), (model, shard_opt)):
                optimizer.zero_grad()
                net(x).square().mean().backward()
                optimizer.step()
            for (name, p), q in zip(reference.named_parameters(), model.parameters()):
                assert torch.equal(q.full_tensor(), p.detach()), ("trained", step, name)

    # The hard prune on the sharded model: the whole mask on every rank, each rank zeroing its own shards.
    mask = shard_opt.hard_mask(model)
    expected = unsharded.hard_mask(reference)
    assert mask.keys() == expected.keys() and all(torch.equal(mask[k], expected[k]) for k in mask)
    apply_mask_to_weights(model, mask)
    apply_mask_to_weights(reference, expected)
    for p, q in zip(reference.parameters(), model.parameters()):
        assert torch.equal(q.full_tensor(), p.detach())
    save_sparse(model, out / "pruned_sparse.hdf5")  # every rank gathers; rank 0 writes
    if rank == 0:
        save_mask(mask, out / "mask.hdf5")
        (out / "keep.txt").write_text(str(mask_count(mask)))
        torch.save({k: v.detach().clone() for k, v in reference.state_dict().items()}, out / "reference.pt")
    dist.barrier()


def _run(world_size: int, tmp_path: Path, mesh_shape=None) -> None:
    try:
        mp.spawn(_worker, args=(world_size, free_port(), str(tmp_path), mesh_shape), nprocs=world_size)
    except Exception:
        errors = [p.read_text() for p in sorted(tmp_path.glob("error*.txt"))]
        pytest.fail("\n".join(errors) or "a rank failed")


@pytest.mark.parametrize("world_size,mesh_shape", [(2, None), (3, None), (2, (2, 1))],
                         ids=["2 ranks", "3 ranks", "HSDP 2 replicas"])
def test_sharded_gsm_equals_unsharded(world_size, mesh_shape, tmp_path):
    """FSDP2 over 2 and 3 ranks, and HSDP whose two replicas each hold the whole model (a replicating mesh
    dimension, whose ranks hold copies: their counts must not be summed)."""
    _run(world_size, tmp_path, mesh_shape)
    reference = torch.load(tmp_path / "reference.pt")
    mask = load_mask(tmp_path / "mask.hdf5")
    assert sorted(mask) == ["0.weight", "2.weight", "4.weight", "6.weight"]
    num_prunable = sum(m.numel() for m in mask.values())
    kept = int((tmp_path / "keep.txt").read_text())
    assert kept == mask_count(mask) >= int(RATIO * num_prunable)  # ties at the threshold are kept
    for key, m in mask.items():  # the export holds the pruned weights: zero wherever the mask is
        assert not load_sparse(tmp_path / "pruned_sparse.hdf5")[key][~m].any()
    exported = load_sparse(tmp_path / "pruned_sparse.hdf5")
    assert exported.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(exported[key], value), key


def test_mixed_sharded_and_plain_parameters_are_refused(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.FileStore(str(tmp_path / "store"), 1))
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
        plain = nn.Parameter(torch.randn(4, 4))
        with pytest.raises(ValueError, match="DTensors .* and the others plain tensors"):
            GSM([sharded, plain], lr=0.1, nonzero_ratio=0.5)
        with pytest.raises(ValueError, match="fused=True"):
            GSM([sharded], lr=0.1, nonzero_ratio=0.5, fused=True)
        optimizer = GSM([sharded], lr=0.1, nonzero_ratio=0.5)
        with pytest.raises(ValueError, match="DTensors"):
            optimizer.add_param_group({"params": [plain]})
        assert len(optimizer.param_groups) == 1
    finally:
        dist.destroy_process_group()


def test_the_example_prunes_a_sharded_model(tmp_path):
    """examples/gsm_with_fsdp2.py under torchrun with 2 ranks: 10x kept, and its export, loaded into an unsharded
    model, computes what the sharded model computes."""
    example = REPO_ROOT / "examples" / "gsm_with_fsdp2.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(example),
               "--steps", "40", "--out", str(tmp_path)]  # --standalone: a free port of its own
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    found = re.match(r"2 ranks; kept (\d+) of 76288 prunable weights \(10\.0x\)", summary)
    assert found and 7628 <= int(found.group(1)) <= 7640, summary  # Q = 7628, and any ties at the threshold
    assert summary.endswith("computes the same outputs: True"), summary
    assert (tmp_path / "mask.hdf5").is_file() and (tmp_path / "pruned_sparse.hdf5").is_file()
