"""The segmentation methods by name: ``config.method`` -> model class.

Each method module registers its class (``@register("sdfsmis")``); ``sdfsmis.models`` imports the
built-in method modules, so any import from ``sdfsmis.models`` fills the registry. Saving and
loading (``sdfsmis.models.io``) build models through :func:`build_model` and so never import a method
module, and the methods' shared base class never imports them either: the import graph of
``sdfsmis.models`` has no cycle (``tests/test_import_graph.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from sdfsmis.errors import InputError
from sdfsmis.models.backbones import Backbone
from sdfsmis.models.config import ModelConfig

M = TypeVar("M", bound=type[nn.Module])
_METHODS: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[M], M]:
    """Class decorator: the model class of ``ModelConfig(method=name)``."""

    def add(cls: M) -> M:
        known = _METHODS.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"method {name!r} is already registered to {known.__qualname__}")
        _METHODS[name] = cls
        return cls

    return add


def method_class(name: str) -> type[nn.Module]:
    """The class registered for ``name``; InputError for an unknown method."""
    try:
        return _METHODS[name]
    except KeyError:
        raise InputError(None, f"unknown method {name!r}; registered: {', '.join(sorted(_METHODS))}") from None


def build_model(cfg: ModelConfig, backbone: Backbone | None = None) -> nn.Module:
    """The model of ``cfg.method`` (``SDFSMIS``, ``DiffewS`` or ``SDSeg``) on ``cfg.backbone``
    (or on an already built ``backbone``)."""
    return method_class(cfg.method)(cfg, backbone)
