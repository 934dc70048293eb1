"""Finishing a Label Studio bulk run wherever it completes.

``RunStore.complete_if_done`` flips a run to ``done`` for exactly one caller: the worker that
records its last batch (so ``prelabel --no-wait`` runs, or runs whose CLI was killed, end too),
the planner when nothing was left to enqueue, or the CLI following it. That caller then makes the
project show the run's predictions: Label Studio's selected ``model_version`` becomes the run's
(unless the run was started with ``--keep-project-version``), as ``prelabel`` has always done at
the end of a followed run.
"""

from __future__ import annotations

import logging

from egm.bulk.run_store import RunStore

log = logging.getLogger(__name__)


def show_version_in_project(client, project_id: int, model_version: str, basic_auth_pass: str | None = None) -> bool:
    """Make the project show (and score, and keep predicting with) ``model_version``; True when it changed.
    ``LabelStudioClient.show_model_version`` does it (it also renames the connected ML backend)."""
    from egm.labelstudio import VersionShown

    return client.show_model_version(project_id, model_version, basic_auth_pass=basic_auth_pass) is VersionShown.changed


def finish_if_done(runs: RunStore, run_id: str | None, client=None, basic_auth_pass: str | None = None) -> bool:
    """Complete the run if its every task is resolved; True when this call completed it.

    ``client`` (a ``LabelStudioClient``) switches the project's model version, best effort:
    the predictions are written either way, and a failure is logged, never raised.
    """
    if not run_id or not runs.complete_if_done(run_id):
        return False
    progress = runs.progress(run_id)
    spec = runs.spec(run_id) or {}
    log.info("bulk run done", extra={"run_id": run_id, "resolved": progress.resolved if progress else None})
    project_id = spec.get("project_id")
    if (client is None or spec.get("kind") != "label_studio" or project_id is None or progress is None
            or progress.done + progress.skipped == 0 or not runs.switches_project_version(run_id)):
        return True
    try:
        if show_version_in_project(client, int(project_id), progress.model_version, basic_auth_pass):
            log.info("project shows the run's model version", extra={"run_id": run_id, "project": project_id,
                                                                     "model_version": progress.model_version})
    except Exception as exc:  # noqa: BLE001 - a convenience after the fact; never fail the batch for it
        log.warning("could not set the project's model version",
                    extra={"run_id": run_id, "project": project_id, "error": type(exc).__name__})
    return True
