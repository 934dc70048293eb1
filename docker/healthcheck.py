"""Container health probes used by the images' HEALTHCHECK.

``python healthcheck.py backend``: the ML backend answers ``GET /health`` with
``{"status": "UP"}`` (the route Label Studio itself polls; it needs no auth).

``python healthcheck.py worker``: an RQ worker started in this container (same
hostname, live process) is registered in Redis. RQ drops a worker's key when
its heartbeat stops, so a hung or dead worker turns the container unhealthy.

Exit status 0 = healthy, 1 = unhealthy (what Docker expects), with one line of
explanation on stdout, which ``docker inspect`` shows.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass

#: Docker kills a probe that runs past the HEALTHCHECK timeout; stay below it.
HTTP_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Probe:
    healthy: bool
    detail: str


def backend_url(host: str, port: int) -> str:
    """Where to reach a backend listening on ``host``: a wildcard address is reached on loopback."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/health"


def probe_backend(url: str, timeout_s: float = HTTP_TIMEOUT_S) -> Probe:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            body = resp.read(4096)
    except (urllib.error.URLError, OSError) as exc:
        return Probe(False, f"{url}: {exc}")
    try:
        status = json.loads(body).get("status")
    except (ValueError, AttributeError):
        return Probe(False, f"{url}: not a JSON object: {body[:80]!r}")
    return Probe(status == "UP", f"{url}: status={status!r}")


def _process_alive(pid: int | None) -> bool:
    if not pid:
        return True  # RQ did not record a pid: trust the heartbeat alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def probe_worker(redis_url: str, hostname: str) -> Probe:
    """Healthy when a registered RQ worker has this hostname and its process is alive."""
    import redis
    from rq import Worker

    try:
        workers = Worker.all(connection=redis.Redis.from_url(redis_url, socket_timeout=HTTP_TIMEOUT_S))
    except redis.RedisError as exc:
        return Probe(False, f"redis unreachable: {exc}")
    mine = [w for w in workers if w.hostname == hostname]
    if not mine:
        return Probe(False, f"no RQ worker registered for host {hostname!r} ({len(workers)} registered in all)")
    alive = [w for w in mine if _process_alive(w.pid)]
    if not alive:
        return Probe(False, f"worker(s) {[w.name for w in mine]} registered but their process is gone")
    return Probe(True, f"worker {alive[0].name} state={alive[0].get_state()}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in ("backend", "worker"):
        print("usage: healthcheck.py backend|worker", file=sys.stderr)
        return 1  # Docker reserves exit status 2
    from egm.config.settings import get_settings

    settings = get_settings()
    if argv[0] == "backend":
        result = probe_backend(backend_url(settings.host, settings.port))
    else:
        result = probe_worker(settings.redis_url, socket.gethostname())
    print(("healthy: " if result.healthy else "unhealthy: ") + result.detail)
    return 0 if result.healthy else 1


if __name__ == "__main__":
    sys.exit(main())
