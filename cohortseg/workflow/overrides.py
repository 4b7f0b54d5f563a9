"""Command-line config overrides that work: typed values inside nested ``--config`` entries.

``snakemake --config 'inference={"shard_size": 3}'`` parses a nested value with YAML's BaseLoader,
so every scalar inside it arrives as a string (``{'shard_size': '3'}``) and the JSON schema would
reject it (``'3' is not of type 'integer'``). :func:`coerce_config` walks the config along
``config/schemas/config.schema.yaml`` and turns such strings into what the schema asks for, where
the schema does not also accept a string:

* ``integer``: ``'3'`` -> 3;  ``number``: ``'0.4'`` -> 0.4, ``'2'`` -> 2;
* ``boolean``: ``'true'``/``'false'`` (also yes/no/on/off, any case);
* ``null``: ``'null'``, ``'~'`` or ``''``.

A string that does not parse is left alone, so validation still names the key; the message then
shows the working forms (:func:`override_hint`).
"""
from __future__ import annotations

import re

from cohortseg.schema import SCHEMA, load_schema

_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|nan)$", re.I)
_BOOL = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
_NULL = {"null", "~", ""}


def _types(schema: dict) -> list[str]:
    t = schema.get("type", [])
    return [t] if isinstance(t, str) else list(t)


def coerce_scalar(value: str, schema: dict):
    """`value` (a string) as the type `schema` wants, or unchanged when it wants a string too or
    the string does not parse as any of its types."""
    types = _types(schema)
    if not types or "string" in types:
        return value
    s = value.strip()
    if "null" in types and s.lower() in _NULL:
        return None
    if "boolean" in types and s.lower() in _BOOL:
        return _BOOL[s.lower()]
    if "integer" in types and _INT.match(s):
        return int(s)
    if "number" in types and _INT.match(s):
        return int(s)
    if "number" in types and _FLOAT.match(s):
        return float(s)
    return value


def coerce(value, schema: dict):
    """`value` with its number/boolean/null-like strings coerced along `schema` (recursively)."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, str):
        return coerce_scalar(value, schema)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return {k: coerce(v, props[k]) if k in props else v for k, v in value.items()}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [coerce(v, schema["items"]) for v in value]
    return value


def apply_defaults(value, schema: dict):
    """Fill in the schema's defaults, as validation with defaults does (every `properties` with a
    `default` that the value lacks, recursively through objects and array items); the schema has
    no $ref or *Of combinators (a test checks), so this walk is the same."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for k, sub in props.items():
            if isinstance(sub, dict) and "default" in sub:
                value.setdefault(k, sub["default"])
        for k, v in value.items():
            if k in props:
                apply_defaults(v, props[k])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for v in value:
            apply_defaults(v, schema["items"])
    return value


def validate_config(config: dict, check: bool = True, schema_path=SCHEMA) -> dict:
    """The workflow's config as every process uses it, in place: nested command-line strings
    coerced (:func:`coerce_config`), validated against the schema (`check`; the message names the
    key and shows the working command-line forms) and the schema's defaults filled in. A cluster
    job passes check=False: the main process validated the same config already, and the job
    only needs the same defaults (without importing jsonschema)."""
    schema = load_schema(schema_path)
    coerce_config(config, schema)
    apply_defaults(config, schema)
    if check:
        import jsonschema
        from jsonschema import Draft202012Validator

        from cohortseg.errors import ConfigError

        try:
            Draft202012Validator(schema).validate(config)
        except jsonschema.ValidationError as e:
            where = "/".join(map(str, e.absolute_path)) or "(top level)"
            raise ConfigError(override_hint(f"config invalid at {where}: {e.message}")) from None
    return config


def coerce_config(config: dict, schema: dict | None = None) -> dict:
    """Coerce `config` in place (the Snakefile's global config) and return it."""
    fixed = coerce(config, load_schema() if schema is None else schema)
    config.update(fixed)
    return config


def override_hint(message: str) -> str:
    """A validation message, plus the working command-line forms when a string was refused."""
    if not re.search(r"'[^']*' is not of type '(integer|number|boolean|null)'", message):
        return message
    return (message + "\nOn the command line, give numbers, booleans and null unquoted, top-level as "
            "--config max_voxels=300000000 and nested as --config 'inference={\"shard_size\": 3}' "
            "(number-like strings are converted where the schema wants a number); a value that still "
            "fails here is not a valid number/boolean/null.")
