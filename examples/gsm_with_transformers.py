"""GSM inside a Hugging Face `transformers` Trainer: a tiny GPT-2 (output tied to the token embedding) pruned 10x.

    pip install "transformers>=5" accelerate        # not a dependency of this project
    python examples/gsm_with_transformers.py --out /tmp/gsm_hf

What a user has to know, each shown below:
  - pass the GSM optimizer as `optimizers=(optimizer, None)`: the Trainer adds its lr schedule on top and saves
    and restores the optimizer's state with its checkpoints (resuming gives bitwise the same weights);
  - `trainer.optimizer` is accelerate's wrapper, without GSM's methods: use the object you made, or
    `gsm.unwrap_optimizer(trainer.optimizer)`;
  - the tied `lm_head.weight` is the embedding's own tensor: GSM ranks it once, and `save_sparse` stores it once.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch

import gsm


class ByteWindows(torch.utils.data.Dataset):
    """Fixed windows of a byte string, as language-model examples (inputs are also the labels)."""

    def __init__(self, data: bytes, context: int) -> None:
        self.tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.context = context

    def __len__(self) -> int:
        return (self.tokens.numel() - 1) // self.context

    def __getitem__(self, i: int) -> dict:
        window = self.tokens[i * self.context:(i + 1) * self.context]
        return {"input_ids": window, "labels": window}


def tiny_gpt2(seed: int = 0):
    """A 2-layer GPT-2 over bytes, its output layer tied to the token embedding (transformers' default)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2,
                                      bos_token_id=None, eos_token_id=None))


def make_trainer(model, out: Path, max_steps: int, save_steps: int, nonzero_ratio: float = 0.1):
    """A Trainer that steps GSM; weight decay and momentum are GSM's (the Trainer's own optimizer settings are
    unused when an optimizer is passed)."""
    from transformers import Trainer, TrainingArguments

    optimizer = gsm.GSM(gsm.param_groups(model, weight_decay=1e-3), lr=0.05, momentum=0.9,
                        nonzero_ratio=nonzero_ratio)
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8,
                             learning_rate=0.05, lr_scheduler_type="constant", save_steps=save_steps,
                             save_strategy="steps", logging_steps=max_steps, report_to=[], seed=0, use_cpu=True,
                             disable_tqdm=True)
    text = Path(gsm.__file__).read_bytes() * 4  # any text: here this package's own source
    return Trainer(model=model, args=args, train_dataset=ByteWindows(text, 64), optimizers=(optimizer, None))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the Trainer's checkpoints and exports")
    parser.add_argument("--steps", type=int, default=40, help="training steps (default: %(default)s)")
    args = parser.parse_args(argv)
    model = tiny_gpt2()
    trainer = make_trainer(model, args.out, args.steps, save_steps=args.steps)
    trainer.train()
    optimizer = gsm.unwrap_optimizer(trainer.optimizer)  # the GSM inside accelerate's wrapper
    mask = optimizer.hard_mask(model)
    readiness = gsm.prune_readiness(model, optimizer)
    gsm.apply_mask_to_weights(model, mask)
    gsm.save_sparse(model, args.out / "pruned_sparse.hdf5", names=mask.keys())
    print(f"ranked {optimizer.num_prunable} weights ({len(optimizer.prunable_names(model))} tensors, the tied one "
          f"once); kept {gsm.mask_count(mask)}; before the prune {readiness.outside_above_1e_2} of the removed "
          f"weights were above 0.01; export: {args.out / 'pruned_sparse.hdf5'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
