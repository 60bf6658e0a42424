"""``kvbound policies``: every registered policy with its description, whether it is exact, its options with
their defaults and its paper -- all read from the registry (:mod:`kvbound.cache.registry`)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..cache.registry import PolicySpec, registered
from . import common

CAPABILITIES = ("needs_budget", "can_rollback", "can_draft", "beams", "reruns_model")


def add(sub) -> None:
    p = sub.add_parser("policies", help="list every policy: exact or lossy, options with defaults, paper",
                       description=__doc__.split("\n\n")[0].replace("``", "'"), formatter_class=common.FORMATTER)
    p.add_argument("--json", action="store_true", help="print one JSON object: policy name -> its entry")
    p.set_defaults(func=cmd_policies)


def options_of(spec: PolicySpec) -> dict[str, Any]:
    """The policy's options and their defaults, from its options dataclass."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(spec.options):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
        else:
            out[f.name] = None
    return out


def entry(spec: PolicySpec) -> dict[str, Any]:
    return {"exact": spec.exact, "description": spec.description, "options": options_of(spec),
            "paper": spec.paper or None, **{c: getattr(spec, c) for c in CAPABILITIES}}


def cmd_policies(args) -> int:
    specs = registered()
    if args.json:
        print(json.dumps({name: entry(spec) for name, spec in specs.items()}, default=str))
        return 0
    for name, spec in specs.items():
        caps = [c.replace("_", "-") for c in CAPABILITIES if getattr(spec, c)]
        print(f"{name}  [{'exact' if spec.exact else 'lossy'}{''.join(', ' + c for c in caps)}]")
        print(f"    {spec.description}")
        opts = options_of(spec)
        if opts:
            print("    options: " + ", ".join(f"{k}={v}" for k, v in opts.items()))
        if spec.paper:
            print(f"    paper: {spec.paper}")
    return 0
