#!/usr/bin/env bash
# Builds the plugins under plugins/ as WebAssembly components (wasm32-wasip2)
# and copies them to plugins/wasm/. Idempotent; quick when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  echo "[build-plugins] installing the wasm32-wasip2 target" >&2
  rustup target add wasm32-wasip2
fi
target_dir="${CARGO_TARGET_DIR:-$PWD/plugins/target}/sluice-plugins"
CARGO_TARGET_DIR="$target_dir" cargo build --quiet --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
mkdir -p plugins/wasm
for wasm in "$target_dir"/wasm32-wasip2/release/*.wasm; do
  cp -p "$wasm" plugins/wasm/
done
