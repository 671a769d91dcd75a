"""Typed configuration for every section of params.yaml.

One pydantic model per section; `load_config` validates the whole file and turns the first problem into a
one-line `ConfigError` naming the key path (`tokenizer.vocab_size: must be ≥ 512, got 100`). Unknown keys are
errors, never silently ignored. `apply_overrides` implements `-S section.key=value` exactly like
`dvc exp run -S`: the value is parsed as YAML, validated with the rest, then written back into params.yaml.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from lmcore.errors import ConfigError
from lmcore.files import atomic_write_text
from lmcore.options import (  # noqa: F401  (the params schema's sections, one import for the lifecycle layer)
    DEFAULT_SFT_METRICS,
    DEVICE_PATTERN,
    LAUNCH_KEYS,
    SFT_METRICS,
    SPECIAL_TOKENS,
    LoraConfig,
    Section,
    SourceConfig,
    TokenizerConfig,
    TrainConfig,
)

PARAMS_FILE = "params.yaml"


# --- project -------------------------------------------------------------------------------------------------


class ProjectConfig(Section):
    name: str = "lmcycle-demo"
    experiment: str = "lmcycle"
    registered_model: str = "lmcycle-demo"
    seed: int = Field(1337, ge=0)


# --- data (ingest) -------------------------------------------------------------------------------------------


DATA_KINDS = ("pretrain", "sft", "classification")  # the source lists of `data`, one ingest output each
# the stage modules of lmcore/lifecycle/stages/, in graph order (dvc.yaml has the same stages)
STAGES = ["ingest", "tokenizer", "tokenize", "pretrain", "finetune", "evaluate"]


class DataConfig(Section):
    pretrain: list[SourceConfig] = Field(default_factory=list)
    sft: list[SourceConfig] = Field(default_factory=list)
    classification: list[SourceConfig] = Field(default_factory=list)
    val_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    max_doc_chars: int = Field(100_000, ge=1_000)
    min_doc_chars: int = Field(1, ge=1)
    contamination_ngram: int = Field(13, ge=1)
    split_salt: str = "lmcycle"

    @model_validator(mode="after")
    def _some_source(self) -> DataConfig:
        if not (self.pretrain or self.sft or self.classification):
            raise ValueError("at least one source is needed under data.pretrain, data.sft or data.classification")
        return self


# --- tokenizer / tokenize ------------------------------------------------------------------------------------


class TokenizeConfig(Section):
    shard_tokens: int = Field(50_000_000, ge=1_000, description="tokens per shard file")
    batch_size: int = Field(1_000, ge=1, description="documents per encode call (at most 128 KiB of text per thread)")
    num_workers: int = Field(0, ge=0, description="tokenizer threads; 0 = all cores")


# --- model / pretrain ----------------------------------------------------------------------------------------


class ModelConfigParams(Section):
    preset: Literal["cpu-demo", "gpt2-124m", "custom"] = "cpu-demo"
    n_layer: int | None = Field(None, ge=1)
    n_head: int | None = Field(None, ge=1)
    n_kv_head: int | None = Field(None, ge=1)
    d_model: int | None = Field(None, ge=8)
    d_ff: int | None = Field(None, ge=8)
    context_length: int | None = Field(None, ge=8)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_std: float = Field(0.02, gt=0.0)
    tie_embeddings: bool = True
    rope_theta: float = Field(10_000.0, gt=0.0)
    norm_eps: float = Field(1e-5, gt=0.0)


class PretrainConfig(TrainConfig):
    init_from: str | None = Field(None, description="a Hugging Face Llama directory to continue pretraining from")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="under torchrun: replicate (ddp) or shard (fsdp)")


class FinetuneConfig(TrainConfig):
    task: Literal["sft", "classification"] = "sft"
    init_from: str = Field(
        "models/pretrain/hf",
        description="a Hugging Face causal-LM directory, or a hub id org/name[@revision] from the local HF cache",
    )
    tokenizer: str | None = Field(
        "models/tokenizer",
        description="must equal the tokenizer inside init_from; null = the model's own (a model you bring)",
    )
    max_length: int = Field(256, ge=8, description="tokens per example (capped at the model's context length)")
    packing: bool = False
    text_field: str = "text"
    label_field: str = "label"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    steps: int | Literal["auto"] = Field(
        "auto", description="optimizer steps; auto = one epoch of the training split, at most max_auto_steps"
    )
    epochs: float | None = Field(
        None, gt=0.0, description="steps = ceil(epochs × rows / rows per step); needs steps: auto"
    )
    max_auto_steps: int = Field(2000, ge=1, description="the cap on steps: auto")
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="classification: balanced = weigh each class by n_rows / (n_classes × its rows)"
    )
    lr: float = Field(5e-4, gt=0.0)
    warmup_steps: int = Field(20, ge=0)
    eval_every: int = Field(100, ge=1)
    checkpoint_every: int = Field(100, ge=1)

    @field_validator("steps", mode="before")
    @classmethod
    def _steps_setting(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"must be auto or a whole number ≥ 1, got {value!r}")

    @field_validator("epochs")
    @classmethod
    def _epochs_or_steps(cls, value: float | None, info: Any) -> float | None:
        steps = info.data.get("steps")
        if value is not None and steps not in (None, "auto"):
            raise ValueError(f"give finetune.epochs or finetune.steps, not both (steps is {steps}; set it to auto)")
        return value


# --- evaluate / register / flow ------------------------------------------------------------------------------


class LmEvalConfig(Section):
    enabled: bool = False
    limit: int = Field(0, ge=0, description="0 = every held-out document")


class EvaluateConfig(Section):
    prompts: list[str] = Field(default_factory=lambda: ["In the beginning", "And the LORD said"])
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.8, gt=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    sft_max_examples: int = Field(100, ge=1)
    sft_metrics: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SFT_METRICS),
        description="answer metrics of the held-out greedy answers (sft.<name>, base.sft_<name>): exact_match, "
        "token_f1 (QA), rouge1, rouge2, rougeL (summarization), bleu, chrf (translation)",
    )
    batch_size: int = Field(16, ge=1)
    device: str = Field(
        "cpu",
        pattern=DEVICE_PATTERN,
        description="where models are scored and sampled: cpu (bit-repeatable), auto (CUDA when present), cuda[:N]",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="weights while scoring; auto = bfloat16 on a CUDA device that supports it, else float32"
    )
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig)

    @field_validator("sft_metrics")
    @classmethod
    def _known_metrics(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in SFT_METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(map(repr, unknown))}; choose from {', '.join(SFT_METRICS)}")
        if len(set(names)) != len(names):
            raise ValueError(f"a metric is listed twice: {names}")
        return names


class RegisterConfig(Section):
    """The promotion gate: a new version takes the champion alias only if it beats the champion on this metric."""

    gate_metric: str = Field(
        "auto",
        description="a key of reports/evaluate.json (e.g. sft.loss); auto: the registered model's own held-out "
        "score (classification.macro_f1, sft.loss, or pretrain.val_bpb before a fine-tune exists)",
    )
    direction: Literal["auto", "minimize", "maximize"] = Field(
        "auto", description="auto: minimize losses, bits-per-byte and perplexities, maximize everything else"
    )
    min_improvement: float = Field(0.0, ge=0.0, description="the challenger must be better by more than this")
    challenger_alias: str = Field("challenger", min_length=1)
    champion_alias: str = Field("champion", min_length=1)
    quality_floor: bool = Field(
        True,
        description="a version that does not beat its trivial baseline (bigram, majority class, base model) "
        "is registered as challenger but never becomes champion",
    )

    @model_validator(mode="after")
    def _distinct_aliases(self) -> RegisterConfig:
        if self.challenger_alias == self.champion_alias:
            raise ValueError("challenger_alias and champion_alias must differ")
        return self


PREFECT_CANCEL_KILL_S = 30.0  # prefect.runner / workers: SIGTERM, then SIGKILL after 30 s, on cancellation
MAX_KILL_GRACE_S = PREFECT_CANCEL_KILL_S - 5.0


class FlowConfig(Section):
    """How the Prefect flow drives the stages (none of these change what a stage computes)."""

    retries: int = Field(1, ge=0, description="retries of a failed stage (a retried trainer resumes its checkpoint)")
    retry_delay_s: float = Field(5.0, ge=0.0)
    stage_timeout_s: float = Field(3600.0, gt=0.0, description="a stage running longer is stopped (and retried)")
    kill_grace_s: float = Field(10.0, ge=0.0, description="SIGTERM, then SIGKILL after this many seconds")
    lock_timeout_s: float = Field(0.0, ge=0.0, description="how long a second run waits for the workspace lock")
    cron: str = Field("0 3 * * *", description="the schedule of `lmcycle serve` (prefect.yaml has its own)")

    @field_validator("kill_grace_s")
    @classmethod
    def _within_prefect_cancellation(cls, value: float) -> float:
        # Prefect kills a cancelled flow run's process 30 s after asking it to stop; the stage's grace must end
        # before that (with time left for the flow to stop the stage), or a trainer never gets to save.
        if value > MAX_KILL_GRACE_S:
            raise ValueError(
                f"must be ≤ {MAX_KILL_GRACE_S:g}, got {value:g}: Prefect kills a cancelled flow run "
                f"{PREFECT_CANCEL_KILL_S:g} s after asking it to stop, so a longer grace could never take effect"
            )
        return value


with warnings.catch_warnings():
    # `register` is a params section name; it only shadows ABCMeta.register on the class, which nobody calls.
    warnings.filterwarnings("ignore", message='Field name "register"')

    class Config(Section):
        project: ProjectConfig = Field(default_factory=ProjectConfig)
        data: DataConfig
        tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
        tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
        model: ModelConfigParams = Field(default_factory=ModelConfigParams)
        pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
        finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
        evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
        register: RegisterConfig = Field(default_factory=RegisterConfig)
        flow: FlowConfig = Field(default_factory=FlowConfig)


# --- loading, errors, overrides ------------------------------------------------------------------------------


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    if not path.isprintable():  # a key with a newline or control character: show it escaped, on one line
        path = repr(path)[1:-1]
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key in {source}"
    if kind == "missing":
        return f"{path}: required key missing in {source}"
    msg = first["msg"].removeprefix("Value error, ")
    if "input" in first and kind not in {"value_error"} and not isinstance(first["input"], dict | list):
        msg = f"{msg}, got {first['input']!r}"
    msg = msg.replace("greater than or equal to", "≥").replace("less than or equal to", "≤")
    msg = " ".join(msg.split())  # pydantic's messages and inputs can span lines
    return f"{path}: {msg}" if path else f"{source}: {msg}"


def validate(raw: dict[str, Any], source: str = PARAMS_FILE) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must be a YAML mapping of sections")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to read") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw or {}


def load_config(path: str | Path = PARAMS_FILE) -> Config:
    return validate(read_params(path), str(path))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` → (keys, value), the value read as YAML (as `dvc exp run -S` reads it)."""
    shown = repr(text if len(text) <= 80 else text[:77] + "...")
    if "=" not in text:
        raise ConfigError(f"override {shown}: expected section.key=value")
    key, value = text.split("=", 1)
    keys = key.strip().split(".")
    if len(keys) < 2 or not all(k.strip() for k in keys):
        raise ConfigError(f"override {shown}: expected section.key=value")
    try:
        return keys, yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"override {shown}: the value is not valid YAML ({problem})") from None
    except RecursionError:
        raise ConfigError(f"override {shown}: the value is nested too deeply") from None


def set_key(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node = raw
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def apply_overrides(overrides: list[str], path: str | Path = PARAMS_FILE) -> Config:
    """Validate `section.key=value` overrides and write them into params.yaml (atomically), as dvc exp run -S."""
    path = Path(path)
    raw = read_params(path)
    for text in overrides:
        keys, value = parse_override(text)
        set_key(raw, keys, value)
    config = validate(raw, str(path))
    if overrides:
        atomic_write_text(path, _rewrite_keeping_comments(path.read_text(encoding="utf-8"), overrides))
    return config


def _rewrite_keeping_comments(text: str, overrides: list[str]) -> str:
    """Apply overrides with a round-trip YAML editor (DVC's own, ruamel.yaml) so comments and layout survive."""
    import io

    from ruamel.yaml import YAML
    from ruamel.yaml.representer import RoundTripRepresenter

    class NullAsWord(RoundTripRepresenter):
        """`null` spelled out. A subclass: add_representer on ruamel's own class would change every later dump in
        this process, DVC's dvc.lock among them (it then wrote `init_from:` where a plain `dvc repro` writes null)."""

    null = "tag:yaml.org,2002:null"
    NullAsWord.add_representer(type(None), lambda rep, _: rep.represent_scalar(null, "null"))
    editor = YAML()
    editor.Representer = NullAsWord
    editor.width = 4096
    editor.preserve_quotes = True
    editor.indent(mapping=2, sequence=4, offset=2)
    doc = editor.load(text)
    for item in overrides:
        keys, value = parse_override(item)
        set_key(doc, keys, value)
    out = io.StringIO()
    editor.dump(doc, out)
    return out.getvalue()
