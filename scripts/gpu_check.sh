#!/usr/bin/env bash
# Acceptance checks on a machine with NVIDIA GPUs, in under 5 minutes; JSON results in OUT_DIR.
#   bash scripts/gpu_check.sh OUT_DIR            # GPU: gpu tests, FP8 GEMM TFLOP/s, 1B proxy training, NCCL
#   bash scripts/gpu_check.sh OUT_DIR --smoke    # the same code at toy sizes on CPU (CI runs this)
# Without network: uses the Python it finds (PYTHON, else .venv/bin/python, else python3) with its own
# torch; where megatron_dsv3 or megatron-core do not import, installs them into OUT_DIR/venv
# (--system-site-packages, so the machine's torch is used): megatron-core from a wheel beside this
# script (scripts/wheels/*.whl or scripts/*.whl), the project with --no-deps.
# Exit: 0 all passed, 1 a check failed (named in OUT_DIR/gpu_check.json), 2 bad usage or setup.
set -euo pipefail
if [[ $# -lt 1 || $# -gt 2 || "$1" == -* || ( $# -eq 2 && "$2" != "--smoke" ) ]]; then
    echo "usage: $0 OUT_DIR [--smoke]" >&2
    exit 2
fi
out_dir=$(mkdir -p "$1" && cd "$1" && pwd)
smoke=${2:-}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

python=${PYTHON:-}
if [[ -z "$python" ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
if ! "$python" -c "import megatron_dsv3, megatron.core" 2>/dev/null; then
    echo "gpu_check: installing into $out_dir/venv (no network: wheel beside the script, project --no-deps)"
    "$python" -m venv --system-site-packages "$out_dir/venv"
    python="$out_dir/venv/bin/python"
    shopt -s nullglob
    wheels=(scripts/wheels/megatron_core-*.whl scripts/megatron_core-*.whl)
    shopt -u nullglob
    if ! "$python" -c "import megatron.core" 2>/dev/null; then
        if [[ ${#wheels[@]} -eq 0 ]]; then
            echo "gpu_check: megatron-core does not import and no megatron_core-*.whl is in scripts/wheels/ or scripts/" >&2
            exit 2
        fi
        "$python" -m pip install -q --no-index --no-deps "${wheels[0]}"
    fi
    "$python" -m pip install -q --no-index --no-deps --no-build-isolation -e "$repo"
    "$python" -c "import megatron_dsv3, megatron.core" || { echo "gpu_check: setup failed (see above)" >&2; exit 2; }
fi
exec timeout 295 "$python" scripts/gpu_check.py "$out_dir" $smoke
