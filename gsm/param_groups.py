"""The usual param groups for training with weight decay: none on biases and normalisation parameters."""
from typing import Any, Dict, List, Tuple

from torch import nn

from gsm.wrappers import unwrap_model

# Normalisation layers, whose weights and biases are scales and shifts rather than weights to decay or prune.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def param_groups(model: nn.Module, weight_decay: float, bias_lr_factor: float = 1.0) -> List[Dict[str, Any]]:
    """Param groups for `GSM` (or any torch optimizer) of the trainable parameters of `model` (possibly wrapped
    in DDP or torch.compile): biases and normalisation parameters get no weight decay, biases get
    `lr_factor = bias_lr_factor` (a key the trainers of this project multiply the scheduled lr by; other
    loops may ignore it). Groups appear in the order of their first parameter, parameters in model order:
    [{"params": [...], "lr_factor": ..., "weight_decay": ...}, ...]. None of the groups sets `prunable`, so
    GSM ranks every parameter of dim > 1 (a group of normalisation parameters is never of dim > 1)."""
    plain = unwrap_model(model)
    norm_params = {id(p) for m in plain.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    groups: Dict[Tuple[float, float], List[nn.Parameter]] = {}
    for name, p in plain.named_parameters():
        if not p.requires_grad:
            continue
        is_bias = name.endswith("bias")
        no_decay = is_bias or id(p) in norm_params
        key = (bias_lr_factor if is_bias else 1.0, 0.0 if no_decay else weight_decay)
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "lr_factor": factor, "weight_decay": wd} for (factor, wd), ps in groups.items()]
