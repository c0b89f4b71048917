"""Start ``app.py`` in a subprocess on a free localhost port (for the API and browser tests)."""
from __future__ import annotations

import os
from contextlib import contextmanager

from benchmarks.loadtest import PROJECT_ROOT as ROOT
from benchmarks.loadtest import running_app as _running_app

__all__ = ["ROOT", "running_app"]


@contextmanager
def running_app(checkpoint_dir, log_path, timeout: float = 120.0):
    """The app serving ``checkpoint_dir`` (one thread per torch op unless OMP_NUM_THREADS says otherwise:
    the tiny test networks gain nothing from more, and pytest runs beside the server)."""
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    env = {"OMP_NUM_THREADS": threads, "APP_TORCH_THREADS": threads, "DIFFUSION_HF_REPO": ""}
    with _running_app(checkpoint_dir, log_path, timeout, **env) as url:
        yield url
