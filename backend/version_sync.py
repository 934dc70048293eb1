"""Keep Label Studio's idea of the model version in step with the live workers (the score column).

Label Studio 1.23 sets a project's ``model_version`` to the ML backend's *title* when the backend
is connected, averages in the Data Manager's "Prediction score" column only the predictions whose
``model_version`` equals the project's, and asks the backend for new predictions only while the
project's ``model_version`` equals the backend's title. Ours carry the live workers' version
(``EGM-4B-<hash>``), so out of the box the column stays empty; choosing the version by hand
(Settings -> Annotation -> Prelabeling) fills it but stops live predictions.

So on every ``/setup`` (Label Studio calls it on connect and before each prediction round, so
a version change is seen at once) the backend renames the connected ML backend to the live
version and sets the project's ``model_version`` to it (``LabelStudioClient.show_model_version``).
Label Studio gives ``/setup`` 3 s, so this runs in a background thread with short Label Studio
timeouts, and never fails ``/setup``. On connect Label Studio calls ``/setup`` before it has
saved the backend and sets the project's version to the old title just after, so the thread
checks again a few times and stops once two checks in a row find everything in order.

Which backend is ours: the one whose URL is ``EGM_PUBLIC_URL``, else one on ``EGM_PORT``, else
the project's only backend. Off with ``EGM_LS_SYNC_VERSION=false`` or without Label Studio
credentials.
"""

from __future__ import annotations

import logging
import threading
import time
from urllib.parse import urlsplit

from egm.config.settings import Settings

log = logging.getLogger(__name__)
DELAYS_S = (0.5, 1, 2, 3, 4, 6)
#: Label Studio calls made from here wait at most this long.
LS_TIMEOUT_S = 10.0


def is_our_url(url: str, settings: Settings) -> bool:
    if settings.public_url:
        return url.rstrip("/") == settings.public_url.rstrip("/")
    try:
        return urlsplit(url).port == settings.port
    except ValueError:
        return False


class VersionSync:
    """One background sync per project at a time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._busy: set[int] = set()
        self._lock = threading.Lock()

    def enabled(self) -> bool:
        return self.settings.ls_sync_version and self.settings.label_studio_api_key is not None

    def on_setup(self, project_id: int | None, model_version: str) -> threading.Thread | None:
        if project_id is None or not model_version or not self.enabled():
            return None
        with self._lock:
            if project_id in self._busy:
                return None
            self._busy.add(project_id)
        thread = threading.Thread(target=self._run, args=(project_id, model_version), daemon=True,
                                  name=f"egm-version-sync-{project_id}")
        thread.start()
        return thread

    def _run(self, project_id: int, model_version: str) -> None:
        try:
            self._sync(project_id, model_version)
        finally:
            with self._lock:
                self._busy.discard(project_id)

    def _sync(self, project_id: int, model_version: str) -> None:
        from egm.labelstudio import LabelStudioClient, VersionShown

        def ours(backend) -> bool:
            return is_our_url(backend.url, self.settings)

        password = self.settings.basic_auth_pass.get_secret_value() if self.settings.basic_auth_pass else None
        client = LabelStudioClient.from_settings(self.settings, timeout_s=LS_TIMEOUT_S, retries=0)
        in_order_streak = 0
        try:
            for delay in DELAYS_S:
                time.sleep(delay)
                try:
                    backends = client.list_ml_backends(project_id)
                    live = {b.id for b in backends if ours(b)} or ({backends[0].id} if len(backends) == 1 else set())
                    if not live:  # not saved yet (connect in progress), or not ours to rename
                        in_order_streak = 0
                        continue
                    shown = client.show_model_version(project_id, model_version, is_live=lambda b: b.id in live,
                                                      basic_auth_pass=password)
                except Exception as exc:  # Label Studio busy or unreachable: try again, never fail anything
                    log.info("model version sync retry", extra={"project": project_id, "error": str(exc)[:300]})
                    continue
                if shown is VersionShown.changed:
                    log.info("label studio shows the live model version",
                             extra={"project": project_id, "model_version": model_version})
                in_order_streak = in_order_streak + 1 if shown is VersionShown.in_order else 0
                if in_order_streak >= 2:
                    return
        finally:
            client.close()
