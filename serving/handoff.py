"""Connection handoff between the router and the backend workers: client connections move, requests do not.

In the steady state (one champion, no canary or shadow) proxying every request through the router costs a third of
the endpoint's CPU: the router parses and answers each request, and the backend does the same again for the
combined ones. So after the router has answered a connection's first ``POST /predict``, it hands the client's
socket itself to a backend worker (``SCM_RIGHTS`` over an ``AF_UNIX`` ``SOCK_SEQPACKET`` channel, one per worker,
in the backend's ``KILN_HANDOFF_DIR``). The worker answers that connection's later ``POST /predict`` requests
with the same code as the lane (:meth:`serving.service.KilnService.front`); any other request (``/metrics``,
``/livez``, ``/_kiln/*``, ...) is the router's business, so the worker gives the connection back with that request
as a *prefix* the router parses first, and the client notices nothing.

Before a roll, a canary, a shadow or a promotion changes what the router routes to, the router asks every worker
it handed connections to for them back (``return``): each comes back as soon as it has no request in progress,
and the worker says ``done`` when it has none left. Until then the router counts the backend as busy
(``/_kiln/state``'s ``in_flight``), so ``ServingResource`` stops an old backend only once every client connection
is back with the router. A connection is handed over or given back only between requests: nothing read and not
yet answered is lost, and whatever the client sent meanwhile waits in the socket for the new owner.

Messages on a channel: router -> worker ``b"c"`` with one descriptor (a connection to serve) or ``b"return"``;
worker -> router ``b"c" + prefix`` with one descriptor (a connection given back) or ``b"done"``.

This module moves descriptors and knows no HTTP; :mod:`serving.proxy` (which imports it, never the other way round)
detaches a connection from its transport and writes a given-back request as its prefix.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Callable
from typing import Any

MAX_PREFIX_BYTES = 60_000  # a given-back request travels in one SOCK_SEQPACKET message
RETURN = b"return"
DONE = b"done"
CONNECTION = b"c"


def send(channel: socket.socket, payload: bytes, fd: int | None = None) -> None:
    """One message on a channel (non-blocking; raises OSError when the peer is gone or its queue is full)."""
    if fd is None:
        channel.send(payload)
    else:
        channel.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def receive(channel: socket.socket) -> tuple[bytes, list[int]] | None:
    """One message and the descriptors it carried; None when the peer closed the channel."""
    fds = array.array("i")
    try:
        data, ancillary, _, _ = channel.recvmsg(MAX_PREFIX_BYTES + 16, socket.CMSG_SPACE(4 * fds.itemsize))
    except (BlockingIOError, InterruptedError):
        return b"", []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data and not fds:
        return None
    return data, list(fds)


class WorkerChannels:
    """A backend worker's end: listens on ``<folder>/<pid>.sock`` and serves the connections the router hands over.

    ``adopt(sock, channel)`` starts serving a handed-over socket; ``give_back_all(channel)`` is called when the router
    asks for that channel's connections back (it must call :meth:`given_back` for each and :meth:`finished` at the end).
    """

    def __init__(self, folder: str, loop: Any, adopt: Callable[[socket.socket, socket.socket], None],
                 give_back_all: Callable[[socket.socket], None]) -> None:
        self.path = os.path.join(folder, f"{os.getpid()}.sock")
        self.loop = loop
        self.adopt = adopt
        self.give_back_all = give_back_all
        self.channels: set[socket.socket] = set()
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(self.path)
        self.listener.listen(16)
        self.listener.setblocking(False)
        loop.add_reader(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            channel, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        channel.setblocking(False)
        self.channels.add(channel)
        self.loop.add_reader(channel.fileno(), self._read, channel)

    def _read(self, channel: socket.socket) -> None:
        message = receive(channel)
        if message is None:  # the router went away: its connections stay with us until their clients leave
            self._drop(channel)
            return
        data, fds = message
        for fd in fds:
            self.adopt(socket.socket(fileno=fd), channel)
        if data == RETURN:
            self.give_back_all(channel)

    def given_back(self, channel: socket.socket, fd: int, prefix: bytes) -> bool:
        """Send a connection back to the router (False when the channel is gone: the caller keeps serving it)."""
        try:
            send(channel, CONNECTION + prefix, fd)
        except OSError:
            return False
        return True

    def finished(self, channel: socket.socket) -> None:
        try:
            send(channel, DONE)
        except OSError:
            pass

    def _drop(self, channel: socket.socket) -> None:
        if channel in self.channels:
            self.channels.discard(channel)
            self.loop.remove_reader(channel.fileno())
            channel.close()

    def close(self) -> None:
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        for channel in list(self.channels):
            self._drop(channel)
        try:
            os.unlink(self.path)
        except OSError:
            pass


class BackendChannels:
    """The router's end for one backend: a channel to each worker socket in the backend's handoff folder.

    ``hand(fd)`` passes a connection to the next worker (round robin; False when none takes it). ``recall()`` asks
    every worker for its connections back; each arrives through ``adopt(sock, prefix)``, and ``recalled`` is set
    once every worker has said ``done`` (or gone away)."""

    def __init__(self, folder: str, loop: Any, adopt: Callable[[socket.socket, bytes], None]) -> None:
        import asyncio

        self.folder = folder
        self.loop = loop
        self.adopt = adopt
        self.channels: list[socket.socket] = []
        self.handed = 0
        self.recalling: set[socket.socket] = set()
        self.recalled = asyncio.Event()
        self.recall_started = False
        self._next = 0
        self._connect()

    def _connect(self) -> None:
        try:
            names = sorted(n for n in os.listdir(self.folder) if n.endswith(".sock"))
        except OSError:
            return
        for name in names:
            channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                channel.connect(os.path.join(self.folder, name))
            except OSError:
                channel.close()
                continue
            channel.setblocking(False)
            self.channels.append(channel)
            self.loop.add_reader(channel.fileno(), self._read, channel)

    def hand(self, fd: int) -> bool:
        if self.recall_started:
            return False
        for _ in range(len(self.channels)):
            channel = self.channels[self._next % len(self.channels)]
            self._next += 1
            try:
                send(channel, CONNECTION, fd)
            except OSError:
                continue
            self.handed += 1
            return True
        return False

    def recall(self) -> None:
        self.recall_started = True
        for channel in list(self.channels):
            try:
                send(channel, RETURN)
            except OSError:
                self._drop(channel)
                continue
            self.recalling.add(channel)
        if not self.recalling:
            self.recalled.set()

    def _read(self, channel: socket.socket) -> None:
        message = receive(channel)
        if message is None:  # the worker is gone, and the connections it held with it
            self._drop(channel)
            return
        data, fds = message
        for fd in fds:
            self.adopt(socket.socket(fileno=fd), data[len(CONNECTION):])
        if data == DONE:
            self._drop(channel)

    def _drop(self, channel: socket.socket) -> None:
        if channel in self.channels:
            self.channels.remove(channel)
            self.loop.remove_reader(channel.fileno())
            channel.close()
        if channel in self.recalling:
            self.recalling.discard(channel)
            if not self.recalling:
                self.recalled.set()

    def close(self) -> None:
        for channel in list(self.channels):
            self._drop(channel)
