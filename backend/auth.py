"""Optional HTTP basic auth on every route but the health checks."""

from __future__ import annotations

import secrets

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from egm.config.settings import Settings, get_settings

_basic = HTTPBasic(auto_error=False)


def require_auth(request: Request, credentials: HTTPBasicCredentials | None = Depends(_basic)) -> None:
    # The app's own settings (create_app(settings)), not a fresh read of the environment.
    settings: Settings = getattr(request.app.state, "settings", None) or get_settings()
    if not settings.basic_auth_user:
        return
    expected_pass = settings.basic_auth_pass.get_secret_value() if settings.basic_auth_pass else ""
    ok = credentials is not None and (
        secrets.compare_digest(credentials.username.encode(), settings.basic_auth_user.encode())
        & secrets.compare_digest(credentials.password.encode(), expected_pass.encode())
    )
    if not ok:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong basic-auth credentials",
                            headers={"WWW-Authenticate": 'Basic realm="egm-assist"'})
