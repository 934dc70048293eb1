"""``egm-assist serve``: run the Label Studio ML backend."""

from __future__ import annotations

import socket

from egm.cli.commands._common import settings_from_flags
from egm.cli.errors import EXIT_ERROR, fail


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the Label Studio ML backend (HTTP)")
    p.add_argument("--host", help="interface to listen on (EGM_HOST)")
    p.add_argument("--port", type=int, help="port (EGM_PORT, default 9090)")
    p.set_defaults(func=run)


def port_problem(host: str, port: int) -> str | None:
    """Why the backend could not listen on ``host:port`` (in use, no such address), else None."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def run(args) -> int:
    settings = settings_from_flags(service=True, EGM_HOST=args.host, EGM_PORT=args.port)
    problem = port_problem(settings.host, settings.port)
    if problem:
        return fail(f"cannot listen on {settings.host}:{settings.port}: {problem}; pick another port with --port "
                    f"(or EGM_PORT)")
    from egm.backend.app import serve

    try:
        serve(settings)
    except SystemExit as exc:  # uvicorn exits on start-up failures; its reason is in the log above
        if exc.code not in (None, 0):
            return fail(f"the backend stopped during start-up (uvicorn exit code {exc.code}); see the log above",
                        EXIT_ERROR)
    return 0
