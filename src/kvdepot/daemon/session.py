"""What one daemon client holds: its reserved slots and read leases, and their byte total.

Runs in the daemon process: one `Session` per connection, used by that connection's thread
and by the daemon's reaper (`lock` guards both maps against the reaper).

Invariants (the daemon's "time limits reclaim memory from the dead, never from the slow"):
- A reservation's memory returns to the arena only when its writer is done with it: at its
  `Commit`/abort, or when the client disconnects. A reservation older than its deadline is
  *expired*: it gives up its key (another client may store it; its own commit then counts
  nothing) but keeps its memory, which the slow writer may still be writing.
- A lease's pins go only at `Release` or when the client disconnects: a live reader's memory
  is never reused, however slow it is. A lease past its deadline is only reported overdue.
- A session closes only once its client has closed its end of the connection (or died):
  then nothing of it touches the arena, and everything it held is freed.
- `held_bytes` (reserved + leased, expired reservations included) is what the per-client
  limit bounds.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from kvdepot.tiers.arena import ArenaAllocator
from kvdepot.tiers.memory import MemoryTier, WriteSlot


@dataclass(slots=True)
class Reservation:
    slot: WriteSlot
    deadline: float
    is_expired: bool = False


@dataclass(slots=True)
class Lease:
    stack: contextlib.ExitStack
    nbytes: int
    deadline: float
    is_overdue: bool = False


@dataclass(slots=True)
class Session:
    """One client connection's holdings."""

    name: str
    pid: int
    transport: str
    connected_at: float = field(default_factory=time.time)
    reservations: dict[bytes, Reservation] = field(default_factory=dict)
    leases: dict[int, Lease] = field(default_factory=dict)
    held_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    tokens: Counter[str] = field(default_factory=Counter)  # this client's token counts
    models: set[str] = field(default_factory=set)  # the model labels it reported

    def count_tokens(self, model: str, looked_up: int, hit: int, partial: int, stored: int) -> None:
        with self.lock:
            self.models.add(model)
            self.tokens.update(looked_up=looked_up, hit=hit, partial=partial, stored=stored)

    def add_reservation(self, raw_key: bytes, slot: WriteSlot, ttl_s: float) -> None:
        with self.lock:
            self.reservations[raw_key] = Reservation(slot, time.monotonic() + ttl_s)
            self.held_bytes += ArenaAllocator.footprint(len(slot.buffer))

    def take_reservation(self, raw_key: bytes) -> Reservation | None:
        """Remove and return the reservation of `raw_key`; its bytes are no longer held."""
        with self.lock:
            found = self.reservations.pop(raw_key, None)
            if found is not None:
                self.held_bytes -= ArenaAllocator.footprint(len(found.slot.buffer))
            return found

    def add_lease(
        self, lease_id: int, stack: contextlib.ExitStack, nbytes: int, ttl_s: float
    ) -> None:
        with self.lock:
            self.leases[lease_id] = Lease(stack, nbytes, time.monotonic() + ttl_s)
            self.held_bytes += nbytes

    def release_lease(self, lease_id: int) -> bool:
        """Unpin a lease's chunks; False if there is no such lease."""
        with self.lock:
            lease = self.leases.pop(lease_id, None)
            if lease is not None:
                self.held_bytes -= lease.nbytes
        if lease is None:
            return False
        lease.stack.close()
        return True

    def expire(self, memory: MemoryTier, now: float) -> tuple[int, int]:
        """Expire reservations past their deadline (they give up their keys) and mark leases
        past theirs overdue; returns how many of each happened now."""
        with self.lock:
            reservations = [
                r for r in self.reservations.values() if not r.is_expired and r.deadline < now
            ]
            for reservation in reservations:
                reservation.is_expired = True
            leases = [lease for lease in self.leases.values() if not lease.is_overdue]
            overdue = [lease for lease in leases if lease.deadline < now]
            for lease in overdue:
                lease.is_overdue = True
        for reservation in reservations:
            memory.forfeit(reservation.slot)
        return len(reservations), len(overdue)

    def close(self, memory: MemoryTier) -> None:
        """End the session (its client closed its end): free everything it held."""
        with self.lock:
            reservations, self.reservations = list(self.reservations.values()), {}
            leases, self.leases = list(self.leases.values()), {}
            self.held_bytes = 0
        for lease in leases:
            lease.stack.close()
        for reservation in reservations:
            memory.abort(reservation.slot)
