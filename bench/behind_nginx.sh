#!/usr/bin/env bash
# Two `hanlin serve` replicas on one PostgreSQL behind nginx, with the
# README's "Running at scale" proxy settings (plain HTTP on loopback instead
# of TLS). Checks, and prints:
#   - a stream through nginx arrives as it is generated (time to the first
#     byte against the whole answer: proxy_buffering off works);
#   - requests are spread over both replicas (each one's /metrics);
#   - the replica running a long answer, told to stop (SIGTERM: drain),
#     finishes it, and the requests sent meanwhile are all answered by the
#     other.
# Needs nginx (apt-get install nginx-light) and the model in the store.
#   bench/behind_nginx.sh [MODEL]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-smollm2-135m}"
HANLIN="${HANLIN:-target/release/hanlin}"
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
[ -x "$NGINX" ] || { echo "nginx is not installed (apt-get install nginx-light)" >&2; exit 1; }
[ -x "$HANLIN" ] || cargo build --release --bin hanlin
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs); $(nproc) cores; commit $(git rev-parse --short HEAD)"

SERVER="$(scripts/start_postgres.sh 2>/dev/null | tail -1)"
NAME="hanlin_nginx_$$"
psql "$SERVER" -q -c "CREATE DATABASE $NAME"
DB="${SERVER%/*}/$NAME"
TMP="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$TMP/nginx.pid" ] && kill "$(cat "$TMP/nginx.pid")" 2>/dev/null || true
  sleep 1
  psql "$SERVER" -q -c "DROP DATABASE IF EXISTS $NAME" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
A=$(free_port); B=$(free_port); P=$(free_port)

KEY=$("$HANLIN" admin key create --user nginx-user --plan plus --database-url "$DB" | tail -1 | xargs)
for port in $A $B; do
  HANLIN_LOG=warn "$HANLIN" -t 1 serve --port "$port" --model "$MODEL" --database-url "$DB" \
    --trusted-proxies 127.0.0.1 --allowed-hosts localhost --replica-id "r$port" --drain-secs 30 \
    --files-dir "$TMP/files$port" >"$TMP/r$port.log" 2>&1 &
  PIDS+=($!)
done
cat >"$TMP/nginx.conf" <<EOF
pid $TMP/nginx.pid;
error_log $TMP/nginx.err;
events {}
http {
    access_log off;
    client_body_temp_path $TMP/body;
    proxy_temp_path $TMP/proxy;
    upstream hanlin {
        least_conn;
        server 127.0.0.1:$A max_fails=2 fail_timeout=5s;
        server 127.0.0.1:$B max_fails=2 fail_timeout=5s;
    }
    server {
        listen 127.0.0.1:$P;
        server_name localhost;
        client_max_body_size 64m;
        location / {
            proxy_pass http://hanlin;
            proxy_http_version 1.1;
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_buffering off;
            proxy_read_timeout 600s;
        }
    }
}
EOF
"$NGINX" -c "$TMP/nginx.conf" -p "$TMP"
for port in $A $B; do
  for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.5; done
done
URL="http://localhost:$P"
body() { echo "{\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"$1\"}], \"max_tokens\": $2, \"temperature\": 0, \"stream\": true}"; }
chat() { curl -sN -o "$3" -w '%{http_code} %{time_starttransfer} %{time_total}\n' "$URL/v1/chat/completions" \
  -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' -d "$(body "$1" "$2")"; }
chat "Warm up." 4 /dev/null >/dev/null
chat "Warm up." 4 /dev/null >/dev/null

read -r code first total < <(chat "Write a short poem about the sea." 128 "$TMP/poem")
chunks=$(grep -c '^data: {' "$TMP/poem" || true)
echo "stream through nginx: HTTP $code, first byte ${first}s, whole answer ${total}s, $chunks chunks"

served() { curl -s "http://127.0.0.1:$1/metrics" | awk '/^hanlin_requests_total\{endpoint="chat",status="200"\}/ {print $2}'; }
JOBS=()
for i in $(seq 8); do chat "Question $i: name a colour." 8 /dev/null >/dev/null & JOBS+=($!); done
wait "${JOBS[@]}"
echo "spread: replica A answered $(served $A), replica B $(served $B) chat requests (warm-up and the poem included)"

# The replica running a long answer drains (SIGTERM) while it runs.
active() { curl -s "http://127.0.0.1:$1/metrics" | awk '/^hanlin_active_sequences/ {s += $2} END {print s + 0}'; }
chat "Count from 1 to 200." 192 "$TMP/long" >"$TMP/long.status" &
LONG=$!
sleep 1
if [ "$(active $A)" -gt 0 ]; then DRAIN=0; OTHER=$B; else DRAIN=1; OTHER=$A; fi
kill -TERM "${PIDS[$DRAIN]}"
ok=0
for i in $(seq 8); do
  read -r c _ _ < <(chat "During the drain $i: name a fruit." 8 /dev/null)
  [ "$c" = 200 ] && ok=$((ok + 1))
done
wait "$LONG"
read -r lcode _ _ <"$TMP/long.status"
done_seen=$(grep -c '^data: \[DONE\]' "$TMP/long" || true)
echo "drain: the long stream on the draining replica ended HTTP $lcode with [DONE] x$done_seen; requests during the drain answered $ok/8 (the other replica's count is now $(served $OTHER))"
