"""Where every stage reads and writes, relative to the workspace root (the DVC repository).

One table of paths so stages, dvc.yaml, tests and the flow agree. Outputs under data/ and models/ are
DVC-tracked and git-ignored; reports/ holds small metrics and plots committed to git (DVC's convention).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lmcore.errors import ConfigError

CHECKPOINT_DIR_ENV = "LMCYCLE_CHECKPOINT_DIR"


@dataclass(frozen=True)
class Paths:
    root: Path

    @classmethod
    def of(cls, root: str | Path = ".") -> Paths:
        return cls(Path(root).resolve())

    # ingest: data/ingest/<kind>/{train,val}.jsonl, kind in pretrain | sft | classification
    @property
    def ingest(self) -> Path:
        return self.root / "data" / "ingest"

    def split_file(self, kind: str, split: str) -> Path:
        return self.ingest / kind / f"{split}.jsonl"

    @property
    def tokenizer(self) -> Path:
        return self.root / "models" / "tokenizer"

    # tokenize: data/tokens/{train,val}/ shards + index
    @property
    def tokens(self) -> Path:
        return self.root / "data" / "tokens"

    @property
    def pretrain(self) -> Path:
        return self.root / "models" / "pretrain"

    @property
    def finetune(self) -> Path:
        return self.root / "models" / "finetune"

    def checkpoints(self, stage: str, project: str) -> Path:
        """Resumable checkpoints live outside DVC outputs, so `dvc repro` never deletes them before a resume.

        With LMCYCLE_CHECKPOINT_DIR set they live in `$LMCYCLE_CHECKPOINT_DIR/<project.name>/<stage>` instead: a
        volume several worker hosts share, so a run resumed elsewhere finds them. An environment variable, not a
        param, because where checkpoints live must not change what DVC records or the checkpoint fingerprint
        (which still keeps another run's checkpoints from being resumed).
        """
        shared = os.environ.get(CHECKPOINT_DIR_ENV, "").strip()
        if shared:
            if project in {"", ".", ".."} or "/" in project or "\\" in project:
                raise ConfigError(f"project.name: {project!r} cannot name a folder under {CHECKPOINT_DIR_ENV}")
            return Path(shared).expanduser().resolve() / project / stage
        return self.root / "checkpoints" / stage

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def report(self, stage: str) -> Path:
        return self.reports / f"{stage}.json"

    def plots(self, stage: str) -> Path:
        return self.reports / stage
