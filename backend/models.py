"""Request and response models of the Label Studio ML backend protocol (as Label Studio 1.23 sends them)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr


class _Open(BaseModel):
    # Label Studio adds fields between releases; accept and ignore what we don't use.
    model_config = ConfigDict(extra="allow")


class HealthResponse(BaseModel):
    #: UP, or DOWN (with a 503) while the queue (Redis) is unreachable.
    status: str = "UP"
    model_class: str = "EGM"
    #: the version of the live workers (egm.fleet); None while no worker serves a model.
    model_version: str | None = None
    #: live workers ready to serve.
    workers: int = 0
    #: why there is no model_version, when there is none.
    detail: str | None = None


class SetupRequest(_Open):
    # strict: a JSON true/false or 1.0 is not a project id (lax pydantic would read true as 1)
    project: StrictStr | StrictInt | None = Field(None, description='"<id>.<created timestamp>" or a plain id')
    schema_: str | None = Field(None, alias="schema", description="the project's labeling config XML")
    hostname: str | None = None
    access_token: str | None = None
    extra_params: Any = None


class SetupResponse(BaseModel):
    model_version: str


class PredictParams(_Open):
    login: str | None = None
    password: str | None = None
    context: dict | None = None


class Task(_Open):
    id: StrictInt | None = None
    data: dict[str, Any]


class PredictRequest(_Open):
    tasks: list[Task] = Field(..., min_length=1)
    # strict: a JSON true/false or 1.0 is not a project id (lax pydantic would read true as 1)
    project: StrictStr | StrictInt | None = None
    label_config: str | None = None
    params: PredictParams = Field(default_factory=PredictParams)


class Prediction(BaseModel):
    result: list[dict]
    score: float | None = None
    model_version: str


class PredictResponse(BaseModel):
    #: exactly one entry per task, in order. An empty list means "no prediction for this task
    #: now" (failed, or still running: the worker will write it to Label Studio itself).
    results: list[Prediction | list]


class WebhookEvent(_Open):
    action: str
    project: dict | None = None
    task: dict | None = None
    annotation: dict | None = None
    annotations: list[dict] | None = None


class ErrorResponse(BaseModel):
    detail: str
