"""The policy registry: what each policy is called, how to build it and what it promises.

Every policy module registers its cache class with :func:`register`; callers look policies
up with :func:`get_policy` / :func:`registered` and read capabilities from the
:class:`PolicySpec` instead of probing objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import KVBoundError


@dataclass
class NoOptions:
    """Options dataclass for policies that take none."""


@dataclass(frozen=True)
class PolicySpec:
    """A registered policy: how to build it, its options and what it can do.

    * ``exact`` -- greedy output is token-identical to the full cache at any budget;
    * ``needs_budget`` -- ``make_cache`` requires a budget;
    * ``can_rollback`` -- ``truncate``/``crop`` forget recent tokens (speculative verification);
    * ``can_draft`` -- its layers can restart from an exact hot window (``adopt_recent``), so it
      can draft for :mod:`kvbound.speculative`;
    * ``beams`` -- supports beam search and batch reordering (``reorder_cache``,
      ``batch_select_indices``, ``batch_repeat_interleave``);
    * ``reruns_model`` -- every forward pass re-runs the model's layers over the whole evicted
      span, so its cost grows with the context (benches cap the lengths it runs at);
    * ``paper`` -- the method's paper as ``"Authors Year, URL"`` (empty for kvbound's own policies).
    """

    name: str
    description: str
    build: Callable[..., Any]
    exact: bool
    needs_budget: bool = True
    options: type = NoOptions
    can_rollback: bool = False
    can_draft: bool = False
    beams: bool = False
    reruns_model: bool = False
    paper: str = ""


_REGISTRY: dict[str, PolicySpec] = {}


def register(name: str, description: str, *, exact: bool, needs_budget: bool = True, options: type = NoOptions,
             can_rollback: bool = False, can_draft: bool = False, beams: bool = False, reruns_model: bool = False,
             paper: str = ""):
    """Class decorator: register a cache class under ``name``.

    The class must accept ``(model, budget, **options)``; ``options`` is the dataclass its
    options are parsed into (:func:`parse_options`).
    """

    def deco(cls):
        if name in _REGISTRY:
            raise RuntimeError(f"policy {name!r} registered twice")
        _REGISTRY[name] = PolicySpec(name, description, cls, exact, needs_budget, options,
                                     can_rollback, can_draft, beams, reruns_model, paper)
        cls.policy_name = name
        return cls

    return deco


def get_policy(name: str) -> PolicySpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KVBoundError(
            f"unknown policy {name!r}; valid policies: {', '.join(sorted(_REGISTRY))}"
        ) from None


def registered() -> dict[str, PolicySpec]:
    return dict(sorted(_REGISTRY.items()))


def exact_policies() -> list[str]:
    """Names of the registered exact policies (what exactness tests parametrize over)."""
    return [name for name, spec in registered().items() if spec.exact]


def rerunning_policies() -> list[str]:
    """Names of the policies whose every forward re-runs the model over the evicted span
    (``reruns_model``: benches cap the lengths they run them at)."""
    return [name for name, spec in registered().items() if spec.reruns_model]


def parse_options(cls: type, options: dict[str, Any], policy: str):
    """Build the policy's options dataclass, with a clear error for unknown names."""
    names = {f for f in cls.__dataclass_fields__}
    unknown = set(options) - names
    if unknown:
        valid = ", ".join(sorted(names)) or "none"
        raise KVBoundError(f"policy {policy!r} got unknown option(s) {sorted(unknown)}; valid options: {valid}")
    return cls(**options)
