"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis): no 5xx, answers as documented.

Schemathesis generates requests for every operation of the app's ``/openapi.json``, both
valid ones (positive) and deliberately invalid ones (negative), sends them to the app in
process (ASGI) backed by a real Redis, and its checks judge every answer: no server error,
a documented status code and content type, a body that matches the documented schema,
invalid input refused. Everything runs twice: without credentials configured, and with
basic auth on (every request then carries the right credentials, so the fuzzer reaches the
handlers rather than the 401). ``EGM_FUZZ_EXAMPLES`` sets the examples per operation and mode.

(schemathesis' lazy ``from_fixture`` loader does not work with pytest 9, so the operations
are listed at collection time from an app that never connects, and each test builds the
real app and draws cases from the operation's Hypothesis strategy.)
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance
from schemathesis.config import SchemathesisConfig

from egm.backend.app import create_app
from egm.config.settings import Settings
from tests.stack import SAMPLES

MAX_EXAMPLES = int(os.environ.get("EGM_FUZZ_EXAMPLES", "30"))
AUTH = ("fuzz-user", "fuzz-pass-0123456789")


def _app_settings(redis_url: str, prefix: str, auth: bool) -> Settings:
    extra = {"basic_auth_user": AUTH[0], "basic_auth_pass": AUTH[1]} if auth else {}
    # a tiny budget: no worker runs, and /predict must still answer (empty results, work handed off)
    return Settings(redis_url=redis_url, queue_prefix=prefix, predict_budget_s=0.05,
                    local_files_root=str(SAMPLES), label_studio_api_key=None, **extra)


def _operation_labels() -> list[str]:
    app = create_app(_app_settings("redis://127.0.0.1:1/0", "collect", False))  # never connects
    return [op.ok().label for op in schemathesis.openapi.from_asgi("/openapi.json", app).get_all_operations()]


OPERATIONS = _operation_labels()


def _a_live_worker(settings: Settings) -> None:
    """A ready worker's record in the fleet registry (no process behind it), so /setup and /predict have a
    model_version to plan for; the jobs stay queued and /predict hands them off."""
    import redis

    from egm.fleet import Fleet, WorkerRecord, WorkerState
    from egm.identity import prompt_setup

    fleet = Fleet(redis.Redis.from_url(settings.redis_url), settings.queue_prefix, heartbeat_s=3600)
    fleet.publish(WorkerRecord(worker="fuzz-worker", state=WorkerState.ready, engine="scripted",
                               model_version="scripted-fuzz000000", prompts=prompt_setup(settings)))


@pytest.fixture(scope="module", params=[False, True], ids=["open", "basic-auth"])
def api(request, redis_server):
    """The schema of an app on the session's Redis; with basic auth, schemathesis is given the credentials
    (its auth checks then also send requests without them and with wrong ones, expecting 401)."""
    auth = request.param
    settings = _app_settings(redis_server.url, f"fuzz{int(auth)}-{os.getpid()}", auth)
    _a_live_worker(settings)
    app = create_app(settings)
    config = SchemathesisConfig.from_dict(
        {"auth": {"basic": {"username": AUTH[0], "password": AUTH[1]}}} if auth else {})
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=config)


def test_the_schema_lists_every_route_label_studio_calls():
    assert {"POST /setup", "POST /predict", "POST /webhook", "GET /health", "GET /metrics"} <= set(OPERATIONS)


def _declares_security(api, operation) -> bool:
    return bool(api.raw_schema["paths"][operation.path][operation.method.lower()].get("security"))


def test_security_is_declared_exactly_where_it_is_enforced(api):
    declared = {op.ok().label: _declares_security(api, op.ok()) for op in api.get_all_operations()}
    auth_on = api.app.state.settings.basic_auth_user is not None
    assert declared == {label: auth_on and label != "GET /health" for label in declared}


def _has_inputs(api, operation) -> bool:
    return bool(list(operation.iter_parameters())) or bool(operation.body) or _declares_security(api, operation)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize("label", OPERATIONS)
def test_operation_never_fails_with_5xx_and_answers_as_documented(api, label, mode):
    operation = api.find_operation_by_label(label)
    if mode is GenerationMode.NEGATIVE and not _has_inputs(api, operation):
        pytest.skip(f"{label} takes no input: nothing to make invalid")
    seen: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call()
        seen.append(response.status_code)
        assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
        # Every check but "schema-valid data is accepted": a well-formed /predict can still name a
        # labeling config without rectangles, which is refused (422) by design.
        case.validate_response(response, excluded_checks=[positive_data_acceptance])

    run()
    assert seen  # the fuzzer did send requests
