"""Model cards: one YAML per model, validated against config/schemas/model_card.schema.yaml."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from cohortseg.errors import ModelError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
REPO_ROOT = PACKAGE_ROOT.parent
CARDS_DIR = REPO_ROOT / "config" / "models"
CARD_SCHEMA = REPO_ROOT / "config" / "schemas" / "model_card.schema.yaml"


@dataclass(frozen=True)
class ModelCard:
    """A parsed model card. `base_dir` is where relative fold files of a bundle live (None: model store)."""

    data: dict
    source: Path
    base_dir: Path | None = None
    fold_selection: tuple = field(default=())

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def pipeline(self) -> str:
        return self.data["pipeline"]

    @property
    def folds(self) -> list[dict]:
        folds = self.data["folds"]
        if self.fold_selection:
            folds = [folds[i] for i in self.fold_selection]
        return folds

    def get(self, key, default=None):
        return self.data.get(key, default)

    def __getitem__(self, key):
        return self.data[key]


@lru_cache(maxsize=1)
def _schema() -> dict:
    return yaml.safe_load(CARD_SCHEMA.read_text())


def validate_card(data: dict, source) -> None:
    import jsonschema

    try:
        jsonschema.validate(data, _schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ModelError(f"model card {source}: {where}: {e.message}") from None


def load_card(path) -> ModelCard:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ModelError(f"cannot read model card {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"model card {path} is not a mapping")
    validate_card(data, path)
    # A card inside a trained bundle names its fold files relative to itself.
    base = path.parent if path.name == "card.yaml" else None
    return ModelCard(data=data, source=path, base_dir=base)


def card_paths(extra_dirs=()) -> dict[str, Path]:
    """name -> card file, from config/models plus extra folders (later folders win).

    A folder may hold cards (*.yaml) or bundles (sub-folders with card.yaml).
    """
    found: dict[str, Path] = {}
    for d in [CARDS_DIR, *[Path(x) for x in extra_dirs if x]]:
        if not d.is_dir():
            continue
        for p in sorted(d.glob("*.yaml")) + sorted(d.glob("*/card.yaml")):
            name = p.parent.name if p.name == "card.yaml" else p.stem
            found[name] = p
    return found


def find_card(name_or_path: str, extra_dirs=()) -> ModelCard:
    """A card by name (config/models, extra dirs) or by path (a card file or a bundle folder)."""
    p = Path(name_or_path)
    if p.suffix == ".json" and p.is_file():  # a SHIVA model_info_*.json registers a model as is
        from cohortseg.models.shiva import card_from_model_info

        data = card_from_model_info(p)
        validate_card(data, p)
        return ModelCard(data=data, source=p)
    if p.is_dir() and (p / "card.yaml").is_file():
        return load_card(p / "card.yaml")
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return load_card(p)
    paths = card_paths(extra_dirs)
    if name_or_path not in paths:
        raise ModelError(
            f"unknown model card '{name_or_path}'; known: {', '.join(sorted(paths)) or 'none'} "
            f"(cards live in {CARDS_DIR} or model_cards_dir; a bundle folder path also works)"
        )
    return load_card(paths[name_or_path])


def pipeline_cards(config: dict, pipeline: str) -> list[ModelCard]:
    """The cards a pipeline's config section names (`<pipeline>.models`)."""
    names = (config.get(pipeline) or {}).get("models", [])
    extra = [config["model_cards_dir"]] if config.get("model_cards_dir") else []
    return [find_card(n, extra) for n in names]
