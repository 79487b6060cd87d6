"""requirements-lock.txt, the tested environment (tests/lock.sh writes it, tests/run.sh installs
it), agrees with the ranges users install (requirements.txt, requirements-dev.txt) and with the
environment this suite runs in."""

from __future__ import annotations

import re
from importlib import metadata

from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

LOCK = REPO / "requirements-lock.txt"
TORCH_COMMENT = re.compile(r"^# torch==(\S+) ", flags=re.MULTILINE)


def ranges(file: str) -> list[Requirement]:
    """The requirements a requirements file lists (its -r includes followed)."""
    found = []
    for line in (REPO / file).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            found += ranges(line[3:].strip())
        elif line:
            found.append(Requirement(line))
    return found


def pins() -> dict[str, Version]:
    """The lock's exact versions, by canonical package name."""
    found = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")  # only exact pins: anything else fails here
            found[canonicalize_name(name)] = Version(version)
    return found


def test_the_lock_pins_every_requirement_within_its_range():
    locked = pins()
    assert "torch" not in locked  # tests/run.sh installs torch first, the build the machine needs
    torch_version = Version(TORCH_COMMENT.search(LOCK.read_text()).group(1))
    for requirement in ranges("requirements-dev.txt"):
        name = canonicalize_name(requirement.name)
        version = torch_version if name == "torch" else locked.get(name)
        assert version is not None, f"{name} is not in requirements-lock.txt: run tests/lock.sh"
        assert requirement.specifier.contains(version, prereleases=True), \
            f"requirements-lock.txt has {name} {version}, outside {requirement}: run tests/lock.sh"
    assert len(locked) > 50  # the whole environment, dependencies of dependencies included


def test_this_suite_runs_in_the_locked_environment():
    """tests/run.sh (and so CI) installs the lock: every package at exactly its version."""
    # metadata.version: the distribution that imports first. Not every one on sys.path:
    # setuptools, once imported, appends its vendored packaging and platformdirs to it.
    installed = {name: Version(metadata.version(name)) for name in pins()}
    differ = {name: (str(version), str(installed[name]))
              for name, version in pins().items() if installed[name] != version}
    assert differ == {}, "locked vs installed; run bash tests/run.sh to install the lock"
