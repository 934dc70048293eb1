"""Bulk pre-annotation runs: plan a source into batch jobs, follow them, write the outputs.

* :mod:`egm.bulk.spec` - what a run is (``RunSpec``) and its deterministic run / job ids.
* :mod:`egm.bulk.sources` - tasks of a Label Studio project or view, a folder, a manifest.
* :mod:`egm.bulk.planner` - enqueue what still needs a prediction, never twice.
* :mod:`egm.bulk.retries` - transient task failures come back later, with backoff.
* :mod:`egm.bulk.rq_jobs` - which RQ jobs are alive; jobs RQ gave up on; cancelling.
* :mod:`egm.bulk.outputs` - local results, Label Studio import JSON, COCO.
* :mod:`egm.bulk.progress` - the live progress line.
* :mod:`egm.bulk.runner` - one ``prelabel`` invocation start to finish.
"""
