"""Fake BIDS trees of empty files, for dry-run tests and planning benchmarks (never for real runs)."""
from __future__ import annotations

from pathlib import Path


def make_fake_bids(root, n_subjects: int, contrasts=("T1w", "T2starw", "swi"), session_every: int = 3,
                   n_sessions: int = 2) -> Path:
    """Every `session_every`-th participant gets `n_sessions` sessions, the others none."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "fake", "BIDSVersion": "1.9.0"}\n')
    for i in range(n_subjects):
        sub = f"sub-{i + 1:05d}"
        sessions = [f"ses-{s + 1:02d}" for s in range(n_sessions)] if session_every and i % session_every == 0 else [""]
        for ses in sessions:
            anat = root / sub / ses / "anat" if ses else root / sub / "anat"
            anat.mkdir(parents=True, exist_ok=True)
            stem = f"{sub}_{ses}" if ses else sub
            for c in contrasts:
                (anat / f"{stem}_{c}.nii.gz").touch()
    return root
