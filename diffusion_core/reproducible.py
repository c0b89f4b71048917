"""The CPU numerics a share link's bytes are defined on: AVX2 kernels and two torch threads.

A float computation's last bits depend on the kernels torch dispatches to and on how many threads
split it. On x86 the same sampling gives slightly different floats with AVX-512 kernels than with
AVX2 ones (oneDNN's convolutions, ATen's vectorised group norm and activations), and oneDNN's 1x1
convolutions change their reduction order with the number of threads; after quantisation to 8 bits
a few pixels of a grid then differ by one level, so a PNG's bytes depend on the machine.

``pin()`` fixes both for the process before its first computation: every kernel library is limited
to AVX2 (which every x86-64 server of the last decade has, and which costs the app's small UNets
no measurable speed, ``docs/app.md``) and torch runs ``THREADS`` threads. The app and
``python -m diffusion_core.sample`` call it, so a link made on one x86 machine gives the same PNG
on another; training and the evaluation do not (they want AVX-512 and AMX for bf16). ARM machines
and other torch versions keep their own last bits.
"""
from __future__ import annotations

import os
import platform

KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
THREADS = 2  # the free Spaces CPU tier's cores; share links are defined at this thread count


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def pin_kernels() -> None:
    """Limit ATen, oneDNN and MKL to AVX2 kernels (x86 only). Each library reads its variable once,
    at its first computation: call this before the process computes anything. A variable already set
    in the environment is left as it is."""
    if is_x86():
        for k, v in KERNELS.items():
            os.environ.setdefault(k, v)


def pin(threads: int | None = None) -> str:
    """``pin_kernels`` and ``threads`` torch threads (default ``THREADS``); returns ``describe()``."""
    pin_kernels()
    import torch

    torch.set_num_threads(int(threads or THREADS))
    return describe()


def describe() -> str:
    """One line on the numerics in force, and whether share links reproduce their bytes here."""
    import torch

    threads = torch.get_num_threads()
    if not is_x86():
        return f"{platform.machine()} kernels, {threads} torch threads: share links made on x86 may differ in a pixel here and there"
    capability = torch.backends.cpu.get_cpu_capability()
    pinned = capability == "AVX2" and all(os.environ.get(k) == v for k, v in KERNELS.items())
    if pinned and threads == THREADS:
        return f"AVX2 kernels, {threads} torch threads: share links reproduce their exact bytes"
    return (f"{capability} kernels, {threads} torch threads (links are defined on AVX2 kernels and {THREADS} threads): "
            f"an image may differ from a share link's in a pixel here and there")
