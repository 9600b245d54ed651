"""The channel's bounded busy-poll: a message is returned whether it lands during the spin or after it
(when the wait sleeps in zmq's poll), and the deadline bounds the wait even when it is shorter than the spin."""

from __future__ import annotations

import threading
import time

import pytest

from rollout.transfer import TransferTimeout, new_endpoint, wire
from rollout.transfer.channel import Channel


@pytest.fixture
def pair():
    endpoint = new_endpoint()
    a = Channel(endpoint, bind=True, timeout_s=5.0, spin_s=0.02)
    b = Channel(endpoint, bind=False, timeout_s=5.0, spin_s=0.02)
    yield a, b
    b.close()
    a.close()


@pytest.mark.parametrize("delay_s", [0.0, 0.005, 0.2], ids=["queued", "during-spin", "after-spin"])
def test_message_arrives_whenever_it_is_sent(pair, delay_s):
    a, b = pair
    timer = threading.Timer(delay_s, lambda: b.send(wire.Ack(3, 1, 0), "Ack"))
    timer.start()
    try:
        assert a.recv("Ack", a.deadline()) == wire.Ack(3, 1, 0)
    finally:
        timer.join()


def test_deadline_shorter_than_spin_still_times_out(pair):
    a, _ = pair
    a.spin_s = 10.0
    start = time.monotonic()
    with pytest.raises(TransferTimeout, match="Done of refit 9"):
        a.recv("Done of refit 9", time.monotonic() + 0.05)
    assert time.monotonic() - start < 1.0
