"""The plain model and optimizer inside the wrappers that training adds (DistributedDataParallel, torch.compile,
the optimizer wrappers of accelerate and Lightning)."""
import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel and torch.compile wrappers (whose parameter names carry
    `module.` and `_orig_mod.` prefixes)."""
    while True:
        # No `or` between the two: a compiled module's truth value calls len(), which a plain network lacks.
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def unwrap_optimizer(optimizer):
    """The optimizer inside the wrappers that frameworks put around it (accelerate's AcceleratedOptimizer, which
    transformers' Trainer holds as `trainer.optimizer`, and Lightning's LightningOptimizer), so that a GSM's own
    methods (`hard_mask`, `num_active`, `prunable_names`) are reachable: each wrapper's `optimizer` is followed."""
    while True:
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            return optimizer
        optimizer = inner
