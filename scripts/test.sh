#!/usr/bin/env bash
# The whole sluice test suite, from a fresh machine: installs and starts what
# the tests need (idempotent, and quick when everything is already there),
# then runs every test against real PostgreSQL, Redis and Kafka (tansu).
#
#   scripts/test.sh            # everything
#   scripts/test.sh kafka      # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CACHE="${SLUICE_CACHE_DIR:-$HOME/.cache/sluice}"
mkdir -p "$CACHE"
log() { printf '\033[1m[test.sh]\033[0m %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 100); do port_open "$1" "$2" && return 0; sleep 0.2; done
  log "nothing answers on $1:$2"; return 1
}

# --- PostgreSQL -----------------------------------------------------------
PG_HOST=127.0.0.1 PG_PORT=5432
if ! port_open $PG_HOST $PG_PORT; then
  log "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
  wait_port $PG_HOST $PG_PORT
fi
export SLUICE_TEST_POSTGRES="${SLUICE_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}"

# --- Redis ----------------------------------------------------------------
if ! port_open 127.0.0.1 6379; then
  log "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port 127.0.0.1 6379
fi
export SLUICE_TEST_REDIS="${SLUICE_TEST_REDIS:-redis://127.0.0.1:6379}"
export SLUICE_TEST_REDIS_SERVER="${SLUICE_TEST_REDIS_SERVER:-$(command -v redis-server || true)}"

# --- Kafka (tansu, a Kafka-compatible broker) -----------------------------
if ! command -v tansu >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/tansu" ]; then
  log "installing tansu (one time, ~10 minutes)"
  cargo install tansu --locked --features dynostore
fi
export PATH="$HOME/.cargo/bin:$PATH"
if ! port_open 127.0.0.1 9092; then
  log "starting tansu on 127.0.0.1:9092 (memory storage)"
  nohup tansu broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 \
    --storage-engine memory://tansu/ >"$CACHE/tansu.log" 2>&1 &
  wait_port 127.0.0.1 9092
fi
export SLUICE_TEST_KAFKA="${SLUICE_TEST_KAFKA:-127.0.0.1:9092}"

# --- Chromium (the browser test, tests/browser.rs) -------------------------
if ! command -v chromium >/dev/null 2>&1; then
  log "installing chromium (one time)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

# --- axe-core (the console's accessibility check, in Chromium) ------------
AXE_VERSION=4.11.4
export SLUICE_AXE="$CACHE/axe-core-$AXE_VERSION/axe.min.js"
if [ ! -f "$SLUICE_AXE" ]; then
  log "fetching axe-core $AXE_VERSION (one time)"
  rm -rf "$CACHE/axe-core-$AXE_VERSION.tmp" && mkdir -p "$CACHE/axe-core-$AXE_VERSION.tmp"
  (cd "$CACHE/axe-core-$AXE_VERSION.tmp" && npm pack "axe-core@$AXE_VERSION" --silent >/dev/null \
    && tar xzf "axe-core-$AXE_VERSION.tgz" --strip-components=1 && rm "axe-core-$AXE_VERSION.tgz")
  mv "$CACHE/axe-core-$AXE_VERSION.tmp" "$CACHE/axe-core-$AXE_VERSION"
fi

# --- WebAssembly plugins --------------------------------------------------
log "building the plugins (wasm32-wasip2)"
scripts/build-plugins.sh
log "testing the plugins' logic"
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/plugins/target}/sluice-plugins-host" \
  cargo test --quiet --locked --manifest-path plugins/Cargo.toml

# --- Python with the OpenAI and Anthropic SDKs (compatibility tests) -------
VENV="$CACHE/venv"
if ! "$VENV/bin/python" -c "import openai, anthropic, agents" >/dev/null 2>&1; then
  log "creating $VENV with the openai, anthropic and openai-agents packages"
  [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet openai anthropic openai-agents
fi
export SLUICE_PYTHON="$VENV/bin/python"

# Tests that need a backend fail instead of skipping.
export SLUICE_REQUIRE_SERVICES=1
# The fault tests run the simulated vLLM as a process of its own (SIGKILLed
# mid-answer); `cargo test` builds only the test harness of a binary.
log "building the simulator binary"
cargo build --locked --quiet -p sluice-simulator --bin sluice-simulator
log "running cargo test"
cargo test --locked --workspace "$@"
