#!/bin/sh
# The part of the official nginx image's /docker-entrypoint.sh that docker-compose.yml relies on
# (20-envsubst-on-templates.sh): render /etc/nginx/templates/*.template into /etc/nginx/conf.d/ with
# envsubst, substituting only the environment variables whose names match $NGINX_ENVSUBST_FILTER
# (all variables when unset), then exec the command.
set -eu
template_dir=/etc/nginx/templates
output_dir=/etc/nginx/conf.d
suffix=.template
filter="${NGINX_ENVSUBST_FILTER:-}"
if [ "${1:-}" = nginx ] && [ -d "$template_dir" ]; then
    defined_envs=$(printf '${%s} ' $(awk "END { for (name in ENVIRON) { print ( name ~ /${filter}/ ) ? name : \"\" } }" < /dev/null))
    for template in "$template_dir"/*"$suffix"; do
        [ -f "$template" ] || continue
        name=$(basename "$template" "$suffix")
        echo "$0: rendering $template to $output_dir/$name" >&2
        envsubst "$defined_envs" < "$template" > "$output_dir/$name"
    done
fi
exec "$@"
