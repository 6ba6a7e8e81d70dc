"""Every depth-compression method, one module each, behind one interface (base.Method).

    flattengpt    flattengpt.py  flatten each planned group, prune back to the original width (fits)
    drop          flattengpt.py  the flattening plan with every group's first block kept, the rest deleted
    flatten-only  flattengpt.py  the flattening plan's unpruned wide blocks, zero-padded
    shortgpt      shortgpt.py    drop the k blocks of lowest block influence
    gromov        gromov.py      drop the span of lowest last-token angular distance
    sleb          sleb.py        k rounds of removing the block whose removal costs least calibration loss
    laco          laco.py        LaCo: merge windows of layers top-down while the output stays similar
    slm           slm.py         SLM: sliding windows grown downward while the output stays similar
    replaceme     replaceme.py   drop the Gromov span, fold a fitted linear map into the block before it (fits)

Adding a method: a module with a Method subclass (name, chooses_with, fits, OPTIONS,
CHOICE_OPTIONS, choose, build if its layers are not keep/merge), its entry in METHODS below and
its options in workflow/schemas/config.schema.yaml. Neither the driver nor the rules change.
"""

from __future__ import annotations

import importlib

from .base import Built, BuildContext, Method, MethodError, SearchInputs, SimilarityViews

# method name -> "module:Class"; imported on demand so that a method's dependencies load only when used
METHODS = {
    "flattengpt": "flattengpt:FlattenGPT",
    "drop": "flattengpt:Drop",
    "flatten-only": "flattengpt:FlattenOnly",
    "shortgpt": "shortgpt:ShortGPT",
    "gromov": "gromov:Gromov",
    "sleb": "sleb:SLEB",
    "laco": "laco:LaCo",
    "slm": "slm:SLM",
    "replaceme": "replaceme:ReplaceMe",
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise MethodError(f"method {name!r} is not one of {', '.join(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def get_method(spec: dict) -> Method:
    """The method of a `methods:` entry ({"method": name, option: value, ...}), its options checked."""
    return method_class(spec["method"])(spec)


__all__ = ["METHODS", "Built", "BuildContext", "Method", "MethodError", "SearchInputs", "SimilarityViews",
           "get_method", "method_class"]
