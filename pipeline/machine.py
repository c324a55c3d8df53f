"""What about this machine changes a training's numbers bit for bit.

The same config, seed and sample give identical metrics only with the same torch build, the
same number of CPU threads and the same processor family (or GPU model): each picks other
kernels or sums in another order. These values enter `train`'s cache key and its run's tags.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch


@functools.cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def numerics(device: str) -> dict:
    """The values that decide a training's bits on `device` (besides config, seed and data)."""
    values = {
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": f"{platform.machine()} {cpu_model()}",
    }
    if device.startswith("cuda"):
        values["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return values
