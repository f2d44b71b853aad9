#!/bin/sh
# Serve edgekit's device daemon on all interfaces of the container. With EDGEKIT_TRACKER=HOST:PORT
# (and EDGEKIT_KEY) it registers with that tracker. Arguments, if any, replace the whole command:
# the compose file runs `edgekit-device tracker ...` in the same image that way.
set -eu
if [ "$#" -gt 0 ]; then
    exec "$@"
fi
set -- edgekit-device serve --listen 0.0.0.0 --port "${EDGEKIT_PORT:-9090}" \
    --store "${EDGEKIT_STORE:-/var/lib/edgekit-device}"
if [ -n "${EDGEKIT_TRACKER:-}" ]; then
    set -- "$@" --tracker "$EDGEKIT_TRACKER" \
        --key "${EDGEKIT_KEY:?EDGEKIT_KEY must be set when EDGEKIT_TRACKER is}"
fi
exec "$@"
