#!/usr/bin/env bash
# A GPU run in one command: build, the tests with compiled kernels (the full-size GPU tests first,
# then the rest), and the full benchmark suite, all results in one folder (default: $OUT on the
# device machine, else benchmarks/results/gpu-<time>). Wheels the machine lacks
# (jvp_flash_attention, the peer) are installed from .whl/ when it is there.
#
# It is held to GPU_RUN_BUDGET_S seconds (default 480: the device tool's machine is lent for
# 10 minutes a call and 15 a session): the tests stop at two fifths of it (pytest's summary is
# kept; tests.log says where), and the benchmarks start no case later than 60 s before its end
# (report.md lists the cases not run; a case started runs to its end), so whatever was measured
# comes back in one call.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir=${1:-${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}}
mkdir -p "$out_dir"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
budget=${GPU_RUN_BUDGET_S:-480}
tests_budget=${GPU_TESTS_BUDGET_S:-$((budget * 2 / 5))}
report_margin=60  # for the case running at the benchmarks' deadline and the report

if compgen -G ".whl/*.whl" > /dev/null; then
  $python -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$python -m pip install --no-deps --no-build-isolation --no-index -e . > "$out_dir/install.log" 2>&1 \
  || echo "install failed (see install.log); continuing without the C++ extension"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$out_dir/gpu.txt" 2>&1

# pytest stops on SIGINT with its summary; the exit status is then timeout's 124
run_tests() {  # run_tests LOG UNTIL_SECOND PYTEST_ARGS...
  local log=$1 until=$2; shift 2
  local left=$((until - SECONDS))
  if ((left <= 0)); then echo "not run: the tests' budget was spent" > "$log"; return 124; fi
  timeout -s INT -k 30 "$left" $python -m pytest -q -rs -p no:cacheprovider "$@" 2>&1 | tee "$log"
  local status=${PIPESTATUS[0]}
  ((status == 124)) && echo "stopped at the tests' budget ($tests_budget s of $budget s)" | tee -a "$log"
  return "$status"
}
tests_until=$((SECONDS + tests_budget))
run_tests "$out_dir/tests-gpu.log" "$tests_until" tests/test_gpu.py
gpu_tests=$?
run_tests "$out_dir/tests.log" "$tests_until" tests -n 8 --ignore=tests/test_gpu.py
tests=$?
bench_budget=$((budget - SECONDS - report_margin))
((bench_budget < 1)) && bench_budget=1  # late: the first case only, and the report
$python -m benchmarks.run --full --out "$out_dir" --budget-s "$bench_budget" 2>&1 | tee "$out_dir/benchmarks.log"
bench=${PIPESTATUS[0]}
echo "GPU tests exit $gpu_tests, tests exit $tests, benchmarks exit $bench ($SECONDS s of $budget s); results in $out_dir"
exit $(( gpu_tests != 0 || tests != 0 || bench != 0 ))
