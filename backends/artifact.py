"""Artifacts on disk: the folder a compiled model saves to, its ``manifest.json`` (format, versions,
signature, backend options, the sha256 of every file), atomic saves, and loading with hashes checked.

Manifest (docs/backends.md)::

    {"format": "optc-artifact", "format_version": 1, "optc_version": "0.1.0",
     "backend": "onnx", "target": {"device": "cpu", "backend": "onnx", "layout": "NCHW"},
     "pipeline": "canonicalize,...", "name": "Model",
     "inputs": [TensorSpec.to_json()...], "outputs": [...],
     "in_spec": <treespec_dumps(...) as JSON>, "out_spec": ..., "input_leaves": [{"path", "is_tensor", ...}],
     "options": {backend options}, "versions": {"torch": ..., ...},
     "files": {"model.onnx": {"sha256": "...", "bytes": 1234}}}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING

import torch

import optc
from optc.backends.signature import Signature
from optc.errors import ArtifactError, OptcError
from optc.target import Target, make_target

if TYPE_CHECKING:
    from optc.backends.base import CompiledModel

log = logging.getLogger("optc.backends")

MANIFEST = "manifest.json"
FORMAT = "optc-artifact"
FORMAT_VERSION = 1


def manifest_of(model: "CompiledModel", files: dict[str, dict]) -> dict:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "optc_version": optc.__version__,
        "backend": model.backend,
        "target": {"device": model.target.device, "backend": model.target.backend, "layout": model.target.layout},
        "pipeline": model.pipeline,
        **model.signature.to_json(),
        "options": model.backend_options,
        "versions": _versions(),
        "files": files,
    }


def save_artifact(model: "CompiledModel", directory: str | os.PathLike) -> str:
    """Write ``model``'s artifact(s) and ``manifest.json`` into ``directory``; returns its path.

    Everything is written into a temporary sibling folder that is renamed into place at the end,
    so a failed save leaves no half-written folder. An existing artifact folder is replaced; any
    other existing non-empty folder is an error."""
    final = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(final) or "."
    if os.path.exists(final):
        if not os.path.isdir(final) or (os.listdir(final) and not os.path.exists(os.path.join(final, MANIFEST))):
            raise ArtifactError(f"{final} exists and is not an optc artifact folder: refusing to overwrite it")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    try:
        model.signature.to_json()  # fail early (before the big files) on an unsavable structure
        names = model.save_artifacts(tmp)
        files = {}
        for name in names:
            path = os.path.join(tmp, name)
            if not os.path.isfile(path):
                raise ArtifactError(f"{model.backend}: save_artifacts reported '{name}' but did not write it")
            files[name.replace(os.sep, "/")] = {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest_of(model, files), f, indent=2, sort_keys=False)
            f.write("\n")
        _replace_dir(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OptcError, KeyboardInterrupt, SystemExit)):
            raise
        raise ArtifactError(f"saving {model.signature.name} to {final} failed: {type(e).__name__}: {e}") from e
    return final


def _replace_dir(tmp: str, final: str) -> None:
    if not os.path.exists(final):
        os.rename(tmp, final)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=os.path.dirname(final))
    os.rmdir(old)
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    out = {"torch": torch.__version__}
    for mod in ("onnx", "onnxruntime", "onnxscript", "tvm"):
        m = sys.modules.get(mod)
        if m is not None and getattr(m, "__version__", None):
            out[mod] = m.__version__
    return out


# ---- loading -----------------------------------------------------------------------------------
def read_manifest(directory: str | os.PathLike) -> dict:
    """Read and check ``manifest.json`` and the hash of every artifact file it lists."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ArtifactError(f"{directory}: no such artifact folder")
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ArtifactError(f"{directory}: {MANIFEST} is missing (not an optc artifact folder, or an "
                            "incomplete copy)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: cannot read the manifest: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an optc artifact manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {manifest.get('format_version')} is not "
                            f"supported by optc {optc.__version__} (it reads version {FORMAT_VERSION})")
    for key in ("backend", "target", "files", "inputs", "outputs", "in_spec", "out_spec", "input_leaves"):
        if key not in manifest:
            raise ArtifactError(f"{path}: manifest has no '{key}'")
    if manifest.get("optc_version") != optc.__version__:
        log.warning("%s was saved by optc %s; this is optc %s", directory, manifest.get("optc_version"),
                    optc.__version__)
    root = os.path.realpath(directory)
    for name, info in manifest["files"].items():
        file = os.path.realpath(os.path.join(directory, name))
        if not file.startswith(root + os.sep):
            raise ArtifactError(f"{path}: artifact file '{name}' lies outside the artifact folder")
        if not os.path.isfile(file):
            raise ArtifactError(f"{directory}: artifact file '{name}' is missing")
        digest = sha256_file(file)
        if digest != info.get("sha256"):
            raise ArtifactError(f"{directory}: artifact file '{name}' is corrupted (sha256 {digest[:16]}... "
                                f"does not match the manifest's {str(info.get('sha256'))[:16]}...)")
    return manifest


def load_artifact(directory: str | os.PathLike) -> "CompiledModel":
    """Load a folder written by :meth:`CompiledModel.save` (hashes checked first)."""
    manifest = read_manifest(directory)
    from optc.backends.registry import get_backend
    backend = get_backend(manifest["backend"])
    target = target_from_manifest(manifest)
    backend.check_available(target)
    return backend.load(os.fspath(directory), manifest)


def target_from_manifest(manifest: dict) -> Target:
    t = manifest["target"]
    try:
        return make_target(t["device"], t.get("backend") or manifest["backend"])
    except (OptcError, KeyError, TypeError) as e:
        raise ArtifactError(f"manifest target {t!r} is invalid: {e}") from e


def signature_from_manifest(manifest: dict) -> Signature:
    return Signature.from_json(manifest)


__all__ = ["MANIFEST", "FORMAT", "FORMAT_VERSION", "save_artifact", "manifest_of", "read_manifest", "load_artifact",
           "sha256_file", "target_from_manifest", "signature_from_manifest"]
