"""The plain model inside the wrappers that training adds (DistributedDataParallel, torch.compile)."""
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
