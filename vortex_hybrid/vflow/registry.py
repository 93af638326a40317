"""Flow registry: `@register("name")`, `load_flow(spec)` by name or `path/to/file.py:name`,
`list_flows()`.

`register` traces the flow once with its `probe_shape`, so a mistake in a flow surfaces when its
module is imported, pointing at the faulty line. The library flows (`vortex_hybrid.vflow.flows`)
register themselves here; `vortex_hybrid.vflow` imports them (after this module), so they are listed
whenever any part of vflow is imported. This module does not import them back.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import logging
import os
import sys
from typing import Any, Callable, Union

from .compiler import compile_flow
from .flow import Flow

log = logging.getLogger(__name__)

_flows: dict[str, type[Flow]] = {}
_instances: dict[str, Flow] = {}
_files: dict[str, str] = {}        # absolute path of a user file -> module name
_USER_PREFIX = "vflow_user_"       # module names of flow files loaded by path


def register(name: str) -> Callable[[type[Flow]], type[Flow]]:
    """Class decorator: make a `Flow` subclass loadable as `name`; trace-checks it right away.

    A name may be registered again by the same class (a module imported twice) or when the old flow
    came from a file loaded by path (a newer version of a user's flow); otherwise it is taken.
    """
    if not isinstance(name, str) or not name or ":" in name or os.sep in name:
        raise ValueError(f"register: flow name {name!r} must be a non-empty string without ':' "
                         "or path separators")

    def deco(cls: type[Flow]) -> type[Flow]:
        if not (isinstance(cls, type) and issubclass(cls, Flow)):
            raise ValueError(f"register({name!r}) decorates {cls!r}; it must be a subclass of "
                             "vortex_hybrid.vflow.Flow")
        old = _flows.get(name)
        if old is not None and old.__module__.startswith(_USER_PREFIX):
            log.warning("flow %r from %s replaced by %s", name, old.__module__, cls.__module__)
        elif old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"register: flow name {name!r} is taken by {old.__module__}."
                             f"{old.__qualname__}; pick another name")
        cls.name = name
        compile_flow(cls(), *cls.probe_shape)
        _flows[name] = cls
        _instances.pop(name, None)
        return cls

    return deco


def list_flows() -> list[str]:
    """Names of every registered flow (the library's and any loaded by the user), sorted."""
    return sorted(_flows)


def _import_file(path: str) -> None:
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise ValueError(f"flow file {path!r} does not exist")
    if full in _files:
        return
    mod_name = _USER_PREFIX + hashlib.sha1(full.encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(mod_name, full)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(mod_name, None)
        raise
    _files[full] = mod_name
    log.info("loaded flows from %s", full)


def load_flow(spec: Union[str, Flow, type], **options: Any) -> Flow:
    """A flow object from a registered name, `path/to/file.py:name`, a Flow subclass or instance.

    `options` go to the flow's constructor (e.g. HybridConfig.extra). Without options, a name gives
    the same shared instance every time, so its compiled graphs are reused.
    """
    if isinstance(spec, Flow):
        if options:
            raise ValueError(f"load_flow: options {sorted(options)} given with a flow object; pass "
                             "them to its constructor instead")
        return spec
    if isinstance(spec, type) and issubclass(spec, Flow):
        return spec(**options)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"flow={spec!r} must be a registered name such as 'quest', "
                         "'path/to/file.py:name', or a vortex_hybrid.vflow.Flow")
    name = spec
    path, sep, tail = spec.rpartition(":")
    if sep and path.endswith(".py"):
        _import_file(path)
        name = tail
        if name not in _flows:
            module = sys.modules[_files[os.path.abspath(path)]]
            attr = getattr(module, name, None)
            if isinstance(attr, type) and issubclass(attr, Flow):
                return attr(**options)
            here = sorted(n for n, c in _flows.items() if c.__module__ == module.__name__)
            raise ValueError(f"flow {name!r} is not registered by {path} (it registers {here}; use "
                             f"@register({name!r}) on a Flow subclass)")
    if name not in _flows:
        close = difflib.get_close_matches(name, list(_flows), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown flow {name!r}{hint}; registered flows: {sorted(_flows)}; a user "
                         "flow is named 'path/to/file.py:name'")
    if options:
        return _flows[name](**options)
    if name not in _instances:
        _instances[name] = _flows[name]()
    return _instances[name]
