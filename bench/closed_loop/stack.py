"""The loop's services on this machine: a private Label Studio and a private redis-server.

Label Studio keeps its database in the loop's folder, so the projects, predictions and
annotations outlive each command (the CPU stages before and after the GPU call may be hours
apart); its credentials are stored in the loop's state on first start. It serves the scenes
as local files from the loop's folder, which is also the workers' ``EGM_LOCAL_FILES_ROOT``.
Redis lives only as long as one command: a pre-annotation run that was cut short resumes
from Label Studio itself (tasks with a prediction of the run's model_version are skipped).
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

from egm import processes

from .workspace import Workspace

REPO = Path(__file__).resolve().parents[2]
#: a first start migrates a fresh database: 30 s on a quiet machine, several minutes on a busy one
STARTUP_TIMEOUT_S = 900


def _tests_importable() -> None:
    """The server is the test suite's (tests/fixtures/labelstudio.py): import it from the checkout."""
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))


def _server_class():
    _tests_importable()
    from tests.fixtures import labelstudio
    from tests.fixtures.labelstudio import LabelStudioServer

    labelstudio.STARTUP_TIMEOUT_S = max(labelstudio.STARTUP_TIMEOUT_S, STARTUP_TIMEOUT_S)

    class LoopLabelStudio(LabelStudioServer):
        """The test suite's headless Label Studio, serving local files from the loop's folder."""

        files_root: Path = Path(".")

        @property
        def local_files_root(self) -> Path:
            return self.files_root

    return LoopLabelStudio


class Stack:
    """Label Studio and Redis for one command; ``with Stack(ws) as stack: ...`` stops both."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.ls = None
        self._redis = None
        self.redis_url = ""

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def label_studio(self):
        if self.ls is not None:
            return self.ls
        _tests_importable()
        from tests.fixtures.labelstudio import label_studio_binary

        binary = label_studio_binary()
        if not binary.exists():
            raise SystemExit(f"error: Label Studio not found at {binary}: run `make .lsvenv` (or set EGM_TEST_LS_BIN)")
        creds = self.ws.state.setdefault("label_studio", {})
        if not creds:
            creds.update(password=secrets.token_urlsafe(16), token=secrets.token_hex(20))
            self.ws.save_state()
        server = _server_class()(binary=binary, port=processes.free_port(), workdir=self.ws.labelstudio,
                                 password=creds["password"], token=creds["token"])
        server.files_root = self.ws.root
        print(f"starting Label Studio ({self.ws.labelstudio}) ...", flush=True)
        server.start()
        self.ls = server
        return server

    def redis(self) -> str:
        if not self.redis_url:
            self._redis, self.redis_url = processes.start_redis(self.ws.root / "redis")
        return self.redis_url

    def close(self) -> None:
        if self.ls is not None:
            self.ls.stop()
            self.ls = None
        if self._redis is not None:
            processes.stop(self._redis)
            self._redis, self.redis_url = None, ""
