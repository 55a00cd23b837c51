"""The simulated cluster: its workers, their caches and devices, and the views the router's policy sees.

Owns construction (one `BlockCache` per worker over one `HolderIndex`; one `Device` per worker, or one for
all with `shared_device`) and `views`: what the live router builds from its index mirror and the workers'
reported load, read here from the simulated state itself — exact and without delay. Routing, arrivals and
results are `run.py`'s.
"""

from __future__ import annotations

from collections.abc import Callable

from splitserve.router.cost_model import CostModel
from splitserve.router.policies import DECODE, WorkerView
from splitserve.simulator.cache import BlockCache, HolderIndex
from splitserve.simulator.config import SimConfig
from splitserve.simulator.decode import DecodeWorker
from splitserve.simulator.events import Device, EventQueue
from splitserve.simulator.workers import PrefillWorker, SimRequest


class SimCluster:
    """Workers by id (`prefill`, `decode`) in the order of `SimConfig.worker_ids`. Raises ValueError when
    `costs` has no transfer cost for `config.transport`."""

    def __init__(self, config: SimConfig, costs: CostModel, block_len: int, events: EventQueue,
                 on_finish: Callable[[float, SimRequest], None]) -> None:  # fmt: skip
        if config.transport not in costs.transfers:
            raise ValueError(f"the cost model has no transfer cost for transport {config.transport!r}; "
                             f"it has {', '.join(sorted(costs.transfers))}")  # fmt: skip
        self.index = HolderIndex()
        shared = Device() if config.shared_device else None
        self.prefill: dict[str, PrefillWorker] = {}
        self.decode: dict[str, DecodeWorker] = {}
        self._order: list[tuple[str, str, PrefillWorker | DecodeWorker]] = []
        # What the policies are told of devices, as live workers register theirs: one name for all when
        # they share one, else one each.
        self._device_names = {worker_id: "device-0" if shared else f"device-{worker_id}"
                              for worker_id, _ in config.worker_ids()}  # fmt: skip
        for worker_id, role in config.worker_ids():
            device = shared or Device()
            worker: PrefillWorker | DecodeWorker
            if role == DECODE:
                cache = BlockCache(worker_id, config.decode_kv_blocks, self.index)
                worker = DecodeWorker(worker_id, cache, device, events, costs, config, block_len, on_finish)
                self.decode[worker_id] = worker
            else:
                cache = BlockCache(worker_id, config.prefill_kv_blocks, self.index)
                worker = PrefillWorker(worker_id, role, cache, device, events, costs, config.transport,
                                       block_len, on_finish)  # fmt: skip
                self.prefill[worker_id] = worker
            self._order.append((worker_id, role, worker))

    def worker(self, worker_id: str) -> PrefillWorker | DecodeWorker | None:
        return self.prefill.get(worker_id) or self.decode.get(worker_id)

    def views(self, now: float, matched: dict[str, int]) -> list[WorkerView]:
        """Every worker as the policy sees it at `now`; `matched`: worker id → leading blocks it holds."""
        get = matched.get
        return [WorkerView(worker_id, role, get(worker_id, 0), queued_tokens=worker.queued_tokens(now),
                           running_requests=worker.running_requests, kv_usage=worker.cache.usage,
                           free_blocks=worker.cache.num_free, device=self._device_names[worker_id],
                           waiting_prefills=worker.waiting_prefills, max_running=worker.max_running,
                           step_s=worker.step_s, step_tokens=worker.step_tokens)
                for worker_id, role, worker in self._order]  # fmt: skip
