"""The GPU worker process: an RQ worker that never forks and keeps the engine loaded.

RQ's default worker forks a work-horse per job, which breaks CUDA and would
reload the model every job. :class:`BatchWorker` runs jobs in-process and beats
a short heartbeat from a side thread while a batch runs, so a worker that is
SIGKILLed is noticed within ``3 * EGM_HEARTBEAT_S + 10`` seconds and its batch
goes back to the queue (RQ retries abandoned jobs that have retries left).

RQ's work loop quits when Redis goes away mid-job (restart, failover, network).
:func:`run_worker` keeps the process (and the loaded model) alive instead: it
waits until Redis answers again and starts a fresh work loop; the interrupted
batch is re-queued by RQ once its heartbeat has expired.

Identity (egm.identity): the worker publishes ``starting`` in the fleet registry before
it loads the model, computes its identity from what loaded, then serves only the queues
of that ``model_version``. A served model (``openai`` engine) may change behind its URL:
the worker asks the server between jobs and, when the model changed, re-identifies and
moves to the new version's queues before it takes another job. Between jobs it also fails
jobs of versions no live worker serves (egm.unserved).

Interactive jobs during bulk batches (egm.worker.preempt): the engine pauses the bulk batch and
:meth:`BatchWorker.run_inline` runs a waiting interactive job through RQ right there (its own
execution, registries and result); the heartbeat thread beats for every job in progress, the
paused one included, so neither looks abandoned.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import uuid

import redis
from rq import SimpleWorker
from rq.exceptions import StopRequested
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.utils import now

from egm.backoff import backoff_s
from egm.config.settings import Settings
from egm.contract import Priority
from egm.fleet import Fleet
from egm.identity import ModelIdentity
from egm.redaction import redact
from egm.queue import QueueClient
from egm.unserved import fail_unserved
from egm.worker import rq_entry
from egm.worker.cache import ResultCache
from egm.worker.delivery import LabelStudioWriter
from egm.worker.engines import Engine, EngineError, create_engine
from egm.worker.identity import IdentityError, identify
from egm.worker.outbox import BackgroundWriter, Outbox
from egm.worker.batch_processor import BatchProcessor
from egm.worker.preempt import Preemptor
from egm.worker.prefetch import Prefetcher
from egm.worker.presence import Presence

log = logging.getLogger(__name__)


class BatchWorker(SimpleWorker):
    heartbeat_s: int = 5
    #: set by SIGTERM/SIGINT (RQ's own stop flag misses a stop requested while idle).
    stop_asked: bool = False
    #: returns True when the engine now serves another model than this loop's version.
    identity_changed = None
    #: set when the loop stopped because the served model changed.
    reidentify: bool = False
    #: called between jobs: fails overdue jobs of versions no live worker serves (egm.unserved).
    sweep = None
    #: (job, execution) of the jobs in progress: the running one, and one run in a pause of its batch.
    #: Replaced, never mutated: the heartbeat thread reads it.
    _running: list = []

    def handle_warm_shutdown_request(self) -> None:
        self.stop_asked = True
        super().handle_warm_shutdown_request()

    def get_heartbeat_ttl(self, job: Job) -> int:
        return self.heartbeat_s * 3 + 10

    def _served_model_changed(self) -> bool:
        if self.identity_changed is None:
            return False
        try:
            return bool(self.identity_changed())
        except Exception as exc:  # noqa: BLE001 - server unreachable: its requests will fail and say so
            log.warning("could not ask the engine what it serves", extra={"error": str(exc)})
            return False

    def execute_job(self, job: Job, queue: Queue) -> None:
        if self._served_model_changed():
            # dequeued for the old version: back to its queue, for a worker that still serves it
            queue.push_job_id(job.id, at_front=True)
            self.reidentify = True
            raise StopRequested()
        self._running = []
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(stop,), name="egm-heartbeat", daemon=True)
        beat.start()
        try:
            super().execute_job(job, queue)
        finally:
            stop.set()
            beat.join(timeout=self.heartbeat_s + 1)
            self._running = []

    # -- jobs in progress: the running one and, during a pause of its batch, an interactive one ----------
    def prepare_execution(self, job: Job):
        execution = super().prepare_execution(job)
        self._running = [*self._running, (job, execution)]
        return execution

    def cleanup_execution(self, job: Job, pipeline) -> None:
        super().cleanup_execution(job, pipeline)
        self._running = [(j, e) for j, e in self._running if j.id != job.id]

    def run_inline(self, job: Job, queue: Queue) -> None:
        """Run a dequeued job to completion inside the job in progress (whose batch is paused), through
        RQ as :meth:`execute_job` would; then give the paused job back its execution, name and alarm."""
        outer = list(self._running)
        if len(outer) != 1:
            raise RuntimeError("run_inline needs exactly one job in progress")
        outer_job, outer_execution = outer[0]
        alarm_left = signal.alarm(0)  # the paused job's timeout (RQ's death penalty is SIGALRM)
        alarm_handler = signal.getsignal(signal.SIGALRM)
        try:
            self.prepare_execution(job)
            self.perform_job(job, queue)  # started registry ... result, finished/failed registry
        finally:
            self._running = outer
            self.execution = outer_execution
            self.set_current_job_id(outer_job.id)
            signal.signal(signal.SIGALRM, alarm_handler)
            if alarm_left:
                signal.alarm(alarm_left)  # the pause does not count against the paused job's time

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        # Late results whose /predict caller vanished (see egm.queue): deliver them between jobs.
        try:
            rq_entry.runtime().delivery.deliver_due()
        except Exception:  # Redis or Label Studio hiccup: the entries wait for the next round
            log.warning("late delivery sweep failed", exc_info=True)
        if self.sweep is not None:
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.warning("sweep of unserved versions failed", exc_info=True)
        if self._served_model_changed():
            self.reidentify = True
            raise StopRequested()

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            try:
                self._beat_running()
            except Exception:  # a missed beat is harmless; the next one retries
                log.warning("heartbeat failed", exc_info=True)

    def _beat_running(self) -> None:
        """RQ's maintain_heartbeats for every job in progress (it knows only ``self.execution``)."""
        running = list(self._running)
        if not running:
            return
        with self.connection.pipeline() as pipeline:
            self.heartbeat(self.job_monitoring_interval + 60, pipeline=pipeline)
            for job, execution in running:
                ttl = int(self.get_heartbeat_ttl(job))
                execution.heartbeat(job.started_job_registry, ttl, pipeline=pipeline)
                job.heartbeat(now(), ttl, pipeline=pipeline, xx=True)
            results = pipeline.execute()
            if results[0] == 1:  # the worker's hash had expired: write it whole again (as RQ does)
                pipeline.hset(self.key, mapping=self.serialize())
                pipeline.execute()


def make_label_studio_client(settings: Settings):
    """A Label Studio client when credentials are configured, else None (files/URLs still work)."""
    if settings.label_studio_api_key is None:
        return None
    from egm.labelstudio import LabelStudioClient

    return LabelStudioClient.from_settings(settings)


def build_runtime(settings: Settings, engine: Engine, queue: QueueClient, worker_name: str,
                  identity: ModelIdentity, order: list[Priority] | None = None) -> rq_entry.Runtime:
    ls_client = make_label_studio_client(settings)
    cache = ResultCache(queue.redis, settings.queue_prefix, settings.cache_ttl_s)
    processor = BatchProcessor(engine, settings, cache=cache, ls_client=ls_client, worker_name=worker_name,
                               model_version=identity.model_version)
    writer = LabelStudioWriter(ls_client, queue.redis, settings.queue_prefix)
    from egm.worker.after_batch import record_batch

    auth_pass = settings.basic_auth_pass.get_secret_value() if settings.basic_auth_pass else None
    rt = rq_entry.Runtime(processor=processor, queue=queue, writer=writer,
                          on_batch_done=lambda job, result, stats: record_batch(queue, job, result, stats,
                                                                                ls_client, auth_pass))
    if settings.prefetch:
        rt.prefetcher = Prefetcher(queue, processor.load_images, worker_name, order,
                                   model_version=identity.model_version)
    served = order or [Priority.interactive, Priority.bulk]
    if settings.preempt_interactive and engine.pauses and Priority.interactive in served and Priority.bulk in served:
        rt.preemptor = Preemptor(queue, identity.model_version, check_every_s=settings.preempt_check_s,
                                 prefetcher=rt.prefetcher)
    if settings.write_behind:
        outbox = Outbox(queue.redis, settings.queue_prefix, settings.outbox_lease_s)
        rt.outbox = BackgroundWriter(outbox, lambda entry: rq_entry.write_entry(entry, rt),
                                     max_pending=settings.outbox_max_pending)
    return rt


def failure_reason(exc: BaseException, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """One line a user can act on (no secrets: it is published in Redis): our own errors say it all,
    others need their type."""
    if isinstance(exc, (EngineError, IdentityError, OSError)) and str(exc):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return redact(" ".join(text.split()), secrets)


def run_worker(settings: Settings, *, engine: Engine | None = None, burst: bool = False,
               name: str | None = None, max_jobs: int | None = None,
               priorities: list[Priority] | None = None) -> bool:
    """Load the engine once, then serve its model_version's queues (interactive first) until stopped."""
    queue = QueueClient(settings)
    worker_name = name or f"egm-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    fleet = Fleet.from_settings(settings, queue.redis)
    presence = Presence(fleet, worker_name, engine.name if engine is not None else settings.engine).start()
    try:
        try:
            if engine is None:
                asked = {"hf": settings.model_path, "vllm": settings.model_path,
                         "openai": settings.openai_model or settings.openai_base_url}.get(settings.engine)
                # what was asked for; what loaded is logged as "serving model" with the identity
                log.info("loading engine", extra={"engine": settings.engine, **({"asked_for": asked} if asked else {})})
                engine = create_engine(settings)
            identity = identify(engine, settings)
        except Exception as exc:
            reason = failure_reason(exc, settings.secret_values())
            presence.failed(reason)
            # our own errors say all in their reason; anything else gets its traceback in the log
            log.error("worker failed to start", extra={"worker": worker_name, "reason": reason},
                      exc_info=not isinstance(exc, (EngineError, IdentityError)))
            if engine is not None:
                engine.close()
            raise
        order = priorities or [Priority.interactive, Priority.bulk]
        BatchWorker.heartbeat_s = settings.heartbeat_s
        try:
            return _serve(settings, queue, worker_name, order, engine, identity, presence, burst=burst,
                          max_jobs=max_jobs)
        finally:
            engine.close()
    finally:
        presence.stop()


def _stop_helpers(rt: rq_entry.Runtime | None, settings: Settings) -> None:
    """Finish this worker's queued writes (they would wait for another worker otherwise), then stop."""
    if rt is None:
        return
    if rt.prefetcher is not None:
        rt.prefetcher.close()
    if rt.outbox is not None:
        if not rt.outbox.drain(settings.ls_outage_wait_s + 30):
            log.warning("stopping with unwritten results in the outbox; another worker writes them")
        rt.outbox.stop()


def _start_serving(settings: Settings, queue: QueueClient, engine: Engine, identity: ModelIdentity,
                   presence: Presence, name: str, order: list[Priority]) -> rq_entry.Runtime:
    """Install the runtime for this identity (prefetching from its queues) and say the worker is ready."""
    rt = build_runtime(settings, engine, queue, name, identity, order)
    rq_entry.install(rt)
    if rt.outbox is not None:
        rt.outbox.start()
    presence.ready(identity)
    log.info("serving model", extra={"worker": name, **identity.summary()})
    return rt


def _new_worker(settings: Settings, queue: QueueClient, name: str, order: list[Priority],
                engine: Engine, identity: ModelIdentity) -> BatchWorker:
    maintenance_s = max(5, settings.heartbeat_s * 3)
    fleet = Fleet.from_settings(settings, queue.redis)
    worker = BatchWorker(
        queue.worker_queues(identity.model_version, order), connection=queue.redis, name=name,
        serializer=JSONSerializer, default_result_ttl=settings.result_ttl_s,
        maintenance_interval=maintenance_s, job_monitoring_interval=settings.heartbeat_s,
        # RQ's dequeue timeout is worker_ttl - 15: an idle worker wakes every maintenance period,
        # so maintenance (and with it the late-delivery sweep) runs even when no job arrives.
        worker_ttl=15 + maintenance_s,
    )
    worker.sweep = lambda: fail_unserved(queue, fleet.view(), settings.version_wait_s, name)
    if engine.model_can_change:
        worker.identity_changed = lambda: identify(engine, settings).model_version != identity.model_version
    return worker


def _serve(settings: Settings, queue: QueueClient, name: str, order: list[Priority], engine: Engine,
           identity: ModelIdentity, presence: Presence, *, burst: bool, max_jobs: int | None) -> bool:
    """RQ's work loop, restarted after Redis outages (and, for a served model, after it changed) until a stop
    is requested."""
    worked = False
    rt = _start_serving(settings, queue, engine, identity, presence, name, order)
    try:
        while True:
            worker = _new_worker(settings, queue, name, order, engine, identity)
            if rt.preemptor is not None:
                rt.preemptor.run_inline = worker.run_inline
                rt.preemptor.stopping = lambda w=worker: w.stop_asked
            log.info("worker ready", extra={"worker": name, "queues": [q.name for q in worker.queues],
                                            "engine": engine.name, "model_version": identity.model_version})
            try:
                worked = worker.work(burst=burst, max_jobs=max_jobs,
                                     logging_level=(settings.log_level or "INFO").upper()) or worked
                if worker.reidentify and not worker.stop_asked:
                    previous = identity.model_version
                    try:
                        identity = identify(engine, settings)
                    except Exception as exc:
                        presence.failed(failure_reason(exc, settings.secret_values()))
                        raise
                    log.warning("the served model changed; serving the new version", extra={
                        "worker": name, "previous": previous, "model_version": identity.model_version})
                    _stop_helpers(rt, settings)  # the old version's writes finish under its own name
                    rt = _start_serving(settings, queue, engine, identity, presence, name, order)
                    continue
                if worker.stop_asked or burst or max_jobs is not None:
                    return worked
                log.error("worker loop ended unexpectedly; restarting it once Redis answers", extra={"worker": name})
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if worker.stop_asked:
                    return worked
                log.error("lost Redis; waiting for it", extra={"worker": name, "error": str(exc)})
            if not _wait_for_redis(queue.redis):
                return worked
            try:
                worker.teardown()  # the old loop could not: free the name, stop its pub/sub thread
            except redis.RedisError:
                pass
    finally:
        _stop_helpers(rt, settings)


def _wait_for_redis(connection: redis.Redis, max_delay_s: float = 10.0) -> bool:
    """Block until Redis answers (True) or SIGTERM/SIGINT arrives (False)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        waits = 1
        while not stop.wait(backoff_s(waits, 0.5, max_delay_s)):
            try:
                if connection.ping():
                    log.info("Redis is back; resuming")
                    return True
            except redis.RedisError:
                pass
            waits += 1
        return False
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
