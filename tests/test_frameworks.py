"""GSM in the frameworks people train transformers with, as the examples use it: transformers' Trainer and
Lightning each train with GSM, checkpoint, and resume to bitwise the same weights; GSM's methods are reachable
through their optimizer wrappers; a tied output layer is ranked and exported once. Skipped where a framework is
not installed (neither is a dependency of this project)."""
import importlib.util
import sys
from pathlib import Path

import h5py
import pytest
import torch

import gsm

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
pytestmark = pytest.mark.usefixtures("single_thread")


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None,
                    reason="transformers and accelerate are not installed")
def test_transformers_trainer_trains_resumes_bitwise_and_exports_the_tie_once(tmp_path):
    import gsm_with_transformers as example

    whole = example.tiny_gpt2()
    trainer = example.make_trainer(whole, tmp_path / "whole", max_steps=8, save_steps=4)
    trainer.train()
    optimizer = gsm.unwrap_optimizer(trainer.optimizer)
    assert isinstance(optimizer, gsm.GSM) and not isinstance(trainer.optimizer, gsm.GSM)
    names = optimizer.prunable_names(whole)
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names  # the tied weight once
    assert whole.lm_head.weight is whole.transformer.wte.weight
    assert optimizer.num_active == optimizer.keep_count == int(0.1 * optimizer.num_prunable)

    resumed = example.tiny_gpt2(seed=1)  # other weights: the checkpoint must bring back everything
    assert not same_weights(resumed, whole)
    example.make_trainer(resumed, tmp_path / "whole", max_steps=8, save_steps=4).train(
        resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-4"))
    assert same_weights(resumed, whole)

    mask = optimizer.hard_mask(whole)
    gsm.apply_mask_to_weights(whole, mask)
    gsm.save_sparse(whole, tmp_path / "sparse.hdf5", names=mask.keys())
    with h5py.File(tmp_path / "sparse.hdf5", "r") as f:
        assert [list(pair) for pair in f.attrs["tied"]] == [["lm_head.weight", "transformer.wte.weight"]]
        assert "lm_head.weight" not in f["sparse"] and "lm_head.weight" not in f["dense"]
    fresh = example.tiny_gpt2(seed=2)
    gsm.load_sparse(tmp_path / "sparse.hdf5", fresh)
    assert same_weights(fresh, whole) and fresh.lm_head.weight is fresh.transformer.wte.weight


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="lightning is not installed")
def test_lightning_trains_resumes_bitwise_and_onecycle_moves_momentum(tmp_path):
    import gsm_with_lightning as example

    whole = example.lightning_module()
    example.make_trainer(tmp_path / "whole", max_epochs=2).fit(whole, example.loader())
    optimizer = gsm.unwrap_optimizer(whole.optimizers())
    assert type(optimizer) is gsm.GSM and optimizer is whole.trainer.optimizers[0]
    assert whole.optimizers().num_prunable == optimizer.num_prunable  # Lightning's wrapper subclasses GSM
    assert optimizer.prunable_names(whole.model) == ["embedding.weight", "position.weight",
                                                     "layer.self_attn.in_proj_weight",
                                                     "layer.self_attn.out_proj.weight", "layer.linear1.weight",
                                                     "layer.linear2.weight"]  # the tied head is the embedding
    assert [group["momentum"] for group in optimizer.param_groups] == [0.9] * len(optimizer.param_groups)

    resumed = example.lightning_module()
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)  # the checkpoint must bring back everything
    example.make_trainer(tmp_path / "resumed", max_epochs=2).fit(resumed, example.loader(),
                                                                 ckpt_path=str(tmp_path / "whole" / "epoch=0.ckpt"))
    assert same_weights(resumed.model, whole.model)
    assert resumed.model.head.weight is resumed.model.embedding.weight

    # OneCycleLR's default cycles momentum, which sets how fast GSM's passive weights decay.
    cycled = example.lightning_module(cycle_momentum=True)
    example.make_trainer(tmp_path / "cycled", max_epochs=1).fit(cycled, example.loader())
    momentum = gsm.unwrap_optimizer(cycled.optimizers()).param_groups[0]["momentum"]
    assert 0.85 <= momentum < 0.95 and momentum != 0.9
