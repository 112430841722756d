"""What every benchmark script records about the machine, and how it saves its JSON.

A figure means nothing without the device it was measured on, and a half-written result file is
worse than none; the scripts in ``benchmarks/`` share these two helpers.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    """``"cpu (<model>, N cores)"`` or ``"gpu (NVIDIA H100 80GB HBM3)"``: the first JAX device."""
    import jax

    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu ({_cpu_model()}, {os.cpu_count()} cores)"
    return f"{d.platform} ({d.device_kind})"


def device_tag() -> str:
    """A file-name friendly device name: ``cpu``, ``nvidia_h100_80gb_hbm3``, ``tpu_v5_lite``."""
    import jax

    d = jax.devices()[0]
    return "cpu" if d.platform == "cpu" else d.device_kind.lower().replace(" ", "_")


def host_info(**extra: Any) -> dict[str, Any]:
    """The device, the host and the load it was under (the CI machine is shared), plus ``extra``."""
    import jax
    import numpy as np

    info = {"device": device_name(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "numpy": np.__version__,
            "load_average_1min": os.getloadavg()[0]}
    info.update(extra)
    return info


def write_json(result: Any, path: str, *, indent: int = 1) -> str:
    """Writes ``result`` to ``path`` through a temporary name (never half-written); returns it."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".partial"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=indent)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
