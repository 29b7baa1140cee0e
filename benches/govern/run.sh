#!/usr/bin/env bash
# Builds the release binary and runs the govern benchmark (bench.py):
# edgekeeper's /proc scan against `pgrep -x ffmpeg` and a Python /proc scan
# with 1,000 sleeping processes and 3 targets, and proc-connector discovery
# latency. Run as root for the connector numbers. Usage: run.sh [processes]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet
exec python3 benches/govern/bench.py target/release/edgekeeper "${1:-1000}"
