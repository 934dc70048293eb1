"""``egm-assist serve``: run the Label Studio ML backend."""

from __future__ import annotations

from egm.cli.commands._common import settings_from_flags


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the Label Studio ML backend (HTTP)")
    p.add_argument("--host", help="interface to listen on (EGM_HOST)")
    p.add_argument("--port", type=int, help="port (EGM_PORT, default 9090)")
    p.set_defaults(func=run)


def run(args) -> int:
    settings = settings_from_flags(service=True, EGM_HOST=args.host, EGM_PORT=args.port)
    from egm.backend.app import serve

    serve(settings)
    return 0
