"""Where datasets live on disk: the data root.

Resolution order (first that is given wins):

1. the ``data_root`` argument (the CLI's ``--data-root DIR``);
2. the ``PARM_DATA_ROOT`` environment variable;
3. a per-user cache folder: ``$XDG_CACHE_HOME/parm/data``, else ``~/.cache/parm/data``.

The folder is not created here: reading never writes, and the downloader creates what it needs.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_DATA_ROOT = "PARM_DATA_ROOT"


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    """Return the folder that holds the datasets (see the module docstring for the order).

    An empty string (argument or environment variable) counts as not given.
    """
    if data_root is not None and str(data_root) != "":
        return Path(data_root).expanduser()
    from_env = os.environ.get(ENV_DATA_ROOT, "")
    if from_env:
        return Path(from_env).expanduser()
    return _user_cache_dir() / "parm" / "data"


def _user_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg:
        return Path(xdg).expanduser()
    return Path.home() / ".cache"
