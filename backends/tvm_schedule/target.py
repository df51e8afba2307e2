"""TVM targets for this host (LLVM with the host's CPU, CUDA with the device's compute capability) and the thread pool."""

from __future__ import annotations

import logging
import os
import threading

import tvm

log = logging.getLogger("optc.backends.tvm")


# ---- targets --------------------------------------------------------------------------------------
def host_cpu() -> str:
    """LLVM's name for this machine's CPU (``cascadelake``, ``znver4``...)."""
    from tvm.target.codegen import llvm_get_system_cpu
    return str(llvm_get_system_cpu())


def llvm_target(threads: int, mcpu: str | None = None) -> dict:
    """The TVM target (a JSON dict) for this host's CPU with ``threads`` cores."""
    return {"kind": "llvm", "mcpu": mcpu or host_cpu(), "num-cores": int(threads)}


def cuda_target(device_id: int = 0) -> dict:
    """The TVM target for CUDA device ``device_id``, with its compute capability as ``arch``."""
    dev = tvm.cuda(device_id)
    arch = "sm_" + str(dev.compute_version).replace(".", "")
    return {"kind": "cuda", "arch": arch, "max_threads_per_block": int(dev.max_threads_per_block),
            "max_shared_memory_per_block": int(dev.max_shared_memory_per_block), "thread_warp_size": 32}


# ---- threads ----------------------------------------------------------------------------------------
_THREADS = threading.local()


def configure_threads(n: int) -> None:
    """Make TVM's thread pool of the calling thread run ``n`` workers on every core this process
    may use.

    TVM's pool is per calling thread and created on the first parallel kernel. Left alone on x86
    it starts ``cores / 2`` workers (it assumes hyper-threading: 1 on a 2-core machine) and pins
    the calling thread -- Python's main thread, and every thread torch or ONNX Runtime starts
    from it later -- to core 0. Mode ``-3`` (kSpecifyThreadShareAllCore) with the process's CPU
    set avoids both. Cheap when nothing changes (remembered per thread).
    """
    if getattr(_THREADS, "n", None) == n:
        return
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = list(range(os.cpu_count() or 1))
    tvm.get_global_func("runtime.config_threadpool")(-3, int(n), [str(c) for c in cpus])
    _THREADS.n = n
