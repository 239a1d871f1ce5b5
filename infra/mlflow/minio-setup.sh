#!/bin/sh
# Run once per `docker compose up` by the minio-setup service, with MinIO's root credentials
# (which only this container and MinIO itself see): the bucket, and the MLflow server's own user,
# allowed only to list the bucket and read, write and delete its objects (minio-policy.json).
# Safe to run again: each step accepts what an earlier run made.
set -eu
until mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null; do sleep 2; done
if [ "$MLFLOW_S3_ACCESS_KEY" = "$MINIO_ROOT_USER" ]; then
    echo "minio-setup: MLFLOW_S3_ACCESS_KEY must not be MinIO's root user" >&2
    exit 2
fi
mc mb --ignore-existing local/mlflow
mc admin policy create local mlflow-artifacts /setup/minio-policy.json
mc admin user add local "$MLFLOW_S3_ACCESS_KEY" "$MLFLOW_S3_SECRET_KEY"
# attach refuses a policy already attached: then check that it is (the policy's name appears
# in the user's info only as an attached policy)
mc admin policy attach local mlflow-artifacts --user "$MLFLOW_S3_ACCESS_KEY" ||
    mc --json admin user info local "$MLFLOW_S3_ACCESS_KEY" | grep -q mlflow-artifacts
