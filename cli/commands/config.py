"""``egm-assist config``: show the effective settings, or the documented table of all of them."""

from __future__ import annotations

import json

from pydantic import SecretStr

from egm.config.settings import Settings, get_settings


def register(sub) -> None:
    p = sub.add_parser("config", help="print effective settings (secrets masked) or --markdown table")
    p.add_argument("--markdown", action="store_true", help="print the table of variables, defaults and meanings")
    p.set_defaults(func=run)


def env_name(field) -> str:
    return field.validation_alias.choices[0]


def markdown_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "" if default is None else (f"`{default}`" if default != "" else '`""`')
        rows.append(f"| `{env_name(field)}` | {shown} | {field.description or ''} |")
    return "\n".join(rows)


def run(args) -> int:
    if args.markdown:
        print(markdown_table())
        return 0
    settings = get_settings()
    out = {}
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        out[env_name(field)] = "***" if isinstance(value, SecretStr) else value
    print(json.dumps(out, indent=2, default=str))
    return 0
