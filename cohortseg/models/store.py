"""Model store: resolves every file a card names, verifies checksums, downloads when allowed."""
from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

from cohortseg.models.cards import ModelCard
from cohortseg.errors import ModelError
from cohortseg.io import atomic_path, git_blob_sha1, md5sum, sha256sum, tree_md5, write_json_atomic


#: the checksums a card's file entry may carry, in order of preference: (function, name, what a mismatch
#: means); git_blob_sha1 is a file known by its upstream git blob id (git hash-object)
FILE_CHECKSUMS = {
    "sha256": (sha256sum, "sha256", "the file is corrupt or not the model the card describes"),
    "git_blob_sha1": (git_blob_sha1, "git blob", "the file is truncated, corrupt (e.g. a git-lfs pointer) or not the "
                                                 "model the card describes"),
    "md5": (md5sum, "md5", "the file is corrupt or not the model the card describes"),
}


class ModelStore:
    """Files live under `model_dir` at each card's relative `file` path (bundles: beside their card).

    Verified checksums are remembered in `<model_dir or cache>/.verified.json` keyed by path, size and
    mtime, so a cluster job does not re-hash hundreds of MB of weights.
    """

    def __init__(self, model_dir, allow_download: bool = False, cache_file=None):
        self.model_dir = Path(model_dir).resolve()
        self.allow_download = allow_download
        self.cache_file = Path(cache_file) if cache_file else None
        self._verified = self._load_cache()

    @classmethod
    def from_config(cls, config: dict) -> ModelStore:
        """The run's store: `model_dir`, `allow_download`, verified checksums cached under the work folder."""
        work = Path(config["output_dir"]) / "work" if config.get("output_dir") else None
        return cls(config.get("model_dir", "models"), allow_download=config.get("allow_download", False),
                   cache_file=work / "model_checksums.json" if work else None)

    # -- checksums --------------------------------------------------------------------------
    def _load_cache(self) -> dict:
        if self.cache_file and self.cache_file.is_file():
            try:
                return json.loads(self.cache_file.read_text())
            except (OSError, ValueError):
                return {}
        return {}

    def _save_cache(self) -> None:
        if self.cache_file:
            try:
                write_json_atomic(self.cache_file, self._verified)
            except OSError:
                pass  # a read-only cache location only costs re-hashing

    def _check(self, path: Path, entry: dict, card: ModelCard) -> str:
        st = path.stat()
        key = f"{path}|{st.st_size}|{int(st.st_mtime)}"
        if key in self._verified:
            return self._verified[key]
        if path.is_dir():  # SavedModel folds: md5 over the folder's files (SHIVA's convention)
            if "md5" in entry:
                got = tree_md5(path)
                if got.lower() != entry["md5"].lower():
                    raise ModelError(f"model '{card.name}': checksum mismatch for folder {path} "
                                     f"(md5 {got}, card says {entry['md5']})")
            digest = _dir_digest(path)
        else:
            kind = next((k for k in FILE_CHECKSUMS if k in entry), None)
            if kind is not None:
                fn, name, meaning = FILE_CHECKSUMS[kind]
                got = fn(path)
                if got.lower() != entry[kind].lower():
                    raise ModelError(f"model '{card.name}': checksum mismatch for {path} ({name} {got}, card says "
                                     f"{entry[kind]}); {meaning}")
            digest = got if kind == "sha256" else sha256sum(path)
        self._verified[key] = digest
        return digest

    # -- resolution -------------------------------------------------------------------------
    def path_of(self, card: ModelCard, entry: dict) -> Path:
        base = card.base_dir if card.base_dir is not None else self.model_dir
        return (base / entry["file"]).resolve()

    def fetch(self, card: ModelCard, entry: dict) -> Path:
        path = self.path_of(card, entry)
        if not path.exists():
            url = entry.get("url")
            if not (self.allow_download and url):
                if entry.get("manual_url"):  # a share page / archive: a person downloads and unpacks it
                    hint = f"download the bundle from {entry['manual_url']} and unpack it into model_dir"
                else:
                    hint = f"download it from {url} or set allow_download: true" if url else "no url in the card"
                raise ModelError(f"model '{card.name}': file {path} is missing ({hint}; model_dir={self.model_dir})")
            _download(url, path)
        return path

    def resolve(self, card: ModelCard) -> list[dict]:
        """For every fold: {'path', 'sha256', 'extra': [paths], 'fold': entry}. Raises ModelError."""
        out = []
        for entry in card.folds:
            path = self.fetch(card, entry)
            digest = self._check(path, entry, card)
            extra = []
            for x in entry.get("extra_files", []):
                xp = self.fetch(card, x)
                self._check(xp, x, card)
                extra.append(xp)
            out.append({"path": path, "sha256": digest, "extra": extra, "fold": entry})
        self._save_cache()
        return out

    def verify(self, cards) -> dict[str, list[str]]:
        """Check every card's files; returns name -> [sha256 per fold] (provenance)."""
        return {c.name: [f["sha256"] for f in self.resolve(c)] for c in cards}


def _dir_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(sha256sum(p).encode())
    return h.hexdigest()


def _download(url: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as r, atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
    except OSError as e:
        raise ModelError(f"cannot download {url} to {path}: {e}") from None
    os.chmod(path, 0o644)
