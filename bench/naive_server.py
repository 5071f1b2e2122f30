"""The naive multi-model baseline (Triton/TorchServe/Ray-multiplexing pattern), in process, on this machine.

One full model copy per task in an LRU of ``capacity`` copies; a request for a task that is not loaded waits
while its copy is built from the stored delta (the merged state from the pristine base: the cheapest
possible "load"; real servers read and deserialise a whole checkpoint instead); batches hold requests of
one task only (the oldest waiting request's task, up to ``max_batch_size``, after waiting up to
``max_queue_delay_ms`` for company). One model thread, like the engine, so the comparison is per-core fair.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

import ssf
from service.engine.merged import MergedBuilder, meta_skeleton
from service.engine.workers import own_threads


@dataclass(eq=False)
class _Req:
    task: str
    x: torch.Tensor
    future: asyncio.Future[torch.Tensor]
    enqueued: float = field(default_factory=time.monotonic)


class NaiveServer:
    def __init__(
        self,
        model: nn.Module,
        sites: list[ssf.Site],
        deltas: dict[str, ssf.Delta],
        capacity: int,
        max_batch_size: int = 32,
        max_queue_delay_ms: float = 5.0,
        threads: int = 1,
    ) -> None:
        model = model.eval().requires_grad_(False)
        self.base = dict(model.state_dict())
        self.builder = MergedBuilder(meta_skeleton(model), self.base, [s for s in sites if s.foldable])
        self.deltas = deltas
        self.capacity = capacity
        self.max_batch_size, self.delay = max_batch_size, max_queue_delay_ms / 1000
        self.models: OrderedDict[str, nn.Module] = OrderedDict()
        self.loads = 0
        self.batches = 0
        self.build_s = 0.0  # model-thread seconds spent building copies ("loading")
        self.forward_s = 0.0
        self.queue: list[_Req] = []
        self._wakeup = asyncio.Event()
        # its forwards on ``threads`` intra-op threads, as the engine's model thread
        self._thread = ThreadPoolExecutor(1, "naive-model", initializer=own_threads, initargs=(threads,))
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._thread.shutdown(wait=True)
        self.models.clear()

    def submit(self, task: str, x: torch.Tensor) -> asyncio.Future[torch.Tensor]:
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self.queue.append(_Req(task, x, future))
        self._wakeup.set()
        return future

    def _model(self, task: str) -> nn.Module:
        model = self.models.get(task)
        if model is not None:
            self.models.move_to_end(task)
            return model
        delta = self.deltas[task]
        model, _, seconds = self.builder.build(delta.sites, delta.head)
        self.loads += 1
        self.build_s += seconds
        self.models[task] = model
        while len(self.models) > self.capacity:
            self.models.popitem(last=False)
        return model

    @torch.inference_mode()
    def _run(self, task: str, x: torch.Tensor) -> torch.Tensor:
        model = self._model(task)
        start = time.perf_counter()
        out = model(x)
        self.forward_s += time.perf_counter() - start
        return out

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self.queue[0]
            until = head.enqueued + self.delay
            while (remaining := until - time.monotonic()) > 0:
                if sum(1 for r in self.queue if r.task == head.task) >= self.max_batch_size:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = [r for r in self.queue if r.task == head.task][: self.max_batch_size]
            taken = {id(r) for r in batch}
            self.queue = [r for r in self.queue if id(r) not in taken]
            x = torch.cat([r.x for r in batch])
            out = await loop.run_in_executor(self._thread, self._run, head.task, x)
            self.batches += 1
            for i, r in enumerate(batch):
                if not r.future.done():
                    r.future.set_result(out[i : i + 1])
