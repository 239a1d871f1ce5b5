#!/bin/sh
# Starts the team's MLflow server with its login on (`--app-name basic-auth`): writes MLflow's
# auth config from the environment into a private file and execs `mlflow server`. Nothing secret
# is in the image or the repository, and the server does not start without:
#   MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD  the first admin (MLflow creates it once)
#   MLFLOW_FLASK_SERVER_SECRET_KEY                         CSRF key, the same on every replica
#   MLFLOW_AUTH_DATABASE_URI                               where users and permissions live
# and optionally MLFLOW_AUTH_DEFAULT_PERMISSION (READ when unset: a signed-in user reads all;
# writing needs a grant, or being the creator). Arguments go to `mlflow server` as they are.
set -eu

for var in MLFLOW_AUTH_ADMIN_USERNAME MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY \
    MLFLOW_AUTH_DATABASE_URI; do
    eval "value=\${$var:-}"
    if [ -z "$value" ]; then
        echo "dpfah-mlflow-serve: $var is not set; the server does not start without its login" \
            "(see infra/README.md, 'Start the MLflow tracking server')" >&2
        exit 2
    fi
done
permission="${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}"
case "$permission" in
    READ | USE | EDIT | MANAGE | NO_PERMISSIONS) ;;
    *)
        echo "dpfah-mlflow-serve: MLFLOW_AUTH_DEFAULT_PERMISSION=$permission is not one of" \
            "READ, USE, EDIT, MANAGE, NO_PERMISSIONS" >&2
        exit 2
        ;;
esac
case "$MLFLOW_AUTH_DATABASE_URI" in
    *"
"*)
        echo "dpfah-mlflow-serve: MLFLOW_AUTH_DATABASE_URI holds a line break" >&2
        exit 2
        ;;
esac

umask 077
config="$(mktemp -d)/basic_auth.ini"
# configparser reads % as interpolation: double it (URL-encoded passwords hold %).
uri=$(printf '%s' "$MLFLOW_AUTH_DATABASE_URI" | sed 's/%/%%/g')
cat >"$config" <<EOF
[mlflow]
default_permission = $permission
database_uri = $uri
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
export MLFLOW_AUTH_CONFIG_PATH="$config"
exec mlflow server --app-name basic-auth "$@"
