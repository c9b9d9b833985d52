#!/usr/bin/env bash
# Regenerates man/flannel-udp.1 and completions/ from the command definitions (swift-argument-parser's
# generate-manual plugin and --generate-completion-script). With --check, regenerates into a temporary
# directory and fails if the committed files differ: the test command runs that, so stale docs fail CI.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
require_swift

check=false
[ "${1:-}" = "--check" ] && check=true
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

swift build --product flannel-udp >/dev/null
BIN="$(swift build --show-bin-path)/flannel-udp"
mkdir -p "$out/completions" "$out/man"
"$BIN" --generate-completion-script bash >"$out/completions/flannel-udp.bash"
"$BIN" --generate-completion-script zsh >"$out/completions/_flannel-udp"
"$BIN" --generate-completion-script fish >"$out/completions/flannel-udp.fish"
# The plugin stamps the build date into the page; a fixed date keeps the committed file reproducible.
swift package plugin --allow-writing-to-package-directory generate-manual --configuration debug \
    --date 2026-11-26 --section 1 --authors "the flannel-udp developers" >/dev/null
cp .build/plugins/GenerateManual/outputs/flannel-udp/flannel-udp.1 "$out/man/flannel-udp.1"

if $check; then
    status=0
    for f in completions/flannel-udp.bash completions/_flannel-udp completions/flannel-udp.fish man/flannel-udp.1; do
        if ! cmp -s "$f" "$out/$f"; then
            echo "stale: $f (run scripts/generate-docs.sh and commit the result)" >&2
            diff -u "$f" "$out/$f" | head -20 >&2 || true
            status=1
        fi
    done
    [ $status -eq 0 ] && echo "man page and completions are current"
    exit $status
fi
mkdir -p completions man
cp "$out"/completions/* completions/
cp "$out/man/flannel-udp.1" man/
echo "wrote completions/ and man/flannel-udp.1"
