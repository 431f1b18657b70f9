#!/usr/bin/env bash
# Run the test suite N times with a CPU hog beside it, to catch tests that
# pass on an idle machine and fail on a loaded one (a fixed sleep before an
# assert, a too-short timeout).  Prints pass/fail per run and every failed
# test with how many runs it failed in; exits 1 if any run failed.
#
#   tests/flake_loop.sh [-n RUNS] [-c HOGS] [--nice] [--] [pytest args...]
#
#   -n RUNS   how many full runs (default 5)
#   -c HOGS   how many busy-loop processes (default: one per CPU core, so
#             every core is contended; the suite competes for all of them)
#   --nice    run the hogs at nice 19 (a background load); by default they
#             run at the suite's own priority, the harder case
#   pytest args: paths or options (default: the whole suite)
#
# Logs go to $FLAKE_LOG_DIR (default: a new directory under /tmp), one file
# per run.  PYTHON picks the interpreter (default .venv/bin/python if present).
# See docs/testing.md.
set -uo pipefail
cd "$(dirname "$0")/.."

runs=5
hogs=$(nproc 2>/dev/null || echo 2)
nice_hogs=0
while [ $# -gt 0 ]; do
  case "$1" in
    -n) runs=$2; shift 2 ;;
    -c) hogs=$2; shift 2 ;;
    --nice) nice_hogs=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done

python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
logs=${FLAKE_LOG_DIR:-$(mktemp -d /tmp/flake-loop.XXXXXX)}
mkdir -p "$logs"
# each run's tmp_path root is its own (not the /tmp/pytest-of-<user> that other
# pytest sessions of the same user clean up); the embedded PostgreSQL runs as
# the pgserver user, which must reach its data directory below it
chmod 755 "$logs"

hog_pids=()
stop_hogs() {
  for pid in "${hog_pids[@]}"; do kill "$pid" 2>/dev/null; done
  wait 2>/dev/null
}
trap stop_hogs EXIT
trap 'exit 130' INT TERM

for _ in $(seq "$hogs"); do
  if [ "$nice_hogs" = 1 ]; then
    nice -n 19 python3 -c 'while 1: pass' &
  else
    python3 -c 'while 1: pass' &
  fi
  hog_pids+=($!)
done
echo "flake loop: $runs run(s) of pytest ${*:-(whole suite)} beside $hogs CPU hog(s)$([ "$nice_hogs" = 1 ] && echo ' at nice 19'); logs in $logs"

failed_runs=0
for run in $(seq "$runs"); do
  log="$logs/run-$run.log"
  started=$(date +%s)
  "$python" -m pytest -q -p no:cacheprovider -rfE --basetemp="$logs/tmp" "$@" >"$log" 2>&1
  rc=$?
  rm -rf "$logs/tmp"
  took=$(( $(date +%s) - started ))
  summary=$(grep -E '^=+ .*(passed|failed|error).* =+$|^[0-9]+ (passed|failed)' "$log" | tail -1)
  if [ "$rc" = 0 ]; then
    echo "run $run: pass (${took}s) $summary"
  else
    failed_runs=$((failed_runs + 1))
    echo "run $run: FAIL rc=$rc (${took}s) $summary"
    grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/    /'
  fi
done

echo "flake loop: $((runs - failed_runs))/$runs run(s) passed"
if [ "$failed_runs" -gt 0 ]; then
  echo "failed tests (runs failed in):"
  cat "$logs"/run-*.log | grep -E '^(FAILED|ERROR) ' | sed -E 's/ - .*//' | sort | uniq -c | sort -rn | sed 's/^/  /'
  exit 1
fi
