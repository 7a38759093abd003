#!/usr/bin/env bash
# What observability costs on the cheapest request there is (a cache hit).
# Alternates runs (the machine is noisy; medians are printed) of:
#   off     no tracing subscriber at all (metrics are always on)
#   logs    JSON request logs at info, no trace export
#   10%     JSON request logs, 10% of traces exported over OTLP
#   100%    JSON request logs, every trace exported over OTLP
# RUNS (default 8) rounds; each round runs all four in a rotated order.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${RUNS:-8}"
bench=$(scripts/bench-exe.sh gateway)
declare -A rate cpu
run() { # name, env..., -- args...
  local name=$1; shift
  local line
  line=$(env "$@" --hits-only --hit-seconds 6 2>/dev/null | tail -1)
  rate[$name]+="$(sed -E 's/.*: ([0-9]+);.*/\1/' <<<"$line") "
  cpu[$name]+="$(sed -E 's/.*client included\): ([0-9.]+).*/\1/' <<<"$line") "
}
configs=(off logs 10% 100%)
run_config() {
  case $1 in
    off) run off "$bench" ;;
    logs) run logs OTEL_SDK_DISABLED=true "$bench" --telemetry ;;
    10%) run 10% OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.1 "$bench" --telemetry ;;
    100%) run 100% "$bench" --telemetry ;;
  esac
}
# The order rotates every round: on this machine later runs in a sequence were
# measurably slower, which a fixed order would charge to the same configs.
for round in $(seq 0 $((runs - 1))); do
  for i in 0 1 2 3; do
    run_config "${configs[$(((round + i) % 4))]}"
  done
done
median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
base=$(median "${rate[off]}"); base_cpu=$(median "${cpu[off]}")
printf '| telemetry | cache-hit streams/s (median of %s) | vs off | CPU per stream, client included (µs) |\n|---|---|---|---|\n' "$runs"
for name in off logs 10% 100%; do
  r=$(median "${rate[$name]}"); c=$(median "${cpu[$name]}")
  printf '| %s | %s | %s%% | %s |\n' "$name" "$r" "$(awk "BEGIN {printf \"%+.1f\", ($r/$base-1)*100}")" "$c"
done
