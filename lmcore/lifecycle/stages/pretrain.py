"""Stage `pretrain`: train the transformer on the token shards for `pretrain.steps` steps, resumably.

Reads data/tokens/{train,val}, models/tokenizer and params `model`, `pretrain`, `project.seed`; writes
models/pretrain/{checkpoint,hf} (the final checkpoint and a Hugging Face Llama directory with a model card),
reports/pretrain.json (final metrics, no timings) and reports/pretrain/{train.csv,val.csv,loss.png}.

Resumable by design: checkpoints go to checkpoints/pretrain/ (or $LMCYCLE_CHECKPOINT_DIR/<project.name>/pretrain/,
see lmcore/lifecycle/paths.py), which is NOT a DVC output. `dvc repro` deletes a stage's outputs before running it, so
checkpoints kept under models/pretrain would vanish exactly when a rerun after a crash or preemption needs them.
Each checkpoint carries a fingerprint of what determines the run (the `model` and `pretrain` params except pure
bookkeeping and launcher keys, project.seed, the tokenizer fingerprint, the shard indexes, and the init_from
weights); a rerun resumes from the newest checkpoint with the same fingerprint, so `lmcycle stage pretrain` or
`dvc repro` after a kill continues where it stopped and ends bit-identical on CPU.

Runs the same on `pretrain.nproc_per_node` processes, which the stage starts itself (lmcore/train/launch.py), or
under `torchrun --nproc_per_node=N -m flows.cli stage pretrain` (DDP, or FSDP2 with
`pretrain.parallel: fsdp`): `pretrain.batch_size` is the global micro-batch, each rank reads its share of the same
draw, and rank 0 alone writes checkpoints, reports and the exported model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore.errors import CheckpointError, ConfigError, DataError
from lmcore.lifecycle.config import LAUNCH_KEYS, Config
from lmcore.lifecycle.paths import Paths
from lmcore.lifecycle.reports import significant, write_training_reports
from lmcore.reporting import reporter

if TYPE_CHECKING:
    import torch

    from lmcore.data.shards import TokenShards
    from lmcore.model import ModelConfig
    from lmcore.train.distributed import DistEnv

STAGE = "pretrain"
_round = significant(7)  # every float in pretrain's reports: byte-identical reruns, no float noise
# Keys that change what is logged or kept, never the weights: a checkpoint made with other values still resumes.
# The launcher's keys are among them: a checkpoint resumes on another process count (lmcore/train/loop.py says when).
BOOKKEEPING_KEYS = (
    frozenset({"log_every", "eval_every", "eval_max_batches", "checkpoint_every", "keep_checkpoints"}) | LAUNCH_KEYS
)


def run(config: Config, paths: Paths) -> dict:
    from lmcore.train.distributed import training_process

    with training_process(config.pretrain) as env:
        return _run(config, paths, env)


def _run(config: Config, paths: Paths, env: DistEnv) -> dict:
    import torch

    from lmcore.metrics import evaluate_lm
    from lmcore.train.loop import train
    from lmcore.train.runtime import pick_dtype, seed_everything

    cfg, seed = config.pretrain, config.project.seed
    tokenizer_fp, vocab_size = _tokenizer(paths)
    train_shards, val_shards = _shards(paths, tokenizer_fp)
    mcfg, init_dir = _model_config(config, paths, vocab_size, tokenizer_fp)
    context = mcfg.context_length
    _check_fit(train_shards, val_shards, context, cfg.batch_size, env)
    seed_everything(seed)  # the initial weights depend on the seed alone
    model, init_digest = _build_model(mcfg, init_dir)
    model.to(env.device)

    params = _fingerprint_params(config, mcfg)
    inputs = {
        "tokenizer": tokenizer_fp,
        "train_index": _file_sha(train_shards.directory / "index.json"),
        "val_index": _file_sha(val_shards.directory / "index.json"),
        "init_from": init_digest,
    }
    from lmcore.train.checkpoint import fingerprint

    fp = fingerprint({"params": params, "inputs": inputs})
    tokens_per_step = cfg.batch_size * cfg.grad_accum * context
    dtype = pick_dtype(cfg.dtype, env.device_type)
    if env.is_main:
        _say(
            f"{STAGE}: {mcfg.num_params() / 1e6:.2f}M params, {cfg.steps} steps × {tokens_per_step} tokens, "
            f"{env.world_size} process(es) on {env.device_type} ({str(dtype).removeprefix('torch.')}, "
            f"{torch.get_num_threads()} threads), fingerprint {fp}"
        )
        rep = reporter()
        rep.log_params({f"model.{k}": v for k, v in mcfg.to_dict().items()})
        rep.log_params({f"pretrain.{k}": v for k, v in cfg.model_dump().items()} | {"project.seed": seed})
        rep.log_params({"world_size": env.world_size})  # the processes that trained (PET_* variables may set it)
        for split, shards in (("train", train_shards), ("val", val_shards)):
            rep.log_input(f"tokens-{split}", inputs[f"{split}_index"], str(shards.directory), context=split)

    per_rank = cfg.batch_size // env.world_size
    device = torch.device(env.device)
    pin = env.device_type == "cuda"

    def batch_fn(index: int) -> dict[str, torch.Tensor]:
        x, y = train_shards.batch(index, per_rank, context, seed, env.rank, env.world_size)
        return {"input_ids": _to_device(x, device, pin), "targets": _to_device(y, device, pin)}

    def evaluate_fn(m: torch.nn.Module) -> dict[str, float]:
        return evaluate_lm(m, val_shards, context, cfg.batch_size, cfg.eval_max_batches, env.rank, env.world_size)

    result = train(
        model,
        batch_fn,
        cfg,
        env=env,
        seed=seed,
        evaluate_fn=evaluate_fn,
        checkpoint_dir=paths.checkpoints(STAGE, config.project.name),
        fingerprint=fp,
        meta={"stage": STAGE, "model_config": mcfg.to_dict(), "params": params, "inputs": inputs},
        flops_per_token=mcfg.flops_per_token(context),
        name=STAGE,
        parallel=cfg.parallel,
    )
    if not env.is_main:
        return {"rank": env.rank, "steps": result.step}

    report = _report(result, mcfg)
    write_training_reports(paths, STAGE, report, result.history, ["step", "loss", "bpb"], _round)
    _write_models(paths, config, mcfg, result, report, inputs)
    summary = {
        "steps": result.step,
        "tokens_seen": result.tokens_seen,
        "params": mcfg.num_params(),
        "train_loss": report.get("train_loss"),
        "val_loss": report.get("val_loss"),
        "val_bpb": report.get("val_bpb"),
        "resumed_from_step": result.resumed_from if result.resumed_from is not None else "-",
        "tokens_per_s": round(result.tokens_per_s) if result.tokens_per_s else "-",
        "checkpoint": str(result.checkpoint),
        "model": str(paths.pretrain / "hf"),
    }
    if result.replica_digest:
        summary["replicas_identical"] = f"{env.world_size} ranks, sha256 {result.replica_digest[:16]}"
    return summary


def _say(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def _to_device(array, device: torch.device, pin: bool) -> torch.Tensor:
    import torch

    tensor = torch.from_numpy(array)
    if pin:
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


# --- inputs --------------------------------------------------------------------------------------------------


def _tokenizer(paths: Paths) -> tuple[str, int]:
    from lmcore.tokenizer import read_tokenizer, tokenizer_fingerprint

    tok = read_tokenizer(paths.tokenizer)
    return tokenizer_fingerprint(paths.tokenizer), tok.get_vocab_size()


def _shards(paths: Paths, tokenizer_fp: str) -> tuple[TokenShards, TokenShards]:
    from lmcore.data.shards import TokenShards

    return tuple(TokenShards(paths.tokens / split, expected_fingerprint=tokenizer_fp) for split in ("train", "val"))


def _model_config(config: Config, paths: Paths, vocab_size: int, tokenizer_fp: str) -> tuple[ModelConfig, Path | None]:
    """The architecture: from the `model` params, or from the config.json of `pretrain.init_from`."""
    from lmcore.model import ModelConfig

    init_from = config.pretrain.init_from
    if not init_from:
        try:
            return ModelConfig.from_params(config.model, vocab_size), None
        except ValueError as err:
            raise ConfigError(str(err)) from None

    from lmcore.export import read_hf_config
    from lmcore.tokenizer import tokenizer_fingerprint

    directory = Path(init_from)
    directory = directory if directory.is_absolute() else paths.root / directory
    if not directory.is_dir():
        raise CheckpointError(f"pretrain.init_from: {init_from} is not a directory (an exported Hugging Face model)")
    if (directory / "tokenizer.json").is_file() and tokenizer_fingerprint(directory) != tokenizer_fp:
        raise DataError(
            f"pretrain.init_from: {init_from} was trained with another tokenizer than {paths.tokenizer} "
            f"(fingerprints {tokenizer_fingerprint(directory)} and {tokenizer_fp})"
        )
    mcfg = read_hf_config(directory)
    if mcfg.vocab_size < vocab_size:
        raise DataError(
            f"pretrain.init_from: {init_from} has {mcfg.vocab_size} token embeddings, the tokenizer {vocab_size}"
        )
    return mcfg, directory


def _build_model(mcfg: ModelConfig, init_dir: Path | None) -> tuple[torch.nn.Module, str | None]:
    """(model, digest of the init weights or None): freshly initialised, or the weights of init_dir."""
    from lmcore.model import Transformer

    if init_dir is None:
        return Transformer(mcfg), None
    from lmcore.export import import_hf
    from lmcore.weightfiles import init_weights_digest

    model, _ = import_hf(init_dir)
    return model, init_weights_digest(init_dir)[:16]  # one file or every shard


def _check_fit(train: TokenShards, val: TokenShards, context: int, batch_size: int, env: DistEnv) -> None:
    """Refuse, naming the key to change, what the shards or the process count cannot serve."""
    for shards in (train, val):
        if shards.num_tokens < context + 1:
            raise DataError(
                f"model.context_length {context} is larger than the shards can serve: {shards.directory} holds "
                f"{shards.num_tokens} tokens, fewer than one window of {context + 1} (lower model.context_length)"
            )
    if batch_size % env.world_size:
        raise ConfigError(
            f"pretrain.batch_size: {batch_size} sequences cannot be split evenly over {env.world_size} processes"
        )
    windows = (val.num_tokens - 1) // context
    if windows < batch_size and env.is_main:
        # Not an error: evaluation simply scores the whole val split in one smaller batch.
        _say(
            f"{STAGE}: note: the val split holds {windows} full window(s) of {context} tokens, fewer than "
            f"pretrain.batch_size={batch_size}; evaluation scores all of them in one smaller batch"
        )


def _fingerprint_params(config: Config, mcfg: ModelConfig) -> dict[str, Any]:
    pretrain = {k: v for k, v in config.pretrain.model_dump().items() if k not in BOOKKEEPING_KEYS}
    return {
        "model": config.model.model_dump(),
        "resolved_model": mcfg.to_dict(),
        "pretrain": pretrain,
        "seed": config.project.seed,
    }


def _file_sha(path: Path) -> str:
    from lmcore.files import file_sha256

    return file_sha256(path)[:16]


# --- outputs (rank 0) ----------------------------------------------------------------------------------------


def _report(result, mcfg: ModelConfig) -> dict[str, Any]:
    report = {
        "params": mcfg.num_params(),
        "steps": result.step,
        "tokens_seen": result.tokens_seen,
        "train_loss": result.train_loss,
    }
    for key in ("loss", "perplexity", "bpb", "tokens"):
        if key in result.val:
            report[f"val_{key}"] = result.val[key]
    return {k: _round(v) for k, v in report.items()}


def _write_models(paths: Paths, config: Config, mcfg: ModelConfig, result, report: dict, inputs: dict) -> None:
    """models/pretrain/checkpoint (the final checkpoint) and models/pretrain/hf, each written atomically.

    The export is built from the checkpoint file itself, so what ships is exactly what was saved, whatever
    wrapped the model during training (one device, DDP or FSDP shards).
    """
    from lmcore.export import export_hf
    from lmcore.files import atomic_directory
    from lmcore.model import Transformer
    from lmcore.train import checkpoint as ckpt

    if result.checkpoint is None:
        raise CheckpointError(f"{STAGE}: training ended without a checkpoint to export")
    with atomic_directory(paths.pretrain / "checkpoint") as tmp:
        for file in sorted(result.checkpoint.iterdir()):
            _link_or_copy(file, tmp / file.name)
    model = Transformer(mcfg)
    ckpt.load_model_state(model, ckpt.load_weights(result.checkpoint))
    card = {
        "title": f"{config.project.name} (pretrained)",
        "description": (
            f"Pretrained from scratch by the lmcycle `pretrain` stage for {result.step} steps "
            f"({result.tokens_seen:,} tokens)."
            if not config.pretrain.init_from
            else f"Continued pretraining of {config.pretrain.init_from} by the lmcycle `pretrain` stage."
        ),
        "data": [
            f"tokens: {paths.tokens.relative_to(paths.root)} (shard indexes train {inputs['train_index']}, "
            f"val {inputs['val_index']})",
            f"tokenizer: {paths.tokenizer.relative_to(paths.root)} (fingerprint {inputs['tokenizer']})",
        ],
        "params": {k: v for k, v in config.pretrain.model_dump().items() if v is not None and k not in LAUNCH_KEYS}
        | {"project.seed": config.project.seed},
        "metrics": {k: v for k, v in report.items() if k.startswith(("val_", "train_"))},
        "tags": ["pretrain"],
    }
    lineage = {"lmcycle": {"stage": STAGE, "step": result.step, "inputs": inputs}}
    export_hf(model, paths.tokenizer, paths.pretrain / "hf", card=card, extra_config=lineage)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
