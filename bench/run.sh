#!/usr/bin/env bash
# keyward benchmarks: builds in release mode, then runs one measurement against the real
# binary on loopback. Usage:
#   bench/run.sh [gateway] [--seconds S] [--runs N] [--rate R] [--connections 1,32,256] [--with-litellm] [--baseline REV]
#   bench/run.sh save-list|nodes [--clients N] [--seconds S]
#   bench/run.sh soak [--postgres URL] [--concurrency N] [--duration S] [--stream-ms MS] [--no-faults] [--json PATH]
# `gateway` (the default) needs nginx (Debian nginx-light) for the fake provider; without it
# keyward's own fake is used and the report says so. --with-litellm installs LiteLLM proxy
# into bench/.venv-litellm (PyPI) and measures it in the same run. --baseline REV (a commit,
# branch or tag) builds that revision of keyward in a git worktree (target/bench-baseline) and
# measures it in the same run, next to the working tree's build: a change's before and after
# in one table.
set -euo pipefail
cd "$(dirname "$0")/.."
what=gateway
if [[ $# -gt 0 && "$1" != --* ]]; then what="$1"; shift; fi
args=()
litellm=""
baseline=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --with-litellm) litellm=1 ;;
    --baseline) baseline="${2:?--baseline needs a revision}"; shift ;;
    *) args+=("$1") ;;
  esac
  shift
done
if [[ -n "$baseline" ]]; then
  rev="$(git rev-parse --verify "$baseline^{commit}")"
  tree=target/bench-baseline/src
  git worktree remove --force "$tree" 2>/dev/null || rm -rf "$tree"
  git worktree prune
  git worktree add --detach "$tree" "$rev" >/dev/null
  echo "baseline: $baseline = $(git log -1 --format='%h %s' "$rev" | cut -c1-100)"
  CARGO_TARGET_DIR="$PWD/target/bench-baseline/target" cargo build --release -p keyward --manifest-path "$tree/Cargo.toml"
  args+=(--baseline-bin "$PWD/target/bench-baseline/target/release/keyward")
fi
if [[ -n "$litellm" ]]; then
  venv=bench/.venv-litellm
  # One exact version, never a range: litellm 1.82.7 and 1.82.8 on PyPI were malicious
  # uploads (March 2026; PyPI has since removed them) that a range like >=1.50,<2 took in.
  # 1.110.2 was uploaded 2026-11-20 (pypi.org/pypi/litellm/json). Raise it by hand, after
  # reading what changed; a venv holding another version is rebuilt.
  litellm_version=1.110.2
  if [[ ! -x "$venv/bin/litellm" ]] || ! "$venv/bin/pip" show litellm 2>/dev/null | grep -qx "Version: $litellm_version"; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "litellm[proxy]==$litellm_version"
  fi
  args+=(--litellm "$PWD/$venv/bin/litellm")
fi
cargo build --release -p keyward -p keyward-bench -p keyward-fakes
# Every open stream holds descriptors in the client, the gateway, a worker and the fake: the
# soak's thousands of them need the soft limit at the hard one (the processes started
# below inherit it).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# How idle CPUs wait matters at 1 connection: in a VM, a halted vCPU takes tens of
# microseconds to wake, and each hop of a call (client, gateway, worker, provider, audit
# writer) may wake one; with halt polling (guest_halt_poll_ns > 0) it stays awake briefly.
idle="cpuidle $(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null || echo unknown)"
if [[ -r /sys/module/haltpoll/parameters/guest_halt_poll_ns ]]; then
  idle="$idle, guest_halt_poll_ns $(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns)"
fi
echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r), $idle, load average $(cut -d' ' -f1-3 /proc/loadavg)"
exec target/release/keyward-bench "$what" ${args[@]+"${args[@]}"}
