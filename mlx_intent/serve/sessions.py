"""The server's memory of conversations: the last user turns of each ``"session"``, bounded every way.

A request that names a session is classified with that session's earlier turns as its context
(mlx_intent/context.py), then its text joins them.  Like Dialogflow's contexts (5 turns, 20 minutes), a
session keeps at most ``turns`` turns, forgets a turn ``ttl_s`` after it was said, and the store keeps at
most ``max_sessions`` sessions, dropping the least recently used: its memory never grows without bound.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from mlx_intent.context import MAX_CONTEXT_TURNS

MAX_SESSIONS = 10_000
TTL_S = 20 * 60.0
MAX_SESSION_ID = 128  # characters of a session id


class Sessions:
    """session id -> its last turns, with the time each was said (``clock``: injectable for tests)."""

    def __init__(
        self,
        max_sessions: int = MAX_SESSIONS,
        turns: int = MAX_CONTEXT_TURNS,
        ttl_s: float = TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_sessions, self.turns, self.ttl_s, self.clock = max_sessions, turns, ttl_s, clock
        self._data: OrderedDict[str, deque[tuple[float, str]]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._expire(self.clock())
            return len(self._data)

    def context(self, session: str) -> tuple[str, ...]:
        """The session's turns still remembered, oldest first (none for an unknown or expired session)."""
        with self._lock:
            now = self.clock()
            self._expire(now)
            turns = self._data.get(session, ())
            return tuple(text for said, text in turns if now - said <= self.ttl_s)

    def add(self, session: str, text: str) -> None:
        """Remember ``text`` as the session's newest turn (its oldest goes beyond ``turns``)."""
        with self._lock:
            now = self.clock()
            self._expire(now)
            turns = self._data.pop(session, None) or deque(maxlen=self.turns)
            while turns and now - turns[0][0] > self.ttl_s:
                turns.popleft()
            turns.append((now, text))
            self._data[session] = turns  # the most recently used last
            while len(self._data) > self.max_sessions:
                self._data.popitem(last=False)

    def _expire(self, now: float) -> None:
        """Forget the sessions whose newest turn is older than ttl_s.  Sessions are kept in order of their
        newest turn, so the scan stops at the first one still alive; an alive session's older turns are
        dropped when it is read or added to."""
        while self._data:
            turns = next(iter(self._data.values()))
            if now - turns[-1][0] <= self.ttl_s:
                break
            self._data.popitem(last=False)
