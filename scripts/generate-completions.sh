#!/usr/bin/env bash
# Write the shell completions and the man pages that the .deb and systemd/install.sh install.
# They are generated on the build machine by fieldmq-docgen (docgen/), from the same
# command-line definition the fieldmq binary parses, so they fit every target's binary and
# the generators stay out of the binary that goes on the Pi.
#
#   scripts/generate-completions.sh [--out DIR] [--docgen PATH]
#     --out     where to write (default target/generated, the path Cargo.toml's deb assets name)
#     --docgen  a fieldmq-docgen already built (default: build it with cargo)
#
# Writes fieldmq.bash, _fieldmq (zsh), fieldmq.fish and man/*.1.gz (fieldmq.1.gz and a page per
# command), and prints each path.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
out="$repo/target/generated"
docgen=""

while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="${2:?--out needs a directory}"; shift 2 ;;
        --docgen) docgen="${2:?--docgen needs a path}"; shift 2 ;;
        -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "generate-completions.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done

if [ -z "$docgen" ]; then
    (cd "$repo" && cargo build --locked --quiet -p fieldmq-docgen)
    docgen="$target_dir/debug/fieldmq-docgen"
fi
mkdir -p "$out"
"$docgen" "$out" | grep -v '\.1$'
for page in "$out/man"/*.1; do
    # -n: no name or time stamp in the header, so the same page gives the same bytes.
    gzip -9nf "$page"
    echo "$page.gz"
done
