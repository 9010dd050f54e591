"""GSM inside PyTorch Lightning: a tiny byte-level transformer (output tied to the token embedding) pruned 10x.

    pip install "lightning>=2"        # not a dependency of this project
    python examples/gsm_with_lightning.py --out /tmp/gsm_lightning

What a user has to know, each shown below:
  - return the GSM optimizer from `configure_optimizers`; Lightning checkpoints and restores its state
    (resuming from an epoch-end checkpoint gives bitwise the same weights);
  - `self.optimizers()` is Lightning's wrapper (it passes GSM's methods through); `gsm.unwrap_optimizer` gives
    the GSM itself;
  - OneCycleLR cycles momentum too (0.85 to 0.95 by default), and GSM's passive weights decay at a speed set by
    momentum: pass `cycle_momentum=False` to keep GSM's;
  - a tied weight is one parameter: GSM ranks it once, and `save_sparse` stores it once.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn
from torch.nn import functional as F

import gsm

CONTEXT = 32


class TinyLM(nn.Module):
    """Token and position embeddings, one causal transformer layer, the output tied to the token embedding."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.embedding = nn.Embedding(256, width)
        self.position = nn.Embedding(CONTEXT, width)
        self.layer = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=4 * width, dropout=0.0,
                                                batch_first=True, norm_first=True)
        self.head = nn.Linear(width, 256, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        x = self.embedding(tokens) + self.position(torch.arange(length, device=tokens.device))
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        return self.head(self.layer(x, src_mask=causal, is_causal=True))


def byte_windows() -> torch.utils.data.TensorDataset:
    """Windows of CONTEXT + 1 bytes of this package's source (any text would do)."""
    data = torch.frombuffer(bytearray(Path(gsm.__file__).read_bytes() * 2), dtype=torch.uint8).long()
    count = (data.numel() - 1) // (CONTEXT + 1)
    return torch.utils.data.TensorDataset(data[:count * (CONTEXT + 1)].view(count, CONTEXT + 1))


def loader(batch_size: int = 16) -> torch.utils.data.DataLoader:
    """Shuffled by a sampler that Lightning reseeds each epoch (set_epoch), so that a resumed run sees the
    same batches."""
    windows = byte_windows()
    sampler = torch.utils.data.distributed.DistributedSampler(windows, num_replicas=1, rank=0, shuffle=True, seed=0)
    return torch.utils.data.DataLoader(windows, batch_size=batch_size, sampler=sampler, drop_last=True)


def lightning_module(nonzero_ratio: float = 0.1, cycle_momentum: bool = False):
    """The LightningModule (built here so that importing this file does not need Lightning)."""
    import lightning as L

    class PrunedLM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = TinyLM()

        def training_step(self, batch, batch_idx):
            (windows,) = batch
            logits = self.model(windows[:, :-1])
            return F.cross_entropy(logits.reshape(-1, 256), windows[:, 1:].reshape(-1))

        def configure_optimizers(self):
            optimizer = gsm.GSM(gsm.param_groups(self.model, weight_decay=1e-3), lr=0.05, momentum=0.9,
                                nonzero_ratio=nonzero_ratio)
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=1000,
                                                           cycle_momentum=cycle_momentum)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    return PrunedLM()


def make_trainer(out: Path, max_epochs: int):
    import lightning as L

    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, default_root_dir=str(out), logger=False,
                     enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                     callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=str(out), save_top_k=-1,
                                                                    every_n_epochs=1, filename="{epoch}")])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the checkpoints and the export")
    parser.add_argument("--epochs", type=int, default=2, help="epochs over the windows (default: %(default)s)")
    args = parser.parse_args(argv)
    module = lightning_module()
    trainer = make_trainer(args.out, args.epochs)
    trainer.fit(module, loader())
    optimizer = gsm.unwrap_optimizer(module.optimizers())  # the GSM inside Lightning's wrapper
    model = module.model
    mask = optimizer.hard_mask(model)
    gsm.apply_mask_to_weights(model, mask)
    gsm.save_sparse(model, args.out / "pruned_sparse.hdf5", names=mask.keys())
    print(f"ranked {optimizer.num_prunable} weights (the tied one once); kept {gsm.mask_count(mask)}; "
          f"export: {args.out / 'pruned_sparse.hdf5'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
