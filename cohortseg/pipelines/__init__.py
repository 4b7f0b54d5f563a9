"""Pipeline registry: the one list of pipelines. Modules are imported lazily so planning never
imports TensorFlow. Adding a pipeline = one module + one entry here + its config-schema section + a
model card (a test checks that the schema agrees with this registry)."""
from __future__ import annotations

import hashlib
import importlib
import re
from functools import lru_cache
from pathlib import Path

from cohortseg.errors import ConfigError

REGISTRY = {
    "sc_gm": "cohortseg.pipelines.sc_gm:ScGm",
    "sc_csa": "cohortseg.pipelines.sc_csa:ScCsa",
    "brain_tissue": "cohortseg.pipelines.brain_tissue:BrainTissue",
    "cmb": "cohortseg.pipelines.cmb:Cmb",
    "wmh": "cohortseg.pipelines.wmh:Wmh",
}
#: the net loaders (cohortseg.models.loaders) each pipeline's cards may name: loaders are imported by
#: name, so code_version adds their modules here
LOADERS_USED = {
    "sc_gm": ("gmseg_weights", "keras_full"),
    "sc_csa": ("keras_full",),
    "brain_tissue": ("tfjs_layers", "deepwmh_torch", "keras_full"),
    "cmb": ("savedmodel", "keras_full", "tfjs_layers", "deepwmh_torch"),
    "wmh": ("deepwmh_torch", "savedmodel", "keras_full", "tfjs_layers"),
}
_cache: dict = {}
_PACKAGE = Path(__file__).resolve().parents[1]


def get_pipeline(name: str):
    if name not in _cache:
        if name not in REGISTRY:
            raise ConfigError(f"unknown pipeline '{name}'; known: {', '.join(REGISTRY)}")
        mod, cls = REGISTRY[name].split(":")
        _cache[name] = getattr(importlib.import_module(mod), cls)()
    return _cache[name]


@lru_cache(maxsize=None)
def code_version(name: str) -> str:
    """Digest of the source of pipeline `name`'s module and of every cohortseg module it imports,
    directly or through others (imports inside functions included), and the modules of the net loaders
    its cards may name (`LOADERS_USED`). It enters every item's stamp,
    the steps' params and the provenance: after a change to that code, `reuse` recomputes the items
    of the pipelines that depend on it, and only those. Read from the source files, without importing."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown pipeline '{name}'; known: {', '.join(REGISTRY)}")
    from cohortseg.models.loaders import LOADERS

    todo, seen = [REGISTRY[name].split(":")[0], *(LOADERS[n].split(":")[0] for n in LOADERS_USED[name])], {}
    while todo:
        mod = todo.pop()
        if mod in seen or (found := _module(mod)) is None:
            continue
        seen[mod], imports = found
        todo += imports
    h = hashlib.sha1()
    for mod in sorted(seen):
        h.update(mod.encode() + b"\0" + seen[mod] + b"\0")
    return h.hexdigest()[:16]


@lru_cache(maxsize=None)
def _module(mod: str) -> tuple[bytes, list[str]] | None:
    """(source, imported cohortseg modules) of a cohortseg module; None for other names."""
    parts = mod.split(".")
    if parts[0] != "cohortseg":
        return None
    base = _PACKAGE.joinpath(*parts[1:])
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            source = p.read_bytes()
            return source, _imported(mod, source, p.name == "__init__.py")
    return None


_IMPORT = re.compile(rb"^[ \t]*(?:from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#]+)|import[ \t]+([^\n#]+))", re.M)


def _imported(mod: str, source: bytes, is_package: bool) -> list[str]:
    """cohortseg modules named by the import statements of one module (and its parent packages).
    A regular expression over the source (an AST is ~10x slower, and this runs at every parse)."""
    names = [".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)]  # parent __init__ files
    package = mod if is_package else mod.rpartition(".")[0]
    for m in _IMPORT.finditer(source):
        if m.group(3):
            names += [a.split()[0] for a in m.group(3).decode().split(",") if a.strip()]
            continue
        base = m.group(1).decode()
        level = len(base) - len(base.lstrip("."))
        if level:
            up = package.split(".")[: len(package.split(".")) - level + 1]
            base = ".".join(up + ([base.lstrip(".")] if base.lstrip(".") else []))
        names.append(base)
        names += [f"{base}.{a.split()[0]}" for a in m.group(2).decode().strip("()").split(",") if a.strip()]
    return [n for n in names if n.startswith("cohortseg")]
