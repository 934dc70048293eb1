"""Load: a bulk run with several worker processes while annotators call /predict (bench/load.py's scenario).

CI runs 1,000 tasks (marked ``slow``); the full 10,000-task run is marked ``full`` and runs only
on demand: ``pytest -m full tests/test_load.py`` or ``EGM_LOAD_FULL=1``. ``bench/load.py`` runs
the same scenario from the command line and records its figures. The figures are printed
(``-s`` shows them); the assertions are about completeness and what is left in Redis, never time.
"""

from __future__ import annotations

import os
import time

import pytest

from bench.load import LoadReport, LoadSpec, run_load, table
from egm.config.settings import Settings
from egm.contract import Priority
from egm.queue import QueueClient
from tests.fault_stack import wait_until
from tests.stack import version_of

RESULT_TTL_S = 5  # short, so the test can watch results expire
#: per-job keys that must be gone once RESULT_TTL_S has passed
EXPIRING = ("result", "done", "rq:job", "rq:results")
#: longest lifetime each family of keys may have (seconds)
MAX_TTL = {"result": RESULT_TTL_S, "done": RESULT_TTL_S, "rq:job": RESULT_TTL_S, "rq:results": RESULT_TTL_S,
           # answered interactive calls keep their markers as long as results (at least a minute)
           "handoff": 60, "deliver": 60, "run": 30 * 24 * 3600, "rq:worker": 600}


def _check(report: LoadReport, redis_url: str) -> dict:
    spec = report.spec
    print("\n" + table(report))
    # every bulk task finished, none failed
    assert (report.bulk_done, report.bulk_failed) == (spec.tasks, 0)
    # every interactive call was answered with a prediction
    assert report.interactive_during_bulk > 0 and not report.interactive_errors
    assert report.interactive_empty == 0 and report.interactive_ok == report.interactive_calls
    # nothing left behind: queues, registries, the late-delivery schedule
    assert report.drained, report.queues_after
    assert report.late_pending == 0
    # nothing that grows with the work lives forever
    assert report.unbounded_keys == []
    assert report.lingering_registry_entries == 0
    for family, ttl in report.ttl_by_family.items():
        assert ttl <= MAX_TTL.get(family, 24 * 3600), (family, ttl)
    # and the per-job keys really go: results, wake-ups and RQ's job records expire
    import redis

    conn = redis.Redis.from_url(redis_url)

    def expired() -> bool:
        keys = [k.decode() for k in conn.scan_iter(count=1000)]
        return not [k for k in keys if any(f":{f}:" in k or k.startswith(f + ":") for f in EXPIRING)]

    wait_until(expired, RESULT_TTL_S + 30, "results and job records to expire")
    after = int(conn.info("memory")["used_memory"])
    kept = {}
    for key in conn.scan_iter(count=1000):
        parts = key.decode().split(":")  # rq:<family>:... and <prefix>:<family>:...
        family = parts[1] if len(parts) > 1 else parts[0]
        kept[family] = kept.get(family, 0) + (conn.memory_usage(key) or 0)
    retained = sum(kept.values())
    print(f"after expiry: used_memory {after / 2**20:.2f} MiB; data kept {retained / 1024:.0f} KiB "
          f"({retained / spec.tasks:.0f} bytes per task: {', '.join(f'{k} {v // 1024} KiB' for k, v in kept.items())})")
    # what stays is run progress (30 days) and RQ's finished registry until its next cleanup
    assert retained < 64 * 1024 + 300 * spec.tasks
    return {"after_expiry_bytes": after, "retained_bytes": retained}


def _spec(tasks: int) -> LoadSpec:
    return LoadSpec(tasks=tasks, workers=3, batch_size=8, interactive_clients=4, result_ttl_s=RESULT_TTL_S,
                    timeout_s=600)


@pytest.mark.slow
def test_bulk_run_with_interactive_calls_ci_size(redis_url, tmp_path):
    report = run_load(_spec(1_000), redis_url, tmp_path)
    _check(report, redis_url)


@pytest.mark.full
def test_bulk_run_with_interactive_calls_full_size(redis_url, tmp_path, request):
    if not (os.environ.get("EGM_LOAD_FULL") or "full" in (request.config.getoption("-m") or "")):
        pytest.skip("the 10,000-task run: `pytest -m full tests/test_load.py` or EGM_LOAD_FULL=1")
    report = run_load(_spec(10_000), redis_url, tmp_path)
    _check(report, redis_url)


def test_failed_jobs_expire_too(egm_env):
    """A batch job that fails for good lands in RQ's failed registry with EGM_FAILURE_TTL_S, not RQ's year."""
    from rq.registry import FailedJobRegistry

    from egm.worker.batch_worker import run_worker
    from egm.worker.engines.scripted import ScriptedEngine

    s = Settings(**{**egm_env.model_dump(), "failure_ttl_s": 3, "job_retries": 0})
    queue = QueueClient(s)
    bulk = queue.queue(Priority.bulk, version_of(ScriptedEngine(), s))
    job = bulk.enqueue_call("egm.worker.rq_entry.run_batch", args=({"not": "a batch job"},), failure_ttl=s.failure_ttl_s,
                            result_ttl=s.result_ttl_s)
    run_worker(s, engine=ScriptedEngine(), burst=True)
    registry = FailedJobRegistry(queue=bulk)
    assert job.get_status(refresh=True) == "failed" and job.id in registry.get_job_ids()
    assert 0 < queue.redis.ttl(f"rq:job:{job.id}") <= 3
    wait_until(lambda: not queue.redis.exists(f"rq:job:{job.id}"), 30, "the failed job to expire")
    time.sleep(1)
    registry.cleanup()
    assert job.id not in registry.get_job_ids()
