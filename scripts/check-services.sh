#!/usr/bin/env bash
# Fails with a clear message when PostgreSQL or Redis (provided by the machine, not installed by us) are
# unreachable.
set -euo pipefail
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
ok=1
if ! port_open "${DB_HOST:-127.0.0.1}" "${DB_PORT:-5432}"; then
    echo "error: PostgreSQL is not reachable at ${DB_HOST:-127.0.0.1}:${DB_PORT:-5432} (set DB_HOST/DB_PORT, or start it)" >&2
    ok=0
fi
if ! port_open "${REDIS_HOST:-127.0.0.1}" "${REDIS_PORT:-6379}"; then
    echo "error: Redis is not reachable at ${REDIS_HOST:-127.0.0.1}:${REDIS_PORT:-6379} (set REDIS_HOST/REDIS_PORT, or start it)" >&2
    ok=0
fi
[ "$ok" = 1 ]
