#!/usr/bin/env bash
# Make Docker usable for the sandbox on a fresh Debian machine (run as root); idempotent.
# 1) install docker.io and debootstrap if missing, 2) start dockerd if it is not answering and
# wait for it (bounded), 3) build the sandbox image (skipped when the tag already exists).
set -euo pipefail

need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    echo "docker.sh: installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
    echo "docker.sh: starting dockerd (log: /tmp/dockerd.log)"
    nohup dockerd >/tmp/dockerd.log 2>&1 &
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    if ! docker info >/dev/null 2>&1; then
        echo "docker.sh: dockerd did not come up within 60s; last log lines:" >&2
        tail -n 20 /tmp/dockerd.log >&2
        exit 1
    fi
fi

cd "$(dirname "$0")/.."
"${PYTHON:-python}" -m sandbox build-image
