"""TVM schedules and pipelines for the TVM backend (``backends/tvm.py``).

TVM 0.27's default CPU pipeline applies no schedule at all (every kernel runs as one serial loop
nest: ResNet-50 takes seconds), the wheel has no BLAS/DNNL to offload to, and dlight's CPU rules
cover only GEMV and row reductions. This module supplies the missing default schedule and the
Relax pipeline around it:

``CPUGeneric`` (a dlight :class:`ScheduleRule`)
    * one reduction block whose last spatial axis is the output's contiguous axis and also
      indexes some input contiguously -- matmul with a ``[K, N]`` weight, NHWC convolution with
      an HWIO weight, depthwise convolution, NHWC pooling -- becomes a register-tiled micro-kernel::

          parallel(fuse(n_o, <other spatial>, m_o)) / reduction loops / unroll(m_i) / vectorize(n_i)

      with a small accumulator (``cache_write``, at most :data:`MAX_ACC_BYTES` so LLVM keeps it
      in registers), the elementwise epilogue (bias, folded BN, ReLU, residual add) inlined into
      the write-back, and constant weights repacked at compile time to ``[N/VN, ..., VN]`` panels;
    * an ``NT_matmul`` over a weight as torch lays it out (``[N, K]``; ``params="reference"``) is
      a dot product per output vectorised along ``K`` up to ``NT_DOT_MAX_ROWS`` rows, and above
      gathers a ``[K, VN]`` panel per parallel task for the micro-kernel above;
    * other reductions run their spatial loops in parallel;
    * injective kernels are inlined into one loop nest: parallel outer loops, vectorised inner loop.

``cpu_pipeline`` / ``cuda_pipeline``
    Relax -> fused, scheduled TIR -> VM-ready module. The CPU one runs convolutions in
    NHWC/HWIO (the layout the micro-kernel vectorises: optc's convert-layout produces it, and
    ``ConvertLayout`` converts what is left), marks constant weights layout-free so
    that their repacking is folded at compile time, applies tuned records first (MetaSchedule
    database) and the default rules to everything else. The CUDA one applies dlight's GPU rules.

Also here: thread-pool configuration (TVM's default pool on x86 uses half the cores and pins the
calling thread to core 0), the MetaSchedule builder function, and :func:`check_kernel`, which
decides whether a tuned kernel may replace the default one.

Modules: ``target.py`` (targets, threads), ``relax_rewrites.py`` (Relax mutators),
``cpu_schedule.py`` (``CPUGeneric``), ``pipelines.py`` (the Relax pipelines, TIR queries),
``kernel_check.py`` (checking a tuned kernel), ``tuning.py`` (MetaSchedule with checked records),
``common.py`` (shared constants). Their public names are importable from here.
"""

from optc.backends.tvm_schedule.common import LAYOUTS, MAX_ACC_BYTES
from optc.backends.tvm_schedule.cpu_schedule import CPUGeneric, default_rules
from optc.backends.tvm_schedule.kernel_check import KernelCheck, check_kernel
from optc.backends.tvm_schedule.pipelines import (
    apply_default_schedule, build_pipeline, has_reduction, is_static, lower_passes, pre_schedule_passes,
    pre_schedule_pipeline, schedule_passes, tir_functions,
)
from optc.backends.tvm_schedule.relax_rewrites import clip_to_min_max, fold_constant_call_tir
from optc.backends.tvm_schedule.target import configure_threads, cuda_target, host_cpu, llvm_target
from optc.backends.tvm_schedule.tuning import cpu_tensor_intrinsics_only, make_fast_build, tune

__all__ = ["CPUGeneric", "KernelCheck", "LAYOUTS", "MAX_ACC_BYTES", "apply_default_schedule", "build_pipeline",
           "check_kernel", "clip_to_min_max", "configure_threads", "cpu_tensor_intrinsics_only", "cuda_target",
           "default_rules", "fold_constant_call_tir", "has_reduction", "host_cpu", "is_static", "llvm_target",
           "lower_passes", "make_fast_build", "pre_schedule_passes", "pre_schedule_pipeline", "schedule_passes",
           "tir_functions", "tune"]
