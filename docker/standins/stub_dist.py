"""Install empty distributions NAME==VERSION into this interpreter (build-only stand-ins, see
Dockerfile.vllm-openai): an importable package whose ``__version__`` is VERSION, and the
dist-info that makes ``pip list`` and dependency resolution see NAME at VERSION."""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path


def install(spec: str, site: Path) -> None:
    name, version = spec.split("==")
    package = site / name.replace("-", "_")
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(f'"""Build-only stand-in: not the real {name}."""\n__version__ = "{version}"\n')
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                   f"Summary: build-only stand-in, not the real package\n")
    (info / "INSTALLER").write_text("egm-standin\n")
    (info / "top_level.txt").write_text(name.replace("-", "_") + "\n")
    (info / "RECORD").write_text("")


def main(specs: list[str]) -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    for spec in specs:
        install(spec, site)
        print(f"stand-in {spec} in {site}")


if __name__ == "__main__":
    main(sys.argv[1:])
