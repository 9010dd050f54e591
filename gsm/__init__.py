"""Global Sparse Momentum SGD for pruning: the optimizer, pruning masks and reports, and the files of pruned
models (hdf5 weights, masks, compressed exports). This project's own experiments live in `gsm.experiments`,
which this package does not import."""
from gsm.denormals import flush_denormals
from gsm.optimizer import GSM
from gsm.param_groups import param_groups
from gsm.pruned_io import load_mask, load_sparse, save_mask, save_sparse
from gsm.pruning import (PruneReadiness, apply_mask_to_grads, apply_mask_to_weights, global_magnitude_mask,
                         mask_count, prunable_parameters, prune_readiness, sparsity_report)
from gsm.weights_io import WeightsFileError, load_hdf5, read_hdf5, save_hdf5
from gsm.wrappers import unwrap_model, unwrap_optimizer

__all__ = ["GSM", "flush_denormals", "param_groups", "apply_mask_to_grads", "apply_mask_to_weights",
           "global_magnitude_mask", "mask_count", "prunable_parameters", "sparsity_report", "save_mask", "load_mask",
           "save_sparse", "load_sparse", "WeightsFileError", "load_hdf5", "read_hdf5", "save_hdf5", "unwrap_model",
           "unwrap_optimizer", "PruneReadiness", "prune_readiness"]
