#!/usr/bin/env bash
# Builds a benchmark and prints its executable's path (a test binary of the
# same name may sit beside it in target/release/deps).
#
#   scripts/bench-exe.sh gateway
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench "$1" --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["kind"] == ["bench"] and m.get("executable"):
        print(m["executable"])'
