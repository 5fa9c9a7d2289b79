#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, docs/fuzzing.md) for SECONDS each (default 60) on a working
# copy of its seed corpus, and prints libFuzzer's final line per target (execs, coverage).
# Exits non-zero when any target crashes. `scripts/fuzz.sh --list` lists the targets.
# Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz --locked).
set -euo pipefail
cd "$(dirname "$0")/.."

# Target and its -max_len.
targets=(
  "mqtt_decode 4096"
  # The broker it starts lives for the whole process: no leak report at exit.
  "mqtt_connection 4096 -detect_leaks=0"
  "topic 512"
  "config 8192"
  "modbus_decode 256"
  "serial_framing 2048"
  "serial_parse 512"
  "store_rows 4096"
)

if [ "${1:-}" = "--list" ]; then
  for t in "${targets[@]}"; do echo "${t%% *}"; done
  exit 0
fi
seconds=${1:-60}

cargo +nightly fuzz build -O
failed=()
for t in "${targets[@]}"; do
  read -r name max_len extra <<<"$t"
  run=fuzz/corpus-run/$name
  mkdir -p "$run" "fuzz/artifacts/$name"
  if [ -d "fuzz/corpus/$name" ]; then cp -n fuzz/corpus/"$name"/* "$run"/ 2>/dev/null || true; fi
  log=fuzz/corpus-run/$name.log
  echo "=== $name (${seconds}s, max_len $max_len)"
  asan=${ASAN_OPTIONS:-}
  case "$extra" in *detect_leaks=0*) asan=${asan:+$asan:}detect_leaks=0 ;; esac
  if ASAN_OPTIONS=$asan cargo +nightly fuzz run -O "$name" "$run" -- \
      -max_total_time="$seconds" -max_len="$max_len" ${extra:-} >"$log" 2>&1; then
    grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || tail -3 "$log"
  else
    tail -40 "$log"
    echo "=== $name FAILED (log: $log, artifacts: fuzz/artifacts/$name)"
    failed+=("$name")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "crashes in: ${failed[*]}"
  exit 1
fi
echo "all targets ran ${seconds}s without a crash"
