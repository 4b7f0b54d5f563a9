"""Helpers for the hash-locked requirement files (requirements/*.lock).

  python requirements/locktools.py sync-envs        rewrite the pins of envs/*.yaml from the locks
  python requirements/locktools.py check-installed  the running Python has exactly the locked versions
                                                     (`pip freeze` == cpu.lock for every locked package)

Only the standard library: it runs before anything is installed.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)")
#: conda environment file -> the lock whose pins it takes (tensorflow.yaml is the GPU family)
ENV_LOCKS = {"imaging.yaml": "cpu.lock", "tables.yaml": "cpu.lock", "tensorflow.yaml": "gpu.lock"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path) -> dict[str, str]:
    """{normalised name: version} of a pip requirements lock (one `name==version \\` per package)."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        m = PIN.match(line)
        if m:
            pins[norm(m.group(1))] = m.group(3)
    return pins


def env_pins(path) -> list[tuple[str, str, str]]:
    """(name, extras, version) of every `name==version` line of an envs/*.yaml pip section."""
    out = []
    for line in Path(path).read_text().splitlines():
        m = re.match(r"^\s*-\s+(\S+)\s*$", line)
        if m:
            p = PIN.match(m.group(1))
            if p:
                out.append((p.group(1), p.group(2) or "", p.group(3)))
    return out


def sync_envs(env_dir=REPO / "envs", req_dir=REPO / "requirements") -> list[str]:
    """Set every `name==version` pin of envs/*.yaml to the version of its lock; returns changes."""
    changes = []
    for env, lock in ENV_LOCKS.items():
        path = Path(env_dir) / env
        pins = read_lock(Path(req_dir) / lock)
        text = path.read_text()
        for name, extras, version in env_pins(path):
            want = pins.get(norm(name))
            if want is None:
                raise SystemExit(f"{env}: {name} is not in {lock}")
            if want != version:
                text = re.sub(rf"(?m)^(\s*-\s+){re.escape(name + extras)}=={re.escape(version)}[ \t]*$",
                              rf"\g<1>{name}{extras}=={want}", text)
                changes.append(f"{env}: {name} {version} -> {want}")
        path.write_text(text)
    return changes


def installed_mismatches(lock=REPO / "requirements" / "cpu.lock") -> list[str]:
    """Locked packages whose installed version differs (or that are missing) in this Python."""
    from importlib import metadata

    have = {norm(d.metadata["Name"]): d.version for d in metadata.distributions()}
    return [f"{n}: locked {v}, installed {have.get(n, 'nothing')}"
            for n, v in sorted(read_lock(lock).items()) if have.get(n) != v]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sync-envs"]:
        for c in sync_envs():
            print(c)
        return 0
    if argv[:1] == ["check-installed"]:
        lock = Path(argv[1]) if len(argv) > 1 else REPO / "requirements" / "cpu.lock"
        bad = installed_mismatches(lock)
        for b in bad:
            print(b)
        print(f"{len(read_lock(lock)) - len(bad)} of {len(read_lock(lock))} locked packages installed at the locked version"
              f" in {sys.prefix}")
        return 1 if bad else 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
