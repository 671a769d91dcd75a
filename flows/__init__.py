"""Orchestration: the `lmcycle` CLI and the Prefect flows that drive lmcore's stages through DVC."""
