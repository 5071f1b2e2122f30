"""The engine's threads: one model thread (every forward, table write and merge runs there, so the backend
never races) and a small CPU pool (image decoding, delta validation, store calls). The event loop only
schedules."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Workers:
    def __init__(self, cpu_threads: int = 2) -> None:
        self.model = ThreadPoolExecutor(1, thread_name_prefix="ssf-model")
        self.cpu = ThreadPoolExecutor(cpu_threads, thread_name_prefix="ssf-cpu")

    async def on_model(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.model, fn, *args)

    async def on_cpu(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.cpu, fn, *args)

    def later_on_model(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue work on the model thread without waiting; dropped once the engine has stopped."""
        try:
            self.model.submit(fn, *args)
        except RuntimeError:  # shut down: the memory goes with the engine
            pass

    def shutdown(self) -> None:
        self.model.shutdown(wait=False, cancel_futures=True)
        self.cpu.shutdown(wait=False)  # a late decode finishes, then meets a closed scheduler
