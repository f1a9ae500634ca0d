#!/usr/bin/env bash
# Run every fuzz target (or the ones named) for SECONDS each, one after another, and print
# executions and coverage per target. Usage: tests/fuzz/run.sh [SECONDS] [target ...]
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-600}; shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(classifier store_record audit_log image board_profile task_file manifest tokenizer button_script ui_request)
fi
cargo +nightly fuzz build -O --fuzz-dir . >/dev/null
mkdir -p logs
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  log="logs/$t.$(date +%Y%m%d-%H%M%S).log"
  cargo +nightly fuzz run -O --fuzz-dir . "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=512 -timeout=10 \
    -print_final_stats=1 >"$log" 2>&1 || echo "$t: FAILED, see $log (crash input in artifacts/$t/)"
  execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | awk '{print $2}')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | awk '{print $2}')
  echo "$t: ${execs:-?} executions in ${secs} s, coverage ${cov:-?} edges, corpus $(ls "corpus/$t" | wc -l) inputs"
done
