"""Which tasks stay resident when the resident set is bounded (``SSF_MAX_RESIDENT_TASKS``; 0 = unbounded).

A resident task holds one row in the site tables (and its head) on the device. With a bound, the task used
least recently gives its row back when a new one is loaded; its next request loads it again from the store
(a cold start: one store read, validation and a row write, measured in bench/engine_bench.py). An evicted
task that a request still holds keeps its row until that request is answered (it is retired, like a
replaced version). Runs on the event loop, next to ``Residency``.
"""

from __future__ import annotations

from collections import OrderedDict


class ResidentLRU:
    def __init__(self, max_tasks: int) -> None:
        self.max_tasks = max_tasks
        self._order: OrderedDict[str, None] = OrderedDict()

    @property
    def bounded(self) -> bool:
        return self.max_tasks > 0

    def __len__(self) -> int:
        return len(self._order)

    def touch(self, name: str) -> None:
        if name in self._order:
            self._order.move_to_end(name)

    def add(self, name: str) -> list[str]:
        """``name`` is resident now (the most recently used); returns the tasks to evict, oldest first
        (never ``name`` itself)."""
        self._order[name] = None
        self._order.move_to_end(name)
        victims: list[str] = []
        while self.bounded and len(self._order) > self.max_tasks:
            victim = next(iter(self._order))
            if victim == name:
                break
            del self._order[victim]
            victims.append(victim)
        return victims

    def discard(self, name: str) -> None:
        self._order.pop(name, None)
