"""The code that runs inside vLLM's worker process.

refit.py: the receive-and-load component; extension.py: the worker extensions that own it; rpc.py:
the typed worker RPC; logs.py: the benign-log filter; idle_spin.py: the async engine's worker wait.
It imports only the transfer's receiving half, rollout.load_path, rollout.bucket_stream,
rollout.tied_heads, rollout.vllm_compat and vLLM, never a driver module
(tests/worker/test_worker_imports.py checks it). Nothing is imported here: vLLM imports the
extension by its qualified name.
"""
