"""One module per pipeline stage, each with `run(config, paths) -> summary dict`.

`lmcycle stage NAME` and the DVC `cmd`s call these; the Prefect flow runs them through DVC.
"""

STAGES = ["ingest", "tokenizer", "tokenize", "pretrain", "finetune", "evaluate"]
