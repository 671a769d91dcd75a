"""Stage `evaluate`: every model of the workspace on held-out data, beside the baselines that give it meaning.

Reads models/pretrain/hf, models/finetune/hf, the base model of the fine-tune (`finetune.init_from`),
data/tokens/{train,val}, data/ingest/{pretrain,sft,classification}/val.jsonl and params `evaluate`; writes
reports/evaluate.json (one flat namespace, DVC metrics) and, under reports/evaluate/: pretrain_bpb.png (model vs
baselines), finetune.png (base vs fine-tuned loss, or the confusion matrix), predictions.csv/json (every held-out
answer or prediction) and samples.csv/json (the samples table).

- pretrain: loss, perplexity and bits-per-byte (lmcore.metrics, the one definition) on the val token split,
  beside count-based unigram and bigram models fitted on the train split and scored on the same targets; a
  model that does not beat the bigram is called undertrained in `pretrain.verdict`.
- sft: assistant-token loss/perplexity and the answer metrics of `evaluate.sft_metrics` (exact match / token F1
  by default; ROUGE, BLEU, chrF: lmcore.taskmetrics) of greedy answers on held-out conversations, for the
  fine-tuned model (`sft.*`) and the base model (`base.*`) on the same prompts; per-example values go into
  predictions.csv/json (BLEU and chrF are corpus-level only).
- classification: accuracy, macro-F1, per-class precision/recall/F1, confusion matrix, majority-class baseline.
- lm-evaluation-harness (`evaluate.lm_eval.enabled`): a rolling-loglikelihood task over the held-out pretraining
  text, run offline on the exported HF models; its metrics are merged as `lm_eval.<model>.<metric>`.
Every model is scored on `evaluate.device` with `evaluate.dtype` weights (lmcore.device; cpu/float32 when left out,
bit-repeatable), recorded as `evaluate.device` and `evaluate.dtype` in the report.
`*.data_fingerprint` keys hash the held-out text each number was computed on (not its tokens: bits-per-byte is
tokenizer-independent), so a promotion gate can tell comparable numbers from incomparable ones.
The sft and classification scorers are the LM library's (lmcore.heldout), the ones the gate re-scores a champion
with; this module is the plumbing around them (which models, baselines, plots, tables, the report).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from lmcore.device import Placement
from lmcore.errors import CheckpointError, DataError
from lmcore.lifecycle.config import Config
from lmcore.lifecycle.paths import Paths
from lmcore.reporting import reporter

STAGE = "evaluate"
OUTPUTS = ("pretrain_bpb.png", "finetune.png", "predictions.csv", "predictions.json", "samples.csv", "samples.json")


def run(config: Config, paths: Paths) -> dict:
    from lmcore.scoring import write_report
    from lmcore.train.runtime import seed_everything, set_threads

    set_threads()  # repeatable matrix products (see set_threads)
    seed_everything(config.project.seed)
    out = paths.plots(STAGE)
    for name in OUTPUTS:  # a file this run does not rewrite must not survive from an earlier one
        (out / name).unlink(missing_ok=True)
    models = model_dirs(config, paths)
    if not models:
        raise CheckpointError(f"{STAGE}: no model to evaluate (models/pretrain/hf or models/finetune/hf)")
    where = placement(config)
    metrics: dict[str, Any] = {"evaluate.device": where.device, "evaluate.dtype": where.dtype_name}
    if "pretrain" in models:
        metrics |= evaluate_pretrain(config, paths, models["pretrain"], out, where)
    if "finetune" in models:
        if is_classifier(models["finetune"]):
            metrics |= evaluate_classification(config, paths, models["finetune"], out, where)
        else:
            metrics |= evaluate_sft(config, paths, models["finetune"], models.get("base"), out, where)
    rows = samples(config, models, where)
    if rows:
        from lmcore.scoring import write_table

        write_table(rows, out, "samples")
    if config.evaluate.lm_eval.enabled:
        metrics |= run_lm_eval(config, paths, models, where)
    declared = {k: v for k, v in metrics.items() if k.endswith("data_fingerprint")}
    metrics["eval_data_fingerprint"] = digest(json.dumps(declared, sort_keys=True).encode())
    write_report(paths.report(STAGE), metrics)
    rep = reporter()
    rep.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)})
    rep.log_artifact(paths.report(STAGE))
    for png in sorted(out.glob("*.png")):
        rep.log_artifact(png, "plots")
    keys = ("pretrain.val_bpb", "pretrain.bigram_bpb", "pretrain.verdict", "sft.loss", "base.sft_loss")
    keys += tuple(f"sft.{name}" for name in config.evaluate.sft_metrics)
    keys += ("classification.accuracy", "classification.majority_accuracy", "classification.verdict")
    summary = {k: metrics[k] for k in keys if k in metrics}
    return summary | {"report": str(paths.report(STAGE)), "samples": len(rows)}


def placement(config: Config) -> Placement:
    """`evaluate.device` and `evaluate.dtype` resolved on this machine (cpu/float32 unless the params say else)."""
    from lmcore.device import resolve

    where = resolve(config.evaluate.device, config.evaluate.dtype, key=f"{STAGE}.device")
    if not where.is_default:
        say(f"{STAGE}: scoring on {where}")
    return where


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def progress(message: str) -> None:
    """What the library's scorers report as they go, said as this stage."""
    say(f"{STAGE}: {message}")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def file_fingerprint(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: not found (run the ingest stage first)")
    return digest(path.read_bytes())


# --- which models ----------------------------------------------------------------------------------------------


def model_dirs(config: Config, paths: Paths) -> dict[str, Path]:
    """The HF directories present: the pretrained model, the fine-tuned one and the fine-tune's base."""
    found = {}
    for kind, directory in (("pretrain", paths.pretrain / "hf"), ("finetune", paths.finetune / "hf")):
        if (directory / "config.json").is_file():
            found[kind] = directory
    base = Path(config.finetune.init_from)
    base = base if base.is_absolute() else paths.root / base
    if "finetune" in found and (base / "config.json").is_file():
        found["base"] = base
    return found


def is_classifier(directory: Path) -> bool:
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    return any("SequenceClassification" in a for a in config.get("architectures") or [])


# --- pretrained model vs count baselines -----------------------------------------------------------------------


def evaluate_pretrain(config: Config, paths: Paths, model_dir: Path, out: Path, where: Placement) -> dict[str, Any]:
    import torch

    from lmcore.baselines import BigramLM, UnigramLM, score_shards, shard_chunks
    from lmcore.data.shards import TokenShards
    from lmcore.heldout import load_lm
    from lmcore.metrics import bits_per_byte, evaluate_lm
    from lmcore.scoring import plot_bars
    from lmcore.tokenizer import tokenizer_fingerprint

    model, _ = load_lm(model_dir, where.device, where.dtype_name)
    fp = tokenizer_fingerprint(model_dir)
    train = TokenShards(paths.tokens / "train", expected_fingerprint=fp)
    val = TokenShards(paths.tokens / "val", expected_fingerprint=fp)
    say(f"{STAGE}: pretrained model on {val.num_tokens:,} held-out tokens")
    with torch.no_grad():
        scores = evaluate_lm(model, val, model.config.context_length, config.evaluate.batch_size)
    vocab = max(train.vocab_size, model.config.vocab_size)
    unigram = score_shards(UnigramLM(vocab).fit(shard_chunks(train)), val)
    bigram = score_shards(BigramLM(vocab).fit(shard_chunks(train)), val)
    result = {
        "pretrain.val_loss": scores["loss"],
        "pretrain.val_perplexity": scores["perplexity"],
        "pretrain.val_bpb": scores["bpb"],
        "pretrain.val_tokens": int(scores["tokens"]),
        "pretrain.unigram_bpb": bits_per_byte(unigram.nll_nats, val.utf8_bytes),
        "pretrain.bigram_bpb": bits_per_byte(bigram.nll_nats, val.utf8_bytes),
        "pretrain.data_fingerprint": file_fingerprint(paths.split_file("pretrain", "val")),
    }
    margin = result["pretrain.bigram_bpb"] - result["pretrain.val_bpb"]
    result["pretrain.beats_bigram"] = int(margin > 0)
    result["pretrain.verdict"] = (
        f"beats the bigram baseline by {margin:.3f} bits per byte"
        if margin > 0
        else f"undertrained: {-margin:.3f} bits per byte worse than a count-based bigram model "
        "(raise pretrain.steps or the model size)"
    )
    say(f"{STAGE}: pretrain {result['pretrain.verdict']}")
    bars = {"model": scores["bpb"], "bigram": result["pretrain.bigram_bpb"], "unigram": result["pretrain.unigram_bpb"]}
    plot_bars(bars, out / "pretrain_bpb.png", "held-out bits per byte (lower is better)", "bits per byte")
    return result


# --- SFT: fine-tuned vs base on held-out conversations ---------------------------------------------------------


def evaluate_sft(
    config: Config, paths: Paths, tuned_dir: Path, base_dir: Path | None, out: Path, where: Placement
) -> dict[str, Any]:
    from lmcore.finetune import sft
    from lmcore.heldout import sft_scores
    from lmcore.scoring import plot_bars, write_table

    path = paths.split_file("sft", "val")
    conversations = sft.load_conversations(path)[: config.evaluate.sft_max_examples]
    result: dict[str, Any] = {"sft.data_fingerprint": file_fingerprint(path), "sft.examples": len(conversations)}
    table: list[dict[str, Any]] = []
    for prefix, directory in (("sft", tuned_dir), ("base", base_dir)):
        if directory is None:
            continue
        scores, rows = sft_scores(
            directory,
            conversations,
            prefix,
            batch_size=config.evaluate.batch_size,
            max_new_tokens=config.evaluate.max_new_tokens,
            metrics=config.evaluate.sft_metrics,
            log=progress,
            device=where.device,
            dtype=where.dtype_name,
        )
        result |= {f"{prefix}.{'' if prefix == 'sft' else 'sft_'}{k}": v for k, v in scores.items()}
        table += rows
    bars = {"fine-tuned": result["sft.loss"]}
    if "base.sft_loss" in result:
        result["sft.loss_gain"] = result["base.sft_loss"] - result["sft.loss"]
        bars = {"base": result["base.sft_loss"]} | bars
    plot_bars(bars, out / "finetune.png", "held-out assistant-token loss (lower is better)", "nats per token")
    write_table(table, out, "predictions")
    return result


# --- classification ----------------------------------------------------------------------------------------------


def evaluate_classification(
    config: Config, paths: Paths, model_dir: Path, out: Path, where: Placement
) -> dict[str, Any]:
    from lmcore.finetune import classification as cls
    from lmcore.heldout import classifier_scores
    from lmcore.scoring import plot_confusion_matrix, write_table

    cfg = config.finetune
    train_path, val_path = (paths.split_file("classification", s) for s in ("train", "val"))
    data = cls.load_classification(train_path, val_path, cfg.text_field, cfg.label_field)
    batch_size = config.evaluate.batch_size
    scored = classifier_scores(
        model_dir, data, val_path, batch_size, log=progress, device=where.device, dtype=where.dtype_name
    )
    result = scored.metrics | {"classification.data_fingerprint": file_fingerprint(val_path)}
    result["classification.verdict"] = classifier_verdict(result)
    say(f"{STAGE}: classification {result['classification.verdict']}")
    title = "held-out confusion matrix (rows: true label)"
    plot_confusion_matrix(scored.matrix, scored.labels, out / "finetune.png", title)
    write_table(scored.rows, out, "predictions")
    return result


def classifier_verdict(metrics: dict[str, Any]) -> str:
    """One line: does the classifier beat always answering the majority class, on accuracy or macro-F1?

    Either counts: class weighting may trade a little accuracy for a much better macro-F1 on imbalanced labels."""
    acc, f1 = metrics["classification.accuracy"], metrics["classification.macro_f1"]
    base_acc, base_f1 = metrics["classification.majority_accuracy"], metrics["classification.majority_macro_f1"]
    figures = f"accuracy {acc:.3f} vs {base_acc:.3f}, macro-F1 {f1:.3f} vs {base_f1:.3f}"
    if acc > base_acc or f1 > base_f1:
        return f"beats the majority-class baseline ({figures})"
    return (
        f"does not beat the majority class ({metrics['classification.majority_label']!r} for every row): {figures} "
        "(raise finetune.steps or set it to auto, or try finetune.class_weights: balanced)"
    )


# --- samples -------------------------------------------------------------------------------------------------------


def samples(config: Config, models: dict[str, Path], where: Placement) -> list[dict[str, Any]]:
    """Greedy and top-p continuations of `evaluate.prompts` by the base (or pretrained) and fine-tuned models."""
    from lmcore.finetune import sft
    from lmcore.heldout import complete, load_lm

    cfg = config.evaluate
    rows: list[dict[str, Any]] = []
    base = models.get("base") or models.get("pretrain")
    tuned = models.get("finetune")
    for name, directory in (("base", base), ("finetuned", tuned)):
        if directory is None:
            continue
        if name == "finetuned" and is_classifier(directory):
            rows += classify_samples(config, directory, where)
            continue
        model, tokenizer = load_lm(directory, where.device, where.dtype_name)
        prompts = list(cfg.prompts)
        if name == "finetuned":  # a chat model is asked the prompt as a user turn
            render = sft.chat_renderer(tokenizer, str(directory))
            texts = [render([{"role": "user", "content": p}], True) for p in prompts]
        else:
            texts = [tokenizer.bos_token + p if tokenizer.bos_token else p for p in prompts]
        for mode in ("greedy", "top_p"):
            outputs = complete(
                model,
                tokenizer,
                texts,
                cfg.max_new_tokens,
                greedy=mode == "greedy",
                seed=config.project.seed,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                batch_size=cfg.batch_size,
            )
            rows += [
                {"model": name, "mode": mode, "prompt": p, "completion": o}
                for p, o in zip(prompts, outputs, strict=True)
            ]
    return rows


def classify_samples(config: Config, directory: Path, where: Placement) -> list[dict[str, Any]]:
    import torch

    from lmcore.finetune import classification as cls
    from lmcore.heldout import placed
    from lmcore.tokenizer import model_tokenizer

    model, labels = cls.import_hf_classifier(directory)
    model = placed(model, where.device, where.dtype_name)
    tokenizer = model_tokenizer(directory)
    prompts = list(config.evaluate.prompts)
    rows, _ = cls.encode_texts(prompts, tokenizer, model.config.context_length)
    probs = torch.softmax(cls.logits(model, rows, tokenizer.pad_token_id, config.evaluate.batch_size).float(), -1)
    return [
        {
            "model": "finetuned",
            "mode": "classify",
            "prompt": p,
            "completion": f"{labels[int(q.argmax())]} ({q.max():.3f})",
        }
        for p, q in zip(prompts, probs, strict=True)
    ]


# --- lm-evaluation-harness -----------------------------------------------------------------------------------------


LM_EVAL_TASK = "lmcycle_heldout"
LM_EVAL_METRICS = ("bits_per_byte", "byte_perplexity", "word_perplexity")


def lm_eval_task_yaml(data_file: Path) -> str:
    """A rolling-loglikelihood task over local jsonl documents (`text` field): nothing is fetched from a hub."""
    import yaml

    task = {
        "task": LM_EVAL_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": m} for m in LM_EVAL_METRICS],
    }
    return yaml.safe_dump(task, sort_keys=False)


def run_lm_eval(config: Config, paths: Paths, models: dict[str, Path], where: Placement) -> dict[str, Any]:
    """lm-evaluation-harness on the exported causal LMs over the held-out pretraining text, fully offline."""
    import tempfile

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    cfg = config.evaluate.lm_eval
    data_file = paths.split_file("pretrain", "val")
    if not data_file.is_file():
        raise DataError(f"{data_file}: not found; evaluate.lm_eval needs the held-out pretraining text")
    result: dict[str, Any] = {"lm_eval.data_fingerprint": file_fingerprint(data_file)}
    with tempfile.TemporaryDirectory(prefix="lmcycle-lm-eval-") as tmp:
        (Path(tmp) / f"{LM_EVAL_TASK}.yaml").write_text(lm_eval_task_yaml(data_file), encoding="utf-8")
        manager = TaskManager(include_path=tmp)
        for name in ("pretrain", "finetune"):
            directory = models.get(name)
            if directory is None or is_classifier(directory):
                continue
            say(f"{STAGE}: lm-evaluation-harness on {directory}")
            out = simple_evaluate(
                model="hf",
                model_args=f"pretrained={directory},dtype={where.dtype_name}",
                tasks=[LM_EVAL_TASK],
                task_manager=manager,
                device=where.device,
                batch_size=1,
                limit=cfg.limit or None,
                random_seed=config.project.seed,
                numpy_random_seed=config.project.seed,
                torch_random_seed=config.project.seed,
                log_samples=False,
            )
            scores = out["results"][LM_EVAL_TASK]
            for metric in LM_EVAL_METRICS:
                result[f"lm_eval.{name}.{metric}"] = float(scores[f"{metric},none"])
    return result
