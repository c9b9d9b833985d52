# Shared by scripts/demo.sh, scripts/test.sh and bench/run: install what is missing, build, and print steps.
# Sourced, not run.

: "${SWIFT_DIR:=/opt/swift/usr/bin}"
if ! command -v swift >/dev/null 2>&1 && [ -x "$SWIFT_DIR/swift" ]; then
    export PATH="$SWIFT_DIR:$PATH"
fi

step() { printf '[+] %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# install_packages PKG...: apt-get install whatever is not installed yet (so a second run does nothing).
install_packages() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing packages (${missing[*]}); run as root to install them"
    step "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
}

require_swift() {
    command -v swift >/dev/null 2>&1 || die "Swift 6.x is needed (expected at $SWIFT_DIR); see https://swift.org/install"
}

# Packages every entry point needs: libmnl and libnftables for building, iproute2/ping/iperf3 for namespaces and
# traffic, nftables/iptables (the nft and iptables-restore tools) for --ip-masq and its tests, pkg-config so
# SwiftPM finds the libraries.
BASE_PACKAGES=(libmnl-dev libnftables-dev nftables iptables pkg-config iproute2 iputils-ping iperf3 procps util-linux python3)
