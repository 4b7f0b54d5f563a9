"""Shared by the benchmark scripts: print the figures and write them as JSON."""
import json
import sys
from pathlib import Path

#: the repository (put first on sys.path: the scripts measure this checkout's package) and ../shared
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def emit(result: dict, out) -> dict:
    print(json.dumps(result, indent=2))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result
