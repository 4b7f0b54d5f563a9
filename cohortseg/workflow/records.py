"""Session and item records: the one shape (and the one reader/writer) of what the steps write per
session (`work/prep/<session>.json` by prepare, `work/records/<session>.json` by finalize) and
what the aggregate and the QC page read.

Status vocabulary of an item (and, summarised, of a pipeline and a session in summary.csv):

* ``ok``: measured.
* ``failed``: a data or processing problem (corrupt file, empty mask, inference error, ...);
  ``error`` says which and why.
* ``refused``: the image does not show the pipeline's anatomy (a brain scan given to a cord
  pipeline, a cord scan given to a brain pipeline, a field of view that misses the structure);
  ``error`` names the criterion that failed. Outputs written before the refusal are kept for QC.
* ``no_input``: nothing matching the pipeline's inputs was acquired for the session. Not an error:
  no ``error`` text, and it does not count in the session's overall status.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from cohortseg.errors import AnatomyError, InputError
from cohortseg.io import write_json_atomic

log = logging.getLogger("cohortseg")

OK, FAILED, REFUSED, NO_INPUT = "ok", "failed", "refused", "no_input"
#: the item statuses, and the two more a pipeline or session can summarise to
ITEM_STATUSES = (OK, FAILED, REFUSED, NO_INPUT)
PARTIAL = "partial"
#: one line per status, for the README and the QC page's status filter
STATUS_HELP = {
    OK: "measured",
    PARTIAL: "some of the images with input were measured, others failed or were refused",
    FAILED: "data or processing problem (see error)",
    REFUSED: "wrong anatomy for the pipeline (see error: the failed criterion)",
    NO_INPUT: "nothing matching was acquired: not an error",
}
#: manifest status of a session x pipeline row -> item status
_DISCOVERY_STATUS = {"ok": OK, "missing": NO_INPUT, "ambiguous": FAILED}


@dataclass
class ItemRecord:
    """One item (one input image of a pipeline) of a session. ``contrast`` is
    :attr:`cohortseg.pipelines.base.Item.contrast` (names the per-contrast columns and table rows)."""

    status: str
    stage: str = ""  # discovery | prepare | inference | finalize | workflow (where a failure happened)
    error: str = ""
    contrast: str = ""
    stamp: str = ""
    prep: str = ""  # the prepared input (npz)
    warnings: list = field(default_factory=list)
    seconds: float | None = None  # prepare
    finalize_seconds: float | None = None
    metrics: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # output key -> path
    sanity_flags: list = field(default_factory=list)
    checks: dict = field(default_factory=dict)  # anatomy criteria measured (cohortseg.science.anatomy)

    @property
    def ok(self) -> bool:
        return self.status == OK

    @classmethod
    def from_dict(cls, d: dict) -> ItemRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_error(cls, stage: str, exc: BaseException, who: str = "", contrast: str = "") -> ItemRecord:
        """The record of a failure (``refused`` for an :class:`AnatomyError`), logged once.
        An InputError names its file; ``who`` (session and pipeline) goes to the log."""
        if isinstance(exc, InputError):
            msg = exc.reason + (f" (file: {exc.path})" if exc.path else "")
            status = REFUSED if isinstance(exc, AnatomyError) else FAILED
            log.error("%s: %s %s: %s", who, stage, status, msg)
        else:
            msg, status = f"{type(exc).__name__}: {exc}", FAILED
            log.error("%s: %s failed unexpectedly: %s\n%s", who, stage, msg, traceback.format_exc())
        return cls(status=status, stage=stage, error=msg, contrast=contrast)

    def write(self, path) -> None:
        """As its own file (the record beside an inference output)."""
        write_json_atomic(path, dataclasses.asdict(self))

    @classmethod
    def read(cls, path) -> ItemRecord | None:
        try:
            d = json.loads(Path(path).read_text())
            return cls.from_dict(d) if "status" in d else None
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    @classmethod
    def from_discovery(cls, row: dict) -> ItemRecord:
        """A manifest row that is not an item to process: no input (not an error) or ambiguous."""
        status = _DISCOVERY_STATUS.get(row["status"], FAILED)
        return cls(status=status, stage="discovery", error="" if status == NO_INPUT else row["error"])


@dataclass
class SessionRecord:
    participant_id: str
    session_id: str = ""
    #: pipeline -> item name ('-' for a session x pipeline without item) -> record
    pipelines: dict = field(default_factory=dict)
    cohortseg_version: str = ""
    finished: str = ""

    def items(self, pipeline: str) -> dict[str, ItemRecord]:
        return self.pipelines.setdefault(pipeline, {})

    # -- status -------------------------------------------------------------------------------
    def pipeline_status(self, pipeline: str) -> str | None:
        """ok / partial / failed / refused over the items with input; no_input when none had any;
        None when the pipeline is not in the record."""
        items = self.pipelines.get(pipeline)
        if items is None:
            return None
        return summarise([it.status for it in items.values()])

    def status(self, pipelines) -> str:
        """The session's overall status, over the items of the pipelines that had input."""
        return summarise([it.status for p in pipelines for it in self.pipelines.get(p, {}).values()])

    # -- I/O ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.finished:
            d.pop("finished")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SessionRecord:
        return cls(participant_id=d["participant_id"], session_id=d.get("session_id", "") or "",
                   pipelines={p: {n: ItemRecord.from_dict(it) for n, it in items.items()}
                              for p, items in (d.get("pipelines") or {}).items()},
                   cohortseg_version=d.get("cohortseg_version", ""), finished=d.get("finished", ""))

    def write(self, path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def read(cls, path) -> SessionRecord | None:
        """The record at `path`, or None when it is missing or unreadable (recomputed then)."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def summarise(statuses) -> str:
    """Summary of item statuses: no_input items do not count; none left -> no_input; all ok -> ok;
    some ok -> partial; all refused -> refused; else failed."""
    had = [s for s in statuses if s != NO_INPUT]
    if not had:
        return NO_INPUT
    if all(s == OK for s in had):
        return OK
    if OK in had:
        return PARTIAL
    return REFUSED if all(s == REFUSED for s in had) else FAILED
