#!/usr/bin/env bash
# Builds, on a machine without a GPU, what a GPU machine with no Rust needs for one device run
# (issue 14): the `--features cuda` `zoo` and integration-test binaries, stripped and
# xz-compressed (about 13 and 11 MB instead of 59 and 50: a device call carries at most 64 MiB
# with the working tree), into DIR (default .gpu-pack, which git ignores). scripts/gpu-run.sh
# unpacks and runs them there.
#
#   scripts/gpu-pack.sh [DIR]      # ~16 min cold on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.gpu-pack}"
mkdir -p "$dir"
cargo build --release -p zoo-cli --features cuda
test_bin=$(cargo test --release -p zoo-tests --features cuda --no-run --test integration \
    --message-format=json 2>/dev/null | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "integration" and m.get("executable"):
        print(m["executable"])' | tail -1)
[[ -n "$test_bin" ]] || { echo "gpu-pack: no integration-test binary" >&2; exit 1; }
for pair in "target/release/zoo:zoo" "$test_bin:integration"; do
    cp "${pair%%:*}" "$dir/${pair##*:}"
    strip "$dir/${pair##*:}"
    xz -f -T2 -6 "$dir/${pair##*:}"
done
git rev-parse HEAD >"$dir/commit"
ls -la "$dir"
