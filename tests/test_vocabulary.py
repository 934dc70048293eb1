"""The contract's typed vocabulary: error kinds with is_transient beside them, run statuses and states."""

from __future__ import annotations

import json

import pytest

from egm.contract import TRANSIENT_ERROR_KINDS, ErrorKind, TaskResult, is_transient
from egm.images.errors import IMAGE_ERROR_KINDS
from egm.bulk.run_store import RunProgress, RunState, TaskStatus


def test_every_image_error_kind_has_an_error_kind():
    assert {ErrorKind.of_image(k) for k in IMAGE_ERROR_KINDS} == {k for k in ErrorKind if k.startswith("image:")}


def test_transient_kinds_are_the_ones_a_later_try_can_fix():
    assert {k for k in ErrorKind if k.is_transient} == set(TRANSIENT_ERROR_KINDS) == {
        ErrorKind.image_fetch, ErrorKind.engine, ErrorKind.ls_unavailable}
    assert is_transient("label_studio:unavailable") and not is_transient("label_studio:refused")
    assert not is_transient(None) and not is_transient("something-else")


def test_kinds_cross_redis_as_their_plain_values():
    r = TaskResult(task_id=1, status="failed", error_kind=ErrorKind.ls_refused)
    assert json.loads(r.model_dump_json())["error_kind"] == "label_studio:refused"
    back = TaskResult.model_validate_json(r.model_dump_json())
    assert back.error_kind is ErrorKind.ls_refused and back.error_kind == "label_studio:refused"
    with pytest.raises(ValueError):
        TaskResult(task_id=1, status="failed", error_kind="oops")


def test_run_statuses_and_states():
    assert [s for s in TaskStatus if s.succeeded] == [TaskStatus.ok, TaskStatus.cached]
    p = RunProgress(run_id="r", state=RunState.running)
    assert json.loads(json.dumps(p.as_dict()))["state"] == "running" and f"[{p.state}]" == "[running]"
