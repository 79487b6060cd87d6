"""The GPU kit, benchmarks/gpu_checks.sh, without a GPU and without downloads: its command line,
a failing step failing the whole kit (named in its closing line), the timeout clamp, the carry
limit, and how its Python half picks the carried wheels for a box it has never seen.

The real run is `bash benchmarks/gpu_checks.sh dry-run` (minutes, gigabytes of downloads once);
these tests run the same script with its steps pointed at a stand-in Python.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from conftest import REPO
from packaging.requirements import Requirement
from packaging.version import Version

KIT = REPO / "benchmarks" / "gpu_checks.sh"


def kit(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """The kit itself, run by bash as a person would."""
    return subprocess.run(["bash", str(KIT), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=REPO)


def sourced(script: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`script` run in bash after sourcing the kit (which then only defines its functions)."""
    return subprocess.run(["bash", "-c", f'source "{KIT}"\n{script}'], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=60, cwd=REPO)


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["prepare", "extra"],
                                  ["dry-run", "a", "b"]])
def test_no_or_unknown_arguments_print_the_usage_and_exit_2(args):
    result = kit(*args)
    assert result.returncode == 2
    assert "bash benchmarks/gpu_checks.sh run DIR" in result.stderr
    assert result.stdout == ""


def test_help_prints_the_usage_and_succeeds():
    result = kit("--help")
    assert result.returncode == 0
    assert "dry-run [DIR]" in result.stdout


def test_run_without_a_folder_says_so_in_one_line():
    result = kit("run")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "run needs DIR" in result.stderr


@pytest.mark.parametrize("setting", [{"KIT_MIN_STEP_S": "0"}, {"KIT_BUDGET_S": "-1"},
                                     {"KIT_BUDGET_S": "soon"}])
def test_settings_that_are_no_whole_positive_seconds_are_refused(setting, tmp_path):
    result = kit("run", str(tmp_path), env=setting)
    assert result.returncode == 2
    assert "whole seconds" in result.stderr or "1 or more" in result.stderr


def test_without_the_carried_folder_the_kit_fails_and_says_which_step(tmp_path):
    out = tmp_path / "out"
    result = kit("run", str(out), env={"KIT_GPU_DIR": str(tmp_path / "no-such-folder")})
    assert result.returncode == 1
    summary = last_line(result)
    assert summary.startswith("gpu kit: FAILED -- install FAILED (no ")
    assert "check skipped (install failed), tests skipped (install failed)" in summary
    assert (out / "summary.txt").read_text().strip() == summary


def test_a_broken_wheel_fails_the_install_in_one_line(tmp_path):
    carried = tmp_path / "gpu"
    (carried / "wheels").mkdir(parents=True)
    (carried / "site").mkdir()
    (carried / "wheels" / "datasets-5.2.0-py3-none-any.whl").write_bytes(b"cut short")
    result = kit("run", str(tmp_path / "out"),
                 env={"KIT_GPU_DIR": str(carried), "KIT_PYTHON": sys.executable,
                      "KIT_SITE": str(tmp_path / "site")})
    assert result.returncode == 1
    assert "install: FAILED: datasets-5.2.0-py3-none-any.whl is no wheel" in result.stdout
    assert "Traceback" not in result.stdout
    assert last_line(result).startswith("gpu kit: FAILED -- install FAILED (rc 1), check skipped")


# A stand-in for the box's python3: the steps are told apart by their arguments.
FAKE_PYTHON = """\
#!/bin/bash
case "$*" in
    *" install "*) echo "installed" ;;
    *" check "*) [ "$FAKE" = check ] && { echo "check: FAILED: pyarrow: too old"; exit 1; } ;;
    *"-m pytest"*) echo "1 failed"; exit 3 ;;
    *"-m benchmarks.benchmark"*) echo "measuring"; exec sleep 30 ;;
esac
exit 0
"""


def run_with_fake_python(tmp_path: Path, fake: str) -> subprocess.CompletedProcess:
    carried = tmp_path / "gpu"
    (carried / "wheels").mkdir(parents=True)
    (carried / "site").mkdir()
    python = tmp_path / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    # A 5-second budget and 1-second steps: the benchmark's 420 s are cut to what is left.
    return kit("run", str(tmp_path / "out"),
               env={"KIT_GPU_DIR": str(carried), "KIT_PYTHON": str(python), "FAKE": fake,
                    "KIT_SITE": str(tmp_path / "site"), "KIT_BUDGET_S": "5",
                    "KIT_MIN_STEP_S": "1"})


def test_a_failing_step_and_a_timeout_fail_the_kit_and_are_named(tmp_path):
    result = run_with_fake_python(tmp_path, "tests")
    assert result.returncode == 1
    summary = last_line(result)
    assert summary.startswith("gpu kit: FAILED -- install ok, check ok, tests FAILED (rc 3), "
                              "benchmark TIMED OUT (after ")
    assert "1 failed" in (tmp_path / "out" / "tests.log").read_text()  # tee kept the log
    assert "measuring" in (tmp_path / "out" / "benchmark.log").read_text()


def test_a_failed_check_skips_the_rest(tmp_path):
    result = run_with_fake_python(tmp_path, "check")
    assert result.returncode == 1
    assert last_line(result).startswith(
        "gpu kit: FAILED -- install ok, check FAILED (rc 1), tests skipped (check failed), "
        "benchmark skipped (check failed); ")


@pytest.mark.parametrize(("budget", "least"), [(450, 30), (100, 30), (10, 1)])
def test_a_step_timeout_is_never_zero_negative_or_past_the_budget(budget, least):
    wants = [-5, 0, 1, 29, 30, 60, 240, 420, 1000]
    elapsed = [-10, 0, 1, 200, budget - least - 1, budget - least, budget - least + 1,
               budget - 1, budget, budget + 1, 470, 1000]
    script = "".join(f'echo "{w} {e} $(step_timeout {w} {e} || echo skip)"\n'
                     for w in wants for e in elapsed)
    result = sourced(script, env={"KIT_BUDGET_S": str(budget), "KIT_MIN_STEP_S": str(least)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(wants) * len(elapsed)
    for line in lines:
        want, spent, limit = line.split()
        left = budget - int(spent)
        if limit == "skip":
            assert left < least, line
        else:
            assert least <= int(limit) <= max(int(want), least), line
            assert int(spent) + int(limit) <= budget, line
    assert "420 470 skip" in lines  # where the old kit ran `timeout 0`: no limit at all


def test_a_carry_over_64_mib_is_refused(tmp_path):
    (tmp_path / "wheels").mkdir()
    with open(tmp_path / "wheels" / "huge.whl", "wb") as file:
        file.truncate(65 * 1024 * 1024)  # sparse: du -b counts its size, the disk holds none
    result = sourced("carry_size", env={"KIT_GPU_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert "too big to carry" in result.stderr


# --- the Python half: which carried wheels a box gets ---------------------------------------

# The carried wheels' own Requires-Dist, cut to what matters here.
WHEELS = {
    "datasets-5.2.0": ["numpy>=1.17", "pyarrow>=24.0.0", "dill<0.4.2,>=0.3.0",
                       "multiprocess<0.70.20", "fsspec<=2026.9.0,>=2023.1.0",
                       "huggingface-hub<3.0,>=1.31.0", "xxhash"],
    "datasets-5.0.1": ["numpy>=1.17", "pyarrow>=21.0.0", "dill<0.4.2,>=0.3.0",
                       "multiprocess<0.70.20", "fsspec[http]<=2026.6.0,>=2023.1.0",
                       "huggingface-hub<2.0,>=0.25.0", "xxhash"],
    "dill-0.4.1": [],
    "multiprocess-0.70.19": ["dill>=0.4.1"],
    "fsspec-2026.6.0": ['aiohttp!=4.0.0a0,!=4.0.0a1; extra == "http"',
                        'pyarrow>=1; extra == "arrow"'],
}


@pytest.fixture(scope="module")
def helper(tmp_path_factory):
    """The kit's Python half, as the kit writes it out, imported."""
    path = tmp_path_factory.mktemp("kit") / "gpu_kit.py"
    assert sourced(f'write_helper "{path}"').returncode == 0
    spec = importlib.util.spec_from_file_location("gpu_kit", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_kit"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def carried(helper, tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheels")
    wheels = []
    for stem, requires in WHEELS.items():
        path = folder / f"{stem}-py3-none-any.whl"
        name, version = stem.split("-")
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(f"{name}-{version}.dist-info/METADATA", textwrap.dedent(
                f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
                + "".join(f"Requires-Dist: {req}\n" for req in requires))
        wheels.append(helper.wheel(path))
    return wheels


def box(helper, **versions: str) -> dict:
    """A box with these versions (pyarrow="25.0.1"), and its fsspec's extras as fsspec has them."""
    have = {"numpy": "2.5.2", "huggingface-hub": "1.33.0", "xxhash": "3.6.0",
            "aiohttp": "3.13.0", "fsspec": "2026.9.0", **versions}
    found = {name: helper.Dist(name, Version(version)) for name, version in have.items()}
    found["fsspec"].requires = [Requirement('aiohttp!=4.0.0a0,!=4.0.0a1; extra == "http"')]
    return found


def picked(wheels) -> list[str]:
    return sorted(str(dist) for dist in wheels)


def test_a_box_with_a_new_pyarrow_gets_the_newest_datasets_and_keeps_its_fsspec(helper, carried):
    wheels, notes = helper.plan(carried, box(helper, pyarrow="25.0.1"))
    assert picked(wheels) == ["datasets 5.2.0", "dill 0.4.1", "multiprocess 0.70.19"]
    assert notes == []


def test_a_box_with_an_older_pyarrow_gets_the_older_datasets_and_its_fsspec(helper, carried):
    wheels, notes = helper.plan(carried, box(helper, pyarrow="22.0.0"))
    assert picked(wheels) == ["datasets 5.0.1", "dill 0.4.1", "fsspec 2026.6.0",
                              "multiprocess 0.70.19"]
    assert notes == ["datasets 5.2.0 needs pyarrow>=24.0.0, the box has 22.0.0"]
    # The box's own fsspec stays where it fits.
    wheels, _ = helper.plan(carried, box(helper, pyarrow="22.0.0", fsspec="2026.3.0"))
    assert "fsspec 2026.6.0" not in picked(wheels)


def test_a_box_package_that_needs_its_own_fsspec_keeps_the_carried_one_out(helper, carried):
    found = box(helper, pyarrow="22.0.0")
    found["gcsfs"] = helper.Dist("gcsfs", found["fsspec"].version,
                                 [Requirement("fsspec==2026.9.0")])
    with pytest.raises(helper.NoFit, match=re.escape("gcsfs 2026.9.0 needs fsspec==2026.9.0")):
        helper.plan(carried, found)


def test_a_box_that_fits_no_carried_datasets_is_told_which_package(helper, carried):
    with pytest.raises(helper.NoFit) as why:
        helper.plan(carried, box(helper, pyarrow="20.0.0"))
    assert str(why.value) == (
        "no carried datasets fits the box: datasets 5.2.0 needs pyarrow>=24.0.0, the box has "
        "20.0.0; datasets 5.0.1 needs pyarrow>=21.0.0, the box has 20.0.0")
    found = box(helper, pyarrow="25.0.1")
    del found["huggingface-hub"]
    with pytest.raises(helper.NoFit) as why:
        helper.plan(carried, found)
    assert ("datasets 5.2.0 needs huggingface-hub<3.0,>=1.31.0, the box has none; "
            "datasets 5.0.1 needs huggingface-hub<2.0,>=0.25.0, the box has none") in str(why.value)
