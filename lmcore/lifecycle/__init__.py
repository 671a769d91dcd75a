"""The lifecycle layer: what turns the LM library into a reproducible pipeline.

The params schema and its one-line errors (config), the workspace's paths, one module per stage (stages/), the
registry, the promotion gate, MLflow tracking and every touch of DVC (dvcadapter, the only module that imports
DVC). It imports the LM library (the rest of lmcore) and never the other way round; `flows/` (Prefect and the CLI)
sits on top of it. It lives inside lmcore, not beside it, so that the project keeps its two top-level packages and
one wheel; the import contracts in pyproject.toml keep the boundary.
"""
