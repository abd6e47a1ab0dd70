"""KD methods behind one factory: ``make_distiller(name, teacher, dataset, ...)``."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from rcekd.data import Dataset
from rcekd.kd.base import Distiller, Teacher

#: method name → "module:Class"; imported on use so one method's import cost is not every method's
DISTILLERS: dict[str, str] = {
    "rcekd": "rcekd.kd.rcekd:RCEKD",
    "ce": "rcekd.kd.ce:VanillaCE",
    "cd": "rcekd.kd.cd:CD",
    "rrd": "rcekd.kd.rrd:RRD",
    "dcd": "rcekd.kd.dcd:DCD",
    "hetcomp": "rcekd.kd.hetcomp:HetComp",
}
METHODS = (*DISTILLERS, "none")

__all__ = ["DISTILLERS", "METHODS", "Distiller", "Teacher", "distiller_class", "make_distiller", "method_options"]


def distiller_class(name: str) -> type[Distiller]:
    if name not in DISTILLERS:
        raise ValueError(f"unknown KD method {name!r}; expected one of {sorted(METHODS)}")
    module_name, _, class_name = DISTILLERS[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def make_distiller(name: str, teacher: Teacher, dataset: Dataset, **options: Any) -> Distiller:
    return distiller_class(name)(teacher, dataset, **options)


def method_options() -> dict[str, tuple[type, dict[str, object]]]:
    """Every KD option (keyword-only constructor argument) → (type, {method: default})."""
    options: dict[str, tuple[type, dict[str, object]]] = {}
    for method in DISTILLERS:
        for param in inspect.signature(distiller_class(method).__init__).parameters.values():
            if param.kind is not param.KEYWORD_ONLY and param.name != "weight":
                continue
            kind = type(param.default) if param.default is not None else str
            options.setdefault(param.name, (kind, {}))[1][method] = param.default
    return options
