"""Stage `finetune`: adapt a pretrained model to conversations (SFT) or to labelled text (classification).

Reads the model in `finetune.init_from` (default models/pretrain/hf, or a Hugging Face directory a user brings:
Llama, Qwen2 and Mistral run natively, any other causal LM trains through transformers' own class, lmcore.hfcausal;
it says once which), data/ingest/{sft|classification}/{train,val}.jsonl and params `finetune`, `project.seed`; writes
models/finetune/{checkpoint,hf}, reports/finetune.json (no timings) and reports/finetune/{train.csv,val.csv,loss.png}.

One training loop for everything (lmcore.train.loop): fixed steps, fingerprinted atomic checkpoints under
checkpoints/finetune/ or $LMCYCLE_CHECKPOINT_DIR (outside DVC's outputs, so `dvc repro` after a crash resumes),
exact resume, SIGTERM saves, a non-finite loss stops, DDP on `finetune.nproc_per_node` processes (the stage
starts them, lmcore/train/launch.py) or under `torchrun -m flows.cli stage finetune`. The task only
changes what a batch is and what the loss is: SFT trains on assistant tokens of chat-template renderings;
classification trains a `score` head (and the decoder) on the last token. With `finetune.lora.r > 0` peft adapters
train instead of the full weights and are merged back before export, so the exported model is a plain one.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore.errors import CheckpointError, ConfigError, DataError
from lmcore.lifecycle.config import LAUNCH_KEYS, Config, atomic_write_text
from lmcore.lifecycle.paths import Paths
from lmcore.lifecycle.reports import decimals, write_training_reports
from lmcore.reporting import reporter

if TYPE_CHECKING:
    import torch

    from lmcore.hfcausal import HFModelInfo
    from lmcore.lifecycle.config import FinetuneConfig
    from lmcore.model import ModelConfig, Transformer
    from lmcore.train.distributed import DistEnv

STAGE = "finetune"
rounded = decimals(6)  # every float in finetune's reports: byte-identical reruns, no float noise
# Keys that change what is logged or kept, never the weights: a checkpoint made with other values still resumes.
# The launcher's keys are among them: a checkpoint resumes on another process count (lmcore/train/loop.py says when).
BOOKKEEPING_KEYS = (
    frozenset({"log_every", "eval_every", "eval_max_batches", "checkpoint_every", "keep_checkpoints"}) | LAUNCH_KEYS
)


@dataclass
class Task:
    """What differs between SFT and classification; the loop and everything around it are shared."""

    model: torch.nn.Module
    rows: list[Any]  # training rows; a batch is a list of them
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    evaluate_fn: Callable[[torch.nn.Module], dict[str, float]]
    data: dict[str, Any]  # counts for the report
    trainable: tuple[str, ...] = ()  # modules trained in full even under LoRA (a fresh head)
    val_columns: list[str] = field(default_factory=lambda: ["step", "loss"])


def run(config: Config, paths: Paths) -> dict:
    from lmcore.train.distributed import training_process

    with training_process(config.finetune) as env:
        return _run(config, paths, env)


def _run(config: Config, paths: Paths, env: DistEnv) -> dict:
    import torch

    from lmcore.export import native_features
    from lmcore.finetune import lora
    from lmcore.finetune.data import batch_indices
    from lmcore.finetune.schedule import resolve_steps
    from lmcore.hfcausal import HFModelInfo, load_causal_lm
    from lmcore.tokenizer import model_tokenizer
    from lmcore.train.checkpoint import fingerprint
    from lmcore.train.loop import train
    from lmcore.train.runtime import seed_everything
    from lmcore.weightfiles import init_weights_digest

    cfg, seed = config.finetune, config.project.seed
    init_dir = resolve_dir(paths, cfg.init_from, "finetune.init_from")
    tokenizer = model_tokenizer(init_dir)
    check_tokenizer(paths, cfg.tokenizer, init_dir)
    if cfg.batch_size % env.world_size:
        raise ConfigError(
            f"finetune.batch_size: {cfg.batch_size} sequences cannot be split evenly over {env.world_size} processes"
        )
    seed_everything(seed)  # a fresh head and LoRA adapters start from the seed alone
    base, mcfg = load_causal_lm(init_dir)  # lmcore's Transformer, or transformers' class for other architectures
    through_hf = isinstance(mcfg, HFModelInfo)
    if through_hf and cfg.task == "classification":
        raise ConfigError(
            f"finetune.task: classification needs an architecture lmcore runs natively; {cfg.init_from} is "
            f"{mcfg.model_type} ({mcfg.reason}): fine-tune it with task sft"
        )
    if env.is_main:
        say(mcfg.line(STAGE) if through_hf else f"{STAGE}: {native_features(mcfg)}")
    max_length = min(cfg.max_length, mcfg.context_length)
    prepare = prepare_sft if cfg.task == "sft" else prepare_classification
    task = prepare(config, paths, base, tokenizer, max_length, init_dir)
    plan = resolve_steps(cfg.steps, cfg.epochs, len(task.rows), cfg.batch_size * cfg.grad_accum, cfg.max_auto_steps)
    cfg = cfg.model_copy(update={"steps": plan.steps})  # one number from here on: loop, schedule, fingerprint, records
    config = config.model_copy(update={"finetune": cfg})
    model = lora.apply_lora(task.model, cfg.lora, task.trainable) if cfg.lora.r > 0 else task.model
    trainable, total = lora.count_parameters(model)
    model.to(env.device)

    inputs = {
        "init_from": init_weights_digest(init_dir)[:16],  # one file or every shard
        "init_config": file_digest(init_dir / "config.json"),
        **{f"data_{split}": file_digest(paths.split_file(cfg.task, split)) for split in ("train", "val")},
    }
    params = {
        "finetune": {k: v for k, v in recorded(cfg).items() if k not in BOOKKEEPING_KEYS},
        "max_length": max_length,
        "seed": seed,
    } | ({"through": mcfg.architecture} if through_hf else {})  # a native run's checkpoints would not fit
    fp = fingerprint({"params": params, "inputs": inputs})
    if env.is_main:
        if plan.line():
            say(f"{STAGE}: {plan.line()}")
        adapters = f"LoRA r={cfg.lora.r}" if cfg.lora.r else "full fine-tuning"
        say(
            f"{STAGE}: task {cfg.task} from {cfg.init_from}, {len(task.rows)} training rows, {cfg.steps} steps, "
            f"{adapters} ({trainable:,} of {total:,} parameters train), fingerprint {fp}"
        )
        rep = reporter()
        rep.log_params({f"finetune.{k}": v for k, v in cfg.model_dump().items()} | {"project.seed": seed})
        rep.log_params({"world_size": env.world_size})  # the processes that trained (PET_* variables may set it)
        for split in ("train", "val"):
            path = paths.split_file(cfg.task, split)
            rep.log_input(f"{cfg.task}-{split}", inputs[f"data_{split}"], str(path), context=split)

    per_rank = cfg.batch_size // env.world_size
    device = torch.device(env.device)

    def batch_fn(index: int) -> dict[str, torch.Tensor]:
        picked = batch_indices(len(task.rows), per_rank, index, seed, env.rank, env.world_size)
        return {k: v.to(device) for k, v in task.collate([task.rows[i] for i in picked]).items()}

    result = train(
        model,
        batch_fn,
        cfg,
        env=env,
        seed=seed,
        loss_fn=task.loss_fn,
        evaluate_fn=task.evaluate_fn,
        checkpoint_dir=paths.checkpoints(STAGE, config.project.name),
        fingerprint=fp,
        meta={"stage": STAGE, "task": cfg.task, "model_config": mcfg.to_dict(), "params": params, "inputs": inputs},
        name=STAGE,
    )
    if not env.is_main:
        return {"rank": env.rank, "steps": result.step}

    report = {
        "task": cfg.task,
        "steps": result.step,
        "tokens_seen": result.tokens_seen,
        "train_loss": result.train_loss,
        **{f"val_{k}": v for k, v in result.val.items()},
        "params_total": total,
        "params_trainable": trainable,
        "lora_r": cfg.lora.r,
        "max_length": max_length,
        "data": task.data,
        **plan.record(),
    }
    report = rounded(report)
    write_training_reports(paths, STAGE, report, result.history, task.val_columns, rounded)
    final = lora.merge(model).cpu()
    write_models(paths, config, final, mcfg, init_dir, tokenizer, result, report, task, inputs)
    summary = {
        "task": cfg.task,
        "steps": result.step,
        "train_loss": report["train_loss"],
        **{k: v for k, v in report.items() if k.startswith("val_")},
        "resumed_from_step": result.resumed_from if result.resumed_from is not None else "-",
        "model": str(paths.finetune / "hf"),
    }
    if result.replica_digest:
        summary["replicas_identical"] = f"{env.world_size} ranks, sha256 {result.replica_digest[:16]}"
    return summary


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def recorded(cfg: FinetuneConfig) -> dict[str, Any]:
    """The params a checkpoint fingerprint and the model card keep: `steps` already resolved, so `epochs` and
    `max_auto_steps` (how it was chosen) add nothing, and `class_weights` only when it changes the loss; a
    checkpoint made before these keys existed still resumes."""
    params = cfg.model_dump(exclude={"epochs", "max_auto_steps"})
    if params["class_weights"] == "none":
        del params["class_weights"]
    return params


# --- inputs ----------------------------------------------------------------------------------------------------


def resolve_dir(paths: Paths, value: str, key: str) -> Path:
    """A model directory, or a hub id `org/name[@revision]` from the local Hugging Face cache (lmcore.hubdir)."""
    from lmcore.hubdir import model_directory

    return model_directory(value, paths.root, key)


def check_tokenizer(paths: Paths, expected: str | None, init_dir: Path) -> None:
    """Refuse a model whose tokenizer is not the workspace's (finetune.tokenizer), naming both."""
    if expected is None:
        return
    from lmcore.tokenizer import tokenizer_fingerprint

    workspace = Path(expected) if Path(expected).is_absolute() else paths.root / expected
    if not (workspace / "tokenizer.json").is_file():
        raise CheckpointError(
            f"finetune.tokenizer: {expected} has no tokenizer.json (run the tokenizer stage, or set "
            "finetune.tokenizer: null to use the tokenizer of finetune.init_from)"
        )
    ours, theirs = tokenizer_fingerprint(workspace), tokenizer_fingerprint(init_dir)
    if ours != theirs:
        raise DataError(
            f"finetune.init_from: the tokenizer of {init_dir} (fingerprint {theirs}) differs from the workspace "
            f"tokenizer {workspace} (fingerprint {ours}): rerun pretrain with this tokenizer, or set "
            "finetune.tokenizer: null to fine-tune with the model's own"
        )


def file_digest(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: not found (run the ingest stage first)")
    from lmcore.files import file_sha256

    return file_sha256(path)[:16]


# --- tasks -----------------------------------------------------------------------------------------------------


def prepare_sft(config: Config, paths: Paths, base: Transformer, tokenizer, max_length: int, init_dir: Path) -> Task:
    import math

    from lmcore.finetune import sft

    cfg = config.finetune
    render = sft.chat_renderer(tokenizer, str(init_dir))
    stats = {split: sft.SftStats() for split in ("train", "val")}
    examples = {}
    for split, st in stats.items():
        conversations = sft.load_conversations(paths.split_file("sft", split), st)
        examples[split] = sft.build_examples(conversations, tokenizer, max_length, st, render)
        if not examples[split]:
            raise DataError(
                f"{paths.split_file('sft', split)}: no example keeps an assistant token within "
                f"finetune.max_length={max_length}"
            )
    rows = sft.pack_examples(examples["train"], max_length) if cfg.packing else examples["train"]
    val = examples["val"]
    if cfg.eval_max_batches:
        val = val[: cfg.eval_max_batches * cfg.batch_size]
    pad_id = tokenizer.pad_token_id

    def evaluate_fn(model: torch.nn.Module) -> dict[str, float]:
        nll, count = sft.assistant_nll(model, val, pad_id, cfg.batch_size)
        loss = nll / max(1, count)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}

    data = {split: st.as_dict() for split, st in stats.items()}
    data["train"]["rows_after_packing"] = len(rows)
    return Task(
        model=base,
        rows=rows,
        collate=lambda batch: sft.collate(batch, pad_id),
        loss_fn=sft.sft_loss,
        evaluate_fn=evaluate_fn,
        data=data,
        val_columns=["step", "loss", "perplexity"],
    )


def prepare_classification(
    config: Config, paths: Paths, base: Transformer, tokenizer, max_length: int, init_dir: Path
) -> Task:
    import torch

    from lmcore.finetune import classification as cls
    from lmcore.finetune.schedule import balanced_class_weights

    cfg = config.finetune
    data = cls.load_classification(
        paths.split_file("classification", "train"),
        paths.split_file("classification", "val"),
        cfg.text_field,
        cfg.label_field,
    )
    label2id = data.label2id
    train_ids, train_cut = cls.encode_texts([r.text for r in data.train], tokenizer, max_length)
    val_ids, val_cut = cls.encode_texts([r.text for r in data.val], tokenizer, max_length)
    rows = [(ids, label2id[r.label]) for ids, r in zip(train_ids, data.train, strict=True)]
    weights = None
    if cfg.class_weights == "balanced":
        weights = balanced_class_weights([label for _, label in rows], len(data.labels))
    val_rows = val_ids[: cfg.eval_max_batches * cfg.batch_size] if cfg.eval_max_batches else val_ids
    val_labels = torch.tensor([label2id[r.label] for r in data.val][: len(val_rows)])
    pad_id = tokenizer.pad_token_id

    def collate(batch: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        out = cls.collate_ids([ids for ids, _ in batch], pad_id)
        out["labels"] = torch.tensor([label for _, label in batch])
        return out

    def evaluate_fn(model: torch.nn.Module) -> dict[str, float]:
        logits = cls.logits(model, val_rows, pad_id, cfg.batch_size)
        loss = torch.nn.functional.cross_entropy(logits, val_labels).item()
        return {"loss": loss, "accuracy": (logits.argmax(-1) == val_labels).float().mean().item()}

    report = {
        "labels": data.labels,
        "train_balance": data.balance("train"),
        "val_balance": data.balance("val"),
        "train_rows": len(data.train),
        "val_rows": len(data.val),
        "skipped_empty_text": data.skipped_empty,
        "truncated": {"train": train_cut, "val": val_cut},
        "majority_label": data.majority_label(),
    }
    loss_fn = cls.classification_loss
    if weights is not None:
        report["class_weights"] = dict(zip(data.labels, weights, strict=True))
        loss_fn = functools.partial(cls.classification_loss, weight=torch.tensor(weights))
    return Task(
        model=cls.Classifier(base, len(data.labels)),
        rows=rows,
        collate=collate,
        loss_fn=loss_fn,
        evaluate_fn=evaluate_fn,
        data=report,
        trainable=("score",),
        val_columns=["step", "loss", "accuracy"],
    )


# --- outputs (rank 0) ------------------------------------------------------------------------------------------


def write_models(
    paths: Paths,
    config: Config,
    model: torch.nn.Module,
    mcfg: ModelConfig | HFModelInfo,
    init_dir: Path,
    tokenizer,
    result,
    report: dict,
    task: Task,
    inputs: dict,
) -> None:
    """models/finetune/checkpoint (the final checkpoint, adapters unmerged) and models/finetune/hf (merged)."""
    from lmcore.export import export_hf, export_hf_classifier
    from lmcore.files import atomic_directory
    from lmcore.hfcausal import HFCausalLM, export_hf_causal

    cfg = config.finetune
    if result.checkpoint is None:
        raise CheckpointError(f"{STAGE}: training ended without a checkpoint to export")
    with atomic_directory(paths.finetune / "checkpoint") as tmp:
        for file in sorted(result.checkpoint.iterdir()):
            shutil.copy2(file, tmp / file.name)
    how = f"LoRA (r={cfg.lora.r}, alpha={cfg.lora.alpha:g}, merged)" if cfg.lora.r else "full fine-tuning"
    card = {
        "title": f"{config.project.name} ({cfg.task})",
        "description": (
            f"Fine-tuned from {cfg.init_from} by the lmcycle `finetune` stage: task `{cfg.task}`, {how}, "
            f"{result.step} steps."
        ),
        "data": [
            f"{paths.split_file(cfg.task, split).relative_to(paths.root)} (sha256 {inputs[f'data_{split}']})"
            for split in ("train", "val")
        ],
        "params": {
            k: v for k, v in recorded(cfg).items() if v is not None and not isinstance(v, dict) and k not in LAUNCH_KEYS
        }
        | {"project.seed": config.project.seed},
        "metrics": {k: v for k, v in report.items() if k.startswith(("val_", "train_"))},
        "tags": ["finetune", cfg.task],
    }
    lineage = {"lmcycle": {"stage": STAGE, "task": cfg.task, "step": result.step, "inputs": inputs}}
    out = paths.finetune / "hf"
    if cfg.task == "classification":
        export_hf_classifier(
            model.transformer, model.score.weight, task.data["labels"], init_dir, out, card=card, extra_config=lineage
        )
        return
    card["description"] += " Chat format: the tokenizer's chat template (`tokenizer.apply_chat_template`)."
    export = export_hf_causal if isinstance(model, HFCausalLM) else export_hf
    export(model, init_dir, out, card=card, extra_config=lineage)
    stop_at_end_of_turn(out, tokenizer)


def stop_at_end_of_turn(directory: Path, tokenizer) -> None:
    """A chat model's generation stops at the end-of-turn marker as well as at EOS."""
    from lmcore.tokenizer import END

    end_id = tokenizer.convert_tokens_to_ids(END)
    path = directory / "generation_config.json"
    if end_id is None or end_id == tokenizer.unk_token_id or not path.is_file():
        return
    gen = json.loads(path.read_text(encoding="utf-8"))
    eos = gen.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    gen["eos_token_id"] = eos + [end_id] if end_id not in eos else eos
    atomic_write_text(path, json.dumps(gen, indent=2, sort_keys=True) + "\n")
