"""Benchmarks of the refit, kept out of the installed packages: `python -m benchmarks.<name>` from the repo root.

- `benchmarks.transfer`: one transfer between two processes against the two-copy floor (conf/transfer.yaml).
- `benchmarks.refit`: an end-to-end refit into a live vLLM engine against the floor, a save-and-reload
  through disk and vLLM's reload alone (conf/refit.yaml).
- `benchmarks.fanout`: the refit of a TP=2 engine and of 2 engines against a single-worker engine, same run
  (conf/fanout.yaml).
- `benchmarks.worker_ext`: the worker extension with the benchmarks' and tests' RPCs.
"""
