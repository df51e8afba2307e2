"""Imports every pass module so that each registers itself. Add new pass modules here."""

import importlib
import logging

log = logging.getLogger(__name__)

PASS_MODULES = (
    "dce",
    "cse",
    "constant_fold",
    "canonicalize",
    "fuse_attention",
    "fuse_layer_norm",
    "fuse_gelu",
    "merge_parallel_linear",
    "fold_conv_bn",
    "fold_linear_bn",
    "fold_binary",
    "prune_magnitude",
    "prune_channels",
    "insert_qdq",
    "to_half",
    "convert_layout",
)

for _name in PASS_MODULES:
    try:
        importlib.import_module(f"optc.passes.{_name}")
    except ModuleNotFoundError as e:  # a pass module not written yet must not break the others
        if e.name != f"optc.passes.{_name}":
            raise
        log.debug("pass module %s not present", _name)
