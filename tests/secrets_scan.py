"""Scan log files for secrets: any test that starts processes with credentials can call this.

Usage::

    from tests.secrets_scan import assert_no_secrets
    assert_no_secrets(tmp_path, [password, token])          # every *.log under tmp_path
    assert_no_secrets([backend_log, worker_log], secrets)   # or explicit files

Besides the exact values, the scan looks for their base64 forms as they appear in a basic-auth
header (``user:password``) and for ``Authorization`` headers carrying any credential, which no
log line of this project should ever contain.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

#: A credential after an Authorization header / token field, whatever the secret is.
_HEADER = re.compile(r"(?i)authorization[\"']?\s*[:=]\s*[\"']?(?:token|bearer|basic)\s+"
                     r"(?!\*\*\*)[A-Za-z0-9._~+/=-]{6,}")
MIN_SECRET_LEN = 6


@dataclass(frozen=True)
class Finding:
    path: Path
    line_no: int
    what: str
    line: str

    def __str__(self) -> str:
        return f"{self.path.name}:{self.line_no}: {self.what}: {self.line[:160]}"


def log_files(where: Path | Iterable[Path], pattern: str = "*.log") -> list[Path]:
    """``where`` is a folder (all ``pattern`` files below it) or a list of files."""
    if isinstance(where, Path):
        return sorted(p for p in where.rglob(pattern) if p.is_file())
    return [Path(p) for p in where if Path(p).is_file()]


def secret_forms(secrets: Iterable[str], users: Iterable[str] = ()) -> dict[str, str]:
    """Every spelling of each secret worth looking for -> a label for the report (never the value)."""
    forms: dict[str, str] = {}
    users = list(users)
    for i, secret in enumerate(s for s in secrets if s):
        if len(secret) < MIN_SECRET_LEN:
            raise ValueError(f"secret #{i} is too short to scan for reliably")
        forms[secret] = f"secret #{i}"
        for user in users:
            forms[base64.b64encode(f"{user}:{secret}".encode()).decode()] = f"secret #{i} (basic-auth base64)"
    return forms


def find_secrets(where: Path | Iterable[Path], secrets: Iterable[str], users: Iterable[str] = ()) -> list[Finding]:
    forms = secret_forms(secrets, users)
    findings: list[Finding] = []
    for path in log_files(where):
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for form, label in forms.items():
                if form in line:
                    findings.append(Finding(path, n, label, line.replace(form, "<SECRET>")))
            if _HEADER.search(line):
                findings.append(Finding(path, n, "authorization header with a credential", _HEADER.sub("<HDR>", line)))
    return findings


def assert_no_secrets(where: Path | Iterable[Path], secrets: Iterable[str], users: Iterable[str] = (),
                      min_files: int = 1) -> list[Path]:
    """Fail with the offending lines (secrets masked) if any log file holds a secret; returns the files read."""
    files = log_files(where)
    assert len(files) >= min_files, f"expected at least {min_files} log files, found {len(files)}"
    findings = find_secrets(files, secrets, users)
    assert not findings, "secrets in logs:\n" + "\n".join(str(f) for f in findings[:20])
    return files
