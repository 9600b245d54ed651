"""BucketStream without vLLM: a fake sender that overwrites its one buffer as soon as consume returns,
and a fake loader that, like vLLM's layerwise reload, buffers a layer's tensors until the layer is
complete (layers straddle bucket boundaries)."""

from __future__ import annotations

import threading

import pytest
import torch

from rollout.bucket_stream import BucketStream

NUM_TENSORS, TENSOR_NUMEL, PER_BUCKET, PER_LAYER = (
    12,
    64,
    5,
    3,
)  # 5 per bucket, 3 per layer: straddles


def expected(i: int) -> torch.Tensor:
    return torch.full((TENSOR_NUMEL,), float(i + 1))


def run_sender(stream: BucketStream, errors: list) -> None:
    """Packs tensors into ONE reused buffer; overwrites it with garbage right after each consume."""
    buffer = torch.empty(PER_BUCKET * TENSOR_NUMEL)
    names = list(range(NUM_TENSORS))
    try:
        for start in range(0, NUM_TENSORS, PER_BUCKET):
            batch = names[start : start + PER_BUCKET]
            views = []
            for slot, i in enumerate(batch):
                view = buffer[slot * TENSOR_NUMEL : (slot + 1) * TENSOR_NUMEL]
                view.copy_(expected(i))
                views.append((f"t{i}", view))
            stream.consume(views, is_last=start + PER_BUCKET >= NUM_TENSORS)
            buffer.fill_(-999.0)  # the next pack: whatever still points here now reads garbage
    except BaseException as exc:  # noqa: BLE001
        errors.append(exc)
        stream.receiver_failed(exc)


class LayerBufferingLoader:
    """Buffers (name, tensor) until PER_LAYER tensors of a layer arrived, then copies them out."""

    def __init__(self) -> None:
        self.pending: list[
            list
        ] = []  # [name, tensor] pairs, mutable so a detach can swap the tensor
        self.loaded: dict[str, torch.Tensor] = {}

    def load(self, weights) -> None:
        for name, tensor in weights:
            self.pending.append([name, tensor])
            if len(self.pending) == PER_LAYER or name == f"t{NUM_TENSORS - 1}":
                self._flush()

    def _flush(
        self,
    ) -> None:  # its own frame, like vLLM's _layerwise_process: no stale locals stay behind
        for n, t in self.pending:
            self.loaded[n] = t.clone()
        self.pending.clear()

    def detach_pending(self, bucket) -> int:
        spans = [(t.data_ptr(), t.data_ptr() + t.nbytes) for _, t in bucket]
        copied = 0
        for entry in self.pending:
            t = entry[1]
            if any(t.data_ptr() < e and s < t.data_ptr() + t.nbytes for s, e in spans):
                entry[1] = t.clone()
                copied += t.nbytes
        return copied


def refit(loader_fn, detach_pending) -> tuple[BucketStream, list, BaseException | None]:
    stream = BucketStream(timeout_s=10.0, detach_pending=detach_pending, next_bucket_s=20.0)
    errors: list = []
    sender = threading.Thread(target=run_sender, args=(stream, errors))
    sender.start()
    load_error = None
    try:
        loader_fn(stream.weights())
        stream.finish()
    except BaseException as exc:  # noqa: BLE001
        load_error = exc
        stream.fail(exc)
    sender.join(10)
    assert not sender.is_alive()
    return stream, errors, load_error


def test_straddling_layers_are_detached_and_load_exactly():
    loader = LayerBufferingLoader()
    stream, errors, load_error = refit(loader.load, loader.detach_pending)
    assert not errors and load_error is None
    assert stream.num_buckets == 3 and stream.detached_bytes > 0
    for i in range(NUM_TENSORS):
        assert torch.equal(loader.loaded[f"t{i}"], expected(i)), f"t{i} corrupted"


def test_without_the_detach_the_next_bucket_corrupts_buffered_tensors():
    """The same loader with a detach that does nothing: the tensors it buffered across a bucket
    boundary read the sender's next pack. Proves that the detach is what keeps test 1 exact."""
    loader = LayerBufferingLoader()
    stream, errors, load_error = refit(loader.load, lambda bucket: 0)
    assert not errors and load_error is None
    corrupted = [
        i for i in range(NUM_TENSORS) if not torch.equal(loader.loaded[f"t{i}"], expected(i))
    ]
    assert corrupted == [3, 4, 9]  # buffered at the ends of buckets 0 (t3, t4) and 1 (t9)


def test_loader_error_reaches_the_sender():
    def failing(weights):
        for name, _ in weights:
            if name == "t7":
                raise KeyError(f"no parameter named {name!r}")

    stream, errors, load_error = refit(failing, lambda bucket: 0)
    assert isinstance(load_error, KeyError) and stream.last_name == "t7"
    assert errors and "no parameter named 't7'" in str(errors[0])


def test_loader_stopping_early_fails_the_refit():
    def early(weights):
        for name, _ in weights:
            if name == "t2":
                return

    stream, errors, load_error = refit(early, lambda bucket: 0)
    assert load_error is not None and "stopped after 't2'" in str(load_error)
    assert errors


def test_receiver_failure_reaches_the_loader():
    stream = BucketStream(timeout_s=5.0, detach_pending=lambda bucket: 0, next_bucket_s=10.0)
    stream.receiver_failed(TimeoutError("sender went silent"))
    with pytest.raises(TimeoutError, match="sender went silent"):
        list(stream.weights())
