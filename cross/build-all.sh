#!/usr/bin/env bash
# Build release binaries of fieldmq for every Raspberry Pi target with cross (needs Docker or
# Podman; `cargo install cross --locked`). Binaries end up in
# target/<triple>/release/fieldmq; copy one to the Pi and run systemd/install.sh there.
#
#   cross/build-all.sh                         all three targets
#   cross/build-all.sh aarch64-unknown-linux-gnu   only the ones named
#
# Without Docker (CI, or a Debian machine), cross/ci-arm.sh builds aarch64 and armv7 with
# Debian's cross compilers instead.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CROSS_CONFIG="$PWD/cross/Cross.toml"

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf arm-unknown-linux-gnueabihf)
fi

command -v cross >/dev/null || { echo "build-all.sh: cross not found: cargo install cross --locked" >&2; exit 1; }

for target in "${targets[@]}"; do
    echo "== $target"
    start=$SECONDS
    # One target at a time: they share target/ and a Pi-sized build machine has few cores.
    cross build --release --locked --target "$target"
    bin="target/$target/release/fieldmq"
    printf '   %s: %s bytes (stripped), %ds\n' "$bin" "$(stat -c %s "$bin")" $((SECONDS - start))
done
