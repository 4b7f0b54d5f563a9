"""Shared by the benchmark scripts: print the figures and write them as JSON."""
import json
from pathlib import Path


def emit(result: dict, out) -> dict:
    print(json.dumps(result, indent=2))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result
