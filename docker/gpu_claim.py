"""Give each worker replica its own GPU(s) through claims in Redis.

Docker does not share GPUs out between replicas: a device reservation with
``count: 1`` makes every replica of ``docker compose up --scale worker=N`` see
GPU 0 (the daemon turns a count into the ids ``0..count-1``). The worker
service therefore reserves all GPUs and this script, run by
``docker/entrypoint.sh`` before the worker starts, claims free ones:

* ``claim`` picks GPUs nobody holds (a Redis key per GPU UUID, set with NX and
  a TTL, owned by the container's hostname), waits while all are taken, and
  prints their indices for ``CUDA_VISIBLE_DEVICES``;
* ``hold`` keeps the claims alive (refreshes the TTL) until the worker exits,
  so a crashed or removed container frees its GPU within one TTL.

GPU UUIDs are unique across hosts, so replicas on several machines can share
one Redis. Indices follow PCI bus order (the image sets
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so CUDA numbers GPUs the way nvidia-smi does).
Only the standard library, redis-py and ``egm.config.settings`` are used.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

#: claims last this long without a refresh; ``hold`` refreshes three times per TTL.
DEFAULT_TTL_S = 30
#: how long ``claim`` waits for a GPU (a recreated container may have to outlive its predecessor's claim).
DEFAULT_WAIT_S = 120

# Claim (or re-claim) a key when it is free or already ours; 1 = ours now, 0 = someone else's.
_CLAIM_LUA = """
local holder = redis.call('GET', KEYS[1])
if (not holder) or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
  return 1
end
return 0
"""

# Delete a key only while we own it.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class NoFreeGpu(RuntimeError):
    """Every candidate GPU is claimed by another worker."""


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """Parse ``nvidia-smi --query-gpu=index,uuid --format=csv,noheader`` output."""
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        index, _, uuid = (part.strip() for part in line.partition(","))
        if not index.isdigit() or not uuid:
            raise ValueError(f"unexpected nvidia-smi line: {line!r}")
        gpus.append(Gpu(int(index), uuid))
    return gpus


def list_gpus() -> list[Gpu]:
    """GPUs visible in this container; empty when there is no NVIDIA driver."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (FileNotFoundError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return []
    return parse_nvidia_smi(out)


def parse_indices(spec: str) -> set[int] | None:
    """``"0,2"`` -> {0, 2}; empty or ``all`` -> None (no restriction)."""
    spec = spec.strip()
    if spec in ("", "all"):
        return None
    try:
        return {int(part) for part in spec.split(",") if part.strip()}
    except ValueError:
        raise ValueError(f"GPU ids must be comma-separated integers, got {spec!r}") from None


def candidates(gpus: Sequence[Gpu], only: set[int] | None) -> list[Gpu]:
    if only is None:
        return list(gpus)
    unknown = only - {g.index for g in gpus}
    if unknown:
        raise ValueError(f"GPU ids {sorted(unknown)} are not visible here (visible: {[g.index for g in gpus]})")
    return [g for g in gpus if g.index in only]


def claim_key(prefix: str, gpu: Gpu) -> str:
    return f"{prefix}:gpu-claim:{gpu.uuid}"


class Claims:
    """GPU claims of one owner (a worker container) in one Redis."""

    def __init__(self, conn: redis.Redis, prefix: str, owner: str, ttl_s: int = DEFAULT_TTL_S):
        self.conn, self.prefix, self.owner, self.ttl_s = conn, prefix, owner, ttl_s
        self._claim = conn.register_script(_CLAIM_LUA)
        self._release = conn.register_script(_RELEASE_LUA)

    def _claim_one(self, gpu: Gpu) -> bool:
        return bool(self._claim(keys=[claim_key(self.prefix, gpu)], args=[self.owner, self.ttl_s]))

    def holder(self, gpu: Gpu) -> str | None:
        value = self.conn.get(claim_key(self.prefix, gpu))
        return value.decode() if value is not None else None

    def try_claim(self, gpus: Sequence[Gpu], count: int) -> list[Gpu] | None:
        """Claim ``count`` GPUs, all or nothing; GPUs this owner already holds come first."""
        ordered = sorted(gpus, key=lambda g: (self.holder(g) != self.owner, g.index))
        taken: list[Gpu] = []
        for gpu in ordered:
            if len(taken) == count:
                break
            if self._claim_one(gpu):
                taken.append(gpu)
        if len(taken) < count:
            self.release(taken)
            return None
        return sorted(taken, key=lambda g: g.index)

    def refresh(self, gpus: Sequence[Gpu]) -> bool:
        """Extend our claims (re-creating any that expired); False if another owner took one."""
        return all([self._claim_one(gpu) for gpu in gpus])

    def release(self, gpus: Sequence[Gpu]) -> None:
        for gpu in gpus:
            self._release(keys=[claim_key(self.prefix, gpu)], args=[self.owner])


def claim_with_wait(claims: Claims, gpus: Sequence[Gpu], count: int, wait_s: float, poll_s: float = 2.0,
                    sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> list[Gpu]:
    """Claim ``count`` of ``gpus``, retrying while they are all taken, for up to ``wait_s`` seconds."""
    if count < 1:
        raise ValueError(f"GPUs per worker must be at least 1, got {count}")
    if count > len(gpus):
        raise NoFreeGpu(f"{count} GPU(s) per worker requested but only {len(gpus)} candidate(s): "
                        f"{[g.index for g in gpus]}")
    deadline = clock() + wait_s
    while True:
        got = claims.try_claim(gpus, count)
        if got is not None:
            return got
        if clock() >= deadline:
            holders = {g.index: claims.holder(g) for g in gpus}
            raise NoFreeGpu(f"no {count} free GPU(s) after {wait_s:.0f} s; claims by index: {holders}. "
                            "Run fewer worker replicas or free a GPU.")
        sleep(poll_s)


def hold(claims: Claims, gpus: Sequence[Gpu], stop: Callable[[], bool],
         sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
         tick_s: float = 1.0) -> None:
    """Refresh the claims every third of the TTL until ``stop()`` (checked every tick); then release them."""
    next_refresh = clock()
    try:
        while not stop():
            if clock() >= next_refresh:
                next_refresh = clock() + max(1.0, claims.ttl_s / 3)
                _refresh_once(claims, gpus)
            sleep(tick_s)
    finally:
        try:
            claims.release(gpus)
        except redis.RedisError:
            pass  # the claims expire on their own


def _refresh_once(claims: Claims, gpus: Sequence[Gpu]) -> None:
    try:
        if not claims.refresh(gpus):
            holders = {g.index: claims.holder(g) for g in gpus}
            print(f"gpu_claim: another worker holds one of our GPUs: {holders}", file=sys.stderr, flush=True)
    except redis.RedisError as exc:  # Redis restarting: keep going, the claim is re-created on the next refresh
        print(f"gpu_claim: cannot refresh claims: {exc}", file=sys.stderr, flush=True)


def _settings():
    from egm.config.settings import get_settings

    return get_settings()


def _build_claims(args: argparse.Namespace) -> Claims:
    settings = _settings()
    conn = redis.Redis.from_url(args.redis_url or settings.redis_url)
    return Claims(conn, args.prefix or settings.queue_prefix, args.owner, args.ttl)


def _cmd_claim(args: argparse.Namespace) -> int:
    gpus = parse_nvidia_smi(args.gpus) if args.gpus is not None else list_gpus()
    if not gpus:
        print("gpu_claim: no NVIDIA GPU visible; the worker runs without a claim", file=sys.stderr)
        return 0
    try:
        pool = candidates(gpus, parse_indices(args.only))
        got = claim_with_wait(_build_claims(args), pool, args.count, args.wait)
    except (NoFreeGpu, ValueError) as exc:
        print(f"gpu_claim: {exc}", file=sys.stderr)
        return 3
    print(",".join(str(g.index) for g in got))
    return 0


def _cmd_hold(args: argparse.Namespace) -> int:
    gpus = parse_nvidia_smi(args.gpus) if args.gpus is not None else list_gpus()
    wanted = parse_indices(args.indices) or set()
    held = [g for g in gpus if g.index in wanted]
    if not held:
        return 0
    # The worker is our parent; once it is gone (we are re-parented) the GPU is free again.
    # The shell passes its pid: reading getppid() here could already see the re-parenting.
    parent = args.parent or os.getppid()
    stopping = False

    def on_signal(signum, frame):  # noqa: ARG001 - signal handler signature
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    hold(_build_claims(args), held, stop=lambda: stopping or os.getppid() != parent)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_claim", description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", help="default: REDIS_URL through egm.config.settings")
    parser.add_argument("--prefix", help="Redis key prefix (default: EGM_QUEUE_PREFIX)")
    parser.add_argument("--owner", default=socket.gethostname(), help="claim owner (default: hostname)")
    parser.add_argument("--ttl", type=int, default=DEFAULT_TTL_S, help="claim lifetime without refresh, seconds")
    parser.add_argument("--gpus", help="nvidia-smi index,uuid CSV to use instead of running nvidia-smi (tests)")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("claim", help="claim free GPUs and print their indices")
    c.add_argument("--count", type=int, default=1, help="GPUs per worker")
    c.add_argument("--only", default="", help="comma-separated candidate indices (default: all visible)")
    c.add_argument("--wait", type=float, default=DEFAULT_WAIT_S, help="seconds to wait for a free GPU")
    c.set_defaults(func=_cmd_claim)
    h = sub.add_parser("hold", help="keep claims alive until the parent process exits")
    h.add_argument("--indices", required=True, help="comma-separated indices printed by claim")
    h.add_argument("--parent", type=int, help="pid of the worker; stop when it exits (default: parent pid)")
    h.set_defaults(func=_cmd_hold)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
