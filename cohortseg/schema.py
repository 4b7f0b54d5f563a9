"""The workflow's config schema (``config/schemas/config.schema.yaml``): the one place every default
lives. The workflow validates a run's config against it and fills its defaults in
(:mod:`cohortseg.workflow.overrides`); the package reads a default here, never from a copy."""
from __future__ import annotations

import functools
from pathlib import Path

SCHEMA = Path(__file__).resolve().parents[1] / "config" / "schemas" / "config.schema.yaml"


def load_schema(path=SCHEMA) -> dict:
    import yaml

    with open(path) as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml: 5x faster


def defaults(*keys: str) -> dict:
    """The defaults of the object at `keys` in the schema (e.g. ``defaults("cmb")``,
    ``defaults("cmb", "anatomy")``): {property: default} for the properties that have one."""
    import copy

    return copy.deepcopy(_defaults(keys))


def with_defaults(pipeline: str, cfg: dict | None) -> dict:
    """A pipeline's config section with the schema's defaults under it (an object such as `filters`
    merged key by key): the workflow passes a complete section, tests and benchmarks may pass a part."""
    out = defaults(pipeline)
    for k, v in (cfg or {}).items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@functools.lru_cache(maxsize=None)
def _defaults(keys: tuple) -> dict:
    node = _cached()
    for k in keys:
        node = node["properties"][k]
    return {k: v["default"] for k, v in node.get("properties", {}).items() if isinstance(v, dict) and "default" in v}


@functools.lru_cache(maxsize=1)
def _cached() -> dict:
    return load_schema()
