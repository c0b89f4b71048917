"""The app's numerics (``diffusion_core.reproducible``): AVX2 kernels and a fixed thread count,
pinned before a process computes anything, so share links give the same bytes on any x86 machine.
Each case runs in a fresh interpreter: the kernel libraries read their settings once."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from diffusion_core import reproducible

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_FLAGS = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""  # Linux; elsewhere the x86 cases skip
x86_with_avx2 = pytest.mark.skipif(not reproducible.is_x86() or "avx2" not in CPU_FLAGS, reason="needs an x86 Linux CPU with AVX2")


def _python(code: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in reproducible.KERNELS}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


PROBE = """
import torch
from diffusion_core import reproducible
{pin}
x = torch.nn.functional.conv2d(torch.ones(1, 4, 8, 8), torch.ones(2, 4, 1, 1))  # something computes
print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), reproducible.describe(), sep="|")
"""


@x86_with_avx2
def test_pin_after_importing_torch_selects_avx2_and_the_apps_threads():
    capability, threads, line = _python(PROBE.format(pin="reproducible.pin()")).split("|")
    assert capability == "AVX2" and int(threads) == reproducible.THREADS
    assert "share links reproduce their exact bytes" in line


@x86_with_avx2
def test_a_kernel_setting_from_the_environment_wins_and_is_reported():
    capability, _, line = _python(PROBE.format(pin="reproducible.pin()"), ATEN_CPU_CAPABILITY="default").split("|")
    assert capability == "DEFAULT"
    assert "may differ" in line and "AVX2 kernels and 2 threads" in line


@x86_with_avx2
def test_pinning_after_the_first_computation_is_reported_as_not_in_force():
    late = "torch.ones(3).exp()\nreproducible.pin()"  # ATen has chosen its kernels already
    capability, _, line = _python(PROBE.format(pin=late)).split("|")
    assert capability != "AVX2" or "avx512" not in CPU_FLAGS
    if capability != "AVX2":
        assert "may differ" in line


def test_the_sampling_cli_runs_at_the_apps_thread_count():
    from diffusion_core.sample import build_parser

    assert build_parser().parse_args(["--list-models"]).threads == reproducible.THREADS
