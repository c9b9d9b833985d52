#!/usr/bin/env bash
# All the tests: unit tests (no privileges) and integration tests (root; each runs in network namespaces it
# creates and removes), short fuzz runs, the check that the man page and completions match the command
# definitions, the systemd unit check, the bench report's tests and a 1-second bench run that every
# configuration must pass (root), and a closing summary line. Installs what it needs first; safe to run again.
# CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

# systemd + man-db: systemd-analyze verify of the unit file (with its Documentation=man: page);
# python3-prometheus-client: the Prometheus text parser the metrics test scrapes /metrics with.
install_packages "${BASE_PACKAGES[@]}" etcd-server etcd-client openssl systemd man-db python3-prometheus-client
require_swift

step "swift build --build-tests"
swift build --build-tests 2>&1 | grep -E "error|warning: unreachable|Compiling|Build" | grep -v "^\[" | tail -5

step "fuzz (20000 runs per target)"
scripts/fuzz.sh --runs 20000

step "man page and completions"
scripts/generate-docs.sh --check

step "systemd unit (systemd-analyze verify, strict)"
scripts/verify-unit.sh "$(swift build --show-bin-path)/flannel-udp" --self-test

step "bench report unit tests"
python3 bench/test_report.py 2>&1 | tail -1

# The benchmark on a fresh machine: every configuration must set up, pass traffic and tear down. Figures from
# 1-second tests say nothing about speed and are not checked.
step "bench smoke run (bench/run --time 1 --runs 1 --lane-spin 50)"
bench_ok=1
if [ "$(id -u)" -ne 0 ]; then
    echo "skipped: not root (the benchmark creates network namespaces)"
else
    raw="$(mktemp -d)"
    # --lane-spin adds the spinning lane ceilings (lane-bound-s50, lane-node-s50, lane-decide-s50)
    if ! bench/run --time 1 --runs 1 --pings 20 --lane-spin 50 --keep-raw "$raw" >/dev/null 2>"$raw.err" ||
        ! python3 bench/report.py --check "$raw"; then
        bench_ok=0
        tail -5 "$raw.err"
    fi
    rm -rf "$raw" "$raw.err"
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "note: not root: the integration tests will skip (they need to create network namespaces)"
fi
step "swift test"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
swift test --disable-swift-testing 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
summary="$(grep -E "^\s*Executed [0-9]+ tests?" "$log" | tail -1)"
total="$(sed -nE 's/.*Executed ([0-9]+) tests?.*/\1/p' <<<"$summary")"
skipped="$(sed -nE 's/.* ([0-9]+) tests? skipped.*/\1/p' <<<"$summary")"
failed="$(sed -nE 's/.* ([0-9]+) failures?.*/\1/p' <<<"$summary")"
total=${total:-0} skipped=${skipped:-0} failed=${failed:-0}
if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
echo "tests: $((total - skipped - failed)) passed, $failed failed, $skipped skipped"
if [ "$bench_ok" -eq 0 ]; then
    echo "bench smoke run FAILED (see above)"
    [ "$rc" -ne 0 ] || rc=1
fi
exit "$rc"
