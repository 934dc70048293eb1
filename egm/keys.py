"""The Redis keyspace: every key name this project uses (besides RQ's own) is built here.

One :class:`Keys` object per prefix (``EGM_QUEUE_PREFIX``), as RQ builds its own with
``Job.key_for``. Keys are ``<prefix>:<family>:...``; the families and their owners:

=====================================  ==============================================================
``handoff:<job>``                      requester's deadline for a job's result (egm.queue)
``done:<job>``                         wake-up list a finished job pushes to (egm.queue)
``result:<job>``                       the stored ``BatchResult`` (egm.queue)
``deliver:<job>``                      who delivers the result: ``backend`` or ``worker`` (egm.queue)
``late``, ``late-project``             results due for the workers' late sweep, and their project
``prefetch:<job>``                     a worker's claim on prefetching a job's images (worker.prefetch)
``cache:<digest>``                     cached engine answer (worker.cache)
``written:<model_version>:<task>``     claim that a prediction is written to Label Studio (worker.delivery)
``outbox``, ``outbox-lease``,          write-behind outbox: schedule, leases, entries (worker.outbox)
``outbox:<job>``
``runs``, ``run:<id>[:<part>]``        bulk runs (egm.bulk.run_store; parts: :data:`RUN_PARTS`)
``retries``                            bulk-run tasks due for another try (egm.bulk.retries)
``stats``, ``rate:<bucket>``           fleet-wide counters and recent throughput (egm.stats)
``corrections:annotation:<id>``        what an annotation contributed to the live figures (egm.export.live)
``fleet:worker:<name>``,               fleet registry: worker records, live names, versions' first and
``fleet:workers``,                     last sighting and prompts (egm.fleet)
``fleet:versions:<which>``
=====================================  ==============================================================

Any id may be ``"*"`` to build a ``SCAN`` pattern.
"""

from __future__ import annotations

#: What a run's keys hold (``run:<id>:<part>``); the run hash itself has no part.
RUN_PARTS = frozenset({"seen", "failed", "assign", "finished", "spec", "lock", "attempts", "failed_jobs"})
#: ``fleet:versions:<which>``.
FLEET_VERSION_FIELDS = frozenset({"first", "last", "prompts"})
SEPARATOR = ":"


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def _key(self, *parts: str | int) -> str:
        return SEPARATOR.join([self.prefix, *(str(p) for p in parts)])

    # -- delivery hand-off (egm.queue) ---------------------------------------------------
    def handoff(self, job_id: str) -> str:
        return self._key("handoff", job_id)

    def done(self, job_id: str) -> str:
        return self._key("done", job_id)

    @staticmethod
    def job_of(key: str | bytes) -> str:
        """The job id a per-job key (``done:<job>``, ``result:<job>`` ...) names."""
        text = key.decode() if isinstance(key, bytes) else key
        return text.rsplit(SEPARATOR, 1)[-1]

    def result(self, job_id: str) -> str:
        return self._key("result", job_id)

    def deliver(self, job_id: str) -> str:
        return self._key("deliver", job_id)

    def late(self) -> str:
        return self._key("late")

    def late_project(self) -> str:
        return self._key("late-project")

    # -- worker ----------------------------------------------------------------------------
    def prefetch(self, job_id: str) -> str:
        return self._key("prefetch", job_id)

    def cache(self, digest: str) -> str:
        return self._key("cache", digest)

    def written(self, model_version: str, task_id: int | str) -> str:
        return self._key("written", model_version, task_id)

    def outbox(self) -> str:
        return self._key("outbox")

    def outbox_lease(self) -> str:
        return self._key("outbox-lease")

    def outbox_entry(self, job_id: str) -> str:
        return self._key("outbox", job_id)

    # -- bulk runs --------------------------------------------------------------------------
    def runs(self) -> str:
        return self._key("runs")

    def run(self, run_id: str, part: str | None = None) -> str:
        if part is None:
            return self._key("run", run_id)
        if part not in RUN_PARTS:
            raise ValueError(f"unknown run key part {part!r} (one of {sorted(RUN_PARTS)})")
        return self._key("run", run_id, part)

    def retries(self) -> str:
        return self._key("retries")

    # -- counters ------------------------------------------------------------------------------
    def stats(self) -> str:
        return self._key("stats")

    def rate(self, bucket: int | str) -> str:
        return self._key("rate", bucket)

    def annotation_corrections(self, annotation_id: int | str) -> str:
        return self._key("corrections", "annotation", annotation_id)

    # -- fleet registry ----------------------------------------------------------------------------
    def fleet_worker(self, name: str) -> str:
        return self._key("fleet", "worker", name)

    def fleet_workers(self) -> str:
        return self._key("fleet", "workers")

    def fleet_versions(self, which: str) -> str:
        if which not in FLEET_VERSION_FIELDS:
            raise ValueError(f"unknown fleet versions field {which!r}")
        return self._key("fleet", "versions", which)

    def everything(self) -> str:
        """``SCAN`` pattern of every key above (not RQ's)."""
        return self._key("*")
