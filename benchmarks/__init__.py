"""Benchmarks and the load test of the app (``python -m benchmarks.<name>`` from the repository root);
they measure the library and the app, and are no part of either."""
