"""The typed options of the library's own functions: data sources, the tokenizer, training, LoRA.

Plain pydantic models with no file I/O: the library takes them as arguments and never reads params.yaml. The
lifecycle layer's params schema (lmcore/lifecycle/config.py) is built from them, one section per stage.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# pretrain/finetune keys that say how many processes run, not what they compute (see lmcore/train/launch.py)
LAUNCH_KEYS = frozenset({"nproc_per_node", "nnodes", "rdzv_endpoint", "rdzv_id"})
# Held-out answer metrics of a chat fine-tune (lmcore/taskmetrics.py): QA, summarization, translation.
SFT_METRICS = ("exact_match", "token_f1", "rouge1", "rouge2", "rougeL", "bleu", "chrf")
DEFAULT_SFT_METRICS = ("exact_match", "token_f1")
# Where a model is scored or sampled (lmcore/device.py): auto, cpu, cuda, cuda:N.
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(Section):
    """One input (see lmcore/data/sources.py and records.py for what each option does).

    `uri` is a path/dir/glob, `package:DIST/path`, `hf:name[:config]`, or an fsspec URL. `split` and `data_files`
    are passed to `datasets.load_dataset` for hf: sources. `group_by` (pretrain only) joins consecutive records
    with equal values of these fields into one document.
    """

    uri: str
    format: Literal["auto", "text", "markdown", "jsonl", "json", "csv", "parquet", "conversations"] = "auto"
    text_field: str = "text"
    group_by: list[str] = Field(default_factory=list)
    split: str = "train"
    data_files: list[str] = Field(default_factory=list)
    label_field: str = "label"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    response_field: str = "response"


class TokenizerConfig(Section):
    special_tokens: list[str] = Field(default_factory=lambda: list(SPECIAL_TOKENS))
    vocab_size: int = Field(4096, le=1_000_000)
    min_frequency: int = Field(2, ge=1)
    max_train_bytes: int = Field(0, ge=0, description="0 = the whole train split")

    @field_validator("vocab_size")
    @classmethod
    def _vocab_floor(cls, v: int, info: Any) -> int:
        floor = 256 + len(info.data.get("special_tokens") or SPECIAL_TOKENS)
        floor = max(512, floor)
        if v < floor:
            raise ValueError(f"must be ≥ {floor}, got {v}")
        return v

    @model_validator(mode="after")
    def _required_specials(self) -> TokenizerConfig:
        missing = [t for t in SPECIAL_TOKENS if t not in self.special_tokens]
        if missing:
            raise ValueError(f"special_tokens must include {missing}")
        return self


class TrainConfig(Section):
    """Shared by pretrain and finetune: a fixed number of optimizer steps, never a time budget."""

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=1, description="sequences per micro-batch, all processes together")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(50, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0, description="wsd: share of steps spent decaying")
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0)
    eval_every: int = Field(200, ge=1)
    eval_max_batches: int = Field(0, ge=0, description="0 = the whole val split")
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    compile: bool | Literal["auto"] = Field(
        False, description="torch.compile the transformer blocks: auto = on CUDA and on a Linux CPU with a C++ compiler"
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    threads: int = Field(0, ge=0, description="0 = torch default")
    batch_split: int | Literal["auto"] = Field(
        "auto",
        description="CPU: run each micro-batch as this many parts at once, on threads sharing out the cores "
        "(lmcore/train/threadsplit.py); auto = 2 where it applies and pays, 1 = never",
    )
    # The launcher (lmcore/train/launch.py): how many processes train, never what they compute, so these keys are
    # left out of the checkpoint fingerprint (LAUNCH_KEYS). PET_* environment variables win over them.
    nproc_per_node: int | Literal["auto"] = Field(1, description="processes on this machine; auto = one per GPU")
    nnodes: int = Field(1, ge=1, description="machines taking part; > 1 needs rdzv_endpoint and rdzv_id")
    rdzv_endpoint: str | None = Field(None, description="host:port of the rendezvous (several machines)")
    rdzv_id: str | None = Field(None, description="one id shared by the machines of one run")

    # Unions read badly in pydantic's own messages ("compile.bool: …"): say what is allowed instead.
    @field_validator("compile", mode="before")
    @classmethod
    def _compile_setting(cls, value: Any) -> Any:
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError(f"must be true, false or auto, got {value!r}")

    @field_validator("nproc_per_node", mode="before")
    @classmethod
    def _nproc_setting(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"must be auto or a whole number ≥ 1, got {value!r}")

    @field_validator("rdzv_endpoint")
    @classmethod
    def _endpoint_setting(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"must be host:port, got {value!r}")
        return value

    @field_validator("batch_split", mode="before")
    @classmethod
    def _split_setting(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"must be auto or a whole number ≥ 1, got {value!r}")


class LoraConfig(Section):
    r: int = Field(0, ge=0, description="0 = full fine-tuning; > 0 = LoRA adapters of this rank (peft)")
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="lmcore names (qkv, proj, gate_up, down) or their Llama names (q_proj … down_proj)",
    )
