"""The files the app hands to the browser: content-addressed PNG, GIF and JSON files in one
temporary folder (``OutputFiles``), swept when old, and ``png_files``, which turns a handler's
numpy images into such files."""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .render import png_bytes


class OutputFiles:
    """Content-addressed files for downloads (GIF, PNG, JSON) in one temporary folder; files older
    than ``max_age_s`` are removed as new ones are written. Writing bytes that are already there
    renews their folder's age (the same seed gives the same file, perhaps written hours ago by
    another run of the app), so a file just handed out is never swept."""

    def __init__(self, root=None, max_age_s: float = 3600):
        self.root = Path(root or Path(tempfile.gettempdir()) / "diffusion_app_files")
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._last_sweep = 0.0

    def write(self, name: str, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()[:20]
        folder = self.root / digest
        path = folder / name
        with self._lock:
            folder.mkdir(parents=True, exist_ok=True)
            if not path.is_file():
                tmp = folder / f".{name}.{os.getpid()}.{threading.get_ident()}"
                tmp.write_bytes(data)
                os.replace(tmp, path)
            else:
                os.utime(path)
                os.utime(folder)  # the sweep reads the folder's age
            self._sweep()
        return str(path)

    def _sweep(self):
        now = time.time()
        if now - self._last_sweep < 60:
            return
        self._last_sweep = now
        for folder in self.root.iterdir():
            try:
                if now - folder.stat().st_mtime > self.max_age_s:
                    for f in folder.iterdir():
                        f.unlink()
                    folder.rmdir()
            except OSError:
                pass


def png_files(value, files: OutputFiles, name: str = "image.png"):
    """``value`` (a handler's output: an image, or a tuple, list or dict of outputs) with every
    uint8 numpy image replaced by the path of its PNG in ``files``; anything else as it is.

    Why: Gradio writes a returned array into its cache anew on every return, in place, under a
    name that depends only on the bytes. When the same image goes out again while a browser is
    still fetching it (a streamed chunk repeating an output, two visitors on the same seed), the
    fetch can read a half-written file (seen: "Too little data for declared Content-Length"). A
    returned path is copied into the cache once, under a temporary name, then renamed."""
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return files.write(name, png_bytes(value))
    if isinstance(value, dict):
        return {k: png_files(v, files, name) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(png_files(v, files, name) for v in value)
    return value
