"""Task metrics of held-out answers (lmcore.taskmetrics, `evaluate.sft_metrics`): the values are rouge_score's and
sacrebleu's own on the same strings, unknown names fail params validation in one line, the default keeps the SFT
report's keys, and the evaluate stage writes the metrics a workspace chooses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sacrebleu
from conftest import REPO, copy_workspace, lmcycle
from rouge_score.rouge_scorer import RougeScorer

from lmcore.errors import ConfigError
from lmcore.lifecycle.config import EvaluateConfig, load_config, read_params, validate
from lmcore.scoring import exact_match, token_f1
from lmcore.taskmetrics import corpus_scores, example_scores

# (reference summary, system summary): news-style articles summarised by a weak model.
SUMMARIES = [
    (
        "The city council approved a new budget that raises spending on schools.",
        "City council approves budget with more money for schools.",
    ),
    (
        "Heavy rain flooded several roads in the north of the county on Monday.",
        "Roads in the north of the county were flooded by heavy rain.",
    ),
    (
        "The company reported record profits for the third quarter.",
        "The company reported its highest quarterly profits.",
    ),
    (
        "A new species of frog was discovered in the rainforest of Peru.",
        "Scientists discovered a new frog species in Peru.",
    ),
    (
        "The museum will reopen next month after two years of renovation.",
        "The museum reopens next month after renovation.",
    ),
    (
        "Local farmers expect a smaller harvest because of the dry summer.",
        "Dry summer means smaller harvest for local farmers.",
    ),
    ("The train strike has been called off after talks with the union.", "The union called off the train strike."),
    (
        "Researchers found that regular exercise improves memory in older adults.",
        "Exercise improves memory in older people, researchers say.",
    ),
    ("The national team won the final by two goals to one.", "The national team won the final 2-1."),
    (
        "A fire destroyed a warehouse near the harbour but nobody was hurt.",
        "Nobody was hurt when a warehouse burned near the harbour.",
    ),
    ("The bank raised interest rates for the second time this year.", "Interest rates were raised again by the bank."),
    ("Volunteers planted a thousand trees along the river on Saturday.", "Volunteers planted trees along the river."),
    ("The airport will build a third runway to handle more flights.", "A third runway is planned at the airport."),
    (
        "Students protested against higher tuition fees outside parliament.",
        "Students protested tuition fees at parliament.",
    ),
    ("The hospital opened a new ward for children with cancer.", "A children's cancer ward opened at the hospital."),
    (
        "The mayor announced free bus travel for people over sixty-five.",
        "Free buses for over sixty-fives, the mayor said.",
    ),
    ("A power cut left ten thousand homes without electricity overnight.", "Ten thousand homes lost power overnight."),
    (
        "The author won the prize for her first novel about a fishing village.",
        "Author wins prize for novel about fishing village.",
    ),
    (
        "Police are asking for witnesses after a robbery at a jewellery shop.",
        "Police seek witnesses to jewellery shop robbery.",
    ),
    ("The festival attracted more visitors than ever before this year.", "Record number of visitors at the festival."),
    (
        "Scientists warn that the glacier is melting faster than expected.",
        "The glacier melts faster than scientists expected.",
    ),
    ("The school will start classes an hour later from September.", "Classes will start later from September."),
    (
        "Shoppers spent less in December than in the same month last year.",
        "December spending fell compared with last year.",
    ),
    ("The bridge will be closed for repairs during the whole weekend.", "The bridge closes for repairs this weekend."),
    ("", "An empty reference scores zero."),
]

# (reference translation, system translation): German news sentences translated into English.
TRANSLATIONS = [
    ("The weather will be sunny and warm tomorrow.", "Tomorrow the weather will be sunny and warm."),
    ("I would like to book a table for two people.", "I would like to reserve a table for two persons."),
    ("The train to Berlin is delayed by twenty minutes.", "The train to Berlin has a delay of twenty minutes."),
    ("Where is the nearest pharmacy?", "Where is the next pharmacy?"),
    ("The government wants to reduce taxes next year.", "The government wants to lower taxes next year."),
    ("My brother works as a doctor in a large hospital.", "My brother works as doctor in a big hospital."),
    ("The children are playing football in the park.", "The children play soccer in the park."),
    ("We have been living in this city for ten years.", "We live in this city since ten years."),
    ("The museum is closed on Mondays.", "The museum is closed on Monday."),
    ("Can you help me carry these boxes?", "Can you help me to carry these boxes?"),
    ("The company has hired fifty new employees.", "The firm has employed fifty new workers."),
    ("It has been raining since this morning.", "It rains since this morning."),
    ("The concert starts at eight o'clock in the evening.", "The concert begins at eight in the evening."),
    ("She forgot her umbrella at home.", "She has forgotten her umbrella at home."),
    ("Prices for electricity rose sharply last winter.", "The electricity prices rose strongly last winter."),
    ("The library opens at nine in the morning.", "The library opens at nine o'clock in the morning."),
    ("He has never been to Italy.", "He was never in Italy."),
    ("The meeting was postponed until next week.", "The meeting was moved to next week."),
    ("Please turn off your mobile phones.", "Please switch off your mobile phones."),
    ("The river burst its banks after the storm.", "After the storm the river overflowed."),
    ("Our flight leaves early in the morning.", "Our flight departs early in the morning."),
    ("The new law comes into force in January.", "The new law enters into force in January."),
    ("I did not understand the question.", "I have not understood the question."),
    ("The shop around the corner sells fresh bread.", "The shop at the corner sells fresh bread."),
]


def test_rouge_per_example_and_mean_are_rouge_scores_own():
    references, predictions = (list(x) for x in zip(*SUMMARIES, strict=True))
    names = ["rouge1", "rouge2", "rougeL"]
    rows = example_scores(predictions, references, names)
    scorer = RougeScorer(names, use_stemmer=False)
    expected = [scorer.score(r, p) for r, p in zip(references, predictions, strict=True)]
    for row, direct in zip(rows, expected, strict=True):
        assert row == {n: direct[n].fmeasure for n in names}
    corpus = corpus_scores(predictions, references, names)
    for n in names:
        assert corpus[n] == pytest.approx(sum(d[n].fmeasure for d in expected) / len(expected), abs=1e-12)
    # a weak but on-topic summariser: overlap well above zero, far from perfect; bigrams overlap less than words
    assert 0.2 < corpus["rouge2"] < corpus["rouge1"] < 0.9 and corpus["rougeL"] <= corpus["rouge1"]
    assert rows[-1] == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}  # empty reference


def test_bleu_and_chrf_are_sacrebleus_corpus_scores():
    references, predictions = (list(x) for x in zip(*TRANSLATIONS, strict=True))
    scores = corpus_scores(predictions, references, ["bleu", "chrf"])
    assert scores["bleu"] == sacrebleu.corpus_bleu(predictions, [references]).score
    assert scores["chrf"] == sacrebleu.corpus_chrf(predictions, [references]).score
    assert 20 < scores["bleu"] < scores["chrf"] < 100  # near-miss translations: chrF credits shared characters
    assert list(corpus_scores(references, references, ["chrf", "bleu"])) == ["chrf", "bleu"]  # the order asked
    assert corpus_scores(references, references, ["bleu"])["bleu"] == pytest.approx(100.0)
    # corpus statistics have no per-example value in the predictions table
    assert example_scores(predictions, references, ["bleu", "chrf", "token_f1"])[0] == {
        "token_f1": token_f1(predictions[0], references[0])
    }


def test_default_metrics_are_todays_exact_match_and_token_f1():
    """The default list gives the keys and values the SFT report had before metrics were chosen."""
    config = load_config(REPO / "params.yaml")
    assert config.evaluate.sft_metrics == ["exact_match", "token_f1"]
    assert EvaluateConfig().sft_metrics == ["exact_match", "token_f1"]
    answers = [a for _, a in SUMMARIES[:6]] + ["yes", "The Answer!"]
    refs = [r for r, _ in SUMMARIES[:6]] + ["yes", "answer"]
    scores = corpus_scores(answers, refs, config.evaluate.sft_metrics)
    assert list(scores) == ["exact_match", "token_f1"]
    assert scores["exact_match"] == sum(map(exact_match, answers, refs)) / len(refs) == 2 / 8
    assert scores["token_f1"] == sum(map(token_f1, answers, refs)) / len(refs)


@pytest.mark.parametrize(
    ("value", "needle"),
    [(["rougeL", "meteor"], "'meteor'"), (["bleu", "bleu"], "twice"), ("rougeL", "valid list")],
)
def test_an_unknown_metric_fails_params_validation_in_one_line(value, needle):
    with pytest.raises(ConfigError) as err:
        raw = read_params(REPO / "params.yaml")
        raw["evaluate"]["sft_metrics"] = value
        validate(raw)
    message = str(err.value)
    assert message.startswith("evaluate.sft_metrics: ") and needle in message and "\n" not in message


def test_a_gate_on_rouge_maximizes_and_its_fingerprint_knows_the_metric_list():
    from lmcore.lifecycle.registry.candidate import resolve_gate
    from lmcore.lifecycle.registry.gate import settings_fingerprint

    base = load_config(REPO / "params.yaml")
    chosen = base.model_copy(
        update={
            "evaluate": base.evaluate.model_copy(update={"sft_metrics": ["rougeL", "chrf"]}),
            "register": base.register.model_copy(update={"gate_metric": "sft.rougeL"}),
        }
    )
    metrics = {"sft.rougeL": 0.2, "sft.chrf": 20.0, "sft.loss": 3.0}
    assert resolve_gate(chosen, "text-generation", "finetune", metrics, "report") == ("sft.rougeL", "maximize")
    assert settings_fingerprint("data", "sft", chosen) != settings_fingerprint("data", "sft", base)


@pytest.fixture(scope="module")
def rouge_chrf_evaluated(tmp_path_factory: pytest.TempPathFactory, pretrained_workspace: Path) -> Path:
    root = copy_workspace(
        pretrained_workspace,
        tmp_path_factory.mktemp("task-metrics") / "ws",
        finetune={"steps": 8, "lr": 0.002, "warmup_steps": 2, "eval_every": 8, "checkpoint_every": 8},
        evaluate={"prompts": ["Hello"], "max_new_tokens": 6, "sft_max_examples": 8, "sft_metrics": ["rougeL", "chrf"]},
    )
    lmcycle("stage", "finetune", cwd=root)
    lmcycle("stage", "evaluate", cwd=root)
    return root


def test_evaluate_stage_writes_the_chosen_metrics(rouge_chrf_evaluated: Path):
    report = json.loads((rouge_chrf_evaluated / "reports/evaluate.json").read_text())
    sft_keys = {k for k in report if k.startswith("sft.")}
    assert sft_keys == {f"sft.{k}" for k in ("assistant_tokens", "data_fingerprint", "examples", "loss")} | {
        "sft.loss_gain",
        "sft.perplexity",
        "sft.rougeL",
        "sft.chrf",
    }
    assert {"base.sft_rougeL", "base.sft_chrf"} <= set(report) and "base.sft_exact_match" not in report
    rows = json.loads((rouge_chrf_evaluated / "reports/evaluate/predictions.json").read_text())
    tuned = [r for r in rows if r["model"] == "sft"]
    assert len(tuned) == 8 and all("chrf" not in r and "exact_match" not in r for r in rows)
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    for row in tuned:  # the table's answers, re-scored here by the libraries, give the report's numbers
        assert row["rougeL"] == scorer.score(row["reference"], row["answer"])["rougeL"].fmeasure
    assert report["sft.rougeL"] == pytest.approx(sum(r["rougeL"] for r in tuned) / 8, abs=1e-6)
    chrf = sacrebleu.corpus_chrf([r["answer"] for r in tuned], [[r["reference"] for r in tuned]]).score
    assert report["sft.chrf"] == pytest.approx(chrf, abs=1e-6)


def test_the_gate_rescores_a_chosen_metric_as_the_report_has_it(rouge_chrf_evaluated: Path):
    """A champion scored on other data is re-scored by the gate with the workspace's `evaluate.sft_metrics`."""
    from lmcore.lifecycle.paths import Paths
    from lmcore.lifecycle.registry.promotion import RESCORERS

    report = json.loads((rouge_chrf_evaluated / "reports/evaluate.json").read_text())
    config = load_config(rouge_chrf_evaluated / "params.yaml")
    paths = Paths.of(rouge_chrf_evaluated)
    for metric in ("sft.rougeL", "sft.chrf"):
        value = RESCORERS["sft"](metric, paths.finetune / "hf", paths, config)
        assert value == pytest.approx(report[metric], abs=1e-6)
