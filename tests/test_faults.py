"""Faults: the system keeps working and loses nothing when its parts fail.

Real processes throughout: worker and backend subprocesses, a real redis-server (our own,
with append-only persistence, for the restart test), the real Label Studio of the session,
and a TCP proxy (:mod:`tests.tcp_proxy`) to cut links. After each fault every task must end
with exactly one prediction of our model version in Label Studio, or be listed as failed
with a reason; the queues must drain. (SIGKILL of a worker in the middle of *computing* a
batch is covered by the bulk-run tests; here a worker dies in the middle of *writing*, and in the
middle of an interactive job it runs during a pause of a bulk batch.)
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from rq.registry import StartedJobRegistry

from egm.contract import Priority
from egm.queue import QueueClient
from tests.fault_stack import (Procs, bulk_jobs, ls_project, outcome, predict_body, queues_drained, start_run,
                               wait_until)
from egm.processes import free_port
from tests.fixtures.redis_server import RedisServer
from tests.tcp_proxy import TcpProxy
from egm.config.settings import Settings

pytestmark = pytest.mark.labelstudio


def _queue(redis_url: str, prefix: str) -> QueueClient:
    return QueueClient(Settings(redis_url=redis_url, queue_prefix=prefix))


def _settled(label_studio, project, task_ids, queue, run_id):
    def check():
        out = outcome(label_studio, project, task_ids, queue, run_id)
        return out if out.settled and queues_drained(queue) else None
    return check


@pytest.fixture()
def ls_proxy(label_studio):
    port = int(label_studio.url.rsplit(":", 1)[1])
    with TcpProxy("127.0.0.1", port) as proxy:
        yield proxy


@pytest.fixture()
def procs(tmp_path):
    made: list[Procs] = []

    def make(*args, **kw) -> Procs:
        p = Procs.create(*args, log_dir=tmp_path, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop_all()


# --------------------------------------------------------------------------- Label Studio outage


def test_label_studio_unreachable_for_a_while_then_back(label_studio, redis_url, ls_proxy, procs):
    """Writes fail while the link is cut; workers wait, then write every prediction exactly once."""
    prefix = f"lsout{uuid.uuid4().hex[:6]}"
    queue = _queue(redis_url, prefix)
    project, tasks = ls_project(label_studio, 20)
    run_id = f"run-{prefix}"
    bulk = dict(list(tasks.items())[:16])
    late = dict(list(tasks.items())[16:])
    jobs = bulk_jobs(project, bulk, run_id, size=4)
    # two late interactive results (/predict gave up on them): the worker must deliver those too
    interactive = bulk_jobs(project, late, None, size=2, write=False)
    for j in interactive:
        j.priority = Priority.bulk  # behind the bulk work, so they reach Label Studio during the outage
        queue.hand_off(j.job_id)
    start_run(queue, run_id, jobs)
    queue.enqueue_many(interactive)

    p = procs(redis_url, prefix, label_studio=label_studio, ls_url=ls_proxy.url,
              EGM_SCRIPTED_DELAY_S="0.4", EGM_LS_OUTAGE_WAIT_S="120")
    ls_proxy.set_mode("refuse")  # Label Studio goes away before the first write
    p.worker("w1")
    wait_until(lambda: "waiting for it" in p.log_text("w1"), 30, "a write that fails and waits")
    time.sleep(4)
    assert outcome(label_studio, project, tasks).counts.total() == 0  # nothing got through the cut
    ls_proxy.set_mode("open")

    out = wait_until(_settled(label_studio, project, list(tasks), queue, run_id), 90, "every task settled")
    assert not out.duplicated and not out.failed
    assert all(out.counts[t] == 1 for t in tasks)
    assert all(queue.redis.get(queue.keys.deliver(j.job_id)) == b"worker" for j in interactive)


def test_label_studio_down_longer_than_the_patience_fails_those_tasks_with_a_reason(
        label_studio, redis_url, ls_proxy, procs):
    prefix = f"lsdown{uuid.uuid4().hex[:6]}"
    queue = _queue(redis_url, prefix)
    project, tasks = ls_project(label_studio, 3)
    run_id = f"run-{prefix}"
    jobs = bulk_jobs(project, tasks, run_id, size=3)
    ls_proxy.set_mode("refuse")
    start_run(queue, run_id, jobs)
    p = procs(redis_url, prefix, label_studio=label_studio, ls_url=ls_proxy.url, EGM_LS_OUTAGE_WAIT_S="2")
    p.worker("w1")
    out = wait_until(_settled(label_studio, project, list(tasks), queue, run_id), 60, "tasks listed as failed")
    assert set(out.failed) == set(tasks)
    assert all("Label Studio unavailable" in why for why in out.failed.values()), out.failed
    ls_proxy.set_mode("open")
    assert outcome(label_studio, project, tasks).counts.total() == 0


# --------------------------------------------------------------------------- worker killed mid-write


@pytest.mark.parametrize("link", ["hold_responses", "hold_requests"])
def test_worker_killed_in_the_middle_of_its_label_studio_write(label_studio, redis_url, ls_proxy, procs, link):
    """hold_responses: Label Studio stored the predictions, the worker died before it heard back;
    the retried batch finds them there and does not write them again. hold_requests: the write
    never arrived; the retried batch (same job, so the claim is its own) writes it."""
    prefix = f"kill{uuid.uuid4().hex[:6]}"
    queue = _queue(redis_url, prefix)
    project, tasks = ls_project(label_studio, 12)
    run_id = f"run-{prefix}"
    start_run(queue, run_id, bulk_jobs(project, tasks, run_id, size=4))
    ls_proxy.set_mode(link)
    p = procs(redis_url, prefix, label_studio=label_studio, ls_url=ls_proxy.url)
    p.worker("w1")
    if link == "hold_responses":
        wait_until(lambda: outcome(label_studio, project, tasks).counts.total() >= 4, 60,
                   "the first batch stored in Label Studio")
    else:
        wait_until(lambda: ls_proxy.accepted >= 1, 60, "the first write on its way")
        time.sleep(1)
        assert outcome(label_studio, project, tasks).counts.total() == 0
    p.kill("w1")  # SIGKILL while its write is unanswered
    ls_proxy.set_mode("open")
    p.worker("w2")
    out = wait_until(_settled(label_studio, project, list(tasks), queue, run_id), 90, "every task settled")
    assert not out.duplicated and not out.failed
    assert all(out.counts[t] == 1 for t in tasks)


def test_worker_killed_in_the_middle_of_an_interactive_job_run_in_a_pause(label_studio, redis_url, ls_proxy,
                                                                           procs):
    """The bulk batch is paused and the interactive job runs inside it when the worker is SIGKILLed:
    both jobs sit in RQ's started registries; once their heartbeats lapse another worker runs both
    again and every task ends with exactly one prediction (the interactive one delivered late, as
    /predict had handed it off)."""
    prefix = f"pre{uuid.uuid4().hex[:6]}"
    queue = _queue(redis_url, prefix)
    project, tasks = ls_project(label_studio, 5)
    run_id = f"run-{prefix}"
    items = list(tasks.items())
    bulk, late = dict(items[:4]), dict(items[4:])
    (interactive,) = bulk_jobs(project, late, None, size=1, write=False)
    interactive.priority = Priority.interactive
    queue.hand_off(interactive.job_id)  # /predict gave up waiting: the worker delivers it
    start_run(queue, run_id, bulk_jobs(project, bulk, run_id, size=4))
    p = procs(redis_url, prefix, label_studio=label_studio, ls_url=ls_proxy.url, EGM_SCRIPTED_DELAY_S="4",
              EGM_PREEMPT_CHECK_S="0")
    p.worker("w1")
    version = interactive.model_version
    bulk_started = StartedJobRegistry(queue=queue.queue(Priority.bulk, version))
    interactive_started = StartedJobRegistry(queue=queue.queue(Priority.interactive, version))
    wait_until(lambda: bulk_started.count == 1, 60, "the bulk batch on the engine")
    queue.enqueue(interactive)
    wait_until(lambda: "interactive job runs in a pause" in p.log_text("w1"), 30, "the interactive job in a pause")
    wait_until(lambda: interactive_started.count == 1, 10, "the interactive job started through RQ")
    p.kill("w1")  # SIGKILL: the bulk batch paused, the interactive job on the engine
    assert bulk_started.count == 1 and interactive_started.count == 1  # both remembered as running
    assert queue.result(interactive.job_id) is None and outcome(label_studio, project, tasks).counts.total() == 0
    p.worker("w2", EGM_SCRIPTED_DELAY_S="0.2")
    out = wait_until(_settled(label_studio, project, list(tasks), queue, run_id), 120, "every task settled")
    assert not out.duplicated and not out.failed
    assert all(out.counts[t] == 1 for t in tasks)
    assert queue.result(interactive.job_id) is not None
    assert queue.redis.get(queue.keys.deliver(interactive.job_id)) == b"worker"


# --------------------------------------------------------------------------- write-behind outbox


def test_gpu_work_goes_on_while_label_studio_writes_hang(label_studio, redis_url, ls_proxy, procs):
    """Writes leave the batch: with every write to Label Studio stuck, the worker still computes
    all batches (their results wait in the outbox), then writes each prediction once."""
    prefix = f"wb{uuid.uuid4().hex[:6]}"
    queue = _queue(redis_url, prefix)
    project, tasks = ls_project(label_studio, 12)
    run_id = f"run-{prefix}"
    jobs = bulk_jobs(project, tasks, run_id, size=4)
    start_run(queue, run_id, jobs)
    ls_proxy.set_mode("hold_requests")
    p = procs(redis_url, prefix, label_studio=label_studio, ls_url=ls_proxy.url)
    p.worker("w1")
    wait_until(lambda: p.log_text("w1").count('"batch done"') == 3, 60, "all three batches computed")
    assert queue_jobs_left(queue) == 0  # RQ is done with them; only the writes wait
    assert _outbox_size(queue) == 3
    assert outcome(label_studio, project, tasks).counts.total() == 0
    ls_proxy.set_mode("open")
    out = wait_until(_settled(label_studio, project, list(tasks), queue, run_id), 90, "every task settled")
    assert not out.duplicated and not out.failed and all(out.counts[t] == 1 for t in tasks)
    wait_until(lambda: _outbox_size(queue) == 0, 10, "the outbox emptied")  # entries go after the bookkeeping


@pytest.mark.parametrize("link", ["hold_responses", "hold_requests"])
def test_worker_killed_with_results_in_its_outbox(label_studio, redis_url, ls_proxy, procs, link):
    """The worker computed every batch and died before its writes finished: another worker takes the
    outbox entries over when their leases run out and writes them, each prediction exactly once,
    without computing anything again. hold_responses: Label Studio stored the first import, the
    answer never came back; hold_requests: no import arrived."""
    prefix = f"wbk{uuid.uuid4().hex[:6]}"
    queue = _queue(redis_url, prefix)
    project, tasks = ls_project(label_studio, 12)
    run_id = f"run-{prefix}"
    start_run(queue, run_id, bulk_jobs(project, tasks, run_id, size=4))
    ls_proxy.set_mode(link)
    p = procs(redis_url, prefix, label_studio=label_studio, ls_url=ls_proxy.url, EGM_OUTBOX_LEASE_S="3")
    p.worker("w1")
    wait_until(lambda: p.log_text("w1").count('"batch done"') == 3, 60, "all three batches computed")
    if link == "hold_responses":
        wait_until(lambda: outcome(label_studio, project, tasks).counts.total() >= 4, 60,
                   "the first import stored in Label Studio")
    else:
        wait_until(lambda: ls_proxy.accepted >= 1, 60, "the first write on its way")
    p.kill("w1")  # SIGKILL: one entry leased and mid-write, two waiting
    ls_proxy.set_mode("open")
    assert queue_jobs_left(queue) == 0 and _outbox_size(queue) == 3
    p.worker("w2")
    out = wait_until(_settled(label_studio, project, list(tasks), queue, run_id), 90, "every task settled")
    assert not out.duplicated and not out.failed and all(out.counts[t] == 1 for t in tasks)
    # the entry w1 held is taken over once its lease runs out, which may be after the tasks settled (its
    # import may have reached Label Studio before w1 died): wait for that takeover, then count
    wait_until(lambda: p.log_text("w2").count("outbox: writing an entry another worker filed") >= 3, 30,
               "the leased entry taken over")
    log = p.log_text("w2")
    assert log.count("outbox: writing an entry another worker filed") == 3
    assert not outcome(label_studio, project, tasks).duplicated  # that takeover wrote nothing twice
    assert '"batch done"' not in log  # nothing computed twice
    wait_until(lambda: _outbox_size(queue) == 0, 10, "the outbox emptied")


def queue_jobs_left(queue) -> int:
    return sum(d["queued"] + d["started"] for d in queue.depths().values())


def _outbox_size(queue) -> int:
    return int(queue.redis.zcard(queue.keys.outbox()))


# --------------------------------------------------------------------------- backend restarted


def test_backend_killed_while_predict_calls_wait(label_studio, redis_url, procs):
    """/predict callers lose their connection; the queued work still reaches Label Studio once.

    The three jobs take 1.5 s each on one worker, all finished well before the 8 s deadline:
    with nobody left to claim them, the workers' late sweep delivers them after the deadline."""
    prefix = f"be{uuid.uuid4().hex[:6]}"
    queue = _queue(redis_url, prefix)
    project, tasks = ls_project(label_studio, 6)
    p = procs(redis_url, prefix, label_studio=label_studio, EGM_PREDICT_BUDGET_S="8", EGM_SCRIPTED_DELAY_S="1.5")
    p.worker("w1")
    p.backend()
    p.wait_ready()
    items = list(tasks.items())
    calls = [dict(items[i:i + 2]) for i in range(0, 6, 2)]
    outcomes: list[str] = []

    def call(chunk):
        try:
            p.predict(predict_body(project, chunk), timeout_s=30)
            outcomes.append("answered")
        except Exception as exc:  # noqa: BLE001 - the backend dies under us
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=call, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    wait_until(lambda: len(list(queue.redis.scan_iter(queue.keys.handoff("*")))) == 3, 10, "three jobs queued")
    p.kill("backend")  # SIGKILL while all three wait (the first job needs 1.5 s)
    for t in threads:
        t.join(10)
    assert len(outcomes) == 3 and "answered" not in outcomes, outcomes
    p.backend("backend2")
    assert p.predict(predict_body(project, {}), timeout_s=10).status_code == 422  # the new backend answers
    mv = p.model_version()
    out = wait_until(lambda: (o := outcome(label_studio, project, tasks, model_version=mv)).counts.total() == 6 and o,
                     60, "every task delivered by the worker")
    assert not out.duplicated and all(out.counts[t] == 1 for t in tasks)
    assert queue.late_pending() == 0
    # each by the worker: the sweep, or at once when the batch itself finished past the deadline
    # (the log line follows the write, so give it a moment after the predictions appear)
    def late_deliveries() -> int:
        log = p.log_text("w1")
        return log.count("delivered a late result nobody claimed") + log.count("delivered a late result past")

    wait_until(lambda: late_deliveries() >= 3, 10, "three late deliveries logged")
    assert late_deliveries() == 3
    time.sleep(2)  # nothing else arrives later
    assert outcome(label_studio, project, tasks, model_version=mv).counts.total() == 6


def test_live_backend_answers_and_the_worker_stays_out(label_studio, redis_url, procs):
    """The control case: results /predict returned are never also written by the late sweep."""
    prefix = f"bl{uuid.uuid4().hex[:6]}"
    queue = _queue(redis_url, prefix)
    project, tasks = ls_project(label_studio, 4)
    p = procs(redis_url, prefix, label_studio=label_studio, EGM_PREDICT_BUDGET_S="20")
    p.backend()
    p.worker("w1")
    p.wait_ready()
    resp = p.predict(predict_body(project, tasks))
    assert resp.status_code == 200
    assert all(r and r["result"] for r in resp.json()["results"])
    handoffs = [k.decode().rsplit(":", 1)[-1] for k in queue.redis.scan_iter(queue.keys.handoff("*"))]
    assert handoffs and all(queue.redis.get(queue.keys.deliver(j)) == b"backend" for j in handoffs)
    # the backend's claim took the jobs off the late schedule; a sweep long after the deadline finds nothing
    assert queue.late_pending() == 0
    due = queue.take_due_deliveries(now=time.time() + 3600)
    assert due == [] and not any(queue.worker_must_deliver(j) for j in handoffs)
    time.sleep(1)
    # Label Studio keeps what /predict returned; nothing was written besides
    assert outcome(label_studio, project, tasks, model_version=p.model_version()).counts.total() == 0


# --------------------------------------------------------------------------- Redis restarted / unreachable


@pytest.fixture()
def persistent_redis(tmp_path):
    server = RedisServer(port=free_port(), workdir=tmp_path / "redis-aof", appendonly=True)
    server.workdir.mkdir()
    server.start()
    yield server
    server.stop()


def test_redis_restarted_mid_run_with_persistence(label_studio, persistent_redis, procs):
    prefix = f"rr{uuid.uuid4().hex[:6]}"
    queue = _queue(persistent_redis.url, prefix)
    project, tasks = ls_project(label_studio, 48)
    run_id = f"run-{prefix}"
    jobs = bulk_jobs(project, tasks, run_id, size=4)
    start_run(queue, run_id, jobs)
    p = procs(persistent_redis.url, prefix, label_studio=label_studio, EGM_SCRIPTED_DELAY_S="0.5")
    p.worker("w1")
    p.worker("w2")
    wait_until(lambda: outcome(label_studio, project, tasks).counts.total() >= 8, 60, "the run under way")
    persistent_redis.restart(downtime_s=2)
    out = wait_until(_settled(label_studio, project, list(tasks), queue, run_id), 120, "every task settled")
    assert not out.duplicated and not out.failed
    assert all(out.counts[t] == 1 for t in tasks)
    assert p.alive("w1") and p.alive("w2")  # the workers waited for Redis instead of exiting
    assert "lost Redis" in p.log_text("w1") + p.log_text("w2")


def test_redis_briefly_unreachable(label_studio, redis_server, procs):
    """Connections cut and refused for a few seconds (Redis itself keeps its data)."""
    redis_server.client().flushall()
    prefix = f"ru{uuid.uuid4().hex[:6]}"
    with TcpProxy("127.0.0.1", redis_server.port) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        queue = _queue(redis_server.url, prefix)  # the test's own view goes around the proxy
        project, tasks = ls_project(label_studio, 32)
        run_id = f"run-{prefix}"
        start_run(queue, run_id, bulk_jobs(project, tasks, run_id, size=4))
        p = procs(url, prefix, label_studio=label_studio, EGM_SCRIPTED_DELAY_S="0.5")
        p.backend()
        p.worker("w1")
        p.worker("w2")
        wait_until(lambda: outcome(label_studio, project, tasks).counts.total() >= 8, 60, "the run under way")
        proxy.set_mode("refuse")
        resp = p.predict(predict_body(project, dict(list(tasks.items())[:1])), timeout_s=30)
        assert resp.status_code == 503 and "Redis" in resp.json()["detail"]
        time.sleep(3)
        proxy.set_mode("open")
        out = wait_until(_settled(label_studio, project, list(tasks), queue, run_id), 120, "every task settled")
        assert not out.duplicated and not out.failed
        assert all(out.counts[t] == 1 for t in tasks)
        assert p.alive("w1") and p.alive("w2") and p.alive("backend")
        assert p.predict(predict_body(project, {}), timeout_s=10).status_code == 422  # backend serves again
