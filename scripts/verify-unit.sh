#!/usr/bin/env bash
# Checks contrib/systemd/flannel-udp.service with `systemd-analyze verify`, strictly: systemd-analyze exits 0
# for many mistakes (an unknown key, a bad value "ignoring"), so any message at all is a failure. The unit is
# verified as installed: ExecStart pointed at the built binary, the man page on MANPATH (Documentation=).
# --self-test also proves the check can fail: a unit with a misspelled key and one with a bad Type= must be
# refused. Usage: scripts/verify-unit.sh BINARY [--self-test]
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:?usage: scripts/verify-unit.sh BINARY [--self-test]}"
unit=contrib/systemd/flannel-udp.service
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/man/man1"
cp man/flannel-udp.1 "$tmp/man/man1/"

# verify FILE: succeeds only when systemd-analyze exits 0 and prints nothing.
verify() {
    local out rc=0
    out="$(MANPATH="$tmp/man" systemd-analyze verify "$1" 2>&1)" || rc=$?
    [ "$rc" -eq 0 ] && [ -z "$out" ] && return 0
    printf '%s\n' "$out" | sed 's/^/    /' >&2
    return 1
}

sed "s#/usr/local/bin/flannel-udp#$bin#" "$unit" >"$tmp/flannel-udp.service"
verify "$tmp/flannel-udp.service" || { echo "FAILED: systemd-analyze verify $unit" >&2; exit 1; }
echo "systemd-analyze verify: $unit is clean"

if [ "${2:-}" = "--self-test" ]; then
    sed 's/^Type=notify/Typo=notify/' "$tmp/flannel-udp.service" >"$tmp/bad-key.service"
    sed 's/^Type=notify/Type=notyfy/' "$tmp/flannel-udp.service" >"$tmp/bad-type.service"
    for bad in bad-key bad-type; do
        if verify "$tmp/$bad.service" 2>/dev/null; then
            echo "FAILED: the check accepted a broken unit ($bad)" >&2
            exit 1
        fi
    done
    echo "systemd-analyze verify: broken units are refused (self-test)"
fi
