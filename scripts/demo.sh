#!/usr/bin/env bash
# Corral's main job on the embedded default (SQLite, local runc sandboxes, a local OCI layout):
# an analyst freezes an environment with matplotlib and a charting agent; every run boots that
# frozen snapshot in an isolated sandbox, hot-swaps in the current runner, and fetches prices
# through the host-side bridge, which holds the market-data API key the sandbox never sees.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
run() { say "$*"; "$@"; }
PY=.venv/bin/python
KEY="mk-demo-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"

# The "remote" service: a local market-data API that demands its key (X-Api-Key).
fifo=$(mktemp -u); mkfifo "$fifo"
scan=$(mktemp)
$PY -m tests.fakes.market --port 0 --key "$KEY" > "$fifo" &
market_pid=$!
trap 'kill $market_pid 2>/dev/null || true; rm -f "$fifo" "$scan"' EXIT
read -r MARKET < "$fifo"
printf 'market-data service (stands in for a paid API) at %s\n' "$MARKET"

corral env rm analyst >/dev/null 2>&1 || true
run corral env create analyst
run corral env exec analyst -- pip install --no-warn-script-location -q matplotlib
say "corral env exec analyst -- sh -c 'cat > /home/user/agent.py' < demo/agent.py"
corral env exec analyst -- sh -c 'cat > /home/user/agent.py' < demo/agent.py
run corral env freeze analyst -m "matplotlib and the charting agent"
run corral env history analyst

run corral connection add market --base-url "$MARKET" --auth header:X-Api-Key
say "echo \$KEY | corral secret set alice market --kind api_key"
echo "$KEY" | corral secret set alice market --kind api_key
run corral secret list

run corral run analyst agent.py:main --input '{"ticker": "ACME"}' --user alice --connection market
say "corral run ... (again: the runner was folded into the snapshot, no swap this time)"
corral run analyst agent.py:main --input '{"ticker": "BETA"}' --user alice --connection market 2>&1 \
  | grep -v '^  |' || true

# The key is nowhere in a sandbox. Proven from the host: the sandbox sends out its environment
# and its files, and the host looks for the key in them. The key itself never enters a sandbox,
# not even as a search pattern.
run corral sandbox run analyst -- env
say "corral sandbox run analyst -- sh -c 'env; tar -c /home /tmp /etc /opt /usr/local' > \$scan"
corral sandbox run analyst -- sh -c 'env; tar -c -f - /home /tmp /etc /opt /usr/local 2>/dev/null' \
  > "$scan" || true
grep -qaF home/user/agent.py "$scan" || { echo "the scan saw no files: nothing proven" >&2; exit 1; }
copies=$(grep -caF "$KEY" "$scan" || true)
printf 'scanned %s bytes of the sandbox'"'"'s environment and files on the host: %s copies of the key\n' \
  "$(wc -c < "$scan")" "$copies"
[ "$copies" = 0 ] || { echo "the key reached the sandbox" >&2; exit 1; }
run corral env history analyst
run corral env verify analyst
printf '\nThe snapshots are OCI images: skopeo inspect oci:%s:analyst\n' "${CORRAL_DATA_DIR:-/var/lib/corral}/oci"
