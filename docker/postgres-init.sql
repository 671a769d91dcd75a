-- One PostgreSQL for the team setup: the Prefect server's database (POSTGRES_DB=prefect, created by the image),
-- MLflow's tracking/registry store, and MLflow's basic-auth user store.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
