#!/usr/bin/env bash
# Install everything Corral needs on a fresh Debian bookworm machine, skipping what is there:
# Debian packages, the Python virtualenv with Corral and its dependencies, the base image,
# and a `corral` command on PATH. Safe to run again: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'install-deps: %s\n' "$*"; }
[[ $(id -u) -eq 0 ]] || { echo "install-deps: must run as root (apt, mounts, runc)" >&2; exit 1; }

# chromium and chromium-driver: the web UI's end-to-end test clicks Run in a real browser.
APT_PACKAGES=(runc skopeo debootstrap nftables iproute2 e2fsprogs tar nginx wrk chromium chromium-driver)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.corral-deps
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    log "pip install -e .[dev]"
    .venv/bin/pip install -q -e '.[dev]'
    echo "$want" > "$stamp"
fi

scripts/build-base-image.sh

ln -sf "$PWD/.venv/bin/corral" /usr/local/bin/corral
log "ready: $(corral --version)"
