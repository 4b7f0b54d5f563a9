"""Upgrade check: would the newest versions that pyproject.toml's ranges allow still pass?

Not part of the default CI run. It resolves the newest allowed versions into a throw-away virtual
environment, prints every version that differs from requirements/cpu.lock, and runs the test suite
there (from this checkout). Two resolvers:

  --resolver uv   (default) `uv pip compile --upgrade`: the newest consistent set, hash-locked, i.e.
                  what `requirements/lock --upgrade` would write; installed with the README's
                  `pip install --require-hashes -r ... && pip install --no-deps -e .`
  --resolver pip  plain `pip install -e ".[test]"`: what a user who ignores the lock gets

  python requirements/upgrade_check.py                       # whole suite
  python requirements/upgrade_check.py -- tests/test_registration.py -x -q   # pytest arguments
  python requirements/upgrade_check.py --resolver pip --keep /tmp/upg      # keep the venv

If it passes, raise the lock with `requirements/lock --upgrade` (or `--upgrade-package NAME`);
if it fails, tighten the range in pyproject.toml and record why in docs/DEPENDENCIES.md.
Exit status: pytest's (0 = the newest versions pass), 3 when the environment could not be built.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import locktools  # noqa: E402

PLATFORM = ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"]


def run(cmd, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], **kw)


def venv(path: Path) -> Path:
    run([sys.executable, "-m", "venv", path], check=True)
    return path / "bin" / "python"


def uv_exe(tmp: Path) -> str:
    found = shutil.which("uv")
    if found:
        return found
    py = venv(tmp / "uv-venv")
    run([py, "-m", "pip", "install", "-q", "uv"], check=True)
    return str(tmp / "uv-venv" / "bin" / "uv")


def build_uv(tmp: Path, py: Path) -> dict[str, str]:
    cand = tmp / "candidate.lock"
    run([uv_exe(tmp), "pip", "compile", REPO / "pyproject.toml", "--extra", "test", "--generate-hashes",
         "--upgrade", "--index-url", "https://pypi.org/simple", *PLATFORM, "-o", cand, "--quiet"], check=True)
    run([py, "-m", "pip", "install", "-q", "--require-hashes", "-r", cand], check=True)
    run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", REPO], check=True)
    return locktools.read_lock(cand)


def build_pip(tmp: Path, py: Path) -> dict[str, str]:
    run([py, "-m", "pip", "install", "-q", "-e", f"{REPO}[test]"], check=True)
    out = run([py, "-m", "pip", "freeze", "--all", "--exclude-editable"], check=True, capture_output=True,
              text=True).stdout
    pins = {}
    for line in out.splitlines():
        m = locktools.PIN.match(line)
        if m and locktools.norm(m.group(1)) != "pip":  # pip itself is the venv's, never locked
            pins[locktools.norm(m.group(1))] = m.group(3)
    return pins


def differences(lock: dict[str, str], cand: dict[str, str]) -> list[str]:
    rows = []
    for name in sorted(set(lock) | set(cand)):
        a, b = lock.get(name), cand.get(name)
        if a != b:
            rows.append(f"{name}: {a or '-'} -> {b or '-'}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolver", choices=["uv", "pip"], default="uv")
    ap.add_argument("--keep", type=Path, help="build the throw-away environment here and keep it")
    ap.add_argument("--timeout", type=int, default=5400, help="seconds for the test run")
    ap.add_argument("pytest_args", nargs="*", help="after --: arguments for pytest (default: the whole suite)")
    a = ap.parse_args(argv)
    tmp = a.keep or Path(tempfile.mkdtemp(prefix="cohortseg-upgrade-"))
    tmp.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    t0 = time.monotonic()
    try:
        py = venv(tmp / "venv")
        cand = (build_uv if a.resolver == "uv" else build_pip)(tmp, py)
    except subprocess.CalledProcessError as e:
        print(f"upgrade check: the environment could not be built ({e})")
        return 3
    t_install = time.monotonic() - t0
    lock = locktools.read_lock(REPO / "requirements" / "cpu.lock")
    diff = differences(lock, cand)
    t1 = time.monotonic()
    env["PATH"] = f"{py.parent}{os.pathsep}{env.get('PATH', '')}"
    res = run([py, "-m", "pytest", *a.pytest_args], cwd=REPO, env=env, timeout=a.timeout)
    t_test = time.monotonic() - t1
    print(f"\n== upgrade check ({a.resolver} resolver), environment in {tmp} ==")
    print(f"install {t_install:.0f} s, tests {t_test:.0f} s, pytest exit {res.returncode} "
          f"({'PASS' if res.returncode == 0 else 'FAIL'}) for: pytest {' '.join(a.pytest_args) or '(whole suite)'}")
    key = ["snakemake", "snakemake-executor-plugin-slurm", "antspyx", "tensorflow-cpu", "keras", "numpy", "pandas"]
    print("key versions: " + ", ".join(f"{k} {cand.get(k, '-')}" for k in key))
    print(f"{len(diff)} versions differ from requirements/cpu.lock (locked -> newest):")
    for d in diff:
        print("  " + d)
    if not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
