"""Pipeline registry: the one list of pipelines. Modules are imported lazily so planning never
imports TensorFlow. Adding a pipeline = one module + one entry here + its config-schema section + a
model card (a test checks that the schema agrees with this registry)."""
from __future__ import annotations

import ast
import hashlib
import importlib
import json
import os
import sys
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
#: the net loaders (cohortseg.models.loaders) each pipeline's code accepts: loaders are imported by
#: name, so code_version adds their modules here. More than its default cards name (a test checks those
#: and the shipped cards of each pipeline are covered): the alternatives its schema offers, e.g. cmb's
#: brainchop_mindgrab (tfjs_layers), wmh's SHIVA cards (savedmodel, keras_full), trained bundles (keras_full)
LOADERS_USED = {
    "sc_gm": ("gmseg_weights", "keras_full"),
    "sc_csa": ("keras_full",),
    "brain_tissue": ("tfjs_layers", "deepwmh_torch", "keras_full"),
    "cmb": ("savedmodel", "keras_full", "tfjs_layers", "deepwmh_torch"),
    "wmh": ("deepwmh_torch", "savedmodel", "keras_full", "tfjs_layers"),
}
_cache: dict = {}
_PACKAGE = Path(__file__).resolve().parents[1]
#: the cache of _module's parses, one per Python (ast.dump's format is the interpreter's)
_DIGESTS = f"code_digests.{sys.implementation.cache_tag}.json"


def get_pipeline(name: str):
    if name not in _cache:
        if name not in REGISTRY:
            raise ConfigError(f"unknown pipeline '{name}'; known: {', '.join(REGISTRY)}")
        mod, cls = REGISTRY[name].split(":")
        _cache[name] = getattr(importlib.import_module(mod), cls)()
    return _cache[name]


def code_version(name: str, package: Path = _PACKAGE) -> str:
    """Digest of the code pipeline `name` runs: its module, every cohortseg module it imports,
    directly or through others (imports inside functions included), and the modules of the net loaders
    its cards may name (`LOADERS_USED`). Each module counts by its syntax tree without docstrings, so an
    edit of a docstring, a comment or the formatting changes no version. It enters every item's stamp,
    the steps' params and the provenance: after a change to that code, `reuse` recomputes the items
    of the pipelines that depend on it, and only those. Read from the source files under `package`
    (the installed cohortseg; a copy in tests), without importing them."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown pipeline '{name}'; known: {', '.join(REGISTRY)}")
    return _version(name, Path(package))


@lru_cache(maxsize=None)
def _version(name: str, package: Path) -> str:
    from cohortseg.models.loaders import LOADERS

    cache = _digests(package)
    known = len(cache)
    todo, seen = [REGISTRY[name].split(":")[0], *(LOADERS[n].split(":")[0] for n in LOADERS_USED[name])], {}
    while todo:
        mod = todo.pop()
        if mod in seen or (found := _module(mod, package, cache)) is None:
            continue
        seen[mod], imports = found
        todo += imports
    if len(cache) > known:
        _save_digests(package, cache)
    h = hashlib.sha1()
    for mod in sorted(seen):
        h.update(mod.encode() + b"\0" + seen[mod].encode() + b"\0")
    return h.hexdigest()[:16]


def _module(mod: str, package: Path, cache: dict) -> tuple[str, list[str]] | None:
    """(digest of the code, imported cohortseg modules) of a cohortseg module; None for other names.
    Parsing is ~20x slower than reading, so the answer is kept in `cache` under the source's hash."""
    parts = mod.split(".")
    if parts[0] != "cohortseg":
        return None
    base = package.joinpath(*parts[1:])
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            source = p.read_bytes()
            key = hashlib.sha1(f"{mod}:{p.name}:".encode() + source).hexdigest()
            if key not in cache:
                tree = ast.parse(source, str(p))
                imports = _imported(mod, tree, p.name == "__init__.py")
                cache[key] = [hashlib.sha1(ast.dump(tree).encode()).hexdigest(), imports]
            return cache[key][0], cache[key][1]
    return None


@lru_cache(maxsize=None)
def _digests(package: Path) -> dict:
    """The parsed modules' digests (source hash -> [digest, imports]) kept beside Python's bytecode."""
    try:
        return json.loads((package / "__pycache__" / _DIGESTS).read_text())
    except (OSError, ValueError):
        return {}


def _save_digests(package: Path, cache: dict) -> None:
    """Written whole and renamed into place (parallel jobs); a read-only install just parses again."""
    path = package / "__pycache__" / _DIGESTS
    try:
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)
    except OSError:
        pass


def _imported(mod: str, tree: ast.Module, is_package: bool) -> list[str]:
    """cohortseg modules named by the import statements of one module (and its parent packages). Drops
    the module's string statements (docstrings: they do nothing) from `tree` on the way."""
    names = [".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)]  # parent __init__ files
    package = mod if is_package else mod.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names += [base, *(f"{base}.{a.name}" for a in node.names)]
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if isinstance(body, list) and any(_is_string(s) for s in body):
                body[:] = [s for s in body if not _is_string(s)] or [ast.Pass()]
    return [n for n in names if n.startswith("cohortseg")]


def _is_string(node) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
