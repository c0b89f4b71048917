"""Start ``app.py`` in a subprocess on a free localhost port (for the API and browser tests)."""
from __future__ import annotations

import os
from contextlib import contextmanager

from benchmarks.loadtest import PROJECT_ROOT as ROOT
from benchmarks.loadtest import running_app as _running_app

__all__ = ["ROOT", "running_app"]


@contextmanager
def running_app(checkpoint_dir, log_path, timeout: float = 120.0, threads: int | None = None):
    """The app serving ``checkpoint_dir`` with ``threads`` torch threads (default one unless OMP_NUM_THREADS
    says otherwise: the tiny test networks gain nothing from more, and pytest runs beside the server; a
    test comparing the app's bytes with a share link's passes the app's own, ``reproducible.THREADS``)."""
    threads = str(threads) if threads else os.environ.get("OMP_NUM_THREADS", "1")
    env = {"OMP_NUM_THREADS": threads, "APP_TORCH_THREADS": threads, "DIFFUSION_HF_REPO": ""}
    with _running_app(checkpoint_dir, log_path, timeout, **env) as url:
        yield url
