"""The project's Label Studio API client.

Layers, bottom up:

* ``key_kind`` / ``_TokenAuth``: what kind of key we hold and how it goes on the wire.
  A legacy token is sent as ``Authorization: Token <key>``. A personal access token
  is a JWT *refresh* token: it is exchanged at ``/api/token/refresh/`` for a
  5-minute access token sent as ``Authorization: Bearer <access>``, refreshed a
  little before it expires and once more if Label Studio answers 401.
* ``LabelStudioClient.request``: one HTTP call with timeouts, retries and errors
  that name the call but never a secret.
* Typed methods for what this project needs (tasks, predictions, webhooks,
  ML backends and the project's model_version, export, image download, views).

Why plain httpx rather than ``label_studio_sdk.LabelStudio`` for these calls: the
SDK retries every method on 5xx/408/409/429, POSTs included, which can write a
prediction twice; its errors carry response bodies verbatim; and the Data Manager
task listing needs query tricks (keyset paging, computed columns) that the SDK
does not expose. For anything not covered here, ``client.sdk`` returns an SDK
client built on the same URL and key.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator
from urllib.parse import urljoin, urlsplit

import httpx

from egm.backoff import backoff_s
from egm.redaction import redact

if TYPE_CHECKING:  # pragma: no cover
    from egm.config.settings import Settings

log = logging.getLogger(__name__)

#: Refresh an access token this long before Label Studio would reject it.
_ACCESS_TOKEN_MARGIN_S = 30.0
#: Longest slice of a server reply quoted in an error message.
_DETAIL_CHARS = 400
#: longest wait between two tries of one call (before jitter).
MAX_BACKOFF_S = 8.0
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
#: The events an ML backend's webhook carries: what keeps the correction figures current.
WEBHOOK_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED")


class LabelStudioError(RuntimeError):
    """A Label Studio call failed. The message names the call, never the token."""

    def __init__(self, message: str, *, status_code: int | None = None, method: str | None = None,
                 path: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.method = method
        self.path = path


# --------------------------------------------------------------------------- auth


class KeyKind(str, Enum):
    legacy = "legacy"          # 40-hex legacy API token
    refresh = "refresh"        # personal access token (JWT refresh token)
    access = "access"          # a bare JWT access token (cannot be renewed)


def _jwt_claims(token: str) -> dict[str, Any] | None:
    """Claims of a JWT without verifying it (we only need its type and expiry)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def key_kind(key: str) -> KeyKind:
    """Tell a legacy token from a personal access token (or a bare access token)."""
    claims = _jwt_claims(key)
    if claims is None:
        return KeyKind.legacy
    return KeyKind.access if claims.get("token_type") == "access" else KeyKind.refresh


class _TokenAuth(httpx.Auth):
    """Adds the right Authorization header; renews JWT access tokens when needed."""

    requires_request_body = True  # the 401 retry re-sends the body

    def __init__(self, base_url: str, key: str, timeout: httpx.Timeout, verify: bool | str = True):
        self._base_url = base_url
        self._key = key
        self._kind = key_kind(key)
        self._timeout = timeout
        self._verify = verify
        self._lock = threading.Lock()
        self._access: str | None = key if self._kind is KeyKind.access else None
        self._access_exp: float = float("inf")

    @property
    def kind(self) -> KeyKind:
        return self._kind

    def secrets(self) -> list[str]:
        return [s for s in (self._key, self._access) if s]

    def auth_flow(self, request: httpx.Request):
        request.headers["Authorization"] = self._header()
        response = yield request
        if response.status_code == 401 and self._kind is KeyKind.refresh:
            # The access token may have been revoked or the clocks disagree: renew once.
            request.headers["Authorization"] = self._header(force_refresh=True)
            yield request

    def _header(self, force_refresh: bool = False) -> str:
        if self._kind is KeyKind.legacy:
            return f"Token {self._key}"
        if self._kind is KeyKind.refresh:
            return f"Bearer {self._access_token(force_refresh)}"
        return f"Bearer {self._key}"

    def _access_token(self, force: bool) -> str:
        with self._lock:
            fresh = self._access and time.time() < self._access_exp - _ACCESS_TOKEN_MARGIN_S
            if force or not fresh:
                self._access = self._refresh()
                exp = (_jwt_claims(self._access) or {}).get("exp")
                self._access_exp = float(exp) if isinstance(exp, (int, float)) else time.time() + 240
            return self._access

    def _refresh(self) -> str:
        url = urljoin(self._base_url + "/", "api/token/refresh/")
        try:
            response = httpx.post(url, json={"refresh": self._key}, timeout=self._timeout, verify=self._verify)
        except httpx.HTTPError as exc:
            raise LabelStudioError(f"Label Studio token refresh failed: {type(exc).__name__} "
                                   f"talking to {self._base_url}", method="POST", path="/api/token/refresh/") from None
        if response.status_code != 200:
            raise LabelStudioError(
                f"Label Studio rejected the personal access token (POST /api/token/refresh/ -> "
                f"{response.status_code}); create a new one under Account & Settings",
                status_code=response.status_code, method="POST", path="/api/token/refresh/")
        access = response.json().get("access")
        if not isinstance(access, str) or not access:
            raise LabelStudioError("Label Studio token refresh returned no access token",
                                   method="POST", path="/api/token/refresh/")
        return access


# --------------------------------------------------------------------------- records


@dataclass
class Project:
    id: int
    title: str
    label_config: str
    model_version: str = ""
    task_number: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_api(cls, d: dict[str, Any]) -> "Project":
        return cls(id=int(d["id"]), title=d.get("title") or "", label_config=d.get("label_config") or "",
                   model_version=d.get("model_version") or "", task_number=d.get("task_number"), raw=d)


@dataclass
class TaskRecord:
    id: int
    data: dict[str, Any]
    #: distinct ``model_version`` values of the task's predictions.
    model_versions: list[str] = field(default_factory=list)
    total_predictions: int = 0
    total_annotations: int = 0
    cancelled_annotations: int = 0
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_api(cls, d: dict[str, Any]) -> "TaskRecord":
        return cls(id=int(d["id"]), data=d.get("data") or {},
                   model_versions=_split_versions(d.get("predictions_model_versions")),
                   total_predictions=int(d.get("total_predictions") or 0),
                   total_annotations=int(d.get("total_annotations") or 0),
                   cancelled_annotations=int(d.get("cancelled_annotations") or 0), raw=d)


def _split_versions(value: Any) -> list[str]:
    # SQLite aggregates to "a,b", PostgreSQL to a list.
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list):
        items = [str(v) for v in value if v is not None]
    else:
        return []
    return sorted({v.strip() for v in items if v and v.strip()})


@dataclass
class Prediction:
    id: int
    task: int
    result: list[dict[str, Any]]
    score: float | None
    model_version: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_api(cls, d: dict[str, Any]) -> "Prediction":
        return cls(id=int(d["id"]), task=int(d["task"]), result=d.get("result") or [], score=d.get("score"),
                   model_version=d.get("model_version") or "", raw=d)


@dataclass
class PredictionFailure:
    index: int
    task: Any
    error: str


@dataclass
class PredictionWriteReport:
    created: int = 0
    failed: list[PredictionFailure] = field(default_factory=list)


@dataclass
class Webhook:
    id: int
    url: str
    project: int | None
    headers: dict[str, str]
    is_active: bool
    send_for_all_actions: bool
    actions: list[str]

    @classmethod
    def from_api(cls, d: dict[str, Any]) -> "Webhook":
        return cls(id=int(d["id"]), url=d.get("url") or "", project=d.get("project"),
                   headers=dict(d.get("headers") or {}), is_active=bool(d.get("is_active", True)),
                   send_for_all_actions=bool(d.get("send_for_all_actions")), actions=list(d.get("actions") or []))


@dataclass
class MLBackend:
    """An ML backend connected to a project (``/api/ml``)."""

    id: int
    url: str
    title: str
    project: int | None
    is_interactive: bool
    #: the version its last /setup answered.
    model_version: str
    #: ``NONE`` or ``BASIC_AUTH``.
    auth_method: str = "NONE"
    basic_auth_user: str = ""

    @classmethod
    def from_api(cls, d: dict[str, Any]) -> "MLBackend":
        return cls(id=int(d["id"]), url=d.get("url") or "", title=d.get("title") or "", project=d.get("project"),
                   is_interactive=bool(d.get("is_interactive")), model_version=d.get("model_version") or "",
                   auth_method=d.get("auth_method") or "NONE", basic_auth_user=d.get("basic_auth_user") or "")


class VersionShown(str, Enum):
    """What :meth:`LabelStudioClient.show_model_version` found."""

    changed = "changed"        # something was renamed or set
    in_order = "in_order"      # the project and its live backend already name this version
    no_backend = "no_backend"  # no (matching) ML backend yet; the project's version was set if needed


@dataclass
class View:
    id: int
    project: int
    title: str
    data: dict[str, Any]


@dataclass
class ExportedAnnotation:
    id: int
    result: list[dict[str, Any]]
    was_cancelled: bool
    ground_truth: bool
    #: id of the prediction the annotator started from, if any.
    parent_prediction: int | None
    lead_time: float | None
    completed_by: Any
    created_at: str | None
    updated_at: str | None
    #: review records (Label Studio Enterprise); empty in the community edition.
    reviews: list[dict[str, Any]]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_api(cls, d: dict[str, Any]) -> "ExportedAnnotation":
        return cls(id=int(d["id"]), result=d.get("result") or [], was_cancelled=bool(d.get("was_cancelled")),
                   ground_truth=bool(d.get("ground_truth")), parent_prediction=d.get("parent_prediction"),
                   lead_time=d.get("lead_time"), completed_by=d.get("completed_by"),
                   created_at=d.get("created_at"), updated_at=d.get("updated_at"),
                   reviews=list(d.get("reviews") or d.get("review_annotations") or []), raw=d)


@dataclass
class ExportedTask:
    id: int
    data: dict[str, Any]
    annotations: list[ExportedAnnotation]
    #: prediction ids (Label Studio's JSON export lists ids, not bodies).
    predictions: list[Any]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_api(cls, d: dict[str, Any]) -> "ExportedTask":
        return cls(id=int(d["id"]), data=d.get("data") or {},
                   annotations=[ExportedAnnotation.from_api(a) for a in d.get("annotations") or []],
                   predictions=list(d.get("predictions") or []), raw=d)


# --------------------------------------------------------------------------- client


class LabelStudioClient:
    """Synchronous Label Studio client (thread-safe: httpx.Client and the token cache are)."""

    def __init__(self, url: str, api_key: str, *, timeout_s: float = 30.0, connect_timeout_s: float = 5.0,
                 retries: int = 3, backoff_s: float = 0.5, max_download_bytes: int = 50 * 1024 * 1024,
                 verify: bool | str = True):
        if not url:
            raise LabelStudioError("Label Studio URL is empty (set LABEL_STUDIO_URL)")
        if not api_key:
            raise LabelStudioError("Label Studio API key is empty (set LABEL_STUDIO_API_KEY)")
        self.url = url.rstrip("/")
        self.retries = max(0, retries)
        self.backoff_s = backoff_s
        self.max_download_bytes = max_download_bytes
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._auth = _TokenAuth(self.url, api_key, self._timeout, verify)
        self._http = httpx.Client(timeout=self._timeout, auth=self._auth, verify=verify,
                                  headers={"Accept": "application/json"})
        self._api_key = api_key
        self._sdk = None

    @classmethod
    def from_settings(cls, settings: "Settings | None" = None, **kwargs: Any) -> "LabelStudioClient":
        if settings is None:
            from egm.config.settings import get_settings

            settings = get_settings()
        key = settings.label_studio_api_key.get_secret_value() if settings.label_studio_api_key else ""
        kwargs.setdefault("max_download_bytes", settings.max_image_bytes)
        return cls(settings.label_studio_url, key, **kwargs)

    @property
    def key_kind(self) -> KeyKind:
        return self._auth.kind

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "LabelStudioClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LabelStudioClient(url={self.url!r}, key_kind={self.key_kind.value})"

    @property
    def sdk(self):
        """A ``label_studio_sdk.LabelStudio`` on the same URL and key, for calls not wrapped here."""
        if self._sdk is None:
            from label_studio_sdk import LabelStudio

            self._sdk = LabelStudio(base_url=self.url, api_key=self._api_key, timeout=self._timeout.read)
        return self._sdk

    # ----------------------------------------------------------------- transport

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None, json: Any = None,
                files: Any = None, data: Any = None, idempotent: bool | None = None,
                timeout: float | None = None, expect: Iterable[int] = (200, 201, 204)) -> httpx.Response:
        """One call to Label Studio; raises ``LabelStudioError`` on failure.

        Idempotent calls (GET/PUT/DELETE/HEAD by default) are retried with backoff on
        connection errors, timeouts, 429 and 5xx; other calls only when the connection
        could not be opened (nothing was sent).
        """
        method = method.upper()
        if idempotent is None:
            idempotent = method in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS")
        url = self._url(path)
        req_timeout = self._timeout if timeout is None else httpx.Timeout(timeout, connect=self._timeout.connect)
        attempt = 0
        while True:
            try:
                response = self._http.request(method, url, params=params, json=json, files=files, data=data,
                                              timeout=req_timeout)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if attempt < self.retries:
                    attempt = self._backoff(attempt, method, path, type(exc).__name__)
                    continue
                raise self._error(f"cannot connect to Label Studio at {self.url} ({type(exc).__name__})",
                                  method, path) from None
            except httpx.TransportError as exc:
                if idempotent and attempt < self.retries:
                    attempt = self._backoff(attempt, method, path, type(exc).__name__)
                    continue
                raise self._error(f"{type(exc).__name__} talking to Label Studio", method, path) from None
            if response.status_code in _RETRY_STATUS and idempotent and attempt < self.retries:
                attempt = self._backoff(attempt, method, path, f"HTTP {response.status_code}")
                continue
            if response.status_code not in expect:
                raise self._http_error(response, method, path)
            return response

    def request_json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise self._error("Label Studio answered with something that is not JSON", method.upper(), path,
                              status_code=response.status_code) from None

    def _url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            if not self.is_label_studio_url(path):
                raise LabelStudioError(f"refusing to send the Label Studio key to another host: {_path_only(path)}")
            return path
        return self.url + "/" + path.lstrip("/")

    def _backoff(self, attempt: int, method: str, path: str, why: str) -> int:
        delay = backoff_s(attempt + 1, self.backoff_s, MAX_BACKOFF_S, jitter=0.5)
        log.info("label studio %s %s failed (%s); retry %d/%d in %.2fs", method, _path_only(path), why,
                 attempt + 1, self.retries, delay)
        time.sleep(delay)
        return attempt + 1

    def _redact(self, text: str, extra: Iterable[str] = ()) -> str:
        return redact(text, [*self._auth.secrets(), *extra])

    def _error(self, message: str, method: str, path: str, status_code: int | None = None,
               extra_secrets: Iterable[str] = ()) -> LabelStudioError:
        text = self._redact(f"Label Studio {method} {_path_only(path)}: {message}", extra_secrets)
        return LabelStudioError(text, status_code=status_code, method=method, path=_path_only(path))

    def _http_error(self, response: httpx.Response, method: str, path: str,
                    extra_secrets: Iterable[str] = ()) -> LabelStudioError:
        hint = {401: "the API key was rejected (legacy tokens must be enabled in Label Studio, or use a "
                     "personal access token)",
                403: "the API key's user may not do this",
                404: "not found"}.get(response.status_code, "")
        detail = _response_detail(response)
        message = f"HTTP {response.status_code}" + (f" ({hint})" if hint else "") + (f": {detail}" if detail else "")
        return self._error(message, method, path, status_code=response.status_code, extra_secrets=extra_secrets)

    # ----------------------------------------------------------------- projects

    def get_project(self, project_id: int) -> Project:
        return Project.from_api(self.request_json("GET", f"/api/projects/{int(project_id)}/"))

    def get_label_config(self, project_id: int) -> str:
        return self.get_project(project_id).label_config

    def set_project_model_version(self, project_id: int, model_version: str) -> None:
        """The version whose predictions the project shows, scores in the Data Manager and (when an ML
        backend of that title is connected) keeps asking the live model for."""
        self.request_json("PATCH", f"/api/projects/{int(project_id)}/", json={"model_version": model_version},
                          idempotent=True)

    # ----------------------------------------------------------------- ML backends

    def list_ml_backends(self, project_id: int) -> list[MLBackend]:
        body = self.request_json("GET", "/api/ml/", params={"project": int(project_id)})
        return [MLBackend.from_api(b) for b in body or [] if int(b.get("project") or 0) == int(project_id)]

    def rename_ml_backend(self, backend: MLBackend, title: str, basic_auth_pass: str | None = None) -> None:
        """Label Studio moves the project's model_version along when it named the old title.

        Label Studio 1.23 validates an update like a new connection (it calls the backend's /health
        and /setup with the fields sent), so the URL, project and credentials go along; a backend
        behind basic auth needs its password (Label Studio never returns it)."""
        body: dict[str, Any] = {"title": title, "url": backend.url, "project": backend.project,
                                "is_interactive": backend.is_interactive}
        if backend.auth_method == "BASIC_AUTH":
            if not basic_auth_pass:
                raise LabelStudioError(f"ML backend {backend.id} uses basic auth: its password is needed to rename it",
                                       method="PATCH", path=f"/api/ml/{backend.id}")
            body.update(auth_method="BASIC_AUTH", basic_auth_user=backend.basic_auth_user,
                        basic_auth_pass=basic_auth_pass)
        try:  # no trailing slash: /api/ml/<id>/ is a 404 in 1.23
            self.request_json("PATCH", f"/api/ml/{int(backend.id)}", json=body, idempotent=True)
        except LabelStudioError as exc:
            raise LabelStudioError(self._redact(str(exc), [basic_auth_pass or ""]), status_code=exc.status_code,
                                   method=exc.method, path=exc.path) from None

    def show_model_version(self, project_id: int, model_version: str,
                           is_live: Callable[[MLBackend], bool] | None = None,
                           basic_auth_pass: str | None = None) -> VersionShown:
        """Make the project show, score and keep predicting with ``model_version``.

        Label Studio 1.23 scores (Data Manager "Prediction score") only predictions whose
        ``model_version`` equals the project's, and asks an ML backend for new predictions only
        while the project's ``model_version`` equals that backend's *title*. So the live backend
        is renamed to the version and the project set to it. ``is_live`` picks the live backend
        (e.g. by URL); without it, the backend whose title the project names, else the only one.
        ``basic_auth_pass``: the live backend's password, if it uses basic auth.
        """
        project = self.get_project(project_id)
        backends = self.list_ml_backends(project_id)
        if is_live is not None:
            live = [b for b in backends if is_live(b)]
        else:
            live = [b for b in backends if b.title == project.model_version] or (backends if len(backends) == 1 else [])
        changed = False
        for backend in live:
            if backend.title != model_version:
                self.rename_ml_backend(backend, model_version, basic_auth_pass)
                changed = True
        if changed:
            project = self.get_project(project_id)
        if project.model_version != model_version:
            self.set_project_model_version(project_id, model_version)
            changed = True
        if changed:
            return VersionShown.changed
        return VersionShown.in_order if live else VersionShown.no_backend

    # ----------------------------------------------------------------- tasks

    def iter_tasks(self, project_id: int, view_id: int | None = None, filters: dict[str, Any] | None = None,
                   page_size: int = 500, columns: Iterable[str] = ()) -> Iterator[TaskRecord]:
        """Every task of a project (or of one of its Data Manager views), with a light payload.

        Tasks come in id order, paged by id (``id > last seen``) whenever the filters allow
        it, so predictions written while iterating (which can drop tasks out of a view
        like "no predictions yet") never make the iteration skip tasks. ``filters`` uses
        the Data Manager format ``{"conjunction": "and", "items": [{"filter":
        "filter:tasks:total_predictions", "operator": "equal", "type": "Number", "value": 0}]}``
        and, with ``view_id``, narrows the view's own filters further.

        Each task carries its predictions' ``model_versions`` and annotation counters but
        not the prediction/annotation bodies. Note: in a project whose setting "retrieve
        predictions when loading a task automatically" is on, Label Studio calls the ML
        backend for listed tasks that have no prediction yet. ``columns`` names extra Data
        Manager columns to compute (e.g. ``predictions_score``; read them from ``TaskRecord.raw``).
        """
        base_filters = None
        if view_id is not None:
            view = self.request_json("GET", f"/api/dm/views/{int(view_id)}/")
            if int(view.get("project") or 0) != int(project_id):
                raise LabelStudioError(f"Label Studio view {view_id} does not belong to project {project_id}")
            base_filters = (view.get("data") or {}).get("filters")
        merged = _merge_filters(base_filters, filters)
        query: dict[str, Any] = {"ordering": ["tasks:id"],
                                 "hiddenColumns": self._hidden_columns(project_id, columns)}
        keyset = merged is None or merged.get("conjunction", "and") == "and"
        last_id, page = 0, 1
        while True:
            if keyset:
                id_filter = {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": last_id}
                query["filters"] = {"conjunction": "and", "items": [*(merged or {}).get("items", []), id_filter]}
            else:
                query["filters"] = merged
            params = {"project": int(project_id), "page": 1 if keyset else page, "page_size": int(page_size),
                      "query": json.dumps(query, separators=(",", ":"))}
            response = self.request("GET", "/api/tasks/", params=params, expect=(200, 404))
            if response.status_code == 404:
                if not keyset and page > 1:  # "Invalid page": the listing shrank while we read it
                    return
                raise self._http_error(response, "GET", "/api/tasks/")
            body = response.json()
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            for task in tasks:
                yield TaskRecord.from_api(task)
            total = body.get("total") if isinstance(body, dict) else None
            if len(tasks) < page_size or (not keyset and isinstance(total, int) and page * page_size >= total):
                return
            last_id = int(tasks[-1]["id"])
            page += 1

    def _hidden_columns(self, project_id: int, extra: Iterable[str] = ()) -> dict[str, list[str]]:
        """Hide every Data Manager column but the model versions (and ``extra``), so only those aggregates
        are computed."""
        columns = self.request_json("GET", "/api/dm/columns/", params={"project": int(project_id)})
        keep = {"predictions_model_versions", *extra}
        hidden = []
        for column in (columns or {}).get("columns", []):
            cid = column.get("id")
            if not cid or cid in keep:
                continue
            hidden.append(f"tasks:data.{cid}" if column.get("parent") == "data" else f"tasks:{cid}")
        return {"explore": hidden, "labeling": hidden}

    def create_view(self, project_id: int, title: str, filters: dict[str, Any] | None = None,
                    ordering: list[str] | None = None) -> View:
        data: dict[str, Any] = {"title": title}
        if filters is not None:
            data["filters"] = filters
        if ordering is not None:
            data["ordering"] = ordering
        body = self.request_json("POST", "/api/dm/views/", json={"project": int(project_id), "data": data})
        return View(id=int(body["id"]), project=int(body.get("project") or project_id),
                    title=(body.get("data") or {}).get("title", title), data=body.get("data") or {})

    # ----------------------------------------------------------------- predictions

    def create_predictions(self, project_id: int, predictions: list[dict[str, Any]],
                           chunk_size: int = 500) -> PredictionWriteReport:
        """Write many predictions (``{task, result, score, model_version}``) in few requests.

        Malformed items are reported, not sent. A chunk that Label Studio refuses as a
        whole (one unknown task id fails the whole import) is written item by item, so
        one bad prediction never loses the others.
        """
        report = PredictionWriteReport()
        valid: list[tuple[int, dict[str, Any]]] = []
        for index, item in enumerate(predictions):
            problem = _prediction_problem(item)
            if problem:
                task = item.get("task") if isinstance(item, dict) else None
                report.failed.append(PredictionFailure(index, task, problem))
            else:
                valid.append((index, _prediction_body(item)))
        for start in range(0, len(valid), max(1, chunk_size)):
            chunk = valid[start:start + chunk_size]
            try:
                body = self.request_json("POST", f"/api/projects/{int(project_id)}/import/predictions",
                                         json=[p for _, p in chunk], timeout=max(self._timeout.read or 30, 120))
            except LabelStudioError as exc:
                if exc.status_code != 400:
                    raise
                log.warning("label studio refused a batch of %d predictions; writing them one by one", len(chunk))
                self._create_one_by_one(chunk, report)
                continue
            report.created += int((body or {}).get("created", len(chunk)))
        return report

    def _create_one_by_one(self, chunk: list[tuple[int, dict[str, Any]]], report: PredictionWriteReport) -> None:
        for index, body in chunk:
            try:
                self.request_json("POST", "/api/predictions/", json=body)
                report.created += 1
            except LabelStudioError as exc:
                if exc.status_code is None or exc.status_code >= 500:
                    raise
                report.failed.append(PredictionFailure(index, body.get("task"), str(exc)))

    def create_prediction(self, task_id: int, result: list[dict[str, Any]], score: float | None = None,
                          model_version: str | None = None) -> Prediction:
        body = _prediction_body({"task": task_id, "result": result, "score": score, "model_version": model_version})
        return Prediction.from_api(self.request_json("POST", "/api/predictions/", json=body))

    def list_predictions(self, task_id: int | None = None, project_id: int | None = None) -> list[Prediction]:
        if task_id is None and project_id is None:
            raise ValueError("list_predictions needs task_id or project_id")
        params = {k: int(v) for k, v in (("task", task_id), ("project", project_id)) if v is not None}
        body = self.request_json("GET", "/api/predictions/", params=params)
        items = body.get("results", []) if isinstance(body, dict) else body
        return [Prediction.from_api(p) for p in items or []]

    def get_prediction(self, prediction_id: int) -> Prediction:
        return Prediction.from_api(self.request_json("GET", f"/api/predictions/{int(prediction_id)}/"))

    def create_annotation(self, task_id: int, result: list[dict[str, Any]], *, lead_time_s: float | None = None,
                          parent_prediction: int | None = None) -> dict[str, Any]:
        """An annotation of ``task_id`` (what a person submits), optionally started from a prediction."""
        body: dict[str, Any] = {"result": result}
        if lead_time_s is not None:
            body["lead_time"] = lead_time_s
        if parent_prediction is not None:
            body["parent_prediction"] = int(parent_prediction)
        return self.request_json("POST", f"/api/tasks/{int(task_id)}/annotations/", json=body)

    def delete_prediction(self, prediction_id: int) -> None:
        self.request("DELETE", f"/api/predictions/{int(prediction_id)}/")

    # ----------------------------------------------------------------- webhooks

    def list_webhooks(self, project_id: int) -> list[Webhook]:
        body = self.request_json("GET", "/api/webhooks/", params={"project": int(project_id)})
        return [Webhook.from_api(w) for w in body or [] if int(w.get("project") or 0) == int(project_id)]

    def patch_webhook_headers(self, webhook_id: int, headers: dict[str, str], *, merge: bool = True) -> Webhook:
        """Set headers Label Studio sends with a webhook (e.g. basic auth of the ML backend)."""
        path = f"/api/webhooks/{int(webhook_id)}/"
        new_headers = {str(k): str(v) for k, v in headers.items()}
        if merge:
            current = self.request_json("GET", path).get("headers") or {}
            new_headers = {**current, **new_headers}
        try:
            body = self.request_json("PATCH", path, json={"headers": new_headers}, idempotent=True)
        except LabelStudioError as exc:
            # Header values are credentials too: keep them out of the message.
            raise LabelStudioError(self._redact(str(exc), new_headers.values()), status_code=exc.status_code,
                                   method=exc.method, path=exc.path) from None
        return Webhook.from_api(body)

    def create_webhook(self, project_id: int, url: str, *, headers: dict[str, str] | None = None,
                       actions: Iterable[str] | None = WEBHOOK_ACTIONS) -> Webhook:
        """A project webhook to ``url`` sending full payloads; ``actions=None`` sends every action."""
        new_headers = {str(k): str(v) for k, v in (headers or {}).items()}
        body = {"project": int(project_id), "url": url, "send_payload": True, "is_active": True,
                "headers": new_headers, "send_for_all_actions": actions is None,
                "actions": list(actions or [])}
        try:
            return Webhook.from_api(self.request_json("POST", "/api/webhooks/", json=body))
        except LabelStudioError as exc:
            raise LabelStudioError(self._redact(str(exc), new_headers.values()), status_code=exc.status_code,
                                   method=exc.method, path=exc.path) from None

    def delete_webhook(self, webhook_id: int) -> None:
        self.request("DELETE", f"/api/webhooks/{int(webhook_id)}/", expect=(200, 204, 404))

    def ensure_webhook(self, project_id: int, url: str, *, headers: dict[str, str] | None = None,
                       same: Callable[[str], bool] | None = None) -> tuple[Webhook, str]:
        """Make the project have exactly one active webhook to ``url`` carrying ``headers``.

        Returns the webhook and what was done: ``"kept"``, ``"patched"`` or ``"created"``.
        ``same(url)`` says which other webhook URLs reach the same receiver (the ML backend under
        another host name). One that Label Studio made itself (it does when an ML backend is
        connected under a URL it accepts) is kept and given the headers; duplicates (Label Studio
        and we creating at once) are deleted, oldest kept, because each would deliver every event again.
        """
        wanted = {str(k): str(v) for k, v in (headers or {}).items()}
        hooks = self._webhooks_to(project_id, url, same)
        outcome = "kept"
        if not hooks:
            self.create_webhook(project_id, url, headers=wanted)
            hooks = self._webhooks_to(project_id, url, same)
            outcome = "created"
            if not hooks:
                raise LabelStudioError(f"Label Studio did not keep the webhook of project {int(project_id)}")
        hook, duplicates = hooks[0], hooks[1:]
        for extra in duplicates:
            self.delete_webhook(extra.id)
        if not hook.is_active or any(hook.headers.get(k) != v for k, v in wanted.items()):
            path = f"/api/webhooks/{hook.id}/"
            merged = {**hook.headers, **wanted}
            try:
                body = self.request_json("PATCH", path, json={"headers": merged, "is_active": True}, idempotent=True)
            except LabelStudioError as exc:
                raise LabelStudioError(self._redact(str(exc), merged.values()), status_code=exc.status_code,
                                       method=exc.method, path=exc.path) from None
            hook = Webhook.from_api(body)
            outcome = "patched" if outcome == "kept" else outcome
        return hook, outcome

    def _webhooks_to(self, project_id: int, url: str, same: Callable[[str], bool] | None = None) -> list[Webhook]:
        """The project's webhooks to ``url`` (trailing slash ignored) or ``same``, oldest first."""
        target = url.rstrip("/")
        return sorted((h for h in self.list_webhooks(project_id)
                       if h.url.rstrip("/") == target or (same is not None and same(h.url))), key=lambda h: h.id)

    # ----------------------------------------------------------------- export

    def export_annotations(self, project_id: int, *, all_tasks: bool = False,
                           timeout_s: float = 300.0) -> list[ExportedTask]:
        """Label Studio's JSON export: tasks with annotations (``all_tasks`` includes unlabeled ones)."""
        params = {"exportType": "JSON", "download_all_tasks": "true" if all_tasks else "false"}
        body = self.request_json("GET", f"/api/projects/{int(project_id)}/export", params=params, timeout=timeout_s)
        return [ExportedTask.from_api(t) for t in body or []]

    # ----------------------------------------------------------------- files

    def is_label_studio_url(self, url: str) -> bool:
        """True for relative ``/data/...`` URLs and absolute URLs on Label Studio's own origin."""
        parts = urlsplit(url)
        if not parts.scheme and not parts.netloc:
            return url.startswith("/")
        own = urlsplit(self.url)
        return (parts.scheme, parts.hostname, _port(parts)) == (own.scheme, own.hostname, _port(own))

    def download(self, url: str, max_bytes: int | None = None, timeout_s: float | None = None) -> bytes:
        """Bytes of a file Label Studio serves (``/data/upload/...``, ``/data/local-files/?d=...``).

        The token is only ever sent to Label Studio's own origin; redirects elsewhere
        (cloud-storage presigned URLs) are followed without it.
        """
        limit = self.max_download_bytes if max_bytes is None else max_bytes
        if not self.is_label_studio_url(url):
            raise LabelStudioError(f"refusing to send the Label Studio key to another host: {_path_only(url)}")
        target = self._url(url)
        timeout = self._timeout if timeout_s is None else httpx.Timeout(timeout_s, connect=self._timeout.connect)
        attempt = 0
        while True:
            try:
                return self._download_once(target, url, limit, timeout)
            except _Retryable as exc:
                if attempt >= self.retries:
                    raise self._error(exc.why, "GET", url) from None
                attempt = self._backoff(attempt, "GET", url, exc.why)

    def _download_once(self, target: str, url: str, limit: int, timeout: httpx.Timeout) -> bytes:
        try:
            with self._http.stream("GET", target, timeout=timeout, follow_redirects=True,
                                   headers={"Accept": "*/*"}) as response:
                if response.status_code in _RETRY_STATUS:
                    raise _Retryable(f"HTTP {response.status_code}")
                if response.status_code != 200:
                    response.read()
                    raise self._http_error(response, "GET", url)
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > limit:
                    raise self._error(f"file is {int(declared)} bytes, over the {limit}-byte limit", "GET", url)
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise self._error(f"file is over the {limit}-byte limit", "GET", url)
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.TransportError as exc:
            raise _Retryable(f"{type(exc).__name__} downloading from Label Studio") from None


class _Retryable(Exception):
    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


# --------------------------------------------------------------------------- helpers


def _path_only(url: str) -> str:
    """A URL without credentials or fragment, for messages (query kept: it names the file)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    prefix = f"{parts.scheme}://{host}" if parts.scheme else ""
    return prefix + parts.path + (f"?{parts.query}" if parts.query else "")


def _port(parts) -> int | None:
    if parts.port:
        return parts.port
    return {"http": 80, "https": 443}.get(parts.scheme)


def _response_detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return text[:_DETAIL_CHARS] if text and not text.lstrip().startswith("<") else ""
    if isinstance(body, dict):
        parts = [str(body[k]) for k in ("detail", "validation_errors") if body.get(k)]
        text = " ".join(parts) if parts else json.dumps(body)
    else:
        text = json.dumps(body)
    return text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS] + "..."


def _merge_filters(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """AND two Data Manager filter groups (either may be missing)."""
    groups = [g for g in (a, b) if g and g.get("items")]
    if not groups:
        return None
    if len(groups) == 1:
        return groups[0]
    if all(g.get("conjunction", "and") == "and" for g in groups):
        return {"conjunction": "and", "items": [*groups[0]["items"], *groups[1]["items"]]}
    raise LabelStudioError("cannot combine a view's 'or' filters with extra filters; create a view instead")


def _prediction_problem(item: Any) -> str | None:
    if not isinstance(item, dict):
        return "prediction is not an object"
    if not isinstance(item.get("task"), int) or isinstance(item.get("task"), bool):
        return "prediction has no integer 'task'"
    if not isinstance(item.get("result"), list):
        return "prediction 'result' is not a list"
    score = item.get("score")
    if score is not None and not isinstance(score, (int, float)):
        return "prediction 'score' is not a number"
    return None


def _prediction_body(item: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"task": item["task"], "result": item["result"]}
    if item.get("score") is not None:
        body["score"] = float(item["score"])
    if item.get("model_version"):
        body["model_version"] = str(item["model_version"])
    return body
