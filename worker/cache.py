"""Content-addressed result cache: the same image and prompt is never computed twice.

Key: sha256 of (image content hash, prompt text, model_version), where model_version is
the identity of the worker that computes (egm.identity): the model's content, engine,
runtime, decoding and prompt settings. Two models never share an entry; a change of any
of them misses the cache. Shared by all workers and projects
through Redis; entries expire after ``EGM_CACHE_TTL_S``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import redis

from egm.keys import Keys


@dataclass
class CachedOutput:
    text: str
    box_scores: list[float | None]


class ResultCache:
    def __init__(self, client: redis.Redis, prefix: str, ttl_s: int) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    def key(self, image_sha256: str, prompt: str, model_version: str) -> str:
        h = hashlib.sha256(f"{image_sha256}\0{prompt}\0{model_version}".encode()).hexdigest()
        return Keys(self.prefix).cache(h)

    def get_many(self, keys: list[str]) -> list[CachedOutput | None]:
        if not self.enabled or not keys:
            return [None] * len(keys)
        raw = self.client.mget(keys)
        return [CachedOutput(**json.loads(r)) if r else None for r in raw]

    def put_many(self, items: dict[str, CachedOutput]) -> None:
        if not self.enabled or not items:
            return
        with self.client.pipeline(transaction=False) as pipe:
            for key, value in items.items():
                pipe.set(key, json.dumps(asdict(value)), ex=self.ttl_s)
            pipe.execute()
