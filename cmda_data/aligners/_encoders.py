"""Encoders that ``config.json`` can describe, rebuilt by ``ContrastiveAligner.load`` (private).

A plain stack of layers (``nn.Identity``, ``nn.Flatten``, ``nn.Linear``, ``nn.LayerNorm``,
``nn.BatchNorm1d``, ``nn.Dropout``, the usual activations, and ``nn.Sequential`` of them) is
saved as a JSON spec: each layer's name from the fixed table :data:`LAYERS` and its
constructor arguments; the weights stay in ``model.safetensors``. Loading rebuilds the stack
from that table only: nothing read from the file is imported or executed. Any other module
(a torchvision backbone, a class of your own) is not describable, and ``load`` asks for it
with ``encoders=``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..core._validation import fail

__all__ = ["LAYERS", "build_encoder", "describe_encoder", "describable_names"]


def _linear(m: nn.Linear) -> Dict[str, Any]:
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}


def _layer_norm(m: nn.LayerNorm) -> Dict[str, Any]:
    return {"normalized_shape": list(m.normalized_shape), "eps": m.eps, "elementwise_affine": m.elementwise_affine,
            "bias": getattr(m, "bias", None) is not None or not m.elementwise_affine}


def _batch_norm(m: nn.BatchNorm1d) -> Dict[str, Any]:
    return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine,
            "track_running_stats": m.track_running_stats}


#: layer name -> (class, its arguments as JSON, the checks of each argument when read back)
LAYERS: Dict[str, Tuple[type, Callable[[Any], Dict[str, Any]], Dict[str, str]]] = {
    "Identity": (nn.Identity, lambda m: {}, {}),
    "Flatten": (nn.Flatten, lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim},
                {"start_dim": "int", "end_dim": "int"}),
    "Linear": (nn.Linear, _linear, {"in_features": "count", "out_features": "count", "bias": "bool"}),
    "LayerNorm": (nn.LayerNorm, _layer_norm, {"normalized_shape": "counts", "eps": "float",
                                              "elementwise_affine": "bool", "bias": "bool"}),
    "BatchNorm1d": (nn.BatchNorm1d, _batch_norm, {"num_features": "count", "eps": "float", "momentum": "float?",
                                                  "affine": "bool", "track_running_stats": "bool"}),
    "Dropout": (nn.Dropout, lambda m: {"p": m.p}, {"p": "float"}),
    "ReLU": (nn.ReLU, lambda m: {}, {}),
    "GELU": (nn.GELU, lambda m: {"approximate": m.approximate}, {"approximate": "gelu"}),
    "SiLU": (nn.SiLU, lambda m: {}, {}),
    "Tanh": (nn.Tanh, lambda m: {}, {}),
    "Sigmoid": (nn.Sigmoid, lambda m: {}, {}),
    "LeakyReLU": (nn.LeakyReLU, lambda m: {"negative_slope": m.negative_slope}, {"negative_slope": "float"}),
}
_NAMES = {cls: name for name, (cls, _, _) in LAYERS.items()}


def describable_names() -> str:
    """The layers :func:`describe_encoder` knows, in words (for error messages and docs)."""
    return ", ".join(f"nn.{name}" for name in LAYERS) + " and nn.Sequential of them"


def describe_encoder(module: nn.Module) -> Optional[Dict[str, Any]]:
    """A JSON spec that rebuilds ``module`` (weights aside), or None when it is not a plain stack.

    Only the exact classes of :data:`LAYERS` and ``nn.Sequential`` count (a subclass may change
    ``forward``). Frozen modules (parameters without ``requires_grad``) are recorded as such.

    Examples:
        >>> describe_encoder(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)))["children"][1]
        ['1', {'layer': 'Linear', 'args': {'in_features': 12, 'out_features': 4, 'bias': True}}]
        >>> describe_encoder(nn.Conv2d(3, 8, 3)) is None
        True
    """
    if type(module) is nn.Sequential:
        children = []
        for name, child in module.named_children():
            spec = describe_encoder(child)
            if spec is None:
                return None
            children.append([name, spec])
        spec: Dict[str, Any] = {"layer": "Sequential", "children": children}
    elif type(module) in _NAMES:
        name = _NAMES[type(module)]
        spec = {"layer": name, "args": LAYERS[name][1](module)}
    else:
        return None
    params = list(module.parameters(recurse=False))
    if params and not any(p.requires_grad for p in params):
        spec["frozen"] = True
    return spec


def _check_arg(where: str, kind: str, value: Any) -> Any:
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "count": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
          "bool": lambda v: isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
          "float?": lambda v: v is None or isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
          "counts": lambda v: isinstance(v, list) and v and all(isinstance(x, int) and x >= 1 for x in v),
          "gelu": lambda v: v in ("none", "tanh")}[kind]
    if not ok(value):
        fail(where, {"int": "an integer", "count": "an integer >= 1", "bool": "true or false",
                     "float": "a finite number >= 0", "float?": "null or a number >= 0",
                     "counts": "a list of integers >= 1", "gelu": "'none' or 'tanh'"}[kind], value)
    return tuple(value) if kind == "counts" else value


def _build(spec: Any, where: str) -> nn.Module:
    if not isinstance(spec, dict) or not isinstance(spec.get("layer"), str):
        fail(where, "an encoder spec {'layer': name, ...} written by ContrastiveAligner.save", spec)
    layer = spec["layer"]
    if layer == "Sequential":
        children = spec.get("children")
        if not isinstance(children, list) or not all(
                isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and c[0] and "." not in c[0]
                for c in children):
            fail(f"{where}.children", "a list of [name, spec] pairs", children)
        module: nn.Module = nn.Sequential()
        for k, (name, child) in enumerate(children):
            module.add_module(name, _build(child, f"{where}.children[{k}]"))
    elif layer in LAYERS:
        cls, _, checks = LAYERS[layer]
        args = spec.get("args", {})
        if not isinstance(args, dict) or set(args) - set(checks):
            fail(f"{where}.args", f"arguments of nn.{layer} among {sorted(checks)}", args)
        module = cls(**{key: _check_arg(f"{where}.args.{key}", checks[key], value) for key, value in args.items()})
    else:
        fail(f"{where}.layer", "one of Sequential, " + ", ".join(LAYERS), layer)
    if spec.get("frozen", False) is True:
        module.requires_grad_(False)
    return module


def build_encoder(spec: Any, where: str) -> nn.Module:
    """Rebuild the module described by :func:`describe_encoder` (fresh weights, global RNG untouched).

    ``where`` names the spec in error messages (the file and key it came from).

    Examples:
        >>> encoder = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU())
        >>> rebuilt = build_encoder(describe_encoder(encoder), "config.json")
        >>> rebuilt
        Sequential(
          (0): Flatten(start_dim=1, end_dim=-1)
          (1): Linear(in_features=12, out_features=4, bias=True)
          (2): ReLU()
        )
    """
    with torch.random.fork_rng(devices=[]):  # the initial weights are replaced by the saved ones
        return _build(spec, where)
