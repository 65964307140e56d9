"""gkd_jax.rewards: built-in rewards on hand-made strings (ROUGE against rouge-score called directly),
user plug-ins, REINFORCE baselines against hand computations, and bad inputs."""
import subprocess
import sys

import numpy as np
import pytest
from rouge_score import rouge_scorer

from gkd_jax import rewards


def test_gsm8k_correct():
    refs = [
        "48/2 = <<48/2=24>>24 in May.\n#### 72",
        "#### 1,234",
        "#### -5",
        "#### 3.50",
        "#### 42",
        "#### 42",
        "#### 7",
        ["#### 10", "#### 12"],
    ]
    preds = [
        "She sold 48 + 24 = 72 clips in total.",  # last number
        "The total is 1234 dollars.",              # comma vs no comma
        "So the balance is -5.",                   # negative
        "It costs $3.5",                           # trailing-zero decimal
        "The answer is 42.",
        "I computed 42 first but the answer is 41.",  # "the answer is" wins over earlier numbers
        "No number at all.",
        "#### 12",                                 # any reference counts
    ]
    got = rewards.get_reward("gsm8k_correct")(preds, refs)
    np.testing.assert_array_equal(got, [1, 1, 1, 1, 1, 0, 0, 1])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(rewards.get_reward("gsm8k_correct")(["-1234", "5"], ["#### 1,234", "#### -5"]),
                                  [0, 0])


def test_gsm8k_reference_without_number_is_an_error():
    with pytest.raises(ValueError, match=r"references\[1\] has no final number"):
        rewards.get_reward("gsm8k_correct")(["1", "2"], ["#### 1", "no answer"])


def test_exact_match_strips():
    got = rewards.get_reward("exact_match")(["  Paris\n", "paris", "Rome", "b"], ["Paris", "Paris", [" x", "Rome "], ["a"]])
    np.testing.assert_array_equal(got, [1, 0, 1, 0])


PREDS = [
    "A High Court judge says bridge could be a sport and get lottery money.",
    "A charity boss was charged with fraudulent trading.",
    "Water was discovered on a planet around a red dwarf star.",
]
REFS = [
    "The card game Bridge is arguably a sport and could qualify for lottery funding, a judge has found.",
    "A man has been charged with fraud after a charity collapsed.",
    "Scientists have found water on a distant planet orbiting a red dwarf.",
]


@pytest.mark.parametrize("rouge_type", ["rouge1", "rouge2", "rougeL", "rougeLsum"])
def test_rouge_matches_rouge_score(rouge_type):
    scorer = rouge_scorer.RougeScorer([rouge_type], use_stemmer=True)
    want = [scorer.score(r, p)[rouge_type].fmeasure for r, p in zip(REFS, PREDS)]
    got = rewards.get_reward("rouge", rouge_type=rouge_type)(PREDS, REFS)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert 0 < got.min() and got.max() < 1


def test_rouge_defaults_to_rougeL_and_takes_best_reference():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    refs = [[REFS[1], REFS[0]], REFS[1]]
    want = [max(scorer.score(r, PREDS[0])["rougeL"].fmeasure for r in refs[0]),
            scorer.score(REFS[1], PREDS[1])["rougeL"].fmeasure]
    np.testing.assert_allclose(rewards.get_reward("rouge")(PREDS[:2], refs), want, rtol=1e-6)
    # stemming is on: "charged"/"charges" match
    assert rewards.get_reward("rouge", rouge_type="rouge1")(["charges"], ["charged"])[0] == 1.0


def test_rouge_bad_type():
    with pytest.raises(ValueError, match="rouge_type='rougeX'"):
        rewards.get_reward("rouge", rouge_type="rougeX")(["a"], ["a"])


def length_reward(predictions, references, *, scale=1.0):
    return [scale * len(p) for p in predictions]


def test_plugin_by_function_and_by_import_string():
    rewards.register_reward("test_length", length_reward)
    try:
        np.testing.assert_array_equal(rewards.get_reward("test_length", scale=2.0)(["ab", "abcd"], ["", ""]), [4, 8])
    finally:
        rewards._REGISTRY.pop("test_length")
    fn = rewards.get_reward(f"{__name__}:length_reward")
    np.testing.assert_array_equal(fn(["abc"], ["x"]), [3])
    assert fn(["abc"], ["x"]).dtype == np.float32


def test_unknown_and_bad_plugins():
    with pytest.raises(ValueError, match=r"unknown reward 'nope'.*'exact_match'.*'gsm8k_correct'.*'rouge'"):
        rewards.get_reward("nope")
    with pytest.raises(ValueError, match="cannot import 'missing'"):
        rewards.get_reward(f"{__name__}:missing")
    with pytest.raises(ValueError, match="cannot import"):
        rewards.get_reward("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match=r"reward 'exact_match' does not accept \['scale'\]"):
        rewards.get_reward("exact_match", scale=2)
    with pytest.raises(ValueError, match="not callable"):
        rewards.register_reward("x", 3)
    with pytest.raises(ValueError, match="without ':'"):
        rewards.register_reward("a:b", length_reward)


def test_bad_calls():
    em = rewards.get_reward("exact_match")
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        em(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="not a string"):
        em("ab", ["a", "b"])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        em(["a"], [[]])
    rewards.register_reward("test_bad_shape", lambda p, r: np.zeros((len(p), 2)))
    try:
        with pytest.raises(ValueError, match=r"'test_bad_shape' returned shape \(3, 2\), expected \(3,\)"):
            rewards.get_reward("test_bad_shape")(["a"] * 3, ["a"] * 3)
    finally:
        rewards._REGISTRY.pop("test_bad_shape")
    assert em([], []).shape == (0,)


def test_baseline_batch_mean():
    r = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    np.testing.assert_allclose(rewards.baseline_advantages(r), [0.5, -0.5, -0.5, 0.5, 0.5, -0.5])
    np.testing.assert_array_equal(rewards.baseline_advantages(r, baseline="none"), r)
    np.testing.assert_array_equal(rewards.baseline_advantages(r, group_size=3, baseline="none"), r)


def test_baseline_group_mean():
    r = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 2.0, 2.0, 5.0], np.float32)
    got = rewards.baseline_advantages(r, group_size=3)
    # prompt 0: mean 1/3; prompt 1: mean 2/3; prompt 2: mean 3
    want = [2 / 3, -1 / 3, -1 / 3, 1 / 3, 1 / 3, -2 / 3, -1.0, -1.0, 2.0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == np.float32
    np.testing.assert_allclose(rewards.baseline_advantages(r, group_size=9), r - r.mean(), rtol=1e-6)
    np.testing.assert_allclose(rewards.baseline_advantages([0.0, 4.0], group_size=2), [-2.0, 2.0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(group_size=4), "batch size 6 is not divisible by group_size=4"),
    (dict(group_size=0), "group_size must be a positive int"),
    (dict(group_size=1.5), "group_size must be a positive int"),
    (dict(baseline="median"), "baseline='median'"),
])
def test_baseline_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rewards.baseline_advantages(np.zeros(6), **kwargs)


def test_baseline_rejects_2d():
    with pytest.raises(ValueError, match=r"1-D \[B\], got shape \(2, 3\)"):
        rewards.baseline_advantages(np.zeros((2, 3)))


def test_import_is_light():
    code = ("import sys, gkd_jax.rewards; "
            "bad = [m for m in ('tensorflow', 'torch', 'seqio', 'matplotlib', 'rouge_score') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
