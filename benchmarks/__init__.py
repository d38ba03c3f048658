"""Benchmarks that time macfn against torch.optim.SGD, AdamW, a dense-inverse MAC and KFAC.

``python -m benchmarks.report`` runs the measured suite and writes ``docs/benchmarks.md``;
``python -m pytest benchmarks --benchmark-only`` runs the pytest-benchmark suite.
"""
