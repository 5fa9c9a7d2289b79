#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, docs/fuzzing.md) for SECONDS each (default 60) on a working
# copy of its seed corpus, and prints libFuzzer's final line per target (execs, coverage).
# Exits non-zero when any target crashes. `scripts/fuzz.sh --list` lists the targets.
# FUZZ_JOBS=N runs N targets at a time (default 1). FUZZ_SANITIZER=none builds without
# AddressSanitizer (a faster build, for a short smoke run; panics are still found).
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
  "payload 4096"
  "sparkplug_command 4096"
  "sunspec_chain 4096"
  "write_payload 16384"
)

if [ "${1:-}" = "--list" ]; then
  for t in "${targets[@]}"; do echo "${t%% *}"; done
  exit 0
fi
seconds=${1:-60}
jobs=${FUZZ_JOBS:-1}
build=(-O --sanitizer "${FUZZ_SANITIZER:-address}")

cargo +nightly fuzz build "${build[@]}"

# Runs one target; prints its summary; leaves `fuzz/corpus-run/NAME.failed` on a crash.
run_target() {
  local name=$1 max_len=$2 extra=${3:-}
  local run=fuzz/corpus-run/$name log=fuzz/corpus-run/$name.log
  mkdir -p "$run" "fuzz/artifacts/$name"
  rm -f "fuzz/corpus-run/$name.failed"
  if [ -d "fuzz/corpus/$name" ]; then cp -n fuzz/corpus/"$name"/* "$run"/ 2>/dev/null || true; fi
  local asan=${ASAN_OPTIONS:-}
  case "$extra" in *detect_leaks=0*) asan=${asan:+$asan:}detect_leaks=0 ;; esac
  if ASAN_OPTIONS=$asan cargo +nightly fuzz run "${build[@]}" "$name" "$run" -- \
      -max_total_time="$seconds" -max_len="$max_len" ${extra:-} >"$log" 2>&1; then
    echo "=== $name (${seconds}s, max_len $max_len): $(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || tail -1 "$log")"
  else
    echo "=== $name FAILED (log: $log, artifacts: fuzz/artifacts/$name)"
    tail -40 "$log"
    touch "fuzz/corpus-run/$name.failed"
  fi
}

running=0
for t in "${targets[@]}"; do
  read -r name max_len extra <<<"$t"
  if [ "$jobs" -le 1 ]; then
    run_target "$name" "$max_len" "${extra:-}"
    continue
  fi
  run_target "$name" "$max_len" "${extra:-}" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait

failed=()
for t in "${targets[@]}"; do
  name=${t%% *}
  if [ -e "fuzz/corpus-run/$name.failed" ]; then failed+=("$name"); fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "crashes in: ${failed[*]}"
  exit 1
fi
echo "all targets ran ${seconds}s without a crash"
