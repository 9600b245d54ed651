"""The ZMQ socket between sender and receiver, with the one receive helper that enforces `timeout_s`.

DEALER on both ends: unlike REQ/REP it has no lock-step state to get stuck in after a timeout, and a
restarted peer simply reconnects. The sender binds, the receiver connects; ZMQ lets the connect
come first on ipc:// and retries until the sender binds. A sender with N receivers binds one socket
per receiver (`receiver_endpoint`): each conversation stays a plain ordered pair, and every wait for
a receiver is a wait on its own socket, bounded like any other.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import weakref

import zmq

from rollout.transfer import wire
from rollout.transfer.errors import TransferTimeout

_IPC = "ipc://"
_MAX_SOCKET_PATH = 107  # sun_path in struct sockaddr_un on Linux, minus the NUL
_RANK_SUFFIX = 6  # room for receiver_endpoint's ".<rank>" up to rank 99999


def new_endpoint(directory: str | None = None) -> str:
    """A fresh `ipc://` address inside a new private (0700) directory, so two jobs on one host never
    collide and no other user can connect. The binding side removes both on close."""
    private_dir = tempfile.mkdtemp(prefix="refit-", dir=directory)
    path = os.path.join(private_dir, "sock")
    if len(path.encode()) + _RANK_SUFFIX > _MAX_SOCKET_PATH:
        os.rmdir(private_dir)
        raise ValueError(
            f"socket path {path!r} exceeds {_MAX_SOCKET_PATH} bytes; pass a shorter directory"
        )
    return _IPC + path


def receiver_endpoint(endpoint: str, rank: int) -> str:
    """The socket of receiver `rank`: receiver 0 uses `endpoint` itself (so one receiver is what it always
    was), receiver r a sibling file in the same private directory."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"receiver rank must be an integer >= 0, got {rank!r}")
    return endpoint if rank == 0 else f"{endpoint}.{rank}"


def ipc_path(endpoint: str) -> str:
    if not endpoint.startswith(_IPC):
        raise ValueError(
            f"endpoint must be an ipc:// address (see new_endpoint()), got {endpoint!r}"
        )
    return endpoint[len(_IPC) :]


class Channel:
    """One DEALER socket; every send and receive is bounded by `timeout_s`.

    Example:
        ch = Channel(endpoint, bind=True, timeout_s=30.0)
        ch.send(msg, "BeginRefit")
        ready = ch.recv("Ready for refit 3", deadline=time.monotonic() + 30.0)
        ch.close()
    """

    def __init__(self, endpoint: str, *, bind: bool, timeout_s: float, spin_s: float = 0.0) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.spin_s = spin_s
        self._bind = bind
        path = ipc_path(endpoint)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)  # a dead peer must not block close()
        self._sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout_s * 1000)))
        self._sock.setsockopt(zmq.RECONNECT_IVL, 20)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 200)
        if bind:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            self._sock.bind(endpoint)
        else:
            self._sock.connect(endpoint)

    def send(self, msg: wire.Message, what: str, if_blocked=None) -> None:
        """Send, waiting up to timeout_s for a peer. `if_blocked()` runs first when the message cannot go out at
        once (no peer connected: e.g. one that failed and closed); it may raise the real cause instead."""
        frame = wire.encode(msg)
        if if_blocked is not None:
            try:
                return self._sock.send(frame, flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                if_blocked()
        try:
            self._sock.send(frame, copy=True)
        except zmq.Again:
            raise TransferTimeout(
                f"{self.endpoint}: could not send {what} within {self.timeout_s}s (no peer connected)"
            ) from None

    def try_send(self, msg: wire.Message) -> None:
        """Best effort, never blocks: used to tell the peer about an abort we are already raising for."""
        try:
            self._sock.send(wire.encode(msg), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def recv(self, waiting_for: str, deadline: float) -> wire.Message:
        """The next message, or TransferTimeout naming the endpoint and `waiting_for` at `deadline`.
        Busy-polls for up to `spin_s` first, then sleeps in zmq's poll until the message or the deadline."""
        if self.spin_s:
            spin_end = min(deadline, time.monotonic() + self.spin_s)
            while time.monotonic() < spin_end:
                try:
                    return wire.decode(self._sock.recv(zmq.NOBLOCK, copy=True))
                except zmq.Again:
                    pass
        remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
        if not self._sock.poll(remaining_ms, zmq.POLLIN):
            raise TransferTimeout(
                f"{self.endpoint}: timed out after {self.timeout_s}s waiting for {waiting_for} "
                "(peer dead, stuck, or never started?)"
            )
        return wire.decode(self._sock.recv(copy=True))

    def deadline(self) -> float:
        return time.monotonic() + self.timeout_s

    def close(self) -> None:
        """Idempotent. The binding side removes its socket file and the endpoint's private directory."""
        if self._sock.closed:
            return
        self._sock.close(linger=0)
        self._ctx.term()
        if self._bind:
            remove_endpoint(self.endpoint)
        elif not _listener_alive(ipc_path(self.endpoint)):
            remove_endpoint(self.endpoint)  # the binder died without cleaning up


class Owned:
    """What one end owns (its transport and channel). close() releases it; so does a weakref.finalize
    when close() was forgotten or an exception escaped, so no segment or socket file outlives us."""

    def __init__(self) -> None:
        self.transport = None
        self.channels: list[Channel] = []  # the receiver's one; the sender's one per receiver

    def release(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        channels, self.channels = self.channels, []
        for channel in channels:
            channel.close()


class End:
    """What the sender and the receiver share: their transport and channel live in an `Owned`, released
    by `close()` or, when close() is forgotten or an exception escapes, by a weakref.finalize."""

    def _own(self, channels: list[Channel]) -> None:
        self._owned = Owned()
        self._owned.channels = channels
        self._finalizer = weakref.finalize(self, self._owned.release)

    @property
    def _transport(self):
        return self._owned.transport

    @_transport.setter
    def _transport(self, value) -> None:
        self._owned.transport = value

    @property
    def _channels(self) -> list[Channel]:
        return self._owned.channels

    @property
    def _channel(self) -> Channel | None:
        """The first (a receiver's only) channel; None once closed."""
        return self._owned.channels[0] if self._owned.channels else None

    def close(self) -> None:
        """Idempotent: frees the buffers, closes the socket; the binding end removes the socket file and its
        directory (the connecting end does so too when the binder died without cleaning up)."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _listener_alive(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:  # ECONNREFUSED: a stale file; ENOENT: already gone
        return False
    finally:
        probe.close()


def remove_endpoint(endpoint: str) -> None:
    """Remove the socket file and, if it is a new_endpoint() directory and now empty, the directory."""
    path = ipc_path(endpoint)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    directory = os.path.dirname(path)
    if os.path.basename(directory).startswith("refit-"):
        try:
            os.rmdir(directory)
        except OSError:  # not empty or already gone: not ours to force
            pass
