#!/usr/bin/env bash
# A GPU run in one command: build, the tests with compiled kernels (GPU-marked ones included),
# and the full benchmark suite, all results in one folder (default: $OUT on the device machine,
# else benchmarks/results/gpu-<time>). Wheels the machine lacks (jvp_flash_attention, the peer)
# are installed from .whl/ when it is there.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir=${1:-${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}}
mkdir -p "$out_dir"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

if compgen -G ".whl/*.whl" > /dev/null; then
  $python -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$python -m pip install --no-deps --no-build-isolation --no-index -e . > "$out_dir/install.log" 2>&1 \
  || echo "install failed (see install.log); continuing without the C++ extension"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$out_dir/gpu.txt" 2>&1

$python -m pytest tests -q -rs -n 8 -p no:cacheprovider 2>&1 | tee "$out_dir/tests.log"
tests=${PIPESTATUS[0]}
$python -m benchmarks.run --full --out "$out_dir" 2>&1 | tee "$out_dir/benchmarks.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, benchmarks exit $bench; results in $out_dir"
exit $(( tests != 0 || bench != 0 ))
