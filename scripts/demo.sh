#!/usr/bin/env bash
# Corral's main job on the embedded default (SQLite, local runc sandboxes, a local OCI layout):
# an analyst freezes an environment with matplotlib and a charting script, and every run boots
# that frozen snapshot in an isolated sandbox.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
run() { say "$*"; "$@"; }

corral env rm analyst >/dev/null 2>&1 || true
run corral env create analyst
run corral env exec analyst -- pip install --no-warn-script-location -q matplotlib
say "corral env exec analyst -- sh -c 'cat > /home/user/plot.py' < demo/plot.py"
corral env exec analyst -- sh -c 'cat > /home/user/plot.py' < demo/plot.py
run corral env freeze analyst -m "matplotlib and plot.py"
run corral env history analyst
run corral sandbox run analyst -- python3 /home/user/plot.py
run corral sandbox run analyst -- sh -c 'echo scratch > /home/user/scratch; ls /home/user'
run corral sandbox run analyst -- sh -c 'ls /home/user   # the last run'"'"'s scratch file is gone'
run corral env verify analyst
printf '\nThe snapshot is an OCI image: skopeo inspect oci:%s:analyst\n' "${CORRAL_DATA_DIR:-/var/lib/corral}/oci"
