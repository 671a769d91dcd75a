"""The training loop in-process: schedules, AdamW groups, checkpoints (atomic, verified, set aside), exact resume
with dropout, the metric definitions, on the real token shards of the tiny data workspace."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_cpu_compile

from lmcore.data.shards import TokenShards
from lmcore.errors import CheckpointError, ConfigError
from lmcore.lifecycle.config import TrainConfig
from lmcore.metrics import bits_per_byte, count_batches, evaluate_lm
from lmcore.model import IGNORE_INDEX, ModelConfig, Transformer
from lmcore.train import checkpoint as ckpt
from lmcore.train.compile import compile_choice
from lmcore.train.distributed import DistEnv
from lmcore.train.loop import TrainCallback, TrainingError, lm_loss, train
from lmcore.train.optim import build_optimizer, lr_at, param_groups
from lmcore.train.resume import state_digest
from lmcore.train.runtime import rng_state, seed_everything, set_rng_state
from lmcore.train.threadsplit import SplitBackward, split_choice

TINY = dict(n_layer=2, n_head=2, n_kv_head=1, d_model=32, d_ff=64, context_length=32)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine: one thread is many times faster than two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- schedules and optimizer ---------------------------------------------------------------------------------


def test_cosine_schedule_warms_up_then_decays_to_the_floor() -> None:
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=True))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(1e-4)


def test_wsd_schedule_holds_then_decays_linearly() -> None:
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert [lr_at(s, cfg) for s in (10, 50, 79)] == [1e-3] * 3
    assert lr_at(89, cfg) == pytest.approx(0.5e-3)
    assert lr_at(99, cfg) == pytest.approx(0.0)


def test_constant_schedule() -> None:
    cfg = TrainConfig(steps=50, lr=3e-4, warmup_steps=0, schedule="constant")
    assert {lr_at(s, cfg) for s in range(50)} == {3e-4}


def test_weight_decay_only_on_matrices_and_tied_weights_once() -> None:
    model = Transformer(ModelConfig(vocab_size=512, **TINY))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for group in (decay, no_decay) for p in group["params"]
    )
    optimizer = build_optimizer(model, TrainConfig(), "cpu")
    assert optimizer.defaults.get("fused") is True  # the fused CPU kernel of torch ≥ 2.4


def test_rng_state_round_trips_through_weights_only_load(tmp_path: Path) -> None:
    seed_everything(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (np.random.rand(3), torch.rand(3), __import__("random").random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (np.random.rand(3), torch.rand(3), __import__("random").random())
    assert np.array_equal(expected[0], got[0]) and torch.equal(expected[1], got[1]) and expected[2] == got[2]


# --- checkpoints ---------------------------------------------------------------------------------------------


def write(root: Path, step: int, fp: str = "fp-a") -> Path:
    weights = {"w": torch.full((4, 4), float(step))}
    return ckpt.write_checkpoint(root, step, weights, {"optimizer": {}}, {"train": [], "val": []}, {"fingerprint": fp})


def test_checkpoint_is_verified_and_newest_wins(tmp_path: Path) -> None:
    for step in (10, 20):
        write(tmp_path, step)
    (tmp_path / ".tmp-step_0000030-123").mkdir()  # a write interrupted by a crash
    found = ckpt.find_resumable(tmp_path, "fp-a")
    assert found.path.name == "step_0000020" and found.meta["step"] == 20
    assert not list(tmp_path.glob(".tmp-*"))
    assert torch.equal(ckpt.load_weights(found.path)["w"], torch.full((4, 4), 20.0))


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_meta", "bad_meta"])
def test_damaged_checkpoint_falls_back_to_the_previous(tmp_path: Path, damage: str) -> None:
    write(tmp_path, 10)
    newest = write(tmp_path, 20)
    weights = newest / ckpt.MODEL_FILE
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:50])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "no_meta":
        (newest / ckpt.META_FILE).unlink()
    else:
        (newest / ckpt.META_FILE).write_text("{not json")
    found = ckpt.find_resumable(tmp_path, "fp-a")
    assert found.path.name == "step_0000010"
    assert (tmp_path / ckpt.CORRUPT_DIR / "step_0000020").is_dir()  # kept for inspection, never resumed
    assert ckpt.find_resumable(tmp_path, "fp-a").path.name == "step_0000010"


def test_only_corrupt_checkpoints_means_a_fresh_start(tmp_path: Path) -> None:
    path = write(tmp_path, 10)
    (path / ckpt.MODEL_FILE).write_bytes(b"garbage")
    assert ckpt.find_resumable(tmp_path, "fp-a") is None
    with pytest.raises(CheckpointError, match="unreadable"):
        ckpt.load_weights(tmp_path / ckpt.CORRUPT_DIR / "step_0000010")


def test_other_fingerprints_are_set_aside_and_come_back(tmp_path: Path) -> None:
    write(tmp_path, 10, fp="fp-a")
    write(tmp_path, 20, fp="fp-a")
    assert ckpt.find_resumable(tmp_path, "fp-b") is None
    assert not list(tmp_path.glob("step_*"))
    assert [p.name for p in (tmp_path / ckpt.STALE_DIR / "fp-a").iterdir()] == ["step_0000020"]  # newest only
    assert ckpt.find_resumable(tmp_path, "fp-a").path == tmp_path / "step_0000020"


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        write(tmp_path, step)
    ckpt.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000003", "step_0000004"]


def test_meta_records_file_hashes(tmp_path: Path) -> None:
    meta = json.loads((write(tmp_path, 5) / ckpt.META_FILE).read_text())
    assert meta["step"] == 5 and set(meta["files"]) == {ckpt.MODEL_FILE, ckpt.TRAINER_FILE, ckpt.HISTORY_FILE}
    assert ckpt.verify(tmp_path / "step_0000005")["fingerprint"] == "fp-a"


# --- the loop on real shards ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(data_workspace: Path) -> tuple[TokenShards, TokenShards]:
    tokens = data_workspace / "data" / "tokens"
    return TokenShards(tokens / "train"), TokenShards(tokens / "val")


class Crash(TrainCallback):
    """Raises right after the checkpoint of `at` is written: a process dying between two steps."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_checkpoint(self, step: int, path: Path) -> None:
        if step == self.at:
            raise RuntimeError(f"crash after step {step}")


def run_loop(shards, checkpoint_dir: Path | None, callbacks=(), dropout: float = 0.1, **overrides):
    train_shards, val_shards = shards
    cfg = TrainConfig(
        **{
            "steps": 12,
            "batch_size": 4,
            "grad_accum": 2,
            "lr": 3e-3,
            "warmup_steps": 2,
            "log_every": 3,
            "eval_every": 6,
            "eval_max_batches": 4,
            "checkpoint_every": 4,
            "device": "cpu",
            **overrides,
        }
    )
    seed_everything(7)
    model = Transformer(ModelConfig(vocab_size=train_shards.vocab_size, dropout=dropout, **TINY))

    def batch_fn(index: int) -> dict[str, torch.Tensor]:
        x, y = train_shards.batch(index, cfg.batch_size, TINY["context_length"], seed=7)
        return {"input_ids": torch.from_numpy(x), "targets": torch.from_numpy(y)}

    def evaluate_fn(m):
        return evaluate_lm(m, val_shards, TINY["context_length"], cfg.batch_size, cfg.eval_max_batches)

    result = train(
        model,
        batch_fn,
        cfg,
        env=DistEnv(),
        seed=7,
        evaluate_fn=evaluate_fn,
        checkpoint_dir=checkpoint_dir,
        fingerprint="test",
        callbacks=callbacks,
    )
    return model, result


def test_resume_after_a_crash_is_bit_identical_with_dropout(shards, tmp_path: Path) -> None:
    straight, expected = run_loop(shards, tmp_path / "a")
    with pytest.raises(RuntimeError, match="crash after step 8"):
        run_loop(shards, tmp_path / "b", callbacks=[Crash(8)])
    resumed, result = run_loop(shards, tmp_path / "b")
    assert result.resumed_from == 8
    assert state_digest(resumed.state_dict()) == state_digest(straight.state_dict())
    assert result.history == expected.history  # the logged series, losses to the last bit, continue seamlessly
    assert result.tokens_seen == expected.tokens_seen == 12 * 2 * 4 * TINY["context_length"]
    assert [row["step"] for row in result.history["val"]] == [6, 12]
    assert sorted(p.name for p in (tmp_path / "b").glob("step_*")) == ["step_0000008", "step_0000012"]


def test_a_resume_with_other_resolved_numerics_says_so_in_one_line(shards, tmp_path: Path, capfd) -> None:
    """`threads: 0` and the `auto` settings resolve per machine: the checkpoint records what they resolved to, and
    a resume under other values (here 1 thread, then 2) says in one line that it is no longer bit-identical."""
    with pytest.raises(RuntimeError, match="crash after step 4"):
        run_loop(shards, tmp_path, callbacks=[Crash(4)], steps=8, dropout=0.0)
    saved = ckpt.read_meta(tmp_path / "step_0000004")["numerics"]
    assert saved == {"device": "cpu", "dtype": "float32", "threads": 1, "batch_split": 1, "compile": False}
    capfd.readouterr()
    with pytest.raises(RuntimeError, match="crash after step 8"):
        run_loop(shards, tmp_path, callbacks=[Crash(8)], steps=12, dropout=0.0)
    assert "other numerics" not in capfd.readouterr().err  # same machine, same settings: a silent, exact resume
    torch.set_num_threads(2)
    _, result = run_loop(shards, tmp_path, steps=12, dropout=0.0, batch_split=1)
    assert result.resumed_from == 8
    notes = [line for line in capfd.readouterr().err.splitlines() if "other numerics" in line]
    assert len(notes) == 1 and "threads 1 → 2" in notes[0], notes


def test_two_runs_are_bit_identical_and_dropout_changes_them(shards) -> None:
    a, _ = run_loop(shards, None, steps=4)
    b, _ = run_loop(shards, None, steps=4)
    c, _ = run_loop(shards, None, steps=4, dropout=0.0)
    assert state_digest(a.state_dict()) == state_digest(b.state_dict())
    assert state_digest(a.state_dict()) != state_digest(c.state_dict())


def test_the_loop_trains_with_the_hand_written_gradients(shards) -> None:
    """lmcore.kernels enters at one place, the loop: every layer of the model it trains is swapped."""
    from lmcore.kernels import FastAttention, FastMLP, FastRMSNorm, FastTransformer

    model, _ = run_loop(shards, None, steps=1)
    assert isinstance(model, FastTransformer) and isinstance(model.norm, FastRMSNorm)
    for block in model.blocks:
        assert isinstance(block.attn, FastAttention) and isinstance(block.mlp, FastMLP)
        assert isinstance(block.attn_norm, FastRMSNorm) and isinstance(block.mlp_norm, FastRMSNorm)


@needs_cpu_compile
def test_compiled_training_tracks_eager_and_resumes_bit_identically(shards, tmp_path: Path) -> None:
    from torch._dynamo.utils import counters

    _, eager = run_loop(shards, None, dropout=0.0)
    counters.clear()
    straight, expected = run_loop(shards, tmp_path / "a", dropout=0.0, compile=True)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured the blocks
    assert all(block._compiled_call_impl is None for block in straight.blocks)  # eager again once trained
    eager_losses = [row["loss"] for row in eager.history["train"]]
    compiled_losses = [row["loss"] for row in expected.history["train"]]
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-4)  # the same math, other kernels
    assert expected.val["loss"] == pytest.approx(eager.val["loss"], abs=1e-4)
    with pytest.raises(RuntimeError, match="crash after step 8"):
        run_loop(shards, tmp_path / "b", callbacks=[Crash(8)], dropout=0.0, compile=True)
    resumed, result = run_loop(shards, tmp_path / "b", dropout=0.0, compile=True)
    assert result.resumed_from == 8
    assert state_digest(resumed.state_dict()) == state_digest(straight.state_dict())
    assert result.history == expected.history


@needs_cpu_compile
def test_compiled_training_is_bit_identical_on_two_threads(shards) -> None:
    torch.set_num_threads(2)  # where a kernel adding in parallel (atomics) would show
    a, _ = run_loop(shards, None, steps=4, batch_size=16, compile=True)
    b, _ = run_loop(shards, None, steps=4, batch_size=16, compile=True)
    assert state_digest(a.state_dict()) == state_digest(b.state_dict())


@needs_cpu_compile
def test_compile_true_without_a_cpp_compiler_names_the_key() -> None:
    import torch._inductor.config

    # inductor's own patch: pytest's monkeypatch would undo it with delattr, which hides the setting for good
    with torch._inductor.config.patch({"cpp.cxx": ("no-such-c++-compiler",)}):
        with pytest.raises(ConfigError, match=r"^pretrain\.compile: true, but .*C\+\+ compiler"):
            compile_choice(True, "cpu", "pretrain")
        assert compile_choice("auto", "cpu", "pretrain") == (
            False,
            "eager: torch.compile on CPU needs a C++ compiler and none was found (set CXX) (compile: auto)",
        )
    assert compile_choice(False, "cpu", "pretrain") == (False, "")
    assert compile_choice("auto", "cpu", "pretrain")[0]  # the compiler is found again afterwards


# --- a micro-batch split into parts on threads (lmcore/train/threadsplit.py) -----------------------------------------


def assert_split_gives_the_whole_batch_gradient(model, batch, loss_fn, parts: tuple[int, ...]) -> None:
    loss = loss_fn(model, batch)
    loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    for n in parts:
        model.zero_grad(set_to_none=True)
        split = SplitBackward(n, 2)
        try:
            split_loss = split(model, batch, loss_fn, 1.0)
        finally:
            split.close()
        assert split_loss.item() == pytest.approx(loss.item(), abs=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=f"{n} parts: {name}")
    assert torch.get_num_threads() == 2  # the caller's count, given back (MKL's count is process-wide)


def test_split_gradient_is_the_whole_batch_gradient() -> None:
    model = Transformer(ModelConfig(vocab_size=512, **TINY))
    ids = torch.randint(0, 512, (5, 32), generator=torch.Generator().manual_seed(0))
    targets = ids.roll(-1, 1)
    targets[0, :20] = IGNORE_INDEX  # parts with unequal numbers of counted targets
    targets[3, 5:] = IGNORE_INDEX
    assert_split_gives_the_whole_batch_gradient(model, {"input_ids": ids, "targets": targets}, lm_loss, (2, 3))


def test_split_classification_gradient_is_the_whole_batch_gradient() -> None:
    """Batches without targets (classification: one label a row) weigh each part by its rows."""
    from lmcore.finetune.classification import Classifier, classification_loss

    torch.manual_seed(0)
    model = Classifier(Transformer(ModelConfig(vocab_size=512, **TINY)), num_labels=3)
    ids = torch.randint(0, 512, (5, 16), generator=torch.Generator().manual_seed(1))  # parts of 3 and 2 rows
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 1, 0])}
    assert_split_gives_the_whole_batch_gradient(model, batch, classification_loss, (2,))


def test_split_choice_auto_and_explicit() -> None:
    model = Transformer(ModelConfig(vocab_size=512, **TINY))
    dropped = Transformer(ModelConfig(vocab_size=512, dropout=0.1, **TINY))
    where = dict(
        device_type="cpu", threads=2, rows=4, tokens=lambda: 4096, distributed=False, model=model, section="pretrain"
    )
    assert split_choice("auto", **where) == (2, "each micro-batch runs as 2 parts at once, 1 thread(s) each")
    assert split_choice(1, **where) == (1, "")
    for other in (
        dict(threads=1),
        dict(threads=3),
        dict(rows=1),
        dict(device_type="cuda"),
        dict(distributed=True),
        dict(model=dropped),
        dict(tokens=lambda: 2047),  # under 1024 tokens a part
    ):
        assert split_choice("auto", **(where | other))[0] == 1, other
    with pytest.raises(
        ConfigError, match=r"^pretrain\.batch_split: 2 parts, but .*dropout.*: set pretrain\.batch_split"
    ):
        split_choice(2, **(where | dict(model=dropped)))
    with pytest.raises(ConfigError, match=r"^finetune\.batch_split: 4 parts, but only 2 thread"):
        split_choice(4, **(where | dict(section="finetune")))


@needs_cpu_compile
def test_split_training_is_bit_identical_and_resumes_exactly(shards, tmp_path: Path, capfd) -> None:
    torch.set_num_threads(2)
    split = dict(dropout=0.0, batch_size=4, compile=True, batch_split=2)  # explicit: auto leaves tiny batches whole
    _, unsplit = run_loop(shards, None, dropout=0.0, batch_size=4, compile=True, batch_split=1)
    straight, expected = run_loop(shards, tmp_path / "a", **split)
    assert "runs as 2 parts at once" in capfd.readouterr().err
    losses = [row["loss"] for row in expected.history["train"]]
    assert losses == pytest.approx([row["loss"] for row in unsplit.history["train"]], abs=1e-4)
    again, _ = run_loop(shards, None, **split)
    assert state_digest(again.state_dict()) == state_digest(straight.state_dict())
    with pytest.raises(RuntimeError, match="crash after step 8"):
        run_loop(shards, tmp_path / "b", callbacks=[Crash(8)], **split)
    resumed, result = run_loop(shards, tmp_path / "b", **split)
    assert result.resumed_from == 8
    assert state_digest(resumed.state_dict()) == state_digest(straight.state_dict())
    assert result.history == expected.history
    assert torch.get_num_threads() == 2


def test_training_lowers_the_loss_and_logs_grad_norms(shards) -> None:
    _, result = run_loop(shards, None, steps=30, eval_every=30, dropout=0.0)
    train_rows = result.history["train"]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.3
    assert all(row["grad_norm"] > 0 and math.isfinite(row["grad_norm"]) for row in train_rows)
    assert result.val["loss"] < math.log(shards[0].vocab_size)


def test_non_finite_loss_stops_before_the_weights_change(shards, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"non-finite .* at step \d+ .*lower train\.lr") as err:
        run_loop(shards, tmp_path, lr=1e4, warmup_steps=2, checkpoint_every=1, dropout=0.0)
    bad_step = int(str(err.value).split(" at step ")[1].split()[0])
    assert bad_step > 1
    last = ckpt.find_resumable(tmp_path, "test")
    assert last.meta["step"] == bad_step - 1
    assert all(torch.isfinite(t).all() for t in ckpt.load_weights(last.path).values())


# --- metrics -------------------------------------------------------------------------------------------------


def test_bpb_scores_every_val_token_once(shards) -> None:
    _, val = shards
    seed_everything(1)
    model = Transformer(ModelConfig(vocab_size=val.vocab_size, **TINY)).eval()
    with torch.no_grad():
        metrics = evaluate_lm(model, val, TINY["context_length"], batch_size=64)
        assert metrics["tokens"] == val.num_tokens - 1
        assert metrics["bpb"] == pytest.approx(bits_per_byte(metrics["loss"] * metrics["tokens"], val.utf8_bytes))
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
        # by hand, the first window: the same per-token losses the metric sums
        x, y = next(val.sequential_windows(TINY["context_length"], 1))
        by_hand = model.token_losses(torch.from_numpy(x), torch.from_numpy(y)).double().sum().item()
        first = evaluate_lm(model, val, TINY["context_length"], batch_size=1, max_batches=1)
    assert first["tokens"] == TINY["context_length"]
    assert first["loss"] * first["tokens"] == pytest.approx(by_hand)
    # a partial evaluation prorates the bytes by the share of targets scored
    share = first["tokens"] / (val.num_tokens - 1)
    assert first["bpb"] == pytest.approx(bits_per_byte(by_hand, val.utf8_bytes * share))


def test_a_batch_larger_than_the_val_split_scores_it_all_in_one_batch(shards) -> None:
    _, val = shards
    context = 512
    windows = (val.num_tokens - 1) // context
    batch_size = windows + 50
    assert count_batches(val.num_tokens, context, batch_size) <= 2  # the full windows, then the tail
    seed_everything(1)
    model = Transformer(ModelConfig(vocab_size=val.vocab_size, **{**TINY, "context_length": context})).eval()
    with torch.no_grad():
        metrics = evaluate_lm(model, val, context, batch_size=batch_size)
    assert metrics["tokens"] == val.num_tokens - 1
