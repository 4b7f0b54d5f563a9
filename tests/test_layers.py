"""The package's layering as docs/ARCHITECTURE.md draws it: workflow -> pipelines -> models -> science ->
schema/io/errors (qc beside science, training beside pipelines), no module importing another module's
`_private` names, no import cycle; imports inside functions count (they are code the importer runs)."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cohortseg"
#: a module may import its own layer or any layer with a higher number
LAYERS = {"cli": 0, "__main__": 0, "demo": 0, "workflow": 0, "fakebids": 0,
          "pipelines": 1, "training": 1, "models": 2, "qc": 3, "science": 3,
          "schema": 4, "io": 4, "errors": 4, "__init__": 5}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = p
    return out


def _imports(mods: dict) -> dict[str, list[tuple[str, str]]]:
    """module -> [(imported module, imported name or '')] for every cohortseg import in it."""
    out = {}
    for m, p in mods.items():
        found = []
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cohortseg"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    found.append((full, "") if full in mods else (node.module, a.name))
            elif isinstance(node, ast.Import):
                found += [(a.name, "") for a in node.names if a.name.startswith("cohortseg")]
        out[m] = found
    return out


MODS = _modules()
IMPORTS = _imports(MODS)


def _layer(mod: str) -> int:
    parts = mod.split(".")
    return LAYERS["__init__"] if len(parts) == 1 else LAYERS[parts[1]]


def test_nothing_imports_from_a_layer_above():
    bad = [f"{m} imports {t}" for m, imps in IMPORTS.items() for t, _ in imps if _layer(t) < _layer(m)]
    assert bad == []


def test_no_module_imports_another_modules_private_names():
    bad = [f"{m} imports {t}.{n}" for m, imps in IMPORTS.items() for t, n in imps
           if n.startswith("_") and not n.startswith("__") and t != m]
    assert bad == []


def test_no_import_cycle():
    graph = {m: {t if t in MODS else t.rsplit(".", 1)[0] for t, _ in imps} & set(MODS) - {m}
             for m, imps in IMPORTS.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 2:
            return
        if state.get(m) == 1:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        state[m] = 1
        for t in sorted(graph[m]):
            visit(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_pipelines_holds_the_pipelines_only():
    from cohortseg.pipelines import REGISTRY

    names = {p.stem for p in (PKG / "pipelines").glob("*.py")} - {"__init__", "base"}
    assert names == {v.split(":")[0].rsplit(".", 1)[1] for v in REGISTRY.values()}


def test_no_two_modules_share_a_name():
    """e.g. the deep-T1-WMH nets (models/nets/deepwmh_torch) and their science (science/deepwmh)."""
    stems = [p.stem for p in PKG.rglob("*.py") if not p.stem.startswith("__")]
    assert sorted(s for s in stems if stems.count(s) > 1) == []


def test_every_default_or_shipped_card_loader_is_counted_in_its_pipelines_code_version():
    """Loaders are imported by name, so code_version counts the loader modules LOADERS_USED names: those
    of every pipeline's default cards and of the shipped cards that name the pipeline."""
    from cohortseg.models.cards import REPO_ROOT, find_card, load_card
    from cohortseg.pipelines import LOADERS_USED, REGISTRY
    from cohortseg.schema import defaults

    cards = [(p, find_card(name)) for p in REGISTRY for name in defaults(p)["models"]]
    cards += [(c["pipeline"], c) for c in map(load_card, (REPO_ROOT / "config" / "models").rglob("*.yaml"))]
    assert {c["pipeline"] for _, c in cards} <= set(REGISTRY)
    assert [(p, c.name) for p, c in cards if c["architecture"]["loader"] not in LOADERS_USED[p]] == []
