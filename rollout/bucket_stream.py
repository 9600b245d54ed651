"""Turns the receiver's per-bucket callbacks into ONE weights iterator for ONE in-place reload per refit.

Why one iterator: vLLM's `reload_weights` runs its post-load processing (re-packing for oneDNN, quant
processing, attention finalisation) once per call, so a refit must be one call fed by every bucket.

Why the hand-off is race-free (the views are valid only while `consume` runs, because the sender
overwrites the buffer as soon as `consume` returns and the ack goes out):
  1. `consume` (receiver thread) blocks until the loader has pulled *past* the bucket's last tensor.
     vLLM's loaders walk the iterator with plain for-loops (AutoWeightsLoader, WeightsMapper, the
     model's `load_weights`): by the time the next tensor is requested, the previous one has been
     handed to its parameter's weight loader.
  2. A weight loader may still keep a reference after that: vLLM's layerwise reload buffers every
     tensor of a layer until the layer is complete (q/k/v and gate/up land in one fused parameter;
     a layer can straddle two buckets), and layers it cannot finish early (deferred attention,
     padded parameters) until the end of the reload. `detach_pending(bucket)` copies exactly those
     buffered tensors that alias the bucket's memory before the bucket is released.
  3. Nothing else in vLLM's reload path keeps a tensor for later use. Stale references do remain,
     harmlessly: a generator's loop variable holds the tensor it handled last (e.g. WeightsMapper's
     `shard_data` keeps the last *stacked* q/k/v/gate/up tensor until the next one arrives, and
     itertools.groupby its look-ahead item), but they are never read again, only rebound. This is why
     no reference-count check is made: it cannot tell these from real retention. A loader that
     collected the iterator (e.g. `list(weights)`) would break the contract; vLLM's do not (read in
     0.24 and 0.32), and the refit-equivalence tests run with 1 MB buckets in two tensor orders.
  4. The last bucket is released only by `finish()`, after the whole reload (including the final
     processing) has returned, so nothing of it needs copying.
Without step 2 the race is real: tests/engine/test_bucket_stream.py (a fake layer-buffering loader) and
test_engine_vllm.py::test_without_the_detach_a_refit_reads_the_next_bucket (the live engine, copy-out
switched off) both load bytes of the next bucket.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import torch

Weights = list[tuple[str, torch.Tensor]]


class _Bucket:
    def __init__(self, weights: Weights, is_last: bool) -> None:
        self.weights, self.is_last = weights, is_last
        self.released = threading.Event()
        self.error: BaseException | None = None


class _ReceiverFailed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class BucketStream:
    """Receiver thread calls `consume`; the loader iterates `weights()`; then `finish()` or `fail(exc)`.

    Example:
        stream = BucketStream(timeout_s=60.0, detach_pending=detach_layerwise_pending, next_bucket_s=120.0)
        thread = threading.Thread(target=lambda: receiver.receive(stream.consume))   # + stream.receiver_failed
        thread.start()
        try:
            model_runner.reload_weights(weights_iterator=stream.weights(), is_checkpoint_format=True)
            stream.finish()
        except BaseException as exc:
            stream.fail(exc)
    """

    def __init__(
        self, timeout_s: float, detach_pending: Callable[[Weights], int], next_bucket_s: float
    ) -> None:
        """`timeout_s`: how long the receiver waits for the loader to release a bucket; `next_bucket_s`: how
        long the loader waits for the next bucket (rollout.timeouts.next_bucket_s)."""
        self.timeout_s, self.next_bucket_s = timeout_s, next_bucket_s
        self._detach_pending = detach_pending
        self._ready: queue.Queue[_Bucket | _ReceiverFailed] = queue.Queue()
        self._held: _Bucket | None = None
        self._reached_last = False
        self.last_name: str | None = (
            None  # the tensor most recently handed to the loader (for errors)
        )
        self.num_buckets = 0
        self.detached_bytes = 0  # bytes copied out because a layer straddled a bucket boundary

    # -- receiver thread ------------------------------------------------------------------------
    def consume(self, weights: Weights, is_last: bool) -> None:
        bucket = _Bucket(weights, is_last)
        self._ready.put(bucket)
        # The loader may legitimately take long on the last bucket (the reload's final processing).
        if not bucket.released.wait(self.timeout_s):
            raise TimeoutError(
                f"the model loader did not finish a bucket within timeout_s={self.timeout_s}"
            )
        if bucket.error is not None:
            raise RuntimeError(f"loading into the model failed: {bucket.error}") from bucket.error

    def receiver_failed(self, exc: BaseException) -> None:
        self._ready.put(_ReceiverFailed(exc))

    # -- loader thread --------------------------------------------------------------------------
    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        while True:
            try:
                item = self._ready.get(
                    timeout=self.next_bucket_s
                )  # the receiver's own waits time out first
            except queue.Empty:
                raise TimeoutError(
                    f"no bucket arrived within rollout.timeouts.next_bucket_s={self.next_bucket_s}"
                ) from None
            if isinstance(item, _ReceiverFailed):
                raise item.exc
            self._held, self.num_buckets = item, self.num_buckets + 1
            for name, tensor in item.weights:
                self.last_name = name
                yield name, tensor
            # The loader asked for the tensor after this bucket's last one: it is done with the bucket,
            # except for what the layerwise reload buffers, which now gets its own copy.
            if item.is_last:
                self._reached_last = True
                return  # released by finish(), once the reload has returned
            self.detached_bytes += self._detach_pending(item.weights)
            self._release(item)

    def finish(self) -> None:
        """The reload returned: release the last bucket. Raises if the loader stopped early."""
        if not self._reached_last:
            raise RuntimeError(
                f"the model loader stopped after {self.last_name!r}, before the end of the refit"
            )
        self._release(self._held)

    def fail(self, exc: BaseException) -> None:
        """The reload failed: make the held bucket's consume raise `exc` (the sender then raises too)."""
        if self._held is not None and not self._held.released.is_set():
            self._held.error = exc
            self._release(self._held)

    def _release(self, bucket: _Bucket) -> None:
        self._held = None if self._held is bucket else self._held
        bucket.released.set()
