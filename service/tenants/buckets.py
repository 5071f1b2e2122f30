"""Token buckets for request and image rates: one Lua script in Redis (shared by every replica, timed by
the Redis server's clock), or the same arithmetic in process for the embedded store.

A call names several buckets and takes ``cost`` from each, all or nothing: a bucket refuses when taking
its cost would leave fewer than ``floor`` tokens, and the answer is then the seconds until it would not.
A floor of 0 is a plain bucket; a very low floor is a debit (the cost of a request known only after it
ran, e.g. its images, is charged afterwards and the next request waits until the debt is paid).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

DEBIT = -1e18  # the floor of a charge that is never refused


@dataclass(frozen=True)
class Take:
    key: str
    rate: float  # tokens per second
    burst: float  # bucket size
    cost: float
    floor: float = 0.0


@dataclass(frozen=True)
class Refusal:
    wait_s: float
    bucket: Take


# KEYS: bucket keys; ARGV: rate, burst, cost, floor per key.
# Returns {admitted 0/1, wait seconds, 1-based index of the bucket that refused}.
LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local level, wait, which = {}, 0, 0
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[4*i-3]), tonumber(ARGV[4*i-2])
  local cost, floor = tonumber(ARGV[4*i-1]), tonumber(ARGV[4*i])
  local b = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens, ts = tonumber(b[1]), tonumber(b[2])
  if tokens == nil then tokens, ts = burst, now end
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
  if tokens - cost < floor and (floor + cost - tokens) / rate > wait then
    wait, which = (floor + cost - tokens) / rate, i
  end
  level[i] = tokens
end
local ok = 0
if wait == 0 then ok = 1 end
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[4*i-3]), tonumber(ARGV[4*i-2])
  local tokens = level[i]
  if ok == 1 then tokens = tokens - tonumber(ARGV[4*i-1]) end
  redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', tostring(now))
  local idle = (burst - math.min(tokens, 0)) / rate
  redis.call('PEXPIRE', key, math.ceil(idle * 1000) + 1000)
end
return {ok, tostring(wait), which}
"""


class LocalBuckets:
    """The same buckets in this process (the embedded store serves one process per directory)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: dict[str, tuple[float, float]] = {}

    def take(self, takes: list[Take]) -> Refusal | None:
        """None when admitted; otherwise the seconds to wait and the bucket that refused."""
        now = time.monotonic()
        with self._lock:
            levels, wait, which = [], 0.0, 0
            for i, t in enumerate(takes):
                tokens, ts = self._state.get(t.key, (t.burst, now))
                tokens = min(t.burst, tokens + max(0.0, now - ts) * t.rate)
                if tokens - t.cost < t.floor and (t.floor + t.cost - tokens) / t.rate > wait:
                    wait, which = (t.floor + t.cost - tokens) / t.rate, i
                levels.append(tokens)
            for t, tokens in zip(takes, levels, strict=True):
                self._state[t.key] = (tokens - t.cost if wait == 0 else tokens, now)
            return None if wait == 0 else Refusal(wait, takes[which])
