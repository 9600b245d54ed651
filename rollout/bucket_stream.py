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
  3. A check that nothing else kept a bucket tensor: each view's Python reference count must be back
     at its value before the loader saw it, checked before the release for every tensor but the
     bucket's last (which the loader's generators still hold as a stale loop variable while they
     wait for the next tensor), and for that one right after the next tensor went through. A loader
     that keeps tensors (e.g. lists the iterator) thus fails the refit instead of serving corrupt
     weights silently.
  4. The last bucket is released only by `finish()`, after the whole reload (including the final
     processing) has returned, so nothing of it needs copying.
"""

from __future__ import annotations

import queue
import sys
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
        stream = BucketStream(timeout_s=60.0, detach_pending=detach_layerwise_pending)
        thread = threading.Thread(target=lambda: receiver.receive(stream.consume))   # + stream.receiver_failed
        thread.start()
        try:
            model_runner.reload_weights(weights_iterator=stream.weights(), is_checkpoint_format=True)
            stream.finish()
        except BaseException as exc:
            stream.fail(exc)
    """

    def __init__(self, timeout_s: float, detach_pending: Callable[[Weights], int]) -> None:
        self.timeout_s = timeout_s
        self._detach_pending = detach_pending
        self._ready: queue.Queue[_Bucket | _ReceiverFailed] = queue.Queue()
        self._held: _Bucket | None = None
        self._reached_last = False
        self.last_name: str | None = None  # the tensor most recently handed to the loader (for errors)
        self.num_buckets = 0
        self.detached_bytes = 0  # bytes copied out because a layer straddled a bucket boundary
        self._last_counts: list[int] = []

    # -- receiver thread ------------------------------------------------------------------------
    def consume(self, weights: Weights, is_last: bool) -> None:
        bucket = _Bucket(weights, is_last)
        self._ready.put(bucket)
        # The loader may legitimately take long on the last bucket (the reload's final processing).
        if not bucket.released.wait(self.timeout_s):
            raise TimeoutError(f"the model loader did not finish a bucket within timeout_s={self.timeout_s}")
        if bucket.error is not None:
            raise RuntimeError(f"loading into the model failed: {bucket.error}") from bucket.error

    def receiver_failed(self, exc: BaseException) -> None:
        self._ready.put(_ReceiverFailed(exc))

    # -- loader thread --------------------------------------------------------------------------
    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        deferred: tuple[_Bucket, list[int]] | None = None
        while True:
            try:
                item = self._ready.get(timeout=2 * self.timeout_s)  # the receiver's own waits time out first
            except queue.Empty:
                raise TimeoutError(f"no bucket arrived within {2 * self.timeout_s} s") from None
            if isinstance(item, _ReceiverFailed):
                raise item.exc
            self._held, self.num_buckets = item, self.num_buckets + 1
            before = [sys.getrefcount(tensor) for _, tensor in item.weights]
            tensor = None
            for name, tensor in item.weights:
                self.last_name = name
                yield name, tensor
                if deferred is not None:  # one tensor of this bucket went through: stale loop variables are gone
                    self._check_released(*deferred, last=len(deferred[1]))
                    deferred = None
            tensor = None  # our loop variable must not count as the loader's reference
            if item.is_last:
                self._reached_last = True
                self._last_counts = before
                return  # released by finish(), once the reload has returned
            self.detached_bytes += self._detach_pending(item.weights)
            # The bucket's last tensor may still sit in the loader's loop variables (generators waiting for
            # the next tensor): it is checked right after the next bucket's first tensor went through.
            self._check_released(item, before, last=len(before) - 1)
            self._release(item)
            deferred = (item, before)

    def finish(self) -> None:
        """The reload returned: release the last bucket. Raises if the loader stopped early."""
        held = self._held
        if not self._reached_last:
            raise RuntimeError(f"the model loader stopped after {self.last_name!r}, before the end of the refit")
        self._check_released(held, self._last_counts, last=len(self._last_counts))
        self._release(held)

    def fail(self, exc: BaseException) -> None:
        """The reload failed: make the held bucket's consume raise `exc` (the sender then raises too)."""
        if self._held is not None and not self._held.released.is_set():
            self._held.error = exc
            self._release(self._held)

    def _release(self, bucket: _Bucket) -> None:
        self._held = None if self._held is bucket else self._held
        bucket.released.set()

    def _check_released(self, bucket: _Bucket, before: list[int], last: int) -> None:
        """Each of the bucket's first `last` tensors has its reference count back where it started."""
        for (name, tensor), count in zip(bucket.weights[:last], before[:last]):
            if sys.getrefcount(tensor) > count:
                raise RuntimeError(
                    f"the model loader kept a reference to {name!r} past its bucket, where the next bucket "
                    "overwrites it (refit aborted)"
                )
