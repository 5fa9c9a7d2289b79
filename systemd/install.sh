#!/usr/bin/env bash
# Install fieldmq as a systemd service: binary, unit, sysusers.d and tmpfiles.d entries, docs,
# shell completions and man page, and an example configuration (only if none exists yet). Prints every file it installs.
#
#   sudo systemd/install.sh [--bin PATH] [--config PATH] [--generated DIR]
#     --bin        the fieldmq binary (default target/release/fieldmq)
#     --generated  the completions and man pages (default target/generated, written by
#                  scripts/generate-completions.sh, which this script runs when they are
#                  missing and cargo is at hand)
#     --config     the example config for /etc/fieldmq/fieldmq.toml (default systemd/fieldmq.toml,
#                  which is config/demo.toml with data_dir = "/var/lib/fieldmq")
#   DESTDIR=/tmp/root systemd/install.sh --bin target/aarch64-unknown-linux-gnu/release/fieldmq
#
# With DESTDIR set, files go under that directory (an image being built, a package, a test)
# and nothing on the running system is touched. Without it, the script also creates the
# fieldmq user (systemd-sysusers), fixes the config's ownership (systemd-tmpfiles) and, if
# systemd is running, reloads it; it never enables or starts the service by itself.
#
# Running it again upgrades: the binary and unit are replaced atomically, the config is kept.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

bin="$repo/target/release/fieldmq"
config="$here/fieldmq.toml"
generated="$repo/target/generated"
destdir="${DESTDIR:-}"
destdir="${destdir%/}"

usage() {
    sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --bin) bin="${2:?--bin needs a path}"; shift 2 ;;
        --bin=*) bin="${1#--bin=}"; shift ;;
        --config) config="${2:?--config needs a path}"; shift 2 ;;
        --config=*) config="${1#--config=}"; shift ;;
        --generated) generated="${2:?--generated needs a directory}"; shift 2 ;;
        --generated=*) generated="${1#--generated=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done

die() { echo "install.sh: $*" >&2; exit 1; }

[ -f "$bin" ] || die "no binary at $bin (build it with 'cargo build --release' or pass --bin PATH)"
[ -x "$bin" ] || die "$bin is not executable"
[ -f "$config" ] || die "no example config at $config (pass --config PATH)"
if [ -z "$destdir" ] && [ "$(id -u)" -ne 0 ]; then
    die "installing into / needs root (run with sudo, or set DESTDIR=/some/dir)"
fi

# put SRC DEST MODE: install atomically (copy beside, then rename) so a running fieldmq
# keeps its old binary until restarted instead of failing with "Text file busy".
put() {
    local src="$1" dest="$destdir$2" mode="$3"
    install -d -m 0755 "$(dirname "$dest")"
    install -m "$mode" "$src" "$dest.fieldmq-new"
    mv -f "$dest.fieldmq-new" "$dest"
    printf 'installed %-45s mode %s\n' "$2" "$mode"
}

put "$bin"                      /usr/bin/fieldmq                       0755
put "$here/fieldmq.service"     /usr/lib/systemd/system/fieldmq.service 0644
put "$here/fieldmq.sysusers"    /usr/lib/sysusers.d/fieldmq.conf        0644
put "$here/fieldmq.tmpfiles"    /usr/lib/tmpfiles.d/fieldmq.conf        0644
if [ -f "$repo/docs/raspberry-pi.md" ]; then
    put "$repo/docs/raspberry-pi.md" /usr/share/doc/fieldmq/raspberry-pi.md 0644
fi

# Shell completions and man pages do not depend on the target: scripts/generate-completions.sh
# writes them on the build machine, from the same command-line definition as the binary.
if [ ! -f "$generated/man/fieldmq.1.gz" ] && [ "$generated" = "$repo/target/generated" ] \
    && command -v cargo >/dev/null; then
    bash "$repo/scripts/generate-completions.sh" --out "$generated" >/dev/null || true
fi
if [ ! -f "$generated/man/fieldmq.1.gz" ]; then
    generated=""
fi
if [ -n "$generated" ]; then
    put "$generated/fieldmq.bash"  /usr/share/bash-completion/completions/fieldmq     0644
    put "$generated/_fieldmq"      /usr/share/zsh/vendor-completions/_fieldmq         0644
    put "$generated/fieldmq.fish"  /usr/share/fish/vendor_completions.d/fieldmq.fish  0644
    for page in "$generated"/man/*.1.gz; do
        put "$page" "/usr/share/man/man1/$(basename "$page")" 0644
    done
else
    echo "warning: no completions or man pages in target/generated (or --generated): none installed" >&2
    echo "  (run scripts/generate-completions.sh first)" >&2
fi

# The example config: never overwrite one that is there. /etc/fieldmq is root:fieldmq 0750
# once systemd-tmpfiles has run (below, or at the next boot for an image).
install -d -m 0750 "$destdir/etc/fieldmq"
if [ -e "$destdir/etc/fieldmq/fieldmq.toml" ]; then
    echo "kept      /etc/fieldmq/fieldmq.toml (already exists; example not copied)"
else
    # The service can only write to its StateDirectory (ProtectSystem=strict), so data_dir
    # is pointed there (systemd/fieldmq.toml has it already; a --config file may not).
    tmp="$(mktemp)"
    trap 'rm -f "$tmp"' EXIT
    sed -E 's#^([[:space:]]*data_dir[[:space:]]*=[[:space:]]*).*$#\1"/var/lib/fieldmq"#' "$config" > "$tmp"
    install -m 0640 "$tmp" "$destdir/etc/fieldmq/fieldmq.toml"
    printf 'installed %-45s mode %s (from %s)\n' /etc/fieldmq/fieldmq.toml 0640 "${config#"$repo"/}"
fi

if [ -n "$destdir" ]; then
    echo "DESTDIR=$destdir: the fieldmq user and the config's group are created on the target"
    echo "at boot (systemd-sysusers, systemd-tmpfiles), or run there:"
    echo "  systemd-sysusers fieldmq.conf && systemd-tmpfiles --create fieldmq.conf"
    exit 0
fi

if command -v systemd-sysusers >/dev/null; then
    systemd-sysusers fieldmq.conf
    echo "user      fieldmq ($(id fieldmq))"
else
    echo "warning: systemd-sysusers not found; create the user yourself:" >&2
    echo "  useradd --system --home-dir /var/lib/fieldmq --shell /usr/sbin/nologin --groups dialout fieldmq" >&2
fi
if command -v systemd-tmpfiles >/dev/null && getent group fieldmq >/dev/null; then
    systemd-tmpfiles --create fieldmq.conf
    echo "owner     /etc/fieldmq root:fieldmq 0750, fieldmq.toml root:fieldmq 0640"
fi

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "systemd   daemon-reload done"
    echo
    if systemctl is-active --quiet fieldmq; then
        echo "fieldmq is running the old binary; to switch:  sudo systemctl restart fieldmq"
    else
        echo "Next: edit /etc/fieldmq/fieldmq.toml, check it, then enable and start:"
        echo "  sudo -u fieldmq fieldmq check -c /etc/fieldmq/fieldmq.toml"
        echo "  sudo systemctl enable --now fieldmq"
        echo "  journalctl -u fieldmq -f"
    fi
else
    echo "systemd is not running here; on the target: systemctl daemon-reload && systemctl enable --now fieldmq"
fi
