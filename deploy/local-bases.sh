#!/bin/sh
# Local stand-ins for the three official base images, built from Debian bookworm packages with mmdebstrap
# and imported into podman, for hosts where no container registry answers:
#
#   python:3.11-slim-bookworm -> localhost/ssf-base/python:3.11-bookworm  (Debian python3 3.11 + venv)
#   redis:7.0-bookworm        -> localhost/ssf-base/redis:7.0-bookworm    (Debian redis-server 7.0)
#   nginx:1.27-bookworm       -> localhost/ssf-base/nginx:bookworm        (Debian nginx 1.22 + the official
#                                                                          image's template entrypoint)
#
# Each keeps the contract docker-compose.yml and the Dockerfile use: `python`/`python -m venv`; redis-server
# and redis-cli on PATH, workdir /data owned by the redis user; nginx rendering /etc/nginx/templates/*.template
# with envsubst (NGINX_ENVSUBST_FILTER) into conf.d, logs on stdout/stderr, `nginx -g 'daemon off;'`.
#
#   sh deploy/local-bases.sh            # build the missing ones (about 20-60 s each)
#   sh deploy/local-bases.sh --force    # rebuild all
# Needs root, mmdebstrap and podman (apt-get install mmdebstrap podman runc). Prints the three image names.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
force=${1:-}
mirror=${DEBIAN_MIRROR:-}   # empty: the host's apt sources
PY_IMAGE=localhost/ssf-base/python:3.11-bookworm
REDIS_IMAGE=localhost/ssf-base/redis:7.0-bookworm
NGINX_IMAGE=localhost/ssf-base/nginx:bookworm

# slim like the official -slim images: no docs, man pages or locales, no apt lists
SLIM="--dpkgopt=path-exclude=/usr/share/doc/* --dpkgopt=path-include=/usr/share/doc/*/copyright
--dpkgopt=path-exclude=/usr/share/man/* --dpkgopt=path-exclude=/usr/share/locale/*
--dpkgopt=path-exclude=/usr/share/info/*"
CLEAN='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*.log "$1"/var/log/apt/*'

need() { [ "$force" = --force ] || ! podman image exists "$1"; }

build() {  # build IMAGE PACKAGES HOOK CHANGE...
    image=$1 packages=$2 hook=$3
    shift 3
    start=$(date +%s)
    tarball=$(mktemp --suffix=.tar)
    # shellcheck disable=SC2086
    mmdebstrap --quiet --variant=minbase --include="$packages" $SLIM \
        --customize-hook="$hook" --customize-hook="$CLEAN" bookworm "$tarball" $mirror
    n=$#
    for change in "$@"; do set -- "$@" "--change=$change"; done
    shift "$n"
    podman import --quiet "$@" "$tarball" "$image" >/dev/null
    rm -f "$tarball"
    echo "built $image in $(( $(date +%s) - start )) s" >&2
}

if need "$PY_IMAGE"; then
    build "$PY_IMAGE" python3,python3-venv,ca-certificates,netbase,tzdata \
        'ln -sf /usr/bin/python3 "$1"/usr/local/bin/python && ln -sf /usr/bin/python3 "$1"/usr/local/bin/python3' \
        'ENV=LANG=C.UTF-8' 'CMD=["python3"]'
fi

if need "$REDIS_IMAGE"; then
    build "$REDIS_IMAGE" redis-server,redis-tools \
        'mkdir -p "$1"/data "$1"/usr/local/etc/redis && chroot "$1" chown redis:redis /data' \
        'WORKDIR=/data' 'USER=redis' 'EXPOSE=6379' 'CMD=["redis-server"]'
fi

if need "$NGINX_IMAGE"; then
    build "$NGINX_IMAGE" nginx,gettext-base \
        "rm -f \"\$1\"/etc/nginx/sites-enabled/* && mkdir -p \"\$1\"/etc/nginx/templates \"\$1\"/etc/nginx/conf.d && ln -sf /dev/stdout \"\$1\"/var/log/nginx/access.log && ln -sf /dev/stderr \"\$1\"/var/log/nginx/error.log && cp $here/local-bases/nginx-entrypoint.sh \"\$1\"/docker-entrypoint.sh && chmod 755 \"\$1\"/docker-entrypoint.sh" \
        'ENTRYPOINT=["/docker-entrypoint.sh"]' 'CMD ["nginx","-g","daemon off;"]' 'STOPSIGNAL=SIGQUIT' 'EXPOSE=80'
fi

echo "PYTHON_IMAGE=$PY_IMAGE"
echo "REDIS_IMAGE=$REDIS_IMAGE"
echo "NGINX_IMAGE=$NGINX_IMAGE"
