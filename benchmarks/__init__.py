"""gpumesh benchmarks: `python -m benchmarks [name ...] [--json] [--quick]`.

Each benchmark starts what a user would start (a coordinator process, client processes, a
node simulator) and reports latency percentiles, or ratios against a baseline measured in
the same run. They are not part of the test suite: tests assert behaviour, not speed.
"""
