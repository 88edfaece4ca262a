#!/usr/bin/env bash
# Duplex's coordinators in high availability, end to end on this machine's
# Docker engine (deploy/compose.ha.yaml: a three-member etcd and three
# coordinators, one of each per site and one on a witness site): build the
# images, bring everything up, back up, start a failover of site a and at
# once `docker kill` the coordinator that leads. Another must lead and
# finish the failover (storage-b primary, account-b master, phase steady),
# backups must go on, the killed coordinator must rejoin as a follower,
# and every backup must restore bit for bit. Tears down with the volumes;
# exits non-zero on any failure.
#
#   deploy/e2e-ha.sh
set -euo pipefail
cd "$(dirname "$0")/.."
P=duplex-e2e-ha
COMPOSE=(docker-compose -f deploy/compose.ha.yaml -p "$P")
BIN=deploy/bin
# Everything below dials 127.0.0.1: publish there whatever deploy/.env says
# (the shell wins over .env).
export DUPLEX_PUBLIC_HOST=127.0.0.1 DUPLEX_BIND_IP=127.0.0.1
COORDINATORS=(coordinator-a coordinator-b coordinator-witness)
# Where compose.ha.yaml publishes each coordinator.
declare -A PORT=([coordinator-a]=7300 [coordinator-b]=7310 [coordinator-witness]=7320)
# The agent's entry points: it asks the coordinator that leads for the
# topology, skips the others, and logs in through the account servers.
export DUPLEX_ENDPOINT=https://127.0.0.1:7300,https://127.0.0.1:7310,https://127.0.0.1:7320,https://127.0.0.1:7000,https://127.0.0.1:7001
unset DUPLEX_TOKEN DUPLEX_COORDINATOR DUPLEX_OPERATOR_TOKEN
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

# container SERVICE: the id of SERVICE's running container, by Compose's
# labels (v1 and v2 both set them; one docker call, no compose start-up).
container() {
  docker ps -q --filter "label=com.docker.compose.project=$P" \
    --filter "label=com.docker.compose.service=$1" | head -n 1
}

# leading: the coordinator that leads. Only the leader answers `status`,
# so each published coordinator is asked alone. Given the whole list,
# duplexctl would follow a follower's pointer to the leader, but that
# names it by its compose address, which does not resolve on this host.
leading() {
  local c
  for c in "${COORDINATORS[@]}"; do
    if DUPLEX_COORDINATOR=https://127.0.0.1:${PORT[$c]} timeout 10 "$BIN/duplexctl" status >/dev/null 2>&1; then
      echo "$c"
      return 0
    fi
  done
  return 1
}
# ctl ARGS...: duplexctl ARGS at the coordinator that leads.
ctl() {
  local c
  c=$(leading) || { echo "no coordinator leads" >&2; return 1; }
  DUPLEX_COORDINATOR=https://127.0.0.1:${PORT[$c]} "$BIN/duplexctl" "$@"
}

# status_is PYTHON: PYTHON is true of `duplexctl status --json`, as `s`,
# with role(NAME) and coordinators() (name -> leader|follower|down).
status_is() {
  local s
  s=$(ctl status --json) || return 1
  python3 -c '
import json, sys
s = json.loads(sys.argv[1])
def role(name):
    return next((x["role"] for x in s["servers"] if x["name"] == name), None)
def coordinators():
    return {x["name"]: x["role"] for x in s["servers"] if x["kind"] == "coordinator"}
sys.exit(0 if eval(sys.argv[2]) else 1)' "$s" "$1"
}
# Exactly one leader among the three coordinators, and the two others follow.
ONE_LEADS='sorted(coordinators().values()) == ["follower", "follower", "leader"]'

healthy() {
  local ps s
  ps=$(docker ps --filter "label=com.docker.compose.project=$P" \
    --format '{{.Label "com.docker.compose.service"}} {{.Status}}') || return 1
  for s in "${COORDINATORS[@]}" account-a account-b storage-a storage-b mirror-a mirror-b; do
    grep -q "^$s Up .*(healthy)" <<<"$ps" || return 1
  done
  # No health check in the etcd image (etcd alone, nothing to probe it
  # with); the coordinators' health checks pass only once they read it.
  for s in etcd-a etcd-b etcd-witness; do
    grep -q "^$s Up " <<<"$ps" || return 1
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

step "build the static binaries and the images"
deploy/build.sh
docker image inspect duplex-etcd:latest >/dev/null 2>&1 \
  || fail "no image duplex-etcd:latest: deploy/build.sh builds it from the etcd on PATH (apt-get install etcd-server)"

step "bring up etcd, three coordinators and both sites"
"${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
up_start=$SECONDS
"${COMPOSE[@]}" up -d
wait_until 240 "every service to be healthy" healthy
echo "   healthy $((SECONDS - up_start)) s after up"
# The CA certificate to trust and the first admin's token, which the
# coordinator that started first wrote to its data dir (docker cp streams
# a tar). The two started after it found the admin in etcd and wrote none.
docker cp "$(container coordinator-a):/ca/ca.pem" "$work/ca.pem"
export DUPLEX_CA=$work/ca.pem
DUPLEX_OPERATOR_TOKEN=$(docker cp "$(container coordinator-a):/data/admin-token" - | tar -xO | tr -d '\n')
export DUPLEX_OPERATOR_TOKEN
[ -n "$DUPLEX_OPERATOR_TOKEN" ] || fail "coordinator-a wrote no admin token"
for c in coordinator-b coordinator-witness; do
  docker cp "$(container "$c"):/data/admin-token" - >/dev/null 2>&1 \
    && fail "$c wrote an admin token too: the coordinators did not start one after the other"
done
export DUPLEX_PASSWORD=e2e-passphrase-$RANDOM$RANDOM
wait_until 60 "one coordinator to lead and two to follow" status_is "$ONE_LEADS"
wait_until 60 "the roles to settle" status_is 'role("storage-a") == "primary" and role("account-a") == "master"'
echo "   $(leading) leads"

step "create an account and back up"
token=""
until token=$(ctl accounts create e2e --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'); do
  (( SECONDS - up_start < 300 )) || fail "could not create the account"
  sleep 0.5
done
export DUPLEX_TOKEN=$token
backup
backup

step "fail over site a and docker kill the leading coordinator at once"
# The coordinator refuses a failover while it does not know how far the
# standbys are behind; ask until it accepts, each time of the one that
# leads then, which is the one killed right after.
accepted=""
deadline=$((SECONDS + 60))
while (( SECONDS < deadline )); do
  old=$(leading) || { sleep 0.5; continue; }
  old_id=$(container "$old")
  if DUPLEX_COORDINATOR=https://127.0.0.1:${PORT[$old]} "$BIN/duplexctl" failover --site a --yes --json \
    >"$work/failover.json" 2>"$work/failover.err"; then
    accepted=1
    break
  fi
  sleep 0.5
done
[ -n "$accepted" ] || fail "the failover was not accepted: $(cat "$work/failover.err" 2>/dev/null)"
[ -n "$old_id" ] || fail "no container for $old"
docker kill "$old_id" >/dev/null
killed_ms=$(date +%s%3N)
kill_at=$SECONDS
read -r op op_state < <(python3 -c 'import json,sys; o=json.load(open(sys.argv[1])); print(o["id"], o["state"])' "$work/failover.json") \
  || fail "unreadable answer to the failover: $(cat "$work/failover.json")"
echo "   failover $op ($op_state) started at $old, killed"
[ "$op_state" = running ] || fail "failover $op was already $op_state when its leader was killed"

step "another coordinator leads and finishes the failover"
wait_until 30 "a coordinator other than $old to lead, and $old to show down" \
  status_is "coordinators().get('$old') == 'down' and any(r == 'leader' for n, r in coordinators().items() if n != '$old')"
new=$(leading) || fail "no coordinator leads"
echo "   $new leads, $((SECONDS - kill_at)) s after the kill"
wait_until 120 "the failover to finish: phase steady, storage-b primary, account-b master" \
  status_is 's["phase"] == "steady" and role("storage-b") == "primary" and role("account-b") == "master"'
echo "   failed over $((SECONDS - kill_at)) s after the kill"
ctl history --json >"$work/history.json" || fail "history"
python3 - "$work/history.json" "$op" "$killed_ms" <<'EOF' || fail "failover $op in history"
import json, sys
from datetime import datetime, timezone

def unix_ms(t):
    for form in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return datetime.strptime(t, form).replace(tzinfo=timezone.utc).timestamp() * 1000
        except ValueError:
            pass
    raise SystemExit(f"unreadable time {t!r}")

events = json.load(open(sys.argv[1]))["events"]
op = next((e for e in events if e["id"] == int(sys.argv[2])), None)
if op is None:
    raise SystemExit(f"failover {sys.argv[2]} is not in history")
if op["kind"] != "failover" or op["state"] != "done":
    raise SystemExit(f"operation {op['id']} is a {op['kind']} {op['state']}: {op.get('error')}")
# Finished by the next leader: after the kill, not before it.
if not op["finished"] or unix_ms(op["finished"]) <= int(sys.argv[3]):
    raise SystemExit(f"failover {op['id']} finished at {op['finished']}, before its leader was killed")
print("   failover %s done, phases: %s" % (op["id"], ", ".join(p["name"] for p in op["phases"])))
EOF

step "back up through the new leader"
backup
home=$(ctl accounts list --json | python3 -c \
  'import json,sys; print(next(a["home"] for a in json.load(sys.stdin)["accounts"] if a["name"]=="e2e"))') \
  || fail "accounts list"
[ "$home" = storage-b ] || fail "account e2e is homed on $home, not storage-b"

step "start $old again: it rejoins as a follower"
# `docker kill` is a manual stop: Docker leaves it down (see e2e.sh).
[ "$(docker inspect -f '{{.State.Running}}' "$old_id")" = false ] \
  || fail "Docker restarted $old after docker kill; this step assumes it does not"
"${COMPOSE[@]}" start "$old"
wait_until 60 "$old to follow, with one leader" \
  status_is "$ONE_LEADS and coordinators()['$old'] == 'follower'"
backup

step "restore every snapshot bit for bit"
for i in "${!SNAPS[@]}"; do
  target="$work/restored$i"
  "$BIN/duplex" restore "${SNAPS[$i]}" --target "$target" || fail "restore ${SNAPS[$i]}"
  diff -r "${TREES[$i]}" "$target/$(basename "${TREES[$i]}")" || fail "snapshot ${SNAPS[$i]} differs"
done
echo "   ${#SNAPS[@]} snapshots restored identical"
ctl status

step "tear down"
"${COMPOSE[@]}" down -v --remove-orphans
echo "e2e-ha: OK"
