"""Import the project from a bare checkout, as on the lent GPU machine where it is not installed.

``pyproject.toml`` maps the repository's folders onto one ``egm`` namespace (setuptools
``package-dir``: ``worker/`` is ``egm.worker``, ``config/`` is ``egm.config``, ...). An
installed project resolves those names itself; a bare checkout does not. :func:`map_rooms`
reads the same table and registers each folder under its name, so scripts run either way.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def map_rooms(repo: Path = REPO) -> None:
    """Make ``egm.*`` importable from ``repo``; nothing to do when the project is installed or
    already mapped (``bench/gpu_deps/install.sh`` links the rooms on the GPU machine)."""
    try:
        import egm.worker  # noqa: F401
        return
    except ImportError:
        for name in [m for m in sys.modules if m == "egm" or m.startswith("egm.")]:
            del sys.modules[name]  # a bare repo/egm found first: import it again below, mapped
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    import tomllib

    import egm

    table = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    rooms = [(name, repo / folder) for name, folder in table.items() if name != "egm"]
    # egm.config first: the other rooms import the settings when their packages load
    rooms.sort(key=lambda item: item[0] != "egm.config")
    for name, folder in rooms:
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot map {name} onto {folder}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        setattr(egm, name.rsplit(".", 1)[1], module)
        spec.loader.exec_module(module)
