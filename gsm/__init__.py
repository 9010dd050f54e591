"""Global Sparse Momentum SGD: the optimizer, pruning masks, hdf5 weights I/O and the experiment pipelines."""
from gsm.denormals import flush_denormals
from gsm.optimizer import GSM
from gsm.pruning import (apply_mask_to_grads, apply_mask_to_weights, global_magnitude_mask, mask_count,
                         prunable_parameters, sparsity_report)
from gsm.weights_io import WeightsFileError, load_hdf5, read_hdf5, save_hdf5

__all__ = ["GSM", "flush_denormals", "apply_mask_to_grads", "apply_mask_to_weights", "global_magnitude_mask", "mask_count",
           "prunable_parameters", "sparsity_report", "WeightsFileError", "load_hdf5", "read_hdf5", "save_hdf5"]
