"""Load test of the app: concurrent gradio_client clients calling ``/generate`` on a local server.

    python -m benchmarks.loadtest                       # starts app.py on a free port, 20 clients x 5 requests
    python -m benchmarks.loadtest --url http://127.0.0.1:7860/ --clients 20 --requests 5 --json runs/loadtest.json

Every request uses the app's default settings with its own seed. Prints the number of errors and
the p50/p95/max latency; exits with status 1 when any request failed.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from .report import machine_info, write_json

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(checkpoint_dir=None, log_path=None, timeout: float = 120.0, **env_extra):
    """Run ``python app.py`` on a free localhost port; yields its base URL, stops it afterwards."""
    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False",
               PYTHONUNBUFFERED="1", **{k: str(v) for k, v in env_extra.items()})
    if checkpoint_dir is not None:
        env["DIFFUSION_CHECKPOINT_DIR"] = str(checkpoint_dir)
    url = f"http://127.0.0.1:{port}/"
    log_path = Path(log_path) if log_path else Path(os.devnull)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "app.py")], cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-3000:] if log_path.is_file() else ""
                    raise RuntimeError(f"app.py exited with status {proc.returncode}:\n{tail}")
                try:
                    with urllib.request.urlopen(url + "config", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"app.py did not answer within {timeout:.0f} s")
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100)."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def run_load(url: str, clients: int = 20, requests: int = 5, timeout: float = 300.0) -> dict:
    from gradio_client import Client

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def worker(c: int):
        try:
            client = Client(url, verbose=False)
        except Exception as e:  # noqa: BLE001
            with lock:
                errors.extend([f"client {c}: connect: {e}"] * requests)
            barrier.abort()
            return
        try:
            barrier.wait(timeout=120)
        except threading.BrokenBarrierError:
            pass
        for i in range(requests):
            t0 = time.perf_counter()
            try:
                path, settings = client.submit(seed=str(1000 * c + i), api_name="/generate").result(timeout=timeout)
                if not Path(path).is_file() or json.loads(settings)["seed"] != 1000 * c + i:
                    raise RuntimeError("unexpected answer")
                with lock:
                    latencies.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(f"client {c} request {i}: {type(e).__name__}: {e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "url": url, "clients": clients, "requests_per_client": requests, "requests": clients * requests,
        "ok": len(latencies), "errors": len(errors), "error_samples": errors[:5], "wall_s": wall,
        "throughput_rps": len(latencies) / wall if wall else float("nan"),
        "latency_s": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95), "max": max(latencies, default=float("nan")),
                      "mean": statistics.fmean(latencies) if latencies else float("nan")},
    }


def warm_up(url: str) -> None:
    """One small request, so that loading the model is not counted in the latencies."""
    from gradio_client import Client

    Client(url, verbose=False).predict(steps=1, api_name="/generate")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadtest", description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running app (default: start app.py on a free local port)")
    p.add_argument("--checkpoint-dir", help="checkpoints for the started app (default $DIFFUSION_CHECKPOINT_DIR or checkpoints/)")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--requests", type=int, default=5, help="requests per client")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)

    def go(url):
        return run_load(url, args.clients, args.requests)

    if args.url:
        warm_up(args.url)
        result = go(args.url)
    else:
        with running_app(args.checkpoint_dir) as url:
            warm_up(url)
            result = go(url)
    result["machine"] = machine_info()
    lat = result["latency_s"]
    print(f"{result['requests']} requests ({result['clients']} clients x {result['requests_per_client']}) in {result['wall_s']:.1f} s: "
          f"{result['errors']} errors, {result['throughput_rps']:.2f} req/s")
    print(f"latency  p50 {lat['p50']:.3f} s   p95 {lat['p95']:.3f} s   max {lat['max']:.3f} s")
    for e in result["error_samples"]:
        print("  error:", e)
    if args.json:
        write_json(args.json, result)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
