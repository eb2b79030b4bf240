#!/bin/sh
# Entrypoint for the aim-platform containers of the compose stack: secrets arrive as files
# (/run/secrets/...), never as literal values in compose.yaml.
#  - every variable NAME_FILE=/path is exported as NAME=<content of /path>;
#  - with MLFLOW_DB_HOST set, MLFLOW_BACKEND_STORE_URI is built for PostgreSQL from MLFLOW_DB_*
#    (the password URL-quoted), so that it is passed through the environment, not argv.
# Then it execs the command; as AIM_RUN_AS (a user name) when started as root, so that the
# secret files stay 0600 on the host (root reads them here) and the command never runs as root.
set -eu
for assignment in $(env | grep -o '^[A-Z_][A-Z0-9_]*_FILE=' || true); do
    var=${assignment%_FILE=}
    eval "path=\${${var}_FILE}"
    if [ ! -r "$path" ]; then
        echo "with-secrets: ${var}_FILE=$path is not readable" >&2
        exit 1
    fi
    value=$(cat "$path")
    export "$var=$value"
    unset "${var}_FILE"
done
if [ -n "${MLFLOW_DB_HOST:-}" ]; then
    MLFLOW_BACKEND_STORE_URI=$(python -c 'import os, urllib.parse as u; e = os.environ; print(
        "postgresql://%s:%s@%s:%s/%s" % (u.quote(e.get("MLFLOW_DB_USER", "mlflow"), safe=""),
        u.quote(e["MLFLOW_DB_PASSWORD"], safe=""), e["MLFLOW_DB_HOST"],
        e.get("MLFLOW_DB_PORT", "5432"), e.get("MLFLOW_DB_NAME", "mlflow")))')
    export MLFLOW_BACKEND_STORE_URI
    unset MLFLOW_DB_PASSWORD
fi
if [ -n "${AIM_RUN_AS:-}" ]; then
    run_as=$AIM_RUN_AS
    unset AIM_RUN_AS
    if [ "$(id -u)" = 0 ]; then
        HOME=$(getent passwd "$run_as" | cut -d: -f6)
        export HOME
        exec setpriv --reuid="$(id -u "$run_as")" --regid="$(id -g "$run_as")" --init-groups -- "$@"
    fi
fi
exec "$@"
