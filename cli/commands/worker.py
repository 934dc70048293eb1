"""``egm-assist worker``: a GPU worker that keeps the model loaded and serves the queues."""

from __future__ import annotations


from egm.cli.commands._common import settings_from_flags
from egm.cli.errors import fail, service_errors
from egm.contract import Priority


def register(sub) -> None:
    p = sub.add_parser("worker", help="consume the queues with a resident engine (one per GPU)")
    p.add_argument("--engine", choices=["hf", "vllm", "openai", "scripted"], help="engine (EGM_ENGINE)")
    p.add_argument("--device", help="torch device for the hf engine, e.g. cuda:1 (EGM_DEVICE)")
    p.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    p.add_argument("--max-jobs", type=int, help="exit after this many batch jobs")
    p.add_argument("--name", help="worker name (default: egm-<host>-<random>)")
    p.add_argument("--queues", default="interactive,bulk",
                   help="queues to serve, highest priority first (default interactive,bulk)")
    p.set_defaults(func=run)


@service_errors
def run(args) -> int:
    settings = settings_from_flags(service=True, EGM_ENGINE=args.engine, EGM_DEVICE=args.device)
    import redis

    from egm.worker.batch_worker import failure_reason, run_worker

    priorities = [Priority(q.strip()) for q in args.queues.split(",") if q.strip()]
    try:
        run_worker(settings, burst=args.burst, name=args.name, max_jobs=args.max_jobs, priorities=priorities)
    except redis.exceptions.ConnectionError:
        raise  # service_errors says it in one line
    except Exception as exc:  # noqa: BLE001 - the reason is in the fleet registry and the log; one line here
        return fail(f"worker stopped: {failure_reason(exc, settings.secret_values())}")
    return 0
