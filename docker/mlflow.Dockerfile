# The team's MLflow tracking server: PostgreSQL backend store, S3-compatible (MinIO) artifact store behind the
# server (proxied artifacts: clients need no bucket credentials), basic auth (the `auth` extra: Flask-WTF).
# Started by docker/compose.yaml, which gives it every credential through the environment.
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2
ENV PIP_NO_CACHE_DIR=1 DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true
RUN pip install "mlflow[auth]==${MLFLOW_VERSION}" psycopg2-binary boto3 \
    && useradd --uid 10001 --create-home mlflow

USER mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
