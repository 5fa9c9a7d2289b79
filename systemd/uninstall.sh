#!/usr/bin/env bash
# Remove what systemd/install.sh installed.
#
#   sudo systemd/uninstall.sh            stop and disable the service, remove binary, unit,
#                                        sysusers/tmpfiles entries and docs; KEEP the config
#                                        (/etc/fieldmq) and the queues (/var/lib/fieldmq)
#   sudo systemd/uninstall.sh --purge    also delete /etc/fieldmq and /var/lib/fieldmq
#                                        (undelivered messages in the SQLite queues are lost)
#   DESTDIR=/tmp/root systemd/uninstall.sh [--purge]
#
# The fieldmq user and group are left in place (as Debian does for system users), so files
# that still carry its uid are never inherited by a later, unrelated account. Remove it with
# `userdel fieldmq` if you are sure.
set -euo pipefail

purge=no
destdir="${DESTDIR:-}"
destdir="${destdir%/}"

while [ $# -gt 0 ]; do
    case "$1" in
        --purge) purge=yes; shift ;;
        -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "uninstall.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done

if [ -z "$destdir" ] && [ "$(id -u)" -ne 0 ]; then
    echo "uninstall.sh: removing from / needs root (run with sudo, or set DESTDIR=/some/dir)" >&2
    exit 1
fi

systemd_running=no
if [ -z "$destdir" ] && [ -d /run/systemd/system ]; then
    systemd_running=yes
    if systemctl list-unit-files fieldmq.service >/dev/null 2>&1; then
        systemctl disable --now fieldmq.service 2>/dev/null || true
        echo "stopped   fieldmq.service (and disabled it)"
    fi
fi

remove() {
    local path="$destdir$1"
    if [ -e "$path" ] || [ -L "$path" ]; then
        rm -f "$path"
        echo "removed   $1"
    fi
}

remove /usr/bin/fieldmq
remove /usr/lib/systemd/system/fieldmq.service
remove /usr/lib/sysusers.d/fieldmq.conf
remove /usr/lib/tmpfiles.d/fieldmq.conf
remove /usr/share/doc/fieldmq/raspberry-pi.md
remove /usr/share/bash-completion/completions/fieldmq
remove /usr/share/zsh/vendor-completions/_fieldmq
remove /usr/share/fish/vendor_completions.d/fieldmq.fish
for page in "$destdir"/usr/share/man/man1/fieldmq.1.gz "$destdir"/usr/share/man/man1/fieldmq-*.1.gz; do
    remove "${page#"$destdir"}"
done
rmdir "$destdir/usr/share/doc/fieldmq" 2>/dev/null || true

if [ "$purge" = yes ]; then
    for dir in /etc/fieldmq /var/lib/fieldmq; do
        if [ -e "$destdir$dir" ]; then
            rm -rf -- "$destdir$dir"
            echo "purged    $dir"
        fi
    done
else
    if [ -e "$destdir/etc/fieldmq" ]; then
        echo "kept      /etc/fieldmq (configuration; --purge deletes it)"
    fi
    if [ -e "$destdir/var/lib/fieldmq" ]; then
        echo "kept      /var/lib/fieldmq (queues; --purge deletes it)"
    fi
fi

if [ "$systemd_running" = yes ]; then
    systemctl daemon-reload
    systemctl reset-failed fieldmq.service 2>/dev/null || true
    echo "systemd   daemon-reload done"
fi
echo "user fieldmq kept (userdel fieldmq removes it)"
