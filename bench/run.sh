#!/usr/bin/env bash
# keyward benchmarks: builds in release mode, then runs each measurement against the real
# binary on loopback. Usage: bench/run.sh [save-list|ai-latency] [--clients N] [--seconds S]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p keyward -p keyward-bench -p keyward-fakes
what="${1:-save-list}"
shift || true
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
exec target/release/keyward-bench "$what" "$@"
