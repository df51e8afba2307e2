"""Imports every pass module so that each registers itself. Add new pass modules here.

The rule (checked by ``tests/passes/test_registry.py``): every module or package in ``passes/``
is either listed in :data:`PASS_MODULES` and registers the passes named after it (``fold-conv-bn``
in ``fold_conv_bn.py``, ``convert-layout`` in ``convert_layout/``; a pass registered by another
pass's module is listed in :data:`FAMILIES`), or is one of :data:`NOT_PASSES`. The list is
written out, not derived, because its order is the registry's order, which ``optc fuzz`` follows.
"""

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
    "fuse_rms_norm",
    "fuse_rotary",
)

#: passes registered by the module of a related pass: pass name -> module
FAMILIES = {"prune-heads": "prune_channels"}

#: modules of passes/ that register no pass: the pass infrastructure and option types shared by passes
NOT_PASSES = frozenset({"_load_all", "base", "manager", "pipeline", "options"})

for _name in PASS_MODULES:
    importlib.import_module(f"optc.passes.{_name}")

# The backend stage's passes (lower-optc-ops, legalize, half-in-float32, ...) live with the backends
# that run them (backends/stage.py, backends/legalize/); they are registered here too, so that any
# pipeline text can name them and ``optc passes`` lists them.
importlib.import_module("optc.backends.stage")
