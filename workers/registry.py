"""Which models are served: each worker registers itself in Redis and refreshes it every heartbeat.

``sana:worker:<name>`` is a hash (model, device, precision, fast path, limits, busy job...) that expires when
the worker stops heartbeating; the sorted set ``sana:workers`` indexes them by expiry time so readers never SCAN.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

WORKERS_KEY = "sana:workers"


def worker_key(name: str) -> str:
    return f"sana:worker:{name}"


def register_worker(r: redis.Redis, name: str, info: dict[str, Any], ttl_s: float) -> None:
    """Create or refresh a worker's entry; it disappears ``ttl_s`` seconds after the last refresh."""
    now = time.time()
    fields = {k: json.dumps(v) for k, v in info.items()}
    fields["last_heartbeat"] = json.dumps(now)
    with r.pipeline() as pipe:
        pipe.hset(worker_key(name), mapping=fields)
        pipe.expire(worker_key(name), max(1, round(ttl_s)))
        pipe.zadd(WORKERS_KEY, {name: now + ttl_s})
        pipe.execute()


def unregister_worker(r: redis.Redis, name: str) -> None:
    with r.pipeline() as pipe:
        pipe.delete(worker_key(name))
        pipe.zrem(WORKERS_KEY, name)
        pipe.execute()


def live_workers(r: redis.Redis) -> list[dict[str, Any]]:
    """Every worker that heartbeated within its TTL, as plain dicts (``name`` included)."""
    now = time.time()
    r.zremrangebyscore(WORKERS_KEY, "-inf", now)
    names = [n.decode() for n in r.zrange(WORKERS_KEY, 0, -1)]
    if not names:
        return []
    with r.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(worker_key(name))
        raws = pipe.execute()
    out = []
    for name, raw in zip(names, raws):
        if raw:
            info = {k.decode(): json.loads(v) for k, v in raw.items()}
            info["name"] = name
            out.append(info)
    return out


def served_models(r: redis.Redis) -> dict[str, list[dict[str, Any]]]:
    """Live workers grouped by the model they serve."""
    models: dict[str, list[dict[str, Any]]] = {}
    for info in live_workers(r):
        models.setdefault(info["model"], []).append(info)
    return models


def canonical_model(name: str) -> str:
    """The preset name for a preset or one of its aliases; anything else (a folder, a hub id) as given."""
    from engine.presets import get_preset

    preset = get_preset(name)
    return preset.name if preset is not None else name
