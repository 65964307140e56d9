"""gkd_jax.data.metrics against rouge-score / sacrebleu called directly; GSM8K answer extraction;
and the rule that the light modules never import TensorFlow or seqio."""
import subprocess
import sys

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from gkd_jax.data import metrics, tasks

REFS = [
    "The card game Bridge is arguably a sport and could qualify for lottery funding, a judge has found.",
    "A man has been charged with fraud after a charity collapsed.",
    "Scientists have found water on a distant planet orbiting a red dwarf.",
]
PREDS = [
    "A High Court judge says bridge could be a sport and get lottery money.",
    "A charity boss was charged with fraudulent trading.",
    "Water was discovered on a planet around a red dwarf star.",
]


def test_rouge_matches_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct = [scorer.score(r, p) for r, p in zip(REFS, PREDS)]
    got = metrics.rouge(REFS, PREDS)
    for k in ("rouge1", "rouge2", "rougeL"):
        assert got[k] == pytest.approx(100 * np.mean([d[k].fmeasure for d in direct]), abs=1e-9)


def test_rouge_multi_reference_takes_best():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    targets = [[REFS[1], REFS[0]], [REFS[1]]]
    got = metrics.rouge_l(targets, PREDS[:2])
    want = np.mean([max(scorer.score(r, PREDS[0])["rougeL"].fmeasure for r in targets[0]),
                    scorer.score(REFS[1], PREDS[1])["rougeL"].fmeasure])
    assert got == {"rougeL": pytest.approx(100 * want)}


def test_bleu_matches_sacrebleu():
    assert metrics.bleu(REFS, PREDS)["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score)
    # ragged reference lists: the short one repeats its first reference, which leaves BLEU unchanged
    two = [[REFS[0], PREDS[0]], [REFS[1]], [REFS[2], "water on a planet"]]
    want = sacrebleu.corpus_bleu(PREDS, [[r[0] for r in two], [PREDS[0], REFS[1], "water on a planet"]]).score
    assert metrics.bleu(two, PREDS)["bleu"] == pytest.approx(want)
    assert metrics.bleu(["a b c d e"], ["a b c d e"])["bleu"] == pytest.approx(100.0)


@pytest.mark.parametrize("text, want", [
    ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
    ("so the total is\n#### 1,234", "1234"),
    ("#### -5", "-5"),
    ("#### 3.50", "3.5"),
    ("#### $1,000.", "1000"),
    ("The answer is 42.", "42"),
    ("Therefore the answer is -0.25.", "-0.25"),
    ("She has 3 apples and buys 4 more, so she has 7.", "7"),
    ("No digits here.", None),
    ("#### 18\nsome trailing 99", "18"),
])
def test_extract_answer(text, want):
    assert metrics.extract_answer(text) == want


def test_gsm8k_accuracy():
    targets = ["... #### 1,234", "... #### -3", "#### 0.5", "#### 10"]
    predictions = ["The answer is 1234.", "#### -3.0", "so 0.50", "#### 11"]
    assert metrics.gsm8k_accuracy(targets, predictions) == {"accuracy": 75.0}


def test_evaluate_by_task_name_and_errors():
    assert set(tasks.evaluate("xsum", REFS, PREDS)) == {"rouge1", "rouge2", "rougeL"}
    assert set(tasks.evaluate("translate_en_de", REFS, PREDS)) == {"bleu"}
    assert set(tasks.evaluate("instruct", REFS, PREDS)) == {"rougeL"}
    with pytest.raises(ValueError, match="registered tasks: .*gsm8k"):
        tasks.evaluate("no_such_task", REFS, PREDS)
    with pytest.raises(ValueError, match="3 targets but 2 predictions"):
        metrics.rouge(REFS, PREDS[:2])


def test_light_imports_do_not_load_tensorflow():
    code = ("import sys, gkd_jax, gkd_jax.data, gkd_jax.data.metrics, gkd_jax.data.tasks, "
            "gkd_jax.data.sources, gkd_jax.data.batching, gkd_jax.data.pipeline, gkd_jax.tokenizers, gkd_jax.models\n"
            "gkd_jax.data.evaluate('gsm8k', ['#### 1'], ['1'])\n"
            "bad = [m for m in ('tensorflow', 'seqio', 'tensorflow_datasets') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_first_number_accuracy_for_asdiv_answers():
    refs = ["9 apples", "12.4 dollars", "1,200 meters", "0.50 liters", "15 balls"]
    preds = ["9 apples, that is 2 + 7", "12.40 dollars", "1200", "0.5", "Ellen has 14 balls. 15"]
    assert metrics.first_number_accuracy(refs, preds) == {"accuracy": pytest.approx(80.0)}
    assert metrics.first_number_accuracy(["3 cats"], ["three cats"]) == {"accuracy": 0.0}
    assert tasks.get_spec("asdiv").primary_metric == "accuracy"
    assert tasks.evaluate("asdiv", refs[:2], preds[:2]) == {"accuracy": 100.0}
    with pytest.raises(ValueError, match="2 targets but 1 predictions"):
        metrics.first_number_accuracy(refs[:2], preds[:1])


def test_every_task_names_a_primary_metric_it_computes():
    for name, spec in tasks.TASKS.items():
        assert spec.primary_metric in tasks.evaluate(name, ["a b c 1"], ["a b c 1"]), name
