"""Make the project's webhook to this backend exist, with our basic-auth credentials.

Annotation events reach ``/webhook`` only through a Label Studio project webhook. Label
Studio 1.23 creates ``<ML backend URL>/webhook`` itself when the backend is connected, but
only when its URL validation accepts that address: a host name without a dot, such as a
compose service name (``http://backend:9090``), is refused ("Enter a valid URL.") and no
webhook is made. It also creates it without credentials, so with basic auth on every event
would get 401 (REFERENCE.md 4).

So on ``/setup`` (in the background, a few tries, because Label Studio calls ``/setup``
before it saves the ML backend and its webhook):

* with ``EGM_PUBLIC_URL`` set (compose sets a dotted alias, ``http://backend.egm.internal:9090``),
  the webhook ``<EGM_PUBLIC_URL>/webhook`` is *ensured* through
  ``LabelStudioClient.ensure_webhook``: the one Label Studio made is kept (and given our
  ``Authorization`` header when basic auth is on); if none appears within a few seconds,
  the backend creates it; duplicates are removed. A webhook to ``<any host>:EGM_PORT/webhook``
  counts as ours too (the backend connected under another name that Label Studio accepted),
  so connecting under a second name never doubles the events;
* without it, the backend cannot know its own address: it only patches credentials into
  webhooks that look like ours (``<any host>:EGM_PORT/webhook``), as before.

At most one such job runs per project at a time (Label Studio calls ``/setup`` often).
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from urllib.parse import urlsplit

from egm.config.settings import Settings

log = logging.getLogger(__name__)
DELAYS_S = (0.5, 1, 2, 4, 8)
#: Tries that only look for the webhook Label Studio makes itself before the backend creates one.
LOOK_ONLY_TRIES = 3

_running: set[int] = set()
_running_lock = threading.Lock()


def auth_header(settings: Settings) -> str:
    password = settings.basic_auth_pass.get_secret_value() if settings.basic_auth_pass else ""
    return "Basic " + base64.b64encode(f"{settings.basic_auth_user}:{password}".encode()).decode()


def webhook_url(settings: Settings) -> str | None:
    """Where Label Studio should send events: ``<EGM_PUBLIC_URL>/webhook``, or None when unknown."""
    return settings.public_url.rstrip("/") + "/webhook" if settings.public_url else None


def is_ours(url: str, settings: Settings) -> bool:
    """``<EGM_PUBLIC_URL>/webhook``, or any ``<host>:EGM_PORT/webhook`` (this backend under another name)."""
    own = webhook_url(settings)
    if own and url.rstrip("/") == own:
        return True
    parts = urlsplit(url)
    return parts.path.rstrip("/").endswith("/webhook") and parts.port == settings.port


def wanted_headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": auth_header(settings)} if settings.basic_auth_user else {}


def patch_webhooks(settings: Settings, client, project_id: int) -> int:
    """Patch every webhook of the project that points at us and lacks our credentials; returns how many."""
    header = auth_header(settings)
    patched = 0
    for hook in client.list_webhooks(project_id):
        if is_ours(hook.url, settings) and hook.headers.get("Authorization") != header:
            client.patch_webhook_headers(hook.id, {"Authorization": header})
            patched += 1
    return patched


def settle_webhook(settings: Settings, client, project_id: int, *, may_create: bool) -> str | None:
    """One try. Returns what was done ("kept", "patched", "created", "patched N") or None to try again."""
    url = webhook_url(settings)
    if url is None:
        if not settings.basic_auth_user:
            return "kept"  # nothing to add and no address to create one for
        patched = patch_webhooks(settings, client, project_id)
        return f"patched {patched}" if patched else None
    if not may_create and not any(is_ours(h.url, settings) for h in client.list_webhooks(project_id)):
        return None
    _, outcome = client.ensure_webhook(project_id, url, headers=wanted_headers(settings),
                                       same=lambda other: is_ours(other, settings))
    return outcome


def ensure_webhook(settings: Settings, project_id: int | None) -> threading.Thread | None:
    """Start the background job that settles the project's webhook; None when there is nothing to do."""
    if project_id is None or settings.label_studio_api_key is None:
        return None
    if not settings.public_url and not settings.basic_auth_user:
        return None
    with _running_lock:
        if project_id in _running:
            return None
        _running.add(project_id)

    def run() -> None:
        from egm.labelstudio import LabelStudioClient

        try:
            with LabelStudioClient.from_settings(settings) as client:
                for attempt, delay in enumerate(DELAYS_S):
                    time.sleep(delay)
                    try:
                        outcome = settle_webhook(settings, client, project_id, may_create=attempt >= LOOK_ONLY_TRIES)
                    except Exception as exc:  # Label Studio busy or not reachable: try again
                        log.info("webhook retry", extra={"project": project_id, "error": type(exc).__name__})
                        continue
                    if outcome is not None:
                        log.info("webhook ready", extra={"project": project_id, "outcome": outcome,
                                                         "url": webhook_url(settings)})
                        return
                log.warning("webhook of this backend not found or not settled; create or patch it by hand "
                            "(docs/deployment.md: The webhook)", extra={"project": project_id})
        finally:
            with _running_lock:
                _running.discard(project_id)

    thread = threading.Thread(target=run, name="egm-webhook", daemon=True)
    thread.start()
    return thread
