"""Objects a config names by import path, `package.module:attribute`."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from .config import ConfigError


def import_object(path: str, key: str, kind: str = "object") -> Any:
    """The object at `path`; `key` is the config key that names it, for messages.

    Modules are found on sys.path and in the current directory: `train.py` puts its own
    directory first on sys.path, not the directory it is run from, where a user's module lives.

    Raises:
        ConfigError: `path` is not of the form package.module:attribute, the module does not
            import, it has no such attribute, or (kind "function") the attribute is not callable.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key}: {path!r} is not an import path of the form package.module:{kind}.")
    _add_current_directory()
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        # A missing function names its whole path; a missing model class, the module the path names.
        what = repr(path) if kind == "function" else f"module {module_name!r}"
        raise ConfigError(f"{key}: cannot import {what}: {err} (modules are found on sys.path and in the current "
                          f"directory, {os.getcwd()}).") from None
    if not hasattr(module, attr):
        raise ConfigError(f"{key}: cannot import {path!r}: module {module_name!r} has no attribute {attr!r}.")
    found = getattr(module, attr)
    if kind == "function" and not callable(found):
        raise ConfigError(f"{key}: {path!r} is not a function.")
    return found


def _add_current_directory() -> None:
    # Appended, so an installed package of the same name still wins; caches dropped, so a module
    # written since the interpreter started is found.
    here = os.getcwd()
    if not {"", ".", here} & set(sys.path):
        sys.path.append(here)
        importlib.invalidate_caches()
