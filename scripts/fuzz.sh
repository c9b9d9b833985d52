#!/usr/bin/env bash
# Fuzz the parsers and the per-packet decisions with libFuzzer (swiftc -sanitize=fuzzer,address).
#
#   scripts/fuzz.sh [--runs N | --seconds S] [target...]
#
# Targets (all by default):
#   packet      IPv4 validator, ICMP builder, PacketDecider.fromTun/fromUDP against a small route table
#   control     control-protocol request decoder (JSON line), with a round trip
#   peers       peers file parser
#   subnetfile  subnet.env parser, with a round trip through what we write
#   etcd        NetworkConfig(json:), LeaseAttributes(json:), SubnetKey.parse (first byte picks which)
#   tso         tun -> UDP offloads: virtio-net header, NEEDS_CSUM completion, TSO segmentation into the send queue
#   gro         UDP -> tun offloads: GRO split, PacketDecider.fromUDP, TCP coalescing (re-segmented and compared)
#   netlink     netlink reply parser (libmnl's mnl_cb_run2 + ReplyCollector) and the link/address/route parsers
#
# tso, gro and netlink take inputs up to 64 KiB (a super-packet, a GRO buffer, a dump); the others 4 KiB.
# Each target starts from its committed seed corpus fuzz/corpus/<target>/ (read only: new inputs go to
# .build-fuzz/corpus/<target>/, which is kept between runs) and runs N iterations (default 5000) or S seconds.
# A crash or a violated invariant leaves the input in .build-fuzz/crashes/<target>/ and fails the script;
# reproduce it with: FLANNEL_FUZZ_TARGET=<target> .build-fuzz/flannel-udp-fuzz <file>
#
# Sources/FlannelCore (every file) and fuzz/FuzzTargets.swift are compiled with swiftc into one instrumented binary;
# the two packages the core needs (swift-atomics, swift-log) are taken from the debug build, so this runs
# `swift build` first when that is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
require_swift

ALL_TARGETS=(packet control peers subnetfile etcd tso gro netlink)
runs=5000
seconds=""
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs="$2"; seconds=""; shift 2 ;;
        --seconds) seconds="$2"; runs=""; shift 2 ;;
        -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ " ${ALL_TARGETS[*]} " == *" $1 "* ]] || die "unknown target '$1' (one of: ${ALL_TARGETS[*]})"
           targets+=("$1"); shift ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")

# The fuzz entry and the whole FlannelCore target (the data plane, the packet code, the route table, the counters,
# the parsers), compiled as one instrumented module: every file of that directory, so there is no list to keep.
mapfile -t CORE < <(find Sources/FlannelCore -name '*.swift' | sort)
[ ${#CORE[@]} -gt 0 ] || die "no sources under Sources/FlannelCore"

out=.build-fuzz
bin="$out/flannel-udp-fuzz"
modules=.build/debug/Modules
if [ ! -f "$modules/Atomics.swiftmodule" ] || ! ls .build/debug/Atomics.build/*.o >/dev/null 2>&1 \
    || [ ! -f "$modules/Logging.swiftmodule" ] || ! ls .build/debug/Logging.build/*.o >/dev/null 2>&1 \
    || ! ls .build/debug/CShims.build/*.o >/dev/null 2>&1; then
    step "swift build --target Atomics --target Logging --target CShims (the fuzz build links the debug build's objects)"
    swift build --target Atomics >/dev/null
    swift build --target Logging >/dev/null
    swift build --target CShims >/dev/null
fi
shims="$(find .build/checkouts -path '*/_AtomicsShims/include/module.modulemap' | head -1)"
[ -n "$shims" ] || die "swift-atomics checkout not found under .build/checkouts"

mkdir -p "$out"
# The C modules the offload and netlink code imports: CShims (its object from the debug build) and CNetlink (libmnl).
printf 'module CShims {\n    header "%s"\n    export *\n}\n' "$PWD/Sources/CShims/include/CShims.h" >"$out/CShims.modulemap"
inputs=(fuzz/FuzzTargets.swift "${CORE[@]}")
newest="$(ls -t "${inputs[@]}" "$0" | head -1)"
# A file removed from the core makes the binary stale too: the list it was built from is kept next to it.
if [ ! -x "$bin" ] || [ "$newest" -nt "$bin" ] || [ "$(cat "$bin.sources" 2>/dev/null)" != "${inputs[*]}" ]; then
    step "swiftc -sanitize=fuzzer,address -> $bin"
    swiftc -sanitize=fuzzer,address -Onone -parse-as-library -module-name FlannelUDPFuzz -package-name flannel_udp -use-ld=lld -suppress-warnings \
        -I "$modules" -Xcc -fmodule-map-file="$shims" -Xcc -fmodule-map-file="$out/CShims.modulemap" \
        -Xcc -fmodule-map-file=Sources/CNetlink/module.modulemap -lmnl \
        "${inputs[@]}" .build/debug/Atomics.build/*.o .build/debug/_AtomicsShims.build/*/*.o \
        .build/debug/Logging.build/*.o .build/debug/CShims.build/*.o -o "$bin" 2>&1 | grep -v "^\s*$" || true
    [ -x "$bin" ] || die "fuzz build failed"
    printf '%s' "${inputs[*]}" >"$bin.sources"
fi

failed=()
for t in "${targets[@]}"; do
    mkdir -p "$out/corpus/$t" "$out/crashes/$t" "fuzz/corpus/$t"
    limit=(-runs="$runs")
    [ -n "$seconds" ] && limit=(-max_total_time="$seconds")
    step "fuzz $t (${runs:+$runs runs}${seconds:+$seconds s})"
    log="$out/$t.log"
    # tso, gro and netlink: inputs up to 64 KiB from the first run (libFuzzer otherwise grows the length limit
    # slowly, and the large super-packets and GRO buffers are where their bounds are).
    size=(-max_len=4096)
    case "$t" in tso|gro|netlink) size=(-max_len=65536 -len_control=0) ;; esac
    if FLANNEL_FUZZ_TARGET="$t" "$bin" "${limit[@]}" "${size[@]}" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$out/crashes/$t/" "$out/corpus/$t" "fuzz/corpus/$t" >"$log" 2>&1; then
        grep -E "^stat::number_of_executed_units|Done [0-9]+ runs" "$log" | tail -1 | sed 's/^/    /'
    else
        tail -40 "$log"
        echo "    CRASH in $t: see $log and $out/crashes/$t/"
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    die "fuzzing found crashes in: ${failed[*]}"
fi
echo "fuzz: ${#targets[@]} targets, no crashes"
