#!/usr/bin/env bash
# The Python SDK suite: the providers' official SDKs (openai, anthropic, google-genai)
# against the real keyward and keyward-fakes binaries.
#
#   bash tests/python/run.sh [pytest args…]
#
# Creates the virtualenv .venv-sdk at the workspace root ($KEYWARD_SDK_VENV overrides) if missing, installs
# tests/python/requirements.txt from PyPI (again only when that file changed), builds the two
# binaries, and runs pytest. When python3 or the packages cannot be had, it fails under
# KEYWARD_TEST_REQUIRE_ALL=1 (as in CI) and otherwise prints a skip line and exits 0.
# pytest finding no test (its exit code 5) is a failure.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"

VENV="${KEYWARD_SDK_VENV:-$ROOT/.venv-sdk}"
REQS="$ROOT/tests/python/requirements.txt"
STAMP="$VENV/.requirements.sha256"
export PYTHONDONTWRITEBYTECODE=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

unavailable() {
  if [ "${KEYWARD_TEST_REQUIRE_ALL:-}" = "1" ]; then
    echo "tests/python: FAILED: $1 (KEYWARD_TEST_REQUIRE_ALL=1: a missing dependency is a failure)" >&2
    exit 1
  fi
  echo "tests/python: SKIPPED the Python SDK suite: $1 (set KEYWARD_TEST_REQUIRE_ALL=1 to make this a failure)"
  if [ -n "${KEYWARD_TEST_SKIP_LOG:-}" ]; then
    printf 'Python: %s\ttests/python (the whole SDK suite)\n' "$1" >>"$KEYWARD_TEST_SKIP_LOG"
  fi
  exit 0
}

venv_ok() { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1; }

# In CI (root, Debian) the interpreter or its venv module may be missing: install them.
apt_python() {
  if [ -n "${CI:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== tests/python: installing python3 and python3-venv"
    apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null || true
  fi
}

if ! command -v python3 >/dev/null 2>&1; then
  apt_python
  command -v python3 >/dev/null 2>&1 || unavailable "python3 is not installed"
fi

if ! venv_ok; then
  rm -rf "$VENV"
  echo "== tests/python: creating $VENV"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    apt_python
    python3 -m venv "$VENV" >/dev/null 2>&1 || { rm -rf "$VENV"; unavailable "python3 -m venv failed (is python3-venv installed?)"; }
  fi
fi

want="$(sha256sum "$REQS" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ] \
  || ! "$VENV/bin/python" -c 'import openai, anthropic, google.genai, pytest' >/dev/null 2>&1; then
  echo "== tests/python: pip install -r tests/python/requirements.txt"
  rm -f "$STAMP"
  "$VENV/bin/python" -m pip install -q -r "$REQS" || unavailable "pip could not install tests/python/requirements.txt"
  echo "$want" >"$STAMP"
fi
"$VENV/bin/python" -m pip list 2>/dev/null | grep -Ei '^(openai|anthropic|google-genai|pytest) ' | tr -s ' ' | paste -sd' ' - \
  | sed 's/^/== tests\/python: /'

# Built the way `cargo test --workspace` builds them (same feature set), so after the Rust
# tests this is a no-op instead of a second build of every dependency.
echo "== tests/python: cargo test --workspace --no-run (builds keyward and keyward-fakes)"
cargo test --workspace --no-run

set +e
"$VENV/bin/python" -m pytest "$ROOT/tests/python" -p no:cacheprovider -ra "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "tests/python: FAILED: pytest collected no test" >&2
  exit 1
fi
exit "$code"
