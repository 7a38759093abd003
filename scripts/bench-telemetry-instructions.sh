#!/usr/bin/env bash
# What observability costs on a cache hit, in instructions rather than
# seconds: on this shared 2-core machine, throughput and CPU time drift by
# ±15 % between runs, while valgrind's instruction count is repeatable. Each
# configuration runs twice under cachegrind (3 s and 9 s of cache hits); the
# difference divided by the difference in streams is the marginal cost of one
# stream, startup excluded. Run it on an otherwise idle machine: under load,
# fewer streams share the per-second work and each looks dearer. Everything in the process counts: the gateway,
# the in-process client, the log writer and trace exporter threads, and the
# in-process OTLP sink the traces are posted to.
#
#   scripts/bench-telemetry-instructions.sh [off logs 10% 100%]
set -euo pipefail
cd "$(dirname "$0")/.."
# BENCH_EXE runs another build of the benchmark (to compare two commits).
bench=${BENCH_EXE:-$(scripts/bench-exe.sh gateway)}
measure() { # seconds, "VAR=value ...", bench args... -> "instructions streams"
  local seconds=$1 vars=$2; shift 2
  local err out
  err=$(mktemp)
  # shellcheck disable=SC2086 # $vars is a list of assignments
  out=$(env $vars valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
    --log-file="$err" "$bench" "$@" --hits-only --hit-seconds "$seconds" 2>/dev/null | tail -1)
  printf '%s %s\n' "$(grep -oE 'I +refs: +[0-9,]+' "$err" | grep -oE '[0-9,]+$' | tr -d ,)" \
    "$(grep -oE '[0-9]+ streams' <<<"$out" | grep -oE '[0-9]+')"
  rm -f "$err"
}
# REPEAT (default 3) pairs of runs per configuration; the median is printed
# (one pair can be off by ~1.5 %, more than some of the differences measured).
repeat="${REPEAT:-3}"
declare -A cost
run() { # name, "VAR=value ...", bench args...
  local name=$1; shift
  local costs=()
  for _ in $(seq "$repeat"); do
    read -r i1 s1 < <(measure 3 "$@")
    read -r i2 s2 < <(measure 9 "$@")
    costs+=($(( (i2 - i1) / (s2 - s1) )))
  done
  cost[$name]=$(printf '%s\n' "${costs[@]}" | sort -n | sed -n "$(( (repeat + 1) / 2 ))p")
  echo "$name: ${costs[*]}" >&2
}
# Configurations to run (default: all four); the first is the baseline.
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(off logs 10% 100%)
for name in "${configs[@]}"; do
  case $name in
    off) run off "" ;;
    logs) run logs "OTEL_SDK_DISABLED=true" --telemetry ;;
    10%) run 10% "OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.1" --telemetry ;;
    100%) run 100% "" --telemetry ;;
    *) echo "unknown configuration $name (off, logs, 10%, 100%)" >&2; exit 2 ;;
  esac
done
base=${configs[0]}
printf '| telemetry | instructions per cache-hit stream | vs %s |\n|---|---|---|\n' "$base"
for name in "${configs[@]}"; do
  printf '| %s | %s | %s%% |\n' "$name" "${cost[$name]}" \
    "$(awk "BEGIN {printf \"%+.1f\", (${cost[$name]}/${cost[$base]}-1)*100}")"
done
