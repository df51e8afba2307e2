"""Imports every pass module so that each registers itself. Add new pass modules here."""

import importlib

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
    "decompose",
)

for _name in PASS_MODULES:
    importlib.import_module(f"optc.passes.{_name}")
