"""Keep a replica's view of the registry fresh: poll ``versions()`` on a timer, and poll early on hints.

The one replica-following mechanism: the engine's ``ReplicaFollower`` (``service/engine/replicas.py``)
hands each change it reports to the engine's residency.

Pub/sub loses messages silently (a killed subscriber connection drops whatever was published meanwhile;
measured: 1 of 287 per ``CLIENT KILL TYPE pubsub``), so a hint from ``store.watch`` only *wakes* the loop
early: every pass diffs the store's full ``{name: version}`` map (one round trip) against the last one
seen. A lost hint therefore leaves a replica stale for at most ``interval_s`` plus one round trip.

While the store is unavailable the last known state is kept (requests go on being served from what is
loaded), the loop retries every ``retry_s``, and the first pass that succeeds after an outage reconciles
everything that changed meanwhile.

Usage::

    rec = Reconciler(store, on_change=lambda name, version: ..., interval_s=2.0)
    rec.start()          # first pass now (tolerates an unavailable store), then a daemon thread
    ...
    rec.stop()

``on_change(name, version)`` gets the new current version, or ``None`` when the task was deleted (or has
only a staged version). ``on_staged(name, version)``, when given, gets the new staged version, or ``None``
when the task no longer has one. They are called from the reconciler's thread (or the caller's, for
``reconcile()``), one call at a time, the current version first. When one raises, the name keeps its old
value in the seen map, so the next pass offers the change again.

The map diffed is ``store.heads()`` (current, staged and revision per task, one round trip) where the
store has it, else ``versions()``. A change of revision alone (promoted away and back between two passes)
is offered as a change of the current version too, since the replica may hold a stale revision.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from service.store.base import Head, StoreUnavailable, TaskStore

log = logging.getLogger(__name__)

OnChange = Callable[[str, int | None], None]


def heads_of(store: TaskStore) -> dict[str, Head]:
    """The store's heads; a store without staged versions (an older or minimal one) from ``versions()``."""
    heads = getattr(store, "heads", None)
    if heads is None:
        return {name: Head(version) for name, version in store.versions().items()}
    result: dict[str, Head] = heads()
    return result


class Reconciler:
    def __init__(
        self,
        store: TaskStore,
        on_change: OnChange,
        *,
        interval_s: float = 2.0,
        retry_s: float | None = None,
        use_watch: bool = True,
        initial: dict[str, int] | None = None,
        on_staged: OnChange | None = None,
    ) -> None:
        """``initial`` is what the caller already holds (default: nothing, so the first pass reports every
        task as a change). ``retry_s`` is the poll period during an outage (default min(interval_s, 0.5))."""
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.store = store
        self.on_change = on_change
        self.on_staged = on_staged
        self.interval_s = float(interval_s)
        self.retry_s = float(retry_s) if retry_s is not None else min(self.interval_s, 0.5)
        self.use_watch = use_watch
        # -1: the caller's revision is unknown; only a change of version is reported for it
        self._seen: dict[str, Head] = {n: Head(v, None, -1) for n, v in (initial or {}).items()}
        self._pass_lock = threading.Lock()  # one pass at a time (the thread and explicit reconcile())
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._available = True
        self.last_success: float | None = None  # time.monotonic() of the last pass that reached the store
        self.last_error: str | None = None
        self.passes = 0
        self.failures = 0
        self.hints = 0

    # -- state ---------------------------------------------------------------------------------------

    @property
    def known(self) -> dict[str, int]:
        """A copy of the last ``{name: current version}`` map acted on."""
        with self._pass_lock:
            return {n: h.current for n, h in self._seen.items() if h.current is not None}

    @property
    def available(self) -> bool:
        """False from a failed pass until the next successful one."""
        return self._available

    def staleness_s(self) -> float:
        """Seconds since the store was last read successfully (inf before the first success)."""
        return float("inf") if self.last_success is None else time.monotonic() - self.last_success

    # -- one pass ------------------------------------------------------------------------------------

    def reconcile(self) -> bool:
        """Diff the store against the seen map now and report each change. False when the store is
        unavailable (the seen map is kept as it was)."""
        with self._pass_lock:
            self.passes += 1
            try:
                heads = heads_of(self.store)
            except StoreUnavailable as e:
                self.failures += 1
                if self._available:
                    log.warning("task registry unavailable (%s); keeping the last known state", e)
                self._available = False
                self.last_error = str(e)
                return False
            if not self._available:
                log.info("task registry reachable again; reconciling")
            self._available = True
            self.last_error = None
            self.last_success = time.monotonic()
            gone = Head(None)
            for name in sorted(set(heads) | set(self._seen)):
                self._apply(name, self._seen.get(name, gone), heads.get(name, gone))
            return True

    def _apply(self, name: str, old: Head, new: Head) -> None:
        """Report one task's changes; the seen map takes each part that was applied."""
        seen = old
        moved = old.revision >= 0 and old.revision != new.revision
        if old.current != new.current or moved:
            try:
                self.on_change(name, new.current)
                seen = Head(new.current, seen.staged, new.revision)
            except Exception:
                log.exception("on_change(%r, %r) failed; it is offered again next pass", name, new.current)
        if old.staged != new.staged:
            try:
                if self.on_staged is not None:
                    self.on_staged(name, new.staged)
                seen = Head(seen.current, new.staged, seen.revision)
            except Exception:
                log.exception("on_staged(%r, %r) failed; it is offered again next pass", name, new.staged)
        if seen.current is None and seen.staged is None:
            self._seen.pop(name, None)
        else:
            self._seen[name] = seen

    # -- background thread ---------------------------------------------------------------------------

    def hint(self, name: str = "") -> None:
        """Wake the loop for an early pass (the store's watch callback; any name, "" included)."""
        if not self._stop.is_set():
            self.hints += 1
            self._wake.set()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("Reconciler already started")
        self.reconcile()
        if self.use_watch:
            try:
                self.store.watch(self.hint)
            except StoreUnavailable as e:  # hints are an optimisation; polling alone is correct
                log.warning("change hints unavailable (%s); polling every %ss", e, self.interval_s)
        self._thread = threading.Thread(target=self._run, name="ssf-reconciler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s if self._available else self.retry_s)
            if self._stop.is_set():
                break
            self._wake.clear()  # hints arriving during the pass wake the next one
            try:
                self.reconcile()
            except Exception:  # a bug in a store must not kill the loop; log and keep polling
                self.failures += 1
                log.exception("reconcile pass failed")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread (the store's watch thread ends with ``store.close()``)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def __enter__(self) -> Reconciler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
