"""Benchmarks: each module measures tuneline against a naive baseline in one run.

Every bench module exposes `run(argv) -> dict` (with a "goals" list) and is runnable as
`python -m bench.<name>`; `python -m bench.run_all` runs them all with default settings.
"""
