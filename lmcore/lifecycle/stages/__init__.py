"""One module per pipeline stage, each with `run(config, paths) -> summary dict`.

`lmcycle stage NAME` and the DVC `cmd`s call these; the Prefect flow runs them through DVC. Nothing imports a
stage module: `lmcycle stage NAME` loads it by name (their list is lmcore.lifecycle.config.STAGES).
"""
