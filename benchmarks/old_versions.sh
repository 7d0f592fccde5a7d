#!/usr/bin/env bash
# The oldest declared versions, run by hand (not in CI): torch 2.11 with triton 3.6 (the
# GPU machines' own), and torch 2.13 (CPU build) with triton 3.9, each in its own venv.
#
#   bash benchmarks/old_versions.sh [VENV_DIR_PREFIX]   # e.g. /work/venv -> /work/venv-t211, -t39
#
# Per venv: the CPU tests of the op, its torch path, the guard and gpu_check's table
# code; then the offline compile of the kernels as launched (kernel_launched.py, a few
# scenarios, sm_80 and sm_90). torch 2.11 from PyPI is a CUDA build (several GB).
# Output of the recorded run: benchmarks/results/old_versions.txt.
set -uo pipefail
prefix=${1:-/tmp/attnfuse-venv}
root=$(cd "$(dirname "$0")/.." && pwd)
tests="tests/test_op.py tests/test_op_contract.py tests/test_torch_impl.py tests/test_triton_guard.py tests/test_gpu_check.py"
run() {  # name, pip specs...
  local venv="$prefix-$1"; shift
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q "$@" pytest hypothesis numpy wheel 'setuptools<82'
  "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$root"
  "$venv/bin/python" -c "import torch, triton; print('== torch', torch.__version__, 'triton', triton.__version__)"
  (cd "$root" && "$venv/bin/python" -m pytest $tests -q -p no:cacheprovider -k "not triton" 2>&1 | tail -3)
  (cd "$root" && env -u TRITON_INTERPRET "$venv/bin/python" benchmarks/kernel_launched.py --jobs 2 \
     --scenarios "train d64 fp16 causal,decode d128" --first-config 2>&1 | tail -2)
}
run t211 torch==2.11.0
run t39 torch==2.13.0 'triton==3.9.*'
