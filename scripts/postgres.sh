#!/usr/bin/env bash
# Starts a throwaway PostgreSQL cluster on 127.0.0.1 (port from $1, or a free one) under
# $LATTICE_CACHE_DIR/postgres and prints its admin URL. Used by ./test and by the ledger tests
# when LATTICE_TEST_POSTGRES_URL is not set. Installs the server with apt-get if missing.
#   scripts/postgres.sh [PORT]       start; prints postgres://lattice@127.0.0.1:PORT/postgres
#   scripts/postgres.sh --stop PORT  stop and delete that cluster
set -euo pipefail
CACHE="${LATTICE_CACHE_DIR:-$HOME/.cache/lattice}"
if [ "${1:-}" = "--stop" ]; then
  DIR="$CACHE/postgres/$2"
  BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$BIN/pg_ctl" -D "$DIR/data" -m fast stop >/dev/null || true
  else "$BIN/pg_ctl" -D "$DIR/data" -m fast stop >/dev/null || true; fi
  rm -rf "$DIR"
  exit 0
fi
BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
if [ -z "$BIN" ] || [ ! -x "$BIN/postgres" ]; then
  echo "installing postgresql with apt-get" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >&2
  BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
fi
PORT="${1:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
DIR="$CACHE/postgres/$PORT"
# PostgreSQL refuses to run as root: run it as the postgres user when we are root.
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --home /var/lib/postgresql postgres
  AS=(runuser -u postgres --)
  mkdir -p "$CACHE/postgres"; chmod 755 "$CACHE" "$CACHE/postgres" 2>/dev/null || true
  chmod o+x "$HOME" "$HOME/.cache" 2>/dev/null || true
else
  AS=()
fi
rm -rf "$DIR"; mkdir -p "$DIR"
[ "$(id -u)" = 0 ] && chown postgres "$DIR"
"${AS[@]}" "$BIN/initdb" -D "$DIR/data" -U lattice --auth=trust -E UTF8 >/dev/null
"${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/log" -w -o "-h 127.0.0.1 -p $PORT -k $DIR -c fsync=off -c max_connections=200" start >/dev/null
echo "postgres://lattice@127.0.0.1:$PORT/postgres"
