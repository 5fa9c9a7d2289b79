#!/usr/bin/env bash
# CI proof for the Raspberry Pi targets, without Docker (so without `cross`):
#   1. installs Debian's cross compilers and qemu-user if missing, and the rustup targets;
#   2. cross-compiles `--release` for aarch64-unknown-linux-gnu and armv7-unknown-linux-gnueabihf
#      (one at a time, into the shared target/ dir);
#   3. writes the shell completions and man pages for the packages on the host
#      (scripts/generate-completions.sh into target/generated) and checks that each ARM binary
#      has every command they describe;
#   4. smoke-tests each binary under qemu-user: `--version`, `check -c` on every example config,
#      and a short `run` of the demo on a free loopback port with a subscriber that must
#      receive one reading;
#   5. prints the stripped binary sizes and the time of every step.
#
#   bash cross/ci-arm.sh                   what .ci/run calls (after the host tests)
#   bash cross/ci-arm.sh --measure 60      also sample idle RSS/CPU of the demo for 60 s,
#                                          natively and under qemu (for docs/raspberry-pi.md)
#   TARGETS="aarch64-unknown-linux-gnu" bash cross/ci-arm.sh    a subset
#
# The subscriber is the host's own `fieldmq sub` (target/debug or target/release, built if
# missing); mosquitto_sub is the fallback for binaries that predate `fieldmq sub`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

measure=0
while [ $# -gt 0 ]; do
    case "$1" in
        --measure) measure="${2:?--measure needs seconds}"; shift 2 ;;
        *) echo "ci-arm.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done

read -r -a targets <<< "${TARGETS:-aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf}"
# Shared with the host build steps (CARGO_TARGET_DIR if set), so dependencies built once serve
# all of them.
target_dir="${CARGO_TARGET_DIR:-target}"

script_start=$SECONDS
step_start=$SECONDS
timings=()
step() {
    step_start=$SECONDS
    echo
    echo "==> $*"
}
done_step() {
    local took=$((SECONDS - step_start))
    timings+=("$(printf '%5ds  %s' "$took" "$1")")
    echo "    ($1: ${took}s)"
}
fail() {
    echo "ci-arm.sh: FAILED: $*" >&2
    exit 1
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# --- 1. toolchains -------------------------------------------------------------------
step "toolchains"
need_apt=()
command -v aarch64-linux-gnu-gcc >/dev/null || need_apt+=(gcc-aarch64-linux-gnu)
command -v arm-linux-gnueabihf-gcc >/dev/null || need_apt+=(gcc-arm-linux-gnueabihf)
[ -e /usr/aarch64-linux-gnu/lib/libc.so.6 ] || need_apt+=(libc6-dev-arm64-cross)
[ -e /usr/arm-linux-gnueabihf/lib/libc.so.6 ] || need_apt+=(libc6-dev-armhf-cross)
{ command -v qemu-aarch64 >/dev/null && command -v qemu-arm >/dev/null; } || need_apt+=(qemu-user)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "    apt-get install ${need_apt[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
rustup target add "${targets[@]}" 2>&1 | sed 's/^/    /'
done_step "toolchains"

# --- per-target settings -----------------------------------------------------------------
# Sets gcc, qemu (with its sysroot) for a triple, and exports cargo's and cc-rs's variables.
configure_target() {
    local triple="$1" prefix
    case "$triple" in
        aarch64-unknown-linux-gnu) prefix=aarch64-linux-gnu; qemu=(qemu-aarch64 -L /usr/aarch64-linux-gnu) ;;
        armv7-unknown-linux-gnueabihf) prefix=arm-linux-gnueabihf; qemu=(qemu-arm -L /usr/arm-linux-gnueabihf) ;;
        *) fail "no Debian cross toolchain configured for $triple (use cross/build-all.sh)" ;;
    esac
    local upper="${triple^^}"
    upper="${upper//-/_}"
    local lower="${triple//-/_}"
    export "CARGO_TARGET_${upper}_LINKER=${prefix}-gcc"
    export "CC_${lower}=${prefix}-gcc"
    export "AR_${lower}=${prefix}-ar"
}

# --- 2. cross builds -----------------------------------------------------------------------
for triple in "${targets[@]}"; do
    configure_target "$triple"
    step "cargo build --release --target $triple"
    cargo build --release --locked --target "$triple" --bin fieldmq
    file "$target_dir/$triple/release/fieldmq" 2>/dev/null | sed 's/^/    /' || true
    done_step "build $triple"
done

# --- the host subscriber -------------------------------------------------------------------
step "host subscriber"
sub_cmd=()
for candidate in "$target_dir/debug/fieldmq" "$target_dir/release/fieldmq"; do
    if [ -x "$candidate" ] && "$candidate" sub --help >/dev/null 2>&1; then
        sub_cmd=("$candidate" sub)
        break
    fi
done
if [ ${#sub_cmd[@]} -eq 0 ]; then
    # .ci/run's host tests normally leave target/debug/fieldmq behind; build it if not.
    cargo build --locked --bin fieldmq
    if "$target_dir/debug/fieldmq" sub --help >/dev/null 2>&1; then
        sub_cmd=("$target_dir/debug/fieldmq" sub)
    fi
fi
if [ ${#sub_cmd[@]} -eq 0 ]; then
    if ! command -v mosquitto_sub >/dev/null; then
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto-clients >/dev/null
    fi
    sub_cmd=(mosquitto_sub)
fi
echo "    subscriber: ${sub_cmd[*]}"
done_step "host subscriber"

# --- shell completions and man page for the packages ------------------------------------------
# Made on the host by fieldmq-docgen (they do not depend on the target) into target/generated,
# where Cargo.toml's deb assets and systemd/install.sh take them from.
step "shell completions and man pages (fieldmq-docgen)"
bash scripts/generate-completions.sh | sed 's/^/    /'
done_step "completions and man page"

# subscribe_one PORT TOPIC: print one message on TOPIC, fail after 60 s.
subscribe_one() {
    local port="$1" topic="$2"
    if [ "${sub_cmd[0]}" = mosquitto_sub ]; then
        timeout 60 mosquitto_sub -h 127.0.0.1 -p "$port" -t "$topic" -C 1 -v
    else
        timeout 60 "${sub_cmd[@]}" --host 127.0.0.1 --port "$port" "$topic" --count 1
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for_port PORT PID: until something accepts on 127.0.0.1:PORT, or PID dies, or 60 s.
wait_for_port() {
    local port="$1" pid="$2" deadline=$((SECONDS + 60))
    while ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || return 1
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.2
    done
}

# demo_config DIR PORT: the demo config on 127.0.0.1:PORT with its data in DIR.
demo_config() {
    local dir="$1" port="$2"
    sed -E \
        -e "s#^([[:space:]]*bind[[:space:]]*=[[:space:]]*)\"127\.0\.0\.1:1883\"#\1\"127.0.0.1:$port\"#" \
        -e "s#^([[:space:]]*data_dir[[:space:]]*=[[:space:]]*).*#\1\"$dir/data\"#" \
        config/demo.toml > "$dir/demo.toml"
    grep -q "127.0.0.1:$port" "$dir/demo.toml" || fail "config/demo.toml has no listener on 127.0.0.1:1883 to move"
}

# sample PID SECONDS: print RSS and CPU time of PID after SECONDS of idling.
sample() {
    local pid="$1" secs="$2" t0 t1 rss
    t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    sleep "$secs"
    t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
    local hz
    hz=$(getconf CLK_TCK)
    awk -v d=$((t1 - t0)) -v hz="$hz" -v s="$secs" -v rss="$rss" \
        'BEGIN { printf "    idle over %ds: RSS %.1f MiB, CPU %.2f%% of one core\n", s, rss / 1024, 100 * d / hz / s }'
}

workdir="$(mktemp -d)"
gateway_pid=""
cleanup() {
    if [ -n "$gateway_pid" ]; then kill "$gateway_pid" 2>/dev/null || true; fi
    rm -rf "$workdir"
}
trap cleanup EXIT

# run_demo LABEL CMD...: start the demo, wait for the listener, receive one reading, stop it.
run_demo() {
    local label="$1"
    shift
    local dir="$workdir/$label" port
    mkdir -p "$dir"
    port=$(free_port)
    demo_config "$dir" "$port"
    "$@" run -c "$dir/demo.toml" > "$dir/log" 2>&1 &
    gateway_pid=$!
    if ! wait_for_port "$port" "$gateway_pid"; then
        cat "$dir/log" >&2
        fail "$label: the demo never listened on 127.0.0.1:$port"
    fi
    local got
    if ! got=$(subscribe_one "$port" 'demo/sim/#'); then
        cat "$dir/log" >&2
        fail "$label: no reading from the demo within 60 s"
    fi
    echo "    received: $got"
    if [ "$measure" -gt 0 ]; then
        sample "$gateway_pid" "$measure"
    fi
    kill -TERM "$gateway_pid"
    local status=0
    wait "$gateway_pid" || status=$?
    gateway_pid=""
    if [ "$status" -ne 0 ]; then
        cat "$dir/log" >&2
        fail "$label: the demo exited with status $status after SIGTERM"
    fi
    echo "    stopped cleanly on SIGTERM"
}

# --- 3. smoke tests under qemu ----------------------------------------------------------------
configs=(config/*.toml)
[ -e systemd/fieldmq.toml ] && configs+=(systemd/fieldmq.toml)
for triple in "${targets[@]}"; do
    configure_target "$triple"
    bin="$target_dir/$triple/release/fieldmq"
    step "smoke test $triple under ${qemu[0]}"
    echo "    $("${qemu[@]}" "$bin" --version)"
    # The packaged completions and man pages came from the host (fieldmq-docgen, over the same
    # command-line definition): each command they describe is one the ARM binary has.
    for page in target/generated/man/fieldmq-*.1.gz; do
        command=$(basename "$page" .1.gz)
        command=${command#fieldmq-}
        # fieldmq-profiles-list.1 is `fieldmq profiles list` (no command has a dash).
        read -r -a words <<< "${command//-/ }"
        "${qemu[@]}" "$bin" "${words[@]}" --help >/dev/null \
            || fail "$triple: the man page names '$command', which the binary does not have"
    done
    echo "    every command of the man pages is in the binary"
    for config in "${configs[@]}"; do
        # `check` also refuses an unset password variable; the smoke test is about the file,
        # so each variable the config names gets a placeholder.
        secrets=()
        while read -r var; do
            secrets+=("$var=placeholder")
        done < <(sed -n 's/^[[:space:]]*password_env[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$config")
        if ! out=$(env "${secrets[@]}" "${qemu[@]}" "$bin" check -c "$config" 2>&1); then
            echo "$out" >&2
            fail "$triple: fieldmq check -c $config"
        fi
        echo "    check ok: $config"
    done
    run_demo "$triple" "${qemu[@]}" "$bin"
    done_step "smoke $triple"
done

if [ "$measure" -gt 0 ]; then
    step "native demo (for comparison)"
    cargo build --release --locked --bin fieldmq
    run_demo native "$target_dir/release/fieldmq"
    done_step "native demo"
fi

# --- 4. summary ------------------------------------------------------------------------------
echo
echo "==> stripped release binaries"
for triple in "${targets[@]}"; do
    bin="$target_dir/$triple/release/fieldmq"
    size=$(stat -c %s "$bin")
    awk -v s="$size" -v t="$triple" 'BEGIN { printf "    %-32s %9d bytes  %.2f MiB\n", t, s, s / 1048576 }'
    # The budget on the Pi (docs/raspberry-pi.md): a binary over it fails CI.
    [ "$size" -le $((8 * 1024 * 1024)) ] || fail "$triple binary is $size bytes, over the 8 MiB budget"
done
echo
echo "==> timings"
printf '    %s\n' "${timings[@]}"
printf '    %5ds  total\n' $((SECONDS - script_start))
echo
echo "ci-arm: ${#targets[@]} targets built and smoke-tested under qemu"
