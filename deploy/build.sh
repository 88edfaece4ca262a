#!/usr/bin/env bash
# Builds statically linked Duplex binaries (glibc, `+crt-static`) and the
# `duplex:latest` image from them, FROM scratch: nothing is pulled.
#
#   deploy/build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(rustc -vV | sed -n 's/^host: //p')
# --target keeps the static flag off build scripts and proc macros; the
# separate target dir keeps these builds from evicting the normal ones.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
  --target "$target" --target-dir target/static --bins
rm -rf deploy/bin
mkdir -p deploy/bin
for b in duplex duplexctl duplex-coordinator duplex-account-server duplex-storage-server duplex-mirror; do
  cp "target/static/$target/release/$b" deploy/bin/
done
docker build --quiet -t duplex:latest deploy
echo "built duplex:latest"
