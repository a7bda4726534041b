"""``--kv-events``: the KV-cache blocks a server stores and evicts, counted from vLLM's events.

``/metrics`` says how much of the prompts the prefix cache served, not why the rest missed. A
server started with ``--kv-events-config`` publishes its KV-cache events over ZMQ; the monitor
subscribes and counts the blocks stored and evicted per interval: a falling hit rate with
evictions means the cache is too small for the working set; without evictions, the prompts
changed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from harness.errors import UserError


@dataclass(frozen=True)
class BlockCounts:
    """KV-cache blocks stored and evicted, from vLLM's KV events, over one interval.

    ``restored`` tells the two reasons for a miss apart: a block stored again after the monitor
    saw it evicted was a miss the cache's size caused (the same prefix, recomputed); a stored
    block never seen before is new content, which is what a changed prefix produces."""

    stored: int = 0
    evicted: int = 0
    restored: int = 0  # stored again after an eviction this monitor saw: capacity misses
    cleared: int = 0  # AllBlocksCleared events (a prefix-cache reset)
    missed_batches: int = 0  # gaps in the publisher's sequence numbers (events dropped)

    def __add__(self, other: BlockCounts) -> BlockCounts:
        return BlockCounts(
            self.stored + other.stored,
            self.evicted + other.evicted,
            self.restored + other.restored,
            self.cleared + other.cleared,
            self.missed_batches + other.missed_batches,
        )


# Evicted block hashes remembered to recognise re-stored blocks; a bound keeps memory flat.
MAX_REMEMBERED_EVICTIONS = 1_000_000


class KvEventCounter:
    """Subscribes to one server's ZMQ KV-event publisher in a thread and counts blocks.

    vLLM publishes ``(topic, 8-byte sequence number, msgpack batch)``; a batch is
    ``[timestamp, [event, ...], data_parallel_rank]`` and each event a map tagged by ``type``
    (``BlockStored`` and ``BlockRemoved`` with their ``block_hashes``, ``AllBlocksCleared``).
    Decoded with msgspec and pyzmq, which vLLM depends on, without importing vLLM.
    ZMQ subscribers see only what is published after they connect (no replay here)."""

    def __init__(self, endpoint: str) -> None:
        try:
            import msgspec
            import zmq
        except ImportError as exc:  # pragma: no cover - both come with vLLM
            raise UserError(f"--kv-events needs pyzmq and msgspec (installed with vLLM): {exc}") from exc
        self.endpoint = endpoint
        self._decode = msgspec.msgpack.Decoder().decode
        self._zmq = zmq
        self._socket: Any = zmq.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(endpoint)
        self._lock = threading.Lock()
        self._counts = BlockCounts()
        self._evicted: set[Any] = set()
        self._last_seq: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kv-events {endpoint}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = self._zmq.Poller()
        poller.register(self._socket, self._zmq.POLLIN)
        while not self._stop.is_set():
            if not dict(poller.poll(200)):
                continue
            frames = self._socket.recv_multipart()
            if len(frames) >= 3:
                self.count(int.from_bytes(frames[1], "big"), frames[2])

    def count(self, seq: int, payload: bytes) -> None:
        """Count one published batch (``seq``: the publisher's sequence number)."""
        try:
            batch = self._decode(payload)
            events = batch[1] if isinstance(batch, list) and len(batch) > 1 else []
        except Exception:
            return
        stored = evicted = restored = cleared = 0
        with self._lock:
            for event in events:
                kind = _event_type(event)
                hashes = _event_field(event, "block_hashes", 1)
                hashes = [h for h in hashes if isinstance(h, int | bytes)] if isinstance(hashes, list) else []
                if kind == "BlockStored":
                    stored += len(hashes)
                    for h in hashes:
                        if h in self._evicted:
                            restored += 1
                            self._evicted.discard(h)
                elif kind == "BlockRemoved":
                    evicted += len(hashes)
                    if len(self._evicted) + len(hashes) > MAX_REMEMBERED_EVICTIONS:
                        self._evicted.clear()
                    self._evicted.update(hashes)
                elif kind == "AllBlocksCleared":
                    cleared += 1
                    self._evicted.clear()  # a reset, not an eviction: recomputing is expected
            missed = 0
            if self._last_seq is not None and seq > self._last_seq + 1:
                missed = seq - self._last_seq - 1
            self._last_seq = seq
            self._counts = self._counts + BlockCounts(stored, evicted, restored, cleared, missed)

    def take(self) -> BlockCounts:
        """The counts since the last call."""
        with self._lock:
            counts, self._counts = self._counts, BlockCounts()
        return counts

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._socket.close(linger=0)


def _event_type(event: Any) -> str | None:
    if isinstance(event, dict):
        return str(event.get("type"))
    if isinstance(event, list) and event and isinstance(event[0], str):
        return event[0]  # tagged array form
    return None


def _event_field(event: Any, name: str, position: int) -> Any:
    if isinstance(event, dict):
        return event.get(name)
    if isinstance(event, list) and len(event) > position:
        return event[position]
    return None
