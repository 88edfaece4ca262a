#!/usr/bin/env bash
# Builds statically linked Duplex binaries (glibc, `+crt-static`) and the
# `duplex:latest` image from them, FROM scratch: nothing is pulled. Then
# `duplex-etcd:latest` (deploy/compose.ha.yaml) from the etcd on PATH.
#
#   deploy/build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# The image's binaries use the `image` profile: release, stripped, no debug
# info. It lives in Cargo.toml; say so plainly rather than let cargo fail
# with "profile `image` is not defined".
grep -q '^\[profile\.image\]' Cargo.toml || {
  echo "deploy/build.sh: Cargo.toml has no [profile.image]; add:" >&2
  printf '  [profile.image]\n  inherits = "release"\n  debug = false\n  strip = true\n' >&2
  exit 1
}
target=$(rustc -vV | sed -n 's/^host: //p')
# --target keeps the static flag off build scripts and proc macros; the
# separate target dir keeps these builds from evicting the normal ones.
# Cargo puts a custom profile's output in a directory named after it:
# target/static/<triple>/image/.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --profile image --locked \
  --target "$target" --target-dir target/static --bins
rm -rf deploy/bin
mkdir -p deploy/bin
for b in duplex duplexctl duplex-coordinator duplex-account-server duplex-storage-server duplex-mirror; do
  cp "target/static/$target/image/$b" deploy/bin/
done
# The image runs as 65532:65532, not root. A fresh named volume takes the
# owner and mode of the image's directory it is first mounted on, so every
# path compose.yaml mounts a volume on is made here, empty and 0700, and
# copied into the image owned by 65532 (the Dockerfile's second COPY).
# They sit under bin/ only because deploy/.dockerignore lets nothing else
# but the Dockerfile into the build context.
for d in data ca enroll coordinator; do
  mkdir -p "deploy/bin/.mountpoints/$d"
  chmod 700 "deploy/bin/.mountpoints/$d"
done
docker build --quiet -t duplex:latest deploy
echo "built duplex:latest"

# The etcd deploy/compose.ha.yaml's coordinators share, as `duplex-etcd:latest`,
# also FROM scratch and pulled from nowhere: Debian's etcd (`apt-get install
# etcd-server`, as .ci/run does) with what it links. Without an etcd on
# PATH only compose.ha.yaml lacks its image: say so and build the rest.
build_etcd() {
  local etcd libs lib ctx=deploy/etcd/bin
  etcd=$(command -v etcd) || {
    echo "deploy/build.sh: no etcd on PATH (apt-get install etcd-server); duplex-etcd:latest," \
      "which deploy/compose.ha.yaml runs, is not built" >&2
    return 0
  }
  rm -rf "$ctx"
  mkdir -p "$ctx/root/bin"
  cp -L "$etcd" "$ctx/root/bin/etcd"
  # Debian's etcd links the C library: each path ldd prints (libc, and the
  # loader, /lib64/ld-linux-x86-64.so.2, which the binary names) is copied
  # to that same path, symlinks resolved, as the image has no /lib64 ->
  # usr/lib64. A statically linked etcd has none (ldd fails).
  libs=$(ldd "$etcd" 2>/dev/null | grep -o '/[^ ]*') || libs=""
  for lib in $libs; do
    mkdir -p "$ctx/root$(dirname "$lib")"
    cp -L "$lib" "$ctx/root$lib"
  done
  # The data volume's mount point, as for duplex:latest (see above).
  mkdir -p "$ctx/.mountpoints/data"
  chmod 700 "$ctx/.mountpoints/data"
  docker build --quiet -t duplex-etcd:latest deploy/etcd
  echo "built duplex-etcd:latest ($("$etcd" --version | sed -n 1p))"
}
build_etcd
