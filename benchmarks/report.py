"""What every benchmark in this folder records beside its timings: the machine it ran on, and the
JSON file that the numbers of docs/benchmarks.md are read from."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine_info() -> dict:
    """CPU count, torch version and threads, platform and the load average at the time of the run
    (a busy machine explains a slow number)."""
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    try:
        import torch
    except ImportError:  # the load test drives the app over HTTP and needs no torch of its own
        return info
    return {**info, "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def write_json(path, result: dict) -> None:
    """``result`` as indented JSON at ``path`` (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
