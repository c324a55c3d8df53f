"""What about this machine changes a training's numbers bit for bit, found without torch.

The same config, seed and sample give identical metrics only with the same torch build, the
same number of CPU threads and the same processor family (or GPU model): each picks other
kernels or sums in another order. These values enter `train`'s cache key and its run's params.
They are read from files and the driver, not from an imported torch, so that a `main` whose
stages are all cached never loads torch; `train` then runs with exactly these threads.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
from pathlib import Path

import psutil

from pipeline.errors import PipelineError

THREADS_ENV = "OMP_NUM_THREADS"


@functools.cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def torch_build() -> dict:
    """torch's version.py (version, CUDA it was built for), read without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError("torch is not installed: run `make setup` (pip install -r "
                            "requirements.txt)")
    path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    version_spec = importlib.util.spec_from_file_location("_torch_build_version", path)
    module = importlib.util.module_from_spec(version_spec)
    version_spec.loader.exec_module(module)
    return {"version": module.__version__, "cuda": getattr(module, "cuda", None)}


def torch_threads() -> int:
    """$OMP_NUM_THREADS when set, else one thread per physical core (torch's own default)."""
    configured = os.environ.get(THREADS_ENV, "").strip()
    if configured:
        if not configured.isdigit() or int(configured) < 1:
            raise PipelineError(f"{THREADS_ENV}={configured!r}: set it to a positive whole "
                                f"number of threads, or unset it")
        return int(configured)
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def cuda_gpu_names() -> list[str]:
    """The GPUs CUDA would show this process, from the NVIDIA driver (empty without one)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return []
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no library: no GPU
        return []
    try:
        names = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                 for i in range(pynvml.nvmlDeviceGetCount())]
        if visible is not None:
            chosen = [part.strip() for part in visible.split(",")]
            names = [names[int(i)] for i in chosen if i.isdigit() and int(i) < len(names)]
        return [n.decode() if isinstance(n, bytes) else n for n in names]
    finally:
        pynvml.nvmlShutdown()


def resolve_device(requested: str) -> str:
    """`auto` takes a GPU when torch is built for CUDA and the driver shows one."""
    gpus = cuda_gpu_names() if torch_build()["cuda"] else []
    if requested == "auto":
        return "cuda" if gpus else "cpu"
    if requested not in ("cpu", "cuda") and not requested.startswith("cuda:"):
        raise PipelineError(f"unknown device {requested!r}: use auto, cpu or cuda")
    if requested.startswith("cuda") and not gpus:
        raise PipelineError(f"device={requested} but no CUDA GPU is visible; use device=auto or cpu")
    return requested


def numerics(device: str) -> dict:
    """The values that decide a training's bits on `device` (besides config, seed and data)."""
    values = {
        "torch_version": torch_build()["version"],
        "torch_threads": torch_threads(),
        "cpu": f"{platform.machine()} {cpu_model()}",
    }
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        gpus = cuda_gpu_names()
        if index >= len(gpus):
            raise PipelineError(f"device={device} but only {len(gpus)} CUDA GPU(s) are visible")
        values["gpu"] = gpus[index]
    return values
