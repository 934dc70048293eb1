"""The write-behind outbox on a real Redis: leases, renewal, takeover after a writer dies, retries.

What must hold: an entry filed is written by someone unless written already; a writer that
stops renewing loses the entry to another; a writer that lost its lease cannot remove the
entry (the new holder writes it, the delivery claims keep that exactly once); a job filed
again (an RQ retry) is due at once; the worker slows down instead of piling up results.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis

from egm.contract import BatchJob, BatchResult, TaskResult
from egm.worker.outbox import BackgroundWriter, Outbox
from tests.stack import TARGET


def _job(n: int = 2) -> tuple[BatchJob, BatchResult]:
    from egm.contract import Query, TaskJob

    job = BatchJob(model_version="mv-1", target=TARGET, project_id=7, write_to_label_studio=True,
                   tasks=[TaskJob(task_id=i, image=f"img{i}.jpg", queries=[Query(text="q")]) for i in range(n)])
    result = BatchResult(job_id=job.job_id, model_version="mv-1",
                         results=[TaskResult(task_id=i, status="ok") for i in range(n)])
    return job, result


@pytest.fixture()
def outbox(redis_url, request):
    conn = redis.Redis.from_url(redis_url)
    prefix = f"ob{abs(hash(request.node.name)) % 10**8}"
    yield Outbox(conn, prefix, lease_s=30.0)
    for key in conn.scan_iter(f"{prefix}:*"):
        conn.delete(key)


def test_filed_entry_is_leased_once_and_gone_when_finished(outbox):
    job, result = _job()
    outbox.file(job, result, {"gpu_seconds": 1.5})
    entry = outbox.lease()
    assert entry is not None and entry.job.job_id == job.job_id
    assert entry.result == result and entry.stats == {"gpu_seconds": 1.5}
    assert outbox.lease() is None  # held: nobody else gets it
    assert outbox.pending() == 1 and outbox.pending([job.job_id]) == 1
    assert outbox.renew(entry)
    assert outbox.finish(entry)
    assert outbox.pending() == 0 and outbox.lease() is None


def test_a_writer_that_stops_renewing_loses_the_entry(outbox):
    job, result = _job()
    outbox.file(job, result, {})
    first = outbox.lease(now=1000.0)  # leased until 1030
    assert outbox.lease(now=1029.0) is None
    second = outbox.lease(now=1031.0)  # the first writer died: taken over
    assert second is not None and second.job.job_id == job.job_id and second.token != first.token
    # the old holder can neither extend nor remove it; the new one finishes it
    assert not outbox.renew(first)
    assert not outbox.finish(first)
    assert outbox.pending() == 1
    assert outbox.finish(second) and outbox.pending() == 0


def test_a_job_filed_again_is_due_at_once_for_any_writer(outbox):
    job, result = _job()
    outbox.file(job, result, {})
    held = outbox.lease()
    outbox.file(job, result, {"again": 1})  # the job ran again (RQ retry after its worker died)
    again = outbox.lease()
    assert again is not None and again.stats == {"again": 1}
    assert not outbox.finish(held) and outbox.finish(again)


def test_background_writer_writes_every_entry_and_waits_when_behind(outbox):
    release = threading.Event()
    written: list[str] = []

    def slow_write(entry):
        release.wait(30)
        written.append(entry.job.job_id)

    writer = BackgroundWriter(outbox, slow_write, max_pending=1, poll_s=0.1).start()
    try:
        first, second = _job(), _job()
        writer.file(*first, {})
        blocked = threading.Thread(target=writer.file, args=(*second, {}))
        blocked.start()
        blocked.join(0.5)
        assert blocked.is_alive()  # one unwritten result is the limit: the worker waits
        assert outbox.pending() == 1
        release.set()
        blocked.join(10)
        assert not blocked.is_alive()
        assert writer.drain(10)
        assert written == [first[0].job_id, second[0].job_id] and outbox.pending() == 0
    finally:
        release.set()
        writer.stop()


def test_failed_write_keeps_the_entry_for_a_later_try(outbox):
    outbox.lease_s = 0.5
    attempts: list[float] = []

    def flaky(entry):
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise RuntimeError("Redis went away mid-write")

    writer = BackgroundWriter(outbox, flaky, poll_s=0.05).start()
    try:
        job, result = _job()
        writer.file(job, result, {})
        assert writer.drain(10)
        assert len(attempts) == 2 and outbox.pending() == 0  # tried again once the lease ran out
    finally:
        writer.stop()


def test_writer_takes_over_entries_another_worker_left(outbox):
    job, result = _job()
    outbox.file(job, result, {})  # filed by a worker that died before its writer got to it
    seen = []
    writer = BackgroundWriter(outbox, lambda entry: seen.append(entry), poll_s=0.05).start()
    try:
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [e.job.job_id for e in seen] == [job.job_id] and seen[0].taken_over
    finally:
        writer.stop()
