"""Predicted costs of serving work, in seconds: what the `cpd` policy weighs and what the simulator runs.

One model, in parts, each a small formula fitted to measurements of this project's own engine and wire:
- `PrefillCost`: a prefill of `num_new` tokens after `num_cached` cached ones (linear layers per new token,
  attention per new token per context token, a fixed cost per request);
- `DecodeCost`: one decode step of a batch (a fixed cost, per sequence, per context token read);
- `TransferCost`: moving KV bytes between workers, per transport (a latency plus bytes / bandwidth);
- `host_load_bytes_per_s`: loading a prefix hit's KV back from a worker's host-memory tier into its KV
  memory (bytes / bandwidth: a host→device copy on a GPU, a memcpy on CPU; optional in a file, the
  H200's figure when absent);
- `RequestPath`: what a request's path adds to its time to first token beyond the worker's prefill
  (client → router → worker and the first token back: RPCs, routing, tokens relayed), by route (through a
  prefill pool, or prefilled on the decode worker), measured end to end by `benchmarks/calibrate_path.py`
  (optional in a file: 0 when absent).

A calibration file (JSON, written by `benchmarks/calibrate.py` on the machine it measures, or by hand from
the figures in docs/benchmarks.md) holds the fitted numbers and where they came from.

Workers measure their own costs too and publish them with their load (`Measured`: prefill tokens/s by
cached context, host-tier load bytes/s, push bytes/s per transport). The formulas below that take a
worker's `Measured` use its figure where it has one and the calibration's otherwise: `prefill_seconds`,
`host_load_seconds`, `push`. The cpd policy, the fetch plan and the simulator all price work through them.

`load_calibration` raises `CalibrationError` naming the field that is missing or wrong; nothing is
half-loaded. Torch-free: the router process imports this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

CALIBRATION_VERSION = 1
# Host tier → KV memory on one H200 (benchmarks/kv_tiers.py, 2026-12-02: a 4k prefix's 537 MB, Llama-3.1-8B
# shape, in 10.4 ms, one DMA per run of host slots; a property of the host link more than of the layout):
# what a calibration without the field assumes.
H200_HOST_LOAD_BYTES_PER_S = 52e9


class CalibrationError(ValueError):
    """A calibration file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class PrefillCost:
    fixed_s: float  # per prefill request (RPC, scheduling, sampling the first token)
    per_token_s: float  # per new token: the linear layers
    per_token_ctx_s: float  # per new token per token it attends to: attention

    def seconds(self, num_new: int, num_cached: int = 0) -> float:
        """A prefill of `num_new` tokens whose first `num_cached` prompt tokens are cached. 0 for none."""
        if num_new <= 0:
            return 0.0
        attended = num_cached + num_new / 2  # the mean context a new token attends to (causal)
        return self.fixed_s + num_new * (self.per_token_s + attended * self.per_token_ctx_s)


@dataclass(frozen=True)
class DecodeCost:
    fixed_s: float  # per step: launches, the weights read once
    per_seq_s: float  # per sequence in the batch: sampling, host work, its GEMV rows
    per_ctx_token_s: float  # per context token read by attention

    def step_seconds(self, num_seqs: int, num_ctx_tokens: int) -> float:
        """One decode step over `num_seqs` sequences holding `num_ctx_tokens` tokens of KV in all."""
        if num_seqs <= 0:
            return 0.0
        return self.fixed_s + num_seqs * self.per_seq_s + num_ctx_tokens * self.per_ctx_token_s


@dataclass(frozen=True)
class TransferCost:
    latency_s: float  # per transfer: reserve, lease and the last chunk's round trip
    bytes_per_s: float

    def seconds(self, num_bytes: int) -> float:
        return 0.0 if num_bytes <= 0 else self.latency_s + num_bytes / self.bytes_per_s


@dataclass(frozen=True)
class RequestPath:
    pool_s: float = 0.0  # prefilled by a prefill worker, decoded by a decode worker
    local_s: float = 0.0  # prefilled and decoded by the decode worker

    def seconds(self, local: bool) -> float:
        return self.local_s if local else self.pool_s


@dataclass(frozen=True)
class Measured:
    """What one worker measures its own work to cost: running estimates it publishes with its load
    (`WorkerLoad.costs`). A figure of 0 (or a transport or bucket it lacks) is not measured yet."""

    host_load_bytes_per_s: float = 0.0  # its prefix hits' KV loaded back from its host tier
    # Prefill tokens/s by cached context: (cached tokens from, tokens/s) for every bucket, ascending; a
    # bucket holds the contexts from its start up to the next one's.
    prefill_tokens_per_s: tuple[tuple[int, float], ...] = ()
    push_bytes_per_s: tuple[tuple[str, float], ...] = ()  # (transport, wire bytes/s from its tails)

    def prefill_rate(self, num_cached: int) -> float:
        """Tokens/s of its prefills after `num_cached` cached tokens (its bucket's); 0: unmeasured."""
        rate = 0.0
        for start, tokens_per_s in self.prefill_tokens_per_s:
            if start > num_cached:
                break
            rate = tokens_per_s
        return rate

    def push_rate(self, transport: str) -> float:
        return dict(self.push_bytes_per_s).get(transport, 0.0)


UNMEASURED = Measured()


@dataclass(frozen=True)
class CostModel:
    """The fitted model and its provenance. `kv_bytes_per_token`: KV bytes one token occupies in every
    layer (2 × layers × kv heads × head dim × dtype size). `transfers`: by transport ("grpc", "same-host")."""

    prefill: PrefillCost
    decode: DecodeCost
    transfers: dict[str, TransferCost]
    kv_bytes_per_token: int
    path: RequestPath = RequestPath()
    host_load_bytes_per_s: float = H200_HOST_LOAD_BYTES_PER_S
    device: str = "unknown"
    source: str = "defaults"  # how the numbers were obtained (a benchmark run, a docs table)
    measured: str = ""  # date of the measurement
    extra: dict = field(default_factory=dict)  # free-form provenance (versions, model shape)

    def __post_init__(self) -> None:
        if self.kv_bytes_per_token <= 0:
            raise ValueError(f"kv_bytes_per_token must be positive, got {self.kv_bytes_per_token}")
        if not min(self.path.pool_s, self.path.local_s) >= 0:
            raise ValueError(f"request path costs must be non-negative, got {self.path}")
        if not self.transfers:
            raise ValueError("a cost model needs at least one transfer transport")
        if not self.host_load_bytes_per_s > 0:
            raise ValueError(f"host_load_bytes_per_s must be positive, got {self.host_load_bytes_per_s}")

    def transport(self, transport: str | None = None) -> str:
        """The named transport, checked; None: "same-host" if calibrated, else the first one."""
        if transport is None:
            transport = "same-host" if "same-host" in self.transfers else next(iter(self.transfers))
        if transport not in self.transfers:
            raise KeyError(f"no transfer cost for transport {transport!r}; have {sorted(self.transfers)}")
        return transport

    def transfer(self, transport: str | None = None) -> TransferCost:
        """The named transport's cost (`transport` resolves None)."""
        return self.transfers[self.transport(transport)]

    def push(self, measured: Measured = UNMEASURED, transport: str | None = None) -> TransferCost:
        """What a worker's push of KV over `transport` costs: the calibration's latency, and the bytes at
        the rate that worker's pushes measured over it (the calibration's until it has one)."""
        name = self.transport(transport)
        rate = measured.push_rate(name)
        return replace(self.transfers[name], bytes_per_s=rate) if rate > 0 else self.transfers[name]

    def prefill_seconds(self, num_new: int, num_cached: int = 0, measured: Measured = UNMEASURED) -> float:
        """A prefill of `num_new` tokens after `num_cached` cached ones on a worker: the calibration's
        (`PrefillCost.seconds`), or once the worker has measured its rate at that context, the
        calibration's fixed cost plus the new tokens at that rate. 0 for none."""
        rate = measured.prefill_rate(num_cached)
        if num_new <= 0 or rate <= 0:
            return self.prefill.seconds(num_new, num_cached)
        return self.prefill.fixed_s + num_new / rate

    def host_load_seconds(self, num_tokens: int, measured: Measured = UNMEASURED) -> float:
        """Loading `num_tokens` tokens' KV back from a worker's host tier: at the rate it measured, else
        the calibration's."""
        rate = measured.host_load_bytes_per_s or self.host_load_bytes_per_s
        return self.kv_bytes(num_tokens) / rate

    def only(self, transport: str) -> CostModel:
        """This model with one transport (the one a deployment uses), so it is also the default."""
        return replace(self, transfers={transport: self.transfer(transport)})

    def kv_bytes(self, num_tokens: int) -> int:
        return max(0, num_tokens) * self.kv_bytes_per_token

    def to_json(self) -> dict:
        out = asdict(self)
        out["version"] = CALIBRATION_VERSION
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


# The Llama-3.2-1B shape in bf16 on one H200, as `benchmarks/calibrate.py` measured it on 2026-12-02
# (docs/calibration-h200.json, rounded): a prefill request costs ~11.5 ms before its tokens (engine step and
# Prefill RPC), then 1.1 µs per token; a decode step 1.19 ms + 2.4 µs per sequence + 9.4 ns per context
# token; KV 32 KiB per token (16 layers × 8 heads × 64 × 2 × 2 bytes); same-host CUDA IPC 14.9 GB/s, gRPC
# 1.27 GB/s as a request pays them (layer-wise overlap included); the host tier loads back at 52 GB/s. The
# live router's model until a calibration file says otherwise.
DEFAULT_COST_MODEL = CostModel(
    prefill=PrefillCost(fixed_s=11.5e-3, per_token_s=1.12e-6, per_token_ctx_s=5.8e-10),
    decode=DecodeCost(fixed_s=1.19e-3, per_seq_s=2.4e-6, per_ctx_token_s=9.4e-9),
    transfers={"same-host": TransferCost(5.8e-3, 14.9e9), "grpc": TransferCost(8.0e-3, 1.27e9)},
    kv_bytes_per_token=32768,
    host_load_bytes_per_s=H200_HOST_LOAD_BYTES_PER_S,
    device="NVIDIA H200 (Llama-3.2-1B shape, bf16)",
    source="docs/calibration-h200.json (benchmarks/calibrate.py, rounded)",
    measured="2026-12-02",
)


def _number(data: dict, key: str, where: str, positive: bool = False) -> float:
    if key not in data:
        raise CalibrationError(f"{where}: missing field {key!r}")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CalibrationError(f"{where}.{key}: expected a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise CalibrationError(f"{where}.{key}: must be {'positive' if positive else 'non-negative'}, "
                               f"got {value!r}")  # fmt: skip
    return float(value)


def _section(data: dict, key: str, where: str) -> dict:
    value = data.get(key)
    if not isinstance(value, dict):
        raise CalibrationError(f"{where}: field {key!r} must be an object, got {value!r}")
    return value


def cost_model_from_json(data: object, where: str = "calibration") -> CostModel:
    """Parse a calibration document; raises `CalibrationError` naming `where` and the field."""
    if not isinstance(data, dict):
        raise CalibrationError(f"{where}: expected a JSON object")
    if data.get("version") != CALIBRATION_VERSION:
        got = data.get("version")
        raise CalibrationError(f"{where}.version: expected {CALIBRATION_VERSION}, got {got!r}")
    p, d = _section(data, "prefill", where), _section(data, "decode", where)
    prefill = PrefillCost(*(_number(p, k, f"{where}.prefill") for k in ("fixed_s", "per_token_s",
                                                                         "per_token_ctx_s")))  # fmt: skip
    decode = DecodeCost(*(_number(d, k, f"{where}.decode") for k in ("fixed_s", "per_seq_s",
                                                                      "per_ctx_token_s")))  # fmt: skip
    raw = _section(data, "transfers", where)
    if not raw:
        raise CalibrationError(f"{where}.transfers: needs at least one transport")
    transfers = {}
    for name, t in raw.items():
        at = f"{where}.transfers.{name}"
        if not isinstance(t, dict):
            raise CalibrationError(f"{at}: must be an object")
        transfers[name] = TransferCost(_number(t, "latency_s", at), _number(t, "bytes_per_s", at, True))
    kv = _number(data, "kv_bytes_per_token", where, positive=True)
    if kv != int(kv):
        raise CalibrationError(f"{where}.kv_bytes_per_token: must be an integer, got {kv!r}")
    text = {k: data.get(k, "") for k in ("device", "source", "measured")}
    for k, v in text.items():
        if not isinstance(v, str):
            raise CalibrationError(f"{where}.{k}: must be a string, got {v!r}")
    extra = data.get("extra", {})
    if not isinstance(extra, dict):
        raise CalibrationError(f"{where}.extra: must be an object")
    path = RequestPath()
    if "path" in data:
        at = _section(data, "path", where)
        path = RequestPath(*(_number(at, k, f"{where}.path") for k in ("pool_s", "local_s")))
    host_load = H200_HOST_LOAD_BYTES_PER_S
    if "host_load_bytes_per_s" in data:
        host_load = _number(data, "host_load_bytes_per_s", where, positive=True)
    return CostModel(prefill, decode, transfers, int(kv), path, host_load, extra=extra, **text)


def load_calibration(path: str | Path) -> CostModel:
    """A calibration file → `CostModel`. Raises `CalibrationError` (a ValueError) naming the file and
    field, or FileNotFoundError."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise CalibrationError(f"{path}: not JSON: {where}: {exc.msg}") from None
    return cost_model_from_json(data, str(path))
