"""The lock (requirements/*.lock) is what the README installs, agrees with pyproject.toml's ranges
and envs/*.yaml, and (in an environment installed from it, as .ci/run makes) is what is installed."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REQ = REPO / "requirements"


def _locktools():
    spec = importlib.util.spec_from_file_location("locktools", REQ / "locktools.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


lt = _locktools()


@pytest.mark.parametrize("lock", ["cpu.lock", "gpu.lock"])
def test_every_locked_package_is_exact_and_hashed(lock):
    text = (REQ / lock).read_text()
    pins = lt.read_lock(REQ / lock)
    assert len(pins) > 50
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
    for block in blocks:
        m = lt.PIN.match(block)
        if m:
            assert "--hash=sha256:" in block, f"{lock}: {m.group(1)} has no hash"
    code = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    assert not [ln for ln in code if ln.startswith("-e") or "file:" in ln]  # hash mode refuses editables/paths
    if lock == "gpu.lock":
        assert "tensorflow" in pins and "tensorflow-cpu" not in pins and any(n.startswith("nvidia-") for n in pins)
    else:
        assert "tensorflow-cpu" in pins and "tensorflow" not in pins


def test_locked_versions_satisfy_the_ranges_of_pyproject():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = lt.read_lock(REQ / "cpu.lock")
    env = {"platform_machine": "x86_64", "python_version": "3.11", "sys_platform": "linux", "extra": "test"}
    reqs = [Requirement(r) for r in meta["dependencies"] + meta["optional-dependencies"]["test"]]
    checked = 0
    for r in reqs:
        if r.marker is not None and not r.marker.evaluate(env):
            continue
        v = pins.get(lt.norm(r.name))
        assert v is not None, f"{r.name} is a dependency but not locked"
        assert r.specifier.contains(v, prereleases=True), f"{r.name}=={v} outside {r.specifier}"
        checked += 1
    assert checked >= 15
    # the versions the issue that asked for the lock names as the newest that pass
    assert pins["snakemake"].startswith("9.27.") and pins["snakemake-executor-plugin-slurm"].startswith("2.8.")


def test_conda_envs_pin_what_the_locks_pin():
    for env, lock in lt.ENV_LOCKS.items():
        pins = lt.read_lock(REQ / lock)
        got = lt.env_pins(REPO / "envs" / env)
        assert len(got) >= 5, env
        for name, _, version in got:
            assert pins.get(lt.norm(name)) == version, f"envs/{env}: {name}=={version}, {lock}: {pins.get(lt.norm(name))}"
        py = re.search(r"^\s*-\s+python=(\S+)", (REPO / "envs" / env).read_text(), re.M)
        assert py and py.group(1) == "3.11", env


def test_sync_envs_rewrites_a_stale_pin(tmp_path):
    import shutil

    shutil.copytree(REPO / "envs", tmp_path / "envs")
    p = tmp_path / "envs" / "imaging.yaml"
    p.write_text(p.read_text().replace(f"antspyx=={lt.read_lock(REQ / 'cpu.lock')['antspyx']}", "antspyx==0.5.3"))
    assert lt.sync_envs(tmp_path / "envs", REQ) == [f"imaging.yaml: antspyx 0.5.3 -> {lt.read_lock(REQ / 'cpu.lock')['antspyx']}"]
    assert p.read_text() == (REPO / "envs" / "imaging.yaml").read_text()


def test_readme_installs_the_lock():
    """The README's install block is, line for line, what CI runs (.ci/run builds the tested
    environment with it), and every lock or tool the README names exists."""
    readme = (REPO / "README.md").read_text()
    install = readme.split("\n## Install", 1)[1] if "\n## Install" in readme else readme
    block = re.search(r"```bash\n(.*?)```", install, re.S)
    assert block, "README: no ```bash install block"
    cmds = [ln.strip() for ln in block.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    ci = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()]
    assert cmds and all(c in ci for c in cmds), (cmds, "not run by .ci/run")
    assert any("--require-hashes -r requirements/cpu.lock" in c for c in cmds)  # the hash-locked install
    named = set(re.findall(r"\brequirements/\w+(?:\.[a-z]+)?", readme))
    assert {"requirements/cpu.lock", "requirements/gpu.lock", "requirements/lock"} <= named
    assert [n for n in named if not (REPO / n).is_file()] == []
    assert (REPO / "requirements" / "lock").stat().st_mode & 0o111  # `requirements/lock` runs as written


@pytest.mark.skipif(Path(sys.prefix).resolve() != (REPO / ".venv").resolve(),
                    reason="only in the checkout's own .venv made by .ci/run from the lock")
def test_the_installed_environment_is_the_lock():
    assert lt.installed_mismatches(REQ / "cpu.lock") == []
