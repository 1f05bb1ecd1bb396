#!/usr/bin/env bash
# The static checks, in order, with the project's virtualenv (`make deps` creates it):
# ruff's lint rules, ruff's formatting, and mypy --strict over corral and tests (the scope and
# strictness are in pyproject.toml's [tool.mypy]). Stops at the first check that fails and
# names it.
set -euo pipefail
cd "$(dirname "$0")/.."

check() {
    local name=$1
    shift
    printf 'lint: %s\n' "$name"
    "$@" || {
        local code=$?
        printf 'lint: FAILED: %s (%s)\n' "$name" "$*" >&2
        exit "$code"
    }
}

check "ruff check" .venv/bin/ruff check corral tests bench
check "ruff format --check" .venv/bin/ruff format --check corral tests bench
check "mypy --strict (corral, tests)" .venv/bin/mypy
