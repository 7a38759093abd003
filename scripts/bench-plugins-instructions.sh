#!/usr/bin/env bash
# What the example plugins cost on a cache hit, in instructions per stream
# (steadier than wall-clock throughput on a shared 2-core machine, though not
# exact: thread scheduling moves the count a little). Each configuration runs twice under
# cachegrind (3 s and 9 s of hits); the difference divided by the difference
# in streams is the marginal cost of one stream, startup and plugin
# compilation excluded. The instance pool is shrunk to 64 so valgrind can map
# it, and plugin deadlines raised to 5 s (guests run ~50 times slower).
#
#   scripts/build-plugins.sh && scripts/bench-plugins-instructions.sh [none censor ...]
set -euo pipefail
cd "$(dirname "$0")/.."
# BENCH_EXE runs another build of the benchmark.
bench=${BENCH_EXE:-$(scripts/bench-exe.sh plugins)}
measure() { # seconds, plugins -> "instructions streams"
  local err out
  err=$(mktemp)
  out=$(BENCH_MAX_INSTANCES=64 BENCH_PLUGIN_TIMEOUT_MS=5000 BENCH_ONLY_HITS=$2 BENCH_HIT_SECONDS=$1 \
    valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
    --log-file="$err" "$bench" 2>/dev/null)
  printf '%s %s\n' "$(grep -oE 'I +refs: +[0-9,]+' "$err" | grep -oE '[0-9,]+$' | tr -d ,)" \
    "$(grep -oE '^[0-9]+ streams' <<<"$out" | grep -oE '[0-9]+')"
  rm -f "$err"
}
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(none guard pii normalizer censor all)
# REPEAT (default 3) pairs of runs per configuration; the median is printed.
# The plugin-free count moves by about ±2.5 % from pair to pair (thread
# wake-ups weigh more when a stream does little work); with plugins, ±0.3 %.
repeat="${REPEAT:-3}"
declare -A cost
for name in "${configs[@]}"; do
  costs=()
  for _ in $(seq "$repeat"); do
    read -r i1 s1 < <(measure 3 "$name")
    read -r i2 s2 < <(measure 9 "$name")
    costs+=($(( (i2 - i1) / (s2 - s1) )))
  done
  cost[$name]=$(printf '%s\n' "${costs[@]}" | sort -n | sed -n "$(( (repeat + 1) / 2 ))p")
  echo "$name: ${costs[*]}" >&2
done
printf '| plugins | instructions per cache-hit stream | vs none |\n|---|---|---|\n'
for name in "${configs[@]}"; do
  base=${cost[none]:-${cost[$name]}}
  printf '| %s | %s | %s |\n' "$name" "${cost[$name]}" \
    "$(awk "BEGIN {printf \"%.0f %%\", ${cost[$name]}/$base*100}")"
done
