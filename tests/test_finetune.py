"""The finetune stage end to end on a tiny pretrained model: SFT, classification, LoRA, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import copy_workspace, lmcycle, write_jsonl
from safetensors.torch import load_file

from lmcore.errors import CheckpointError, ConfigError, DataError
from lmcore.lifecycle.config import load_config
from lmcore.lifecycle.paths import Paths

SFT = {"steps": 12, "lr": 0.002, "warmup_steps": 2, "eval_every": 6, "checkpoint_every": 4, "log_every": 2}


def run_finetune(ws: Path) -> dict:
    """The stage in this process (a faster path to its errors than the console script)."""
    from lmcore.lifecycle.stages.finetune import run

    return run(load_config(ws / "params.yaml"), Paths.of(ws))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture
def ws(tmp_path: Path, pretrained_workspace: Path):
    """A private copy of the pretrained workspace; call with finetune overrides."""

    def make(name: str = "ws", **finetune) -> Path:
        return copy_workspace(pretrained_workspace, tmp_path / name, finetune=finetune)

    return make


# --- SFT ------------------------------------------------------------------------------------------------------------


def test_sft_exports_a_chat_model_transformers_loads(ws):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = ws(**SFT, packing=True)
    summary = lmcycle("stage", "finetune", cwd=root)
    assert "task" in summary.stderr
    report = json.loads((root / "reports" / "finetune.json").read_text())
    assert report["task"] == "sft" and report["steps"] == 12 and report["lora_r"] == 0
    data = report["data"]
    assert data["train"]["examples"] > data["train"]["rows_after_packing"] > 0  # packing merged rows
    assert data["train"]["truncated"] > 0  # conversations.yml holds conversations longer than 64 tokens
    assert 0 < data["val"]["target_tokens"] < data["val"]["tokens"]
    assert report["val_loss"] > 0 and report["val_perplexity"] > 1
    series = (root / "reports" / "finetune" / "train.csv").read_text().splitlines()
    assert series[0] == "step,loss,lr,grad_norm" and len(series) == 1 + 12 // 2
    assert (root / "reports" / "finetune" / "loss.png").stat().st_size > 0

    hf_dir = root / "models" / "finetune" / "hf"
    card = (hf_dir / "README.md").read_text()
    assert "task `sft`" in card and "apply_chat_template" in card
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    messages = [{"role": "user", "content": "Hello"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end_id in json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"]
    # the weights moved away from the pretrained ones
    tuned, base = weights(hf_dir / "model.safetensors"), weights(root / "models/pretrain/hf/model.safetensors")
    assert not torch.equal(tuned["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_lora_trains_adapters_only_and_exports_merged_weights(ws):
    from transformers import AutoModelForCausalLM

    from lmcore.export import import_hf

    root = ws(**SFT | {"steps": 6, "lr": 0.01}, lora={"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "down_proj"]})
    run_finetune(root)
    report = json.loads((root / "reports" / "finetune.json").read_text())
    assert report["lora_r"] == 4 and 0 < report["params_trainable"] < report["params_total"] / 2
    hf_dir = root / "models" / "finetune" / "hf"
    tuned, base = weights(hf_dir / "model.safetensors"), weights(root / "models/pretrain/hf/model.safetensors")
    assert tuned.keys() == base.keys()  # merged: a plain Llama, no adapter tensors
    changed = {name for name in tuned if not torch.equal(tuned[name], base[name])}
    assert changed and all(("q_proj" in n or "k_proj" in n or "v_proj" in n or "down_proj" in n) for n in changed)
    # the adapter sat on lmcore's fused qkv, so q, k and v all moved
    assert any("k_proj" in n for n in changed)
    ours, _ = import_hf(hf_dir)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs(x).logits, atol=1e-4, rtol=1e-4)


# --- classification -------------------------------------------------------------------------------------------------


def test_classifier_exports_id2label_and_matches_transformers(ws):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmcore.finetune import classification as cls

    root = ws(task="classification", steps=8, lr=0.002, batch_size=16, eval_every=4, checkpoint_every=8)
    run_finetune(root)
    report = json.loads((root / "reports" / "finetune.json").read_text())
    assert report["data"]["train_balance"] == {"new": 320, "old": 320}
    assert report["data"]["val_balance"] == {"new": 80, "old": 80}
    assert report["data"]["labels"] == ["new", "old"] and "val_accuracy" in report

    hf_dir = root / "models" / "finetune" / "hf"
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {"0": "new", "1": "old"} and config["label2id"] == {"new": 0, "old": 1}
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    assert config["pad_token_id"] == tokenizer.pad_token_id is not None
    hf = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    texts = [json.loads(line)["text"] for line in (root / "data/ingest/classification/val.jsonl").open()][:40]
    ours, labels = cls.import_hf_classifier(hf_dir)
    rows, _ = cls.encode_texts(texts, tokenizer, ours.config.context_length)
    ours_logits = cls.logits(ours, rows, tokenizer.pad_token_id, batch_size=8)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=ours.config.context_length, return_tensors="pt")
    with torch.no_grad():
        hf_logits = hf(**enc).logits
    torch.testing.assert_close(ours_logits, hf_logits, atol=1e-5, rtol=1e-5)
    assert ours_logits.argmax(-1).tolist() == hf_logits.argmax(-1).tolist()
    assert labels == ["new", "old"]


# --- guarantees of the loop -----------------------------------------------------------------------------------------


def kill_finetune_at_checkpoint(root: Path, step: int, poll_s: float = 0.05) -> None:
    """Start `lmcycle stage finetune` in `root` and SIGKILL it once its step-`step` checkpoint is complete."""
    proc = subprocess.Popen(["lmcycle", "stage", "finetune"], cwd=root, stderr=subprocess.PIPE, text=True)
    try:
        first = root / "checkpoints" / "finetune" / f"step_{step:07d}" / "meta.json"
        deadline = time.monotonic() + 600
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(poll_s)
        assert proc.poll() is None, f"finished before it could be killed:\n{proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_resume_after_sigkill_ends_bit_identical(ws):
    # long enough that the kill always lands mid-run: it is sent once the step-4 checkpoint is complete, with 116
    # steps still to go (a 12-step run could finish before the signal arrived)
    long_sft = SFT | {"steps": 120, "eval_every": 60}
    straight = ws("straight", **long_sft)
    run_finetune(straight)
    expected = weights(straight / "models/finetune/checkpoint/model.safetensors")

    killed = ws("killed", **long_sft)
    kill_finetune_at_checkpoint(killed, 4)
    assert not (killed / "models" / "finetune").exists()
    resumed = lmcycle("stage", "finetune", cwd=killed)
    assert "resuming from" in resumed.stderr
    assert_same_weights(weights(killed / "models/finetune/checkpoint/model.safetensors"), expected)
    assert (killed / "reports/finetune.json").read_bytes() == (straight / "reports/finetune.json").read_bytes()
    assert (killed / "reports/finetune/val.csv").read_bytes() == (straight / "reports/finetune/val.csv").read_bytes()


def test_sigterm_saves_a_checkpoint_and_exits_nonzero(ws):
    root = ws(**SFT | {"steps": 400, "checkpoint_every": 400, "eval_every": 400})
    proc = subprocess.Popen(["lmcycle", "stage", "finetune"], cwd=root, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "finetune: step 2/" in line:  # training is under way
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "stopped by SIGTERM" in err
    saved = sorted((root / "checkpoints" / "finetune").glob("step_*"))
    assert saved and 2 <= int(saved[-1].name.removeprefix("step_")) < 400


def test_non_finite_loss_stops_naming_the_step(ws):
    root = ws(**SFT | {"lr": 1e30, "warmup_steps": 0, "grad_clip": 0.0})
    proc = lmcycle("stage", "finetune", cwd=root, check=False)
    assert proc.returncode == 1
    assert "error: finetune: non-finite" in proc.stderr and "at step" in proc.stderr


@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_weights(ws):
    params = SFT | {"steps": 4, "batch_size": 4, "checkpoint_every": 4, "eval_every": 4, "threads": 1}
    single = ws("single", **params)
    lmcycle("stage", "finetune", cwd=single)
    root = ws("ddp", **params)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = ["torchrun", "--nproc_per_node=2", "--master_port=29517", "-m", "flows.cli", "stage", "finetune"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((root / "models/finetune/checkpoint/meta.json").read_text())
    assert meta["world_size"] == 2 and len(set(meta["replica_weight_sha256"])) == 1
    # the same global batches as one process: the same training, up to float summation order
    a, b = (json.loads((w / "reports/finetune.json").read_text()) for w in (single, root))
    one, two = (weights(w / "models/finetune/checkpoint/model.safetensors") for w in (single, root))
    assert one.keys() == two.keys()
    gap = max((one[k] - two[k]).abs().max().item() for k in one)
    summary = {k: (a[k], b[k]) for k in ("steps", "tokens_seen", "train_loss", "val_loss")} | {"weights gap": gap}
    assert a["steps"] == b["steps"] == 4, summary
    # Each micro-batch is weighted by its share of the global step's assistant tokens, so the gradient is that of
    # one process on the whole batch, up to float summation order (pretrain's DDP test holds to the same bound).
    assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-4), summary
    assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-4), summary
    assert gap < 1e-4, summary


# --- bad input ------------------------------------------------------------------------------------------------------


def test_misspelled_task_is_a_config_error(ws):
    proc = lmcycle("stage", "finetune", cwd=ws(task="sfft"), check=False)
    assert proc.returncode == 1 and "error: finetune.task:" in proc.stderr and "'sft'" in proc.stderr


def test_unknown_lora_target_lists_what_exists(ws):
    with pytest.raises(ConfigError, match=r"finetune\.lora\.target_modules: no module 'attention'.*available: .*qkv"):
        run_finetune(ws(lora={"r": 4, "target_modules": ["attention"]}))


def test_tokenizer_other_than_the_models_is_refused_naming_both(ws, tmp_path):
    from lmcore.lifecycle.config import TokenizerConfig
    from lmcore.tokenizer import save_tokenizer, tokenizer_fingerprint, train_tokenizer

    root = ws()
    texts = [json.loads(line)["text"] for line in (root / "data/ingest/pretrain/train.jsonl").open()][:50]
    other = save_tokenizer(
        train_tokenizer(texts, TokenizerConfig(vocab_size=600)), tmp_path / "other", TokenizerConfig()
    )
    model_fp = tokenizer_fingerprint(root / "models/pretrain/hf")
    os.replace(root / "models" / "tokenizer", tmp_path / "moved")
    os.replace(other, root / "models" / "tokenizer")
    with pytest.raises(DataError) as err:
        run_finetune(root)
    message = str(err.value)
    assert model_fp in message and tokenizer_fingerprint(root / "models/tokenizer") in message
    assert "models/pretrain/hf" in message and "models/tokenizer" in message


def test_missing_init_model_is_a_clear_error(ws):
    with pytest.raises(CheckpointError, match=r"finetune\.init_from: models/nowhere is not a Hugging Face model"):
        run_finetune(ws(init_from="models/nowhere"))


def test_sft_rows_without_assistant_turn_skipped_and_all_bad_refused(ws):
    root = ws(**SFT | {"steps": 2})
    train = root / "data/ingest/sft/train.jsonl"
    rows = [json.loads(line) for line in train.open()]
    user_only = {"id": "u", "source": "t", "messages": [{"role": "user", "content": "Anyone there?"}]}
    write_jsonl(train, rows + [user_only] * 3)
    run_finetune(root)
    assert json.loads((root / "reports/finetune.json").read_text())["data"]["train"]["no_assistant"] == 3
    write_jsonl(train, [user_only] * 3)
    with pytest.raises(DataError, match=r"train\.jsonl: no usable SFT conversations \(all 3 rows lack an assistant"):
        run_finetune(root)


def test_sft_unknown_role_is_refused(ws):
    root = ws()
    write_jsonl(
        root / "data/ingest/sft/train.jsonl",
        [{"messages": [{"role": "narrator", "content": "Once"}, {"role": "assistant", "content": "Yes"}]}],
    )
    with pytest.raises(DataError, match=r"train\.jsonl:1: message 0 has unknown role 'narrator'"):
        run_finetune(root)


def test_classification_bad_labels_and_text_are_refused(ws):
    root = ws(task="classification")
    folder = root / "data/ingest/classification"
    train = [json.loads(line) for line in (folder / "train.jsonl").open()]
    val = [json.loads(line) for line in (folder / "val.jsonl").open()]

    write_jsonl(folder / "val.jsonl", val + [{"text": "Bel and the Dragon", "label": "apocrypha"}])
    with pytest.raises(DataError, match=r"val\.jsonl: label\(s\) \['apocrypha'\] never appear in the training split"):
        run_finetune(root)
    write_jsonl(folder / "val.jsonl", val)

    write_jsonl(folder / "train.jsonl", [{"text": r["text"], "testament": r["label"]} for r in train])
    with pytest.raises(DataError, match=r"train\.jsonl:1: no label column 'label' \(finetune\.label_field\)"):
        run_finetune(root)

    write_jsonl(folder / "train.jsonl", [{"text": "", "label": r["label"]} for r in train])
    with pytest.raises(DataError, match=r"all 640 rows have an empty text column 'text'"):
        run_finetune(root)


def test_a_users_csv_goes_through_ingest_to_a_classifier(ws, tmp_path):
    """The README's recipe: a CSV with its own column names, declared under data.classification."""
    import csv

    from conftest import testament_rows

    csv_path = tmp_path / "verses.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["verse", "testament"])
        writer.writerows([r["text"], r["label"]] for r in testament_rows(60))
    root = ws(task="classification", steps=2, batch_size=8, eval_every=2, checkpoint_every=2)
    source = {"uri": str(csv_path), "text_field": "verse", "label_field": "testament"}
    params = load_config(root / "params.yaml").model_dump()
    params["data"] |= {"pretrain": [], "sft": [], "classification": [source], "val_fraction": 0.2}
    (root / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    lmcycle("stage", "ingest", cwd=root)
    lmcycle("stage", "finetune", cwd=root)
    report = json.loads((root / "reports/finetune.json").read_text())
    assert report["data"]["labels"] == ["new", "old"]
    assert report["data"]["train_rows"] + report["data"]["val_rows"] == 120
