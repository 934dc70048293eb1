"""Give the webhook Label Studio creates for this backend our basic-auth credentials.

Label Studio 1.23 creates ``<backend url>/webhook`` for the project when the backend
is connected, with no credentials, so with basic auth on every event gets 401
(REFERENCE.md 4). When ``/setup`` runs and Label Studio credentials are configured,
we patch that webhook's headers; it is done in the background with a few retries,
because Label Studio calls ``/setup`` while it is still saving the webhook.
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


def auth_header(settings: Settings) -> str:
    password = settings.basic_auth_pass.get_secret_value() if settings.basic_auth_pass else ""
    return "Basic " + base64.b64encode(f"{settings.basic_auth_user}:{password}".encode()).decode()


def is_ours(url: str, settings: Settings) -> bool:
    if settings.public_url:
        return url.rstrip("/") == settings.public_url.rstrip("/") + "/webhook"
    parts = urlsplit(url)
    return parts.path.rstrip("/").endswith("/webhook") and parts.port == settings.port


def patch_webhooks(settings: Settings, client, project_id: int) -> int:
    """Patch every webhook of the project that points at us and lacks our credentials; returns how many."""
    header = auth_header(settings)
    patched = 0
    for hook in client.list_webhooks(project_id):
        if is_ours(hook.url, settings) and hook.headers.get("Authorization") != header:
            client.patch_webhook_headers(hook.id, {"Authorization": header})
            patched += 1
    return patched


def ensure_webhook_auth(settings: Settings, project_id: int | None) -> threading.Thread | None:
    if not settings.basic_auth_user or project_id is None or settings.label_studio_api_key is None:
        return None

    def run() -> None:
        from egm.labelstudio import LabelStudioClient

        client = LabelStudioClient.from_settings(settings)
        for delay in DELAYS_S:
            time.sleep(delay)
            try:
                if patch_webhooks(settings, client, project_id):
                    log.info("webhook credentials set", extra={"project": project_id})
                    return
            except Exception as exc:  # Label Studio busy or not reachable: try again
                log.info("webhook patch retry", extra={"project": project_id, "error": type(exc).__name__})
        log.warning("no webhook of this backend found to patch; set its Authorization header by hand "
                    "(README: Webhook auth)", extra={"project": project_id})

    thread = threading.Thread(target=run, name="egm-webhook-auth", daemon=True)
    thread.start()
    return thread
