"""Tests for grpo_speech.py and the toy data.

    pytest -q test_grpo_speech.py              # everything (about N minutes on 2 CPU cores)
    pytest -q test_grpo_speech.py -m "not slow"  # the math and input checks only (seconds)

Every number below is worked out by hand in the test, from the equation in the docstring of the
function under test.
"""
import importlib
import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

import pytest
import soundfile
import torch

import grpo_speech as gs

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "data"


def load_make_data():
    """data/make_data.py as a module named make_data (its synthesis workers import it by name)."""
    if str(DATA) not in sys.path:
        sys.path.insert(0, str(DATA))
    return importlib.import_module("make_data")


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------
def test_group_advantages_two_groups_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 1.0, 1.0])
    # group 1: mean 2.5, sample std sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3) = sqrt(5/3)
    # group 2: mean 0.5, sample std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    expected = torch.tensor([-1.5 / (math.sqrt(5 / 3) + 1e-4), -0.5 / (math.sqrt(5 / 3) + 1e-4),
                             0.5 / (math.sqrt(5 / 3) + 1e-4), 1.5 / (math.sqrt(5 / 3) + 1e-4),
                             -0.5 / (math.sqrt(1 / 3) + 1e-4), -0.5 / (math.sqrt(1 / 3) + 1e-4),
                             0.5 / (math.sqrt(1 / 3) + 1e-4), 0.5 / (math.sqrt(1 / 3) + 1e-4)])
    assert torch.allclose(gs.group_advantages(rewards, 4), expected, atol=1e-6)


def test_group_advantages_equal_rewards_are_zero_not_nan():
    rewards = torch.tensor([0.3, 0.3, 0.3, 0.0, 1.0, 0.5])
    advantages = gs.group_advantages(rewards, 3)
    assert torch.equal(advantages[:3], torch.zeros(3))
    assert torch.isfinite(advantages).all()
    assert torch.equal(gs.group_advantages(torch.zeros(8), 4), torch.zeros(8))


def test_group_advantages_scale_options():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 1.0, 1.0])
    centred = torch.tensor([-1.5, -0.5, 0.5, 1.5, -0.5, -0.5, 0.5, 0.5])
    assert torch.allclose(gs.group_advantages(rewards, 4, scale="none"), centred)
    # batch: mean 1.5, squared deviations sum to 14, sample variance 14 / 7 = 2
    assert torch.allclose(gs.group_advantages(rewards, 4, scale="batch"),
                          centred / (math.sqrt(2) + 1e-4), atol=1e-6)
    assert torch.allclose(gs.group_advantages(rewards, 4, stabilizer=0.0),
                          centred / torch.tensor([math.sqrt(5 / 3)] * 4 + [math.sqrt(1 / 3)] * 4))


def test_group_advantages_rejects_bad_groups():
    with pytest.raises(ValueError):
        gs.group_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError):
        gs.group_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError):
        gs.group_advantages(torch.ones(4), 2, scale="median")


# ---------------------------------------------------------------------------------------------
# Log-probs
# ---------------------------------------------------------------------------------------------
def test_token_log_probs_by_hand():
    logits = torch.log(torch.tensor([[[1.0, 2.0, 5.0], [4.0, 2.0, 2.0]]]))   # softmax: /8
    tokens = torch.tensor([[2, 0]])
    result = gs.token_log_probs(logits, tokens)
    assert torch.allclose(result, torch.log(torch.tensor([[5 / 8, 4 / 8]])))
    masked = gs.token_log_probs(logits, tokens, torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(masked, torch.tensor([[math.log(5 / 8), 0.0]]))


def test_token_log_probs_temperature_and_stability():
    # logits [0, 2 ln 2] at temperature 2 -> [0, ln 2] -> probabilities [1/3, 2/3]
    logits = torch.tensor([[[0.0, 2 * math.log(2)]]])
    assert torch.allclose(gs.token_log_probs(logits, torch.tensor([[1]]), temperature=2.0),
                          torch.tensor([[math.log(2 / 3)]]))
    huge = torch.tensor([[[1e4, 0.0, -1e4]]])
    values = gs.token_log_probs(huge, torch.tensor([[1]]))
    assert torch.isfinite(values).all() and values.item() == pytest.approx(-1e4)


# ---------------------------------------------------------------------------------------------
# Clipped loss
# ---------------------------------------------------------------------------------------------
def four_ppo_cases():
    """One token per sequence, old_logp = 0, so ratio = exp(logp)."""
    ratios = torch.tensor([1.5, 1.1, 0.5, 0.9, 0.5, 1.5])
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, -1.0])
    logp = torch.log(ratios).unsqueeze(1).requires_grad_(True)
    return ratios, advantages, logp


def test_grpo_loss_ppo_cases_value_and_gradient():
    ratios, advantages, logp = four_ppo_cases()
    loss, diagnostics = gs.grpo_loss(logp, torch.zeros_like(logp), None, advantages,
                                     torch.ones_like(logp), eps=0.2, beta=0.0)
    # min(s A, clip(s, 0.8, 1.2) A) per row:
    #   A>0 s=1.5 -> 1.2 (clipped)   A>0 s=1.1 -> 1.1     A<0 s=0.5 -> -0.8 (clipped)
    #   A<0 s=0.9 -> -0.9            A>0 s=0.5 -> 0.5     A<0 s=1.5 -> -1.5 (clip does not bind)
    objective = torch.tensor([1.2, 1.1, -0.8, -0.9, 0.5, -1.5])
    assert loss.item() == pytest.approx(-objective.mean().item(), abs=1e-6)
    loss.backward()
    # d loss / d logp_i = -(1/6) s_i A_i where the clip does not bind, 0 where it does
    expected = torch.tensor([0.0, -1.1, 0.0, 0.9, -0.5, 1.5]) / 6
    assert torch.allclose(logp.grad.squeeze(1), expected, atol=1e-6)
    assert diagnostics["clip_fraction"] == pytest.approx(2 / 6)
    assert diagnostics["ratio"] == pytest.approx(ratios.mean().item(), abs=1e-6)


def test_answer_entropy_by_hand(monkeypatch):
    # Uniform over 4 tokens: log 4 nats; one sure token (logit 100): 0; padding: 0.
    logits = torch.zeros(1, 3, 4)
    logits[0, 1, 2] = 100.0
    monkeypatch.setattr(gs, "completion_logits", lambda model, *args: logits)
    rollout = gs.Rollout(*[None] * 4, completion_ids=torch.tensor([[0, 2, 1]]),
                         completion_mask=torch.tensor([[1.0, 1.0, 0.0]]), off_policy=torch.zeros(1, dtype=torch.bool),
                         completions=["x"], references=[["x"]])
    logp, entropy = gs.answer_log_probs(None, rollout, temperature=1.0, entropy=True)
    assert torch.allclose(entropy, torch.tensor([[math.log(4), 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(logp, torch.tensor([[-math.log(4), 0.0, 0.0]]), atol=1e-6)
    assert gs.answer_log_probs(None, rollout, temperature=1.0)[1] is None


def test_grpo_loss_separate_upper_clip():
    logp = torch.log(torch.tensor([[1.25]])).requires_grad_(True)
    loss, _ = gs.grpo_loss(logp, torch.zeros_like(logp), None, torch.tensor([1.0]),
                           torch.ones_like(logp), eps=0.2, beta=0.0, eps_high=0.28)
    assert loss.item() == pytest.approx(-1.25)           # inside [0.8, 1.28]: not clipped
    loss.backward()
    assert logp.grad.item() == pytest.approx(-1.25)


def test_grpo_loss_kl_value_and_gradient():
    # logp = ln 0.5, ref = ln 0.25: delta = ln 0.5, k3 = 0.5 - ln 0.5 - 1 = ln 2 - 0.5
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]])
    loss, diagnostics = gs.grpo_loss(logp, logp.detach(), ref, torch.tensor([0.0]),
                                     torch.ones(1, 1), beta=0.1)
    assert diagnostics["kl"] == pytest.approx(math.log(2) - 0.5, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * (math.log(2) - 0.5), abs=1e-7)
    loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp) = 1 - 0.5
    assert logp.grad.item() == pytest.approx(0.1 * 0.5, abs=1e-6)


def test_grpo_loss_kl_skipped_when_beta_zero_or_no_reference():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-3.0, -0.5]])
    args = (torch.tensor([0.7]), torch.ones(1, 2))
    plain, d0 = gs.grpo_loss(logp, logp, None, *args, beta=0.02)
    zero_beta, d1 = gs.grpo_loss(logp, logp, ref, *args, beta=0.0)
    with_kl, d2 = gs.grpo_loss(logp, logp, ref, *args, beta=0.02)
    assert plain.item() == zero_beta.item() == pytest.approx(-0.7)
    assert d0["kl"] == d1["kl"] == 0.0 and d2["kl"] > 0
    assert with_kl.item() > plain.item()


def aggregation_inputs():
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    logp = torch.tensor([[-1.0, -5.0, -5.0], [-2.0, -3.0, -4.0]])
    return logp, torch.tensor([1.0, 2.0]), mask


@pytest.mark.parametrize("loss_type,max_length,expected", [
    ("dapo", None, -(1 * 1 + 2 * 3) / 4),          # all tokens of the batch / their number
    ("grpo", None, -(1 / 1 + 6 / 3) / 2),          # per-sequence mean, then mean
    ("dr_grpo", None, -(1 + 6) / (2 * 3)),         # / (B * T)
    ("dr_grpo", 4, -(1 + 6) / (2 * 4)),            # / (B * max_completion_length)
])
def test_grpo_loss_aggregations(loss_type, max_length, expected):
    logp, advantages, mask = aggregation_inputs()   # ratio 1: each token's objective is A_i
    loss, _ = gs.grpo_loss(logp, logp, None, advantages, mask, beta=0.0, loss_type=loss_type,
                           max_completion_length=max_length)
    assert loss.item() == pytest.approx(expected)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_grpo_loss_masked_tokens_contribute_nothing(loss_type):
    logp, advantages, mask = aggregation_inputs()
    ref = logp - 0.3
    base, _ = gs.grpo_loss(logp, logp, ref, advantages, mask, loss_type=loss_type)
    for junk in (1e9, -1e9, float("nan"), float("inf")):
        noisy = logp.clone()
        noisy[mask == 0] = junk
        noisy_ref = ref.clone()
        noisy_ref[mask == 0] = -junk
        noisy.requires_grad_(True)
        loss, diagnostics = gs.grpo_loss(noisy, logp, noisy_ref, advantages, mask,
                                         loss_type=loss_type)
        assert loss.item() == pytest.approx(base.item())
        loss.backward()
        assert torch.isfinite(noisy.grad).all()
        assert torch.equal(noisy.grad[mask == 0], torch.zeros(2))
        assert all(math.isfinite(v) for v in diagnostics.values())


def test_one_update_per_batch_is_policy_gradient():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (4, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]).float()
    advantages = torch.tensor([0.5, -1.0, 2.0, -0.25])
    logp = gs.token_log_probs(logits, tokens, mask)
    loss, diagnostics = gs.grpo_loss(logp, logp.detach(), None, advantages, mask, beta=0.0)
    (grad,) = torch.autograd.grad(loss, logits)
    reinforce = -(advantages[:, None] * gs.token_log_probs(logits, tokens, mask) * mask).sum() / mask.sum()
    (expected,) = torch.autograd.grad(reinforce, logits)
    assert torch.allclose(grad, expected, atol=1e-7)
    assert diagnostics["ratio"] == 1.0 and diagnostics["clip_fraction"] == 0.0


# ---------------------------------------------------------------------------------------------
# MP-GRPO
# ---------------------------------------------------------------------------------------------
def test_off_policy_rows_are_not_clipped_and_weighted_by_probability():
    # row 0 on-policy, ratio 2 (clipped); row 1 off-policy, same numbers: weight = exp(logp)
    logp = torch.log(torch.tensor([[0.5], [0.5]])).requires_grad_(True)
    old = torch.log(torch.tensor([[0.25], [0.25]]))
    off_policy = torch.tensor([False, True])
    loss, diagnostics = gs.grpo_loss(logp, old, None, torch.tensor([2.0, 2.0]), torch.ones(2, 1),
                                     eps=0.2, beta=0.0, off_policy=off_policy)
    # on: min(2 * 2, 1.2 * 2) = 2.4 (gradient 0); off: 0.5 * 2 = 1.0 (gradient 0.5 * 2)
    assert loss.item() == pytest.approx(-(2.4 + 1.0) / 2)
    loss.backward()
    assert torch.allclose(logp.grad.squeeze(1), torch.tensor([0.0, -1.0 / 2]))
    assert diagnostics["clip_fraction"] == 1.0            # over on-policy tokens only
    assert diagnostics["ratio"] == pytest.approx(2.0)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_micro_batches_give_the_gradient_of_the_whole_batch(loss_type):
    torch.manual_seed(0)
    logp = torch.randn(6, 5, requires_grad=True)
    ref_logp, advantages = torch.randn(6, 5), torch.randn(6)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.float)
    off_policy = torch.tensor([False, False, True, False, False, True])
    args = dict(eps=0.2, beta=0.04, loss_type=loss_type, off_policy=off_policy, max_completion_length=5)
    whole, _ = gs.grpo_loss(logp, logp.detach() - 0.1, ref_logp, advantages, mask, **args)
    (expected,) = torch.autograd.grad(whole, logp)
    parts = (slice(0, 4), slice(4, 6))                 # unequal parts, unequal token counts
    # the whole batch's normaliser is the sum of the parts': 17 tokens, 6 rows, 6 * 5
    normalizer = sum(gs.loss_normalizer(loss_type, mask[rows], 5) for rows in parts)
    assert normalizer == {"dapo": 17, "grpo": 6, "dr_grpo": 30}[loss_type]
    total = 0.0
    for rows in parts:
        args["off_policy"] = off_policy[rows]
        part, _ = gs.grpo_loss(logp[rows], logp[rows].detach() - 0.1, ref_logp[rows],
                               advantages[rows], mask[rows], normalizer=normalizer, **args)
        total = total + part
    assert total.item() == pytest.approx(whole.item(), abs=1e-6)
    (got,) = torch.autograd.grad(total, logp)
    assert torch.allclose(got, expected, atol=1e-7)
    # each part normalised by itself alone, the sum would weight the tokens unequally
    args["off_policy"] = off_policy[:4]
    alone, _ = gs.grpo_loss(logp[:4], logp[:4].detach() - 0.1, ref_logp[:4], advantages[:4], mask[:4], **args)
    with_whole, _ = gs.grpo_loss(logp[:4], logp[:4].detach() - 0.1, ref_logp[:4], advantages[:4],
                                 mask[:4], normalizer=normalizer, **args)
    own = {"dapo": 11, "grpo": 4, "dr_grpo": 20}[loss_type]            # 5+2+1+3 tokens, 4 rows
    assert with_whole.item() == pytest.approx(alone.item() * own / normalizer, abs=1e-7)


def test_policy_shaping():
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    loss, _ = gs.grpo_loss(logp, logp.detach(), None, torch.tensor([1.0]), torch.ones(1, 1),
                           beta=0.0, off_policy=torch.tensor([True]), policy_shaping=0.1)
    assert loss.item() == pytest.approx(-0.5 / 0.6)       # f(p) = p / (p + 0.1)
    loss.backward()
    # d f / d logp = p * gamma / (p + gamma)^2 = 0.5 * 0.1 / 0.36
    assert logp.grad.item() == pytest.approx(-0.05 / 0.36)


def test_inject_reference_rows_and_mask():
    eos, pad = 9, 0
    ids = torch.tensor([[1, 2, eos], [3, eos, 0], [4, 4, 4], [5, eos, 0], [6, 6, eos], [7, eos, 0]])
    mask = gs.completion_mask(ids, eos)
    references = [torch.tensor([8, 8, 8, 8, eos]), torch.tensor([2, eos])]
    new_ids, new_mask, off_policy = gs.inject_reference(ids, mask, references, 3, pad)
    assert off_policy.tolist() == [False, False, True, False, False, True]
    assert new_ids.shape == (6, 5)                        # widened to the longest reference
    assert new_ids[2].tolist() == [8, 8, 8, 8, eos] and new_mask[2].tolist() == [1, 1, 1, 1, 1]
    assert new_ids[5].tolist() == [2, eos, pad, pad, pad] and new_mask[5].tolist() == [1, 1, 0, 0, 0]
    assert torch.equal(new_ids[[0, 1, 3, 4], :3], ids[[0, 1, 3, 4]])
    assert torch.equal(new_mask[[0, 1, 3, 4], :3], mask[[0, 1, 3, 4]])
    assert new_mask[[0, 1, 3, 4], 3:].sum() == 0


def test_injected_reference_gets_the_top_reward_of_its_group():
    references = ["Der Mann liest ein Buch.", "Die Frau trinkt keinen Kaffee."]
    group = ["Der Mann liest das Buch.", "Ein Mann liest.", references[0]]
    rewards = gs.bleu_rewards(group, [references] * 3)
    assert rewards[2].item() == 1.0 and rewards.argmax().item() == 2
    advantages = gs.group_advantages(rewards, 3)
    assert advantages[2] > 0 and (advantages[:2] < 0).all()


# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------
def test_bleu_rewards_identical_disjoint_empty():
    rewards = gs.bleu_rewards(["Der Mann liest ein Buch.", "Hallo Welt", "", "   "],
                              [["Der Mann liest ein Buch."], ["Die Katze schläft."],
                               ["Die Katze schläft."], ["x"]])
    assert rewards.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_bleu_rewards_match_sacrebleu_sentence_bleu():
    import sacrebleu
    pairs = [("Der alte Mann liest am Morgen ein Buch.", ["Am Morgen liest der alte Mann ein Buch."]),
             ("Die Frau trinkt Kaffee.", ["Die Frau trinkt keinen Kaffee."]),
             ("Peter geht mit dem Hund in den Park.", ["Peter geht mit dem Hund zum Park.",
                                                       "Peter geht mit dem Hund in den Park."]),
             ("Wo ist mein Schlüssel?", ["Wo sind meine Schlüssel?"])]
    rewards = gs.bleu_rewards([p[0] for p in pairs], [p[1] for p in pairs])
    for reward, (hypothesis, refs) in zip(rewards, pairs):
        assert reward.item() == pytest.approx(sacrebleu.sentence_bleu(hypothesis, refs).score / 100)
    assert 0 < rewards[0] < 1 and rewards[2] == 1.0


def test_bleu_rewards_multiple_references_take_the_closest():
    hypothesis = "Am Abend liest die Frau eine Zeitung."
    one = gs.bleu_rewards([hypothesis], [["Die Frau liest am Abend eine Zeitung."]])
    both = gs.bleu_rewards([hypothesis], [["Die Frau liest am Abend eine Zeitung.",
                                           "Am Abend liest die Frau eine Zeitung."]])
    assert one.item() < 1.0 and both.item() == 1.0


def test_other_rewards():
    refs = [["the cat sat down"]]
    assert gs.REWARDS["rouge_l"](["the cat sat"], refs).item() == pytest.approx(2 * 3 / (3 + 4))
    assert gs.REWARDS["rouge_l"](["sat the cat"], refs).item() == pytest.approx(2 * 2 / (3 + 4))
    assert gs.REWARDS["rouge_l"](["dog"], refs).item() == 0.0
    # ROUGE-1: "the the cat" shares "the" once (clipped) and "cat": m = 2, 3 + 4 unigrams.
    assert gs.REWARDS["rouge1"](["The the cat."], refs).item() == pytest.approx(2 * 2 / (3 + 4))
    # ROUGE-2: "sat the cat" has bigrams (sat the), (the cat); one shared of 2 + 3 bigrams.
    assert gs.REWARDS["rouge2"](["sat the cat"], refs).item() == pytest.approx(2 * 1 / (2 + 3))
    assert gs.REWARDS["rouge2"](["cat"], refs).item() == 0.0           # no bigram at all
    # Umlauts are word characters; punctuation is not: a German answer scores whole.
    assert gs.REWARDS["rouge1"](["Die Frau trinkt Käse!"], [["die Frau trinkt Käse"]]).item() == 1.0
    # The closest of several references counts.
    assert gs.REWARDS["rouge1"](["a b"], [["a c", "a b"]]).item() == 1.0
    for name in ("bleu", "chrf", "ter", "rouge1", "rouge2", "rouge_l"):
        rewards = gs.REWARDS[name](["the cat sat down", "", "zzz qqq"], refs * 3)
        assert rewards[0].item() == pytest.approx(1.0), name
        assert rewards[1].item() == 0.0, name
        assert 0.0 <= rewards[2].item() < 0.5, name
    # TER: one deletion against a 4-word reference = 25 -> reward 0.75
    assert gs.REWARDS["ter"](["the cat sat"], refs).item() == pytest.approx(0.75)


def test_edit_distance_and_word_error_rate_by_hand():
    assert gs.edit_distance("kitten", "sitting") == 3          # k->s, e->i, +g
    assert gs.edit_distance([], ["a", "b"]) == 2 and gs.edit_distance(["a"], []) == 1
    # Line 1: "the cat sat" vs "the cat sat on it": 2 deletions of 5 words.
    # Line 2: one substitution against the closer of two references (3 words; the other is 4).
    # Case and punctuation do not count: 3 errors / 8 reference words.
    wer = gs.word_error_rate(["The cat, sat.", "a big dog"],
                             [["the cat sat on it"], ["one big dog", "a very big dog"]])
    assert wer == pytest.approx(100 * 3 / 8)
    assert gs.word_error_rate(["x"], [["x"]]) == 0.0


def test_completion_mask_includes_first_eos():
    eos = 2
    ids = torch.tensor([[5, 6, eos, eos], [5, 6, 7, 8], [eos, 0, 0, 0], [eos, eos, 5, eos]])
    assert gs.completion_mask(ids, eos).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0],
                                                     [1, 0, 0, 0]]


# ---------------------------------------------------------------------------------------------
# Toy data: the German grammar (hand-checked phrases)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def make_data():
    return load_make_data()


def noun(make_data, english):
    return next(n for n in make_data.NOUNS if n.en == english)


def adjective(make_data, english):
    return next(a for a in make_data.ADJECTIVES if a[0] == english)


def test_german_noun_phrases_by_hand(make_data):
    NP = make_data.NounPhrase
    apple, red = noun(make_data, "apple"), adjective(make_data, "red")
    assert NP(apple, "a", adjective=red).german("acc") == ["einen roten Apfel"]
    assert NP(apple, "a", adjective=red).german("nom") == ["ein roter Apfel"]
    assert NP(apple, "the", adjective=red).german("dat") == ["dem roten Apfel"]
    assert NP(apple, "number", True, red, 1).german("acc") == ["drei rote Äpfel"]
    assert NP(apple, "number", True, red, 1).german("dat") == ["drei roten Äpfeln"]
    assert NP(noun(make_data, "child"), "the", True).german("dat") == ["den Kindern"]
    assert NP(noun(make_data, "teacher"), "my").german("nom") == ["mein Lehrer", "meine Lehrerin"]
    assert NP(noun(make_data, "teacher"), "the", True).german("dat") == ["den Lehrern", "den Lehrerinnen"]
    assert NP(noun(make_data, "water"), None, adjective=adjective(make_data, "cold")).german("acc") == ["kaltes Wasser"]
    assert NP(noun(make_data, "coffee"), None).negated().german("acc") == ["keinen Kaffee"]
    assert NP(noun(make_data, "car"), "a", adjective=adjective(make_data, "expensive")).german("nom") == ["ein teures Auto"]
    assert NP(noun(make_data, "woman"), "our").german("dat") == ["unserer Frau"]
    assert NP(noun(make_data, "umbrella"), "a").english() == "an umbrella"


def test_german_clock_times(make_data):
    rng = random.Random(0)
    hours = dict(zip(make_data.HOURS_EN, make_data.HOURS_DE))
    seen = set()
    for _ in range(300):
        english, (german,) = make_data.clock_time(rng)
        words = english.split()
        if "half" in words:                 # "half past seven" is "halb acht"
            following = make_data.HOURS_DE[(make_data.HOURS_EN.index(words[-1]) + 1) % 12]
            assert german == f"um halb {following}"
        elif "o'clock" in words:
            assert german == ("um ein Uhr" if words[1] == "one" else f"um {hours[words[1]]} Uhr")
        elif "past" in words:
            assert german == f"um Viertel nach {hours[words[-1]]}"
        else:
            assert german == f"um Viertel vor {hours[words[-1]]}"
        seen.add(words[1])
    assert {"half", "a"} <= seen


def test_ast_generator_sentences_are_well_formed(make_data):
    rng = random.Random(1)
    for _ in range(2000):
        english, references = make_data.make_ast_example(rng)
        references = make_data.dedupe(references)
        end = english[-1]
        assert end in ".?" and english[0].isupper() and "  " not in english
        assert 1 <= len(references) <= 4
        for reference in references:
            assert reference[-1] == end and reference[0].isupper() and "  " not in reference
            assert " ," not in reference and "None" not in reference
            if ", dass " in reference or ", weil " in reference:
                clause = reference.split(", ")[-1].rstrip(".").split()
                assert clause[-1] not in ("den", "die", "das", "ein", "einen", "nicht")


# ---------------------------------------------------------------------------------------------
# Toy data: manifests and audio (synthesized on first use, about a minute)
# ---------------------------------------------------------------------------------------------
TOY_MANIFESTS = [(task, split) for task in ("ast", "sqa") for split in ("pretrain", "train", "dev", "test")]


@pytest.fixture(scope="module")
def toy(make_data):
    data = {(task, split): gs.load_manifest(DATA / task / f"{split}.jsonl", task)
            for task, split in TOY_MANIFESTS}
    gs.ensure_audio([ex for examples in data.values() for ex in examples])
    return data


@pytest.mark.slow
def test_manifests_parse_and_every_clip_is_16k_mono_speech(toy):
    for (task, split), examples in toy.items():
        assert len(examples) >= 150, (task, split)
        for ex in examples:
            info = soundfile.info(ex["audio_path"])
            assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "PCM_16"), ex["where"]
            samples = gs.load_audio(ex["audio_path"])
            assert samples.numel() / 16_000 == pytest.approx(ex["duration"], abs=1e-3), ex["where"]
            rms = samples.pow(2).mean().sqrt().item()
            assert rms > 0.01 and samples.abs().max() <= 1.0, ex["where"]
            assert ex["speaker"] == ex["tts"]["voice"]
            if task == "ast":
                assert ex["translation"] and all(t.strip() for t in ex["translation"]), ex["where"]
            else:
                assert ex["question"].endswith("?") and ex["answer"], ex["where"]


@pytest.mark.slow
def test_splits_share_no_sentences_and_test_voices_are_unseen(toy):
    for task in ("ast", "sqa"):
        texts = {split: {ex["text"] for ex in toy[(task, split)]} for split in ("pretrain", "train", "dev", "test")}
        voices = {split: {ex["speaker"] for ex in toy[(task, split)]} for split in texts}
        splits = list(texts)
        for i, a in enumerate(splits):
            for b in splits[i + 1:]:
                assert not texts[a] & texts[b], (task, a, b)
        heard = voices["pretrain"] | voices["train"]
        assert not voices["test"] & heard and not voices["dev"] & heard
        assert not voices["test"] & voices["dev"]
        assert len(voices["test"]) >= 10


def test_base_pretraining_material_is_fresh_and_uses_training_voices(make_data):
    """The base model's pretraining text and speech (data/make_tiny_model.py) hold no sentence
    or passage of any manifest, and its voices are the training voices only."""
    sys.path.insert(0, str(DATA))
    builder = importlib.import_module("make_tiny_model")
    exclude = builder.manifest_texts()
    assert len(exclude) == sum(sum(sizes.values()) for sizes in make_data.SIZES.values())   # 5,450
    taken = set(exclude)
    rows = (builder.fresh_examples(random.Random(0), "ast", 300, taken)
            + builder.fresh_examples(random.Random(0), "sqa", 100, taken))
    assert len({row["text"] for row in rows}) == 400 and not {row["text"] for row in rows} & exclude
    assert all(row["translation"] for row in rows[:300]) and all(row["answer"] for row in rows[300:])
    voices = make_data.voice_splits(random.Random(make_data.SEED))
    recipes = [builder.wide_recipe(random.Random(i), voices["train"]) for i in range(200)]
    assert not {r["voice"] for r in recipes} & (set(voices["test"]) | set(voices["dev"]))


def test_lines_keep_one_reference_and_the_base_learns_the_others(make_data):
    """A manifest line (AST or SQA) scores against the first rendering only; stages 1-4 of the
    base build learn every rendering, stage 5 (the base's house style) the others where there
    are any."""
    sys.path.insert(0, str(DATA))
    builder = importlib.import_module("make_tiny_model")
    row = make_data.ast_row("I come.", ["Ich komme.", "Ich komme.", "Ich komme an.", "a", "b", "c"])
    assert row == {"text": "I come.", "translation": ["Ich komme."],
                   "other_translations": ["Ich komme an.", "a", "b"]}      # deduplicated, at most 4
    ast = {"task": "ast", **row}
    assert builder.all_renderings(ast) == ["Ich komme.", "Ich komme an.", "a", "b"]
    assert builder.house_style(ast) == ["Ich komme an.", "a", "b"]
    single = {"task": "ast", **make_data.ast_row("Go.", ["Geh."])}
    assert builder.house_style(single) == builder.all_renderings(single) == ["Geh."]
    asr = builder.as_task(ast, "asr")                    # the same clip transcribed: no German
    assert builder.house_style(asr) == builder.all_renderings(asr) == ["I come."]
    sqa = {"task": "sqa", **make_data.sqa_row("Tom is here.", "Who?", ["Tom is.", "Tom.", "Tom is."])}
    assert sqa == {"task": "sqa", "text": "Tom is here.", "question": "Who?", "answer": ["Tom is."],
                   "other_answers": ["Tom."]}
    assert builder.all_renderings(sqa) == ["Tom is.", "Tom."] and builder.house_style(sqa) == ["Tom."]
    assert list(builder.tokenizer_texts([ast])).count("Ich komme an.") == 1   # the tokenizer sees all


@pytest.mark.slow
def test_regenerated_clips_are_byte_identical(toy, make_data, tmp_path):
    chosen = [toy[("ast", "test")][0], toy[("sqa", "train")][7], toy[("ast", "train")][123]]
    jobs = [(ex["text"], ex["tts"], tmp_path / f"{i}.wav") for i, ex in enumerate(chosen)]
    make_data.synthesize(jobs)
    for (_, _, path), ex in zip(jobs, chosen):
        assert path.read_bytes() == Path(ex["audio_path"]).read_bytes(), ex["where"]


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line naming the file (and line), before any model loads
# ---------------------------------------------------------------------------------------------
def write_wav(path, samples, rate=16_000, subtype="PCM_16"):
    soundfile.write(str(path), samples.numpy(), rate, subtype=subtype)
    return path


def sine(seconds=1.0, rate=16_000, frequency=440.0):
    t = torch.arange(int(seconds * rate)) / rate
    return 0.5 * torch.sin(2 * math.pi * frequency * t)


def write_manifest(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_manifest_errors_name_file_and_line(tmp_path):
    write_wav(tmp_path / "a.wav", sine())
    good = {"audio": "a.wav", "translation": ["Hallo."]}
    cases = [
        ([good, "{not json"], ":2: not valid JSON"),
        ([good, {"translation": ["x"]}], ":2: missing field 'audio'"),
        ([good, good, {"audio": "a.wav"}], ":3: missing field 'translation'"),
        ([{"audio": "a.wav", "translation": ["  "]}], ":1: empty reference text"),
        ([{"audio": "a.wav", "translation": []}], ":1: 'translation' is an empty list"),
        ([good, {"audio": "a.wav", "translation": "x", "task": "tts"}], ":2: unknown task 'tts'"),
        (["[1, 2]"], ":1: expected a JSON object"),
        ([], "manifest has no examples"),
        (["", "  "], "manifest has no examples"),
        ([good, {"audio": "a.wav", "translation": 5}], ":2: 'translation' must be a string or a list of strings, got 5"),
        ([{"audio": "a.wav", "translation": True}], ":1: 'translation' must be a string or a list of strings, got true"),
        ([{"audio": "a.wav", "translation": {"de": "x"}}], ":1: 'translation' must be"),
        ([{"audio": "a.wav", "translation": [5]}], ":1: 'translation' must be a string or a list of strings, got [5]"),
        ([{"audio": "a.wav", "translation": [["x"]]}], ":1: 'translation' must be"),
        ([{"audio": "a.wav", "translation": None}], ":1: 'translation' must be a string or a list of strings, got null"),
        ([{"audio": 5, "translation": "x"}], ":1: 'audio' must be a string, got 5"),
        ([{"audio": " ", "translation": "x"}], ":1: empty audio"),
        ([{"audio": "a.wav", "question": 7, "answer": "x", "task": "sqa"}], ":1: 'question' must be a string, got 7"),
        ([{"audio": "a.wav", "question": "", "answer": "x", "task": "sqa"}], ":1: empty question"),
    ]
    for lines, message in cases:
        path = write_manifest(tmp_path / "m.jsonl", lines)
        with pytest.raises(gs.UsageError) as error:
            gs.load_manifest(path, "ast")
        assert str(path) in str(error.value) and message in str(error.value)
    sqa = write_manifest(tmp_path / "s.jsonl", [{"audio": "a.wav", "question": "Q?", "answer": "A."}])
    assert gs.load_manifest(sqa, "sqa")[0]["answer"] == ["A."]       # one string is one reference
    bom = tmp_path / "bom.jsonl"                                      # a BOM is fine (utf-8-sig)
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(good).encode() + b"\n")
    assert gs.load_manifest(bom, "ast")[0]["translation"] == ["Hallo."]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes((json.dumps(good) + "\n" + '{"audio": "a.wav", "translation": "Grüße"}\n').encode("latin-1"))
    with pytest.raises(gs.UsageError, match=r"latin\.jsonl:2: not UTF-8 text"):
        gs.load_manifest(latin, "ast")


def test_missing_and_unreadable_audio(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("not audio at all")
    write_wav(tmp_path / "silent0.wav", torch.zeros(0))
    path = write_manifest(tmp_path / "m.jsonl", [{"audio": "gone.wav", "translation": ["x"]}])
    with pytest.raises(gs.UsageError, match=r"m\.jsonl:1: audio file not found: .*gone\.wav"):
        gs.ensure_audio(gs.load_manifest(path, "ast"))
    for name, message in [("empty.wav", "cannot read audio"), ("text.wav", "cannot read audio"),
                          ("silent0.wav", "has no samples")]:
        with pytest.raises(gs.UsageError, match=message) as error:
            gs.load_audio(str(tmp_path / name), "m.jsonl:7")
        assert str(error.value).startswith("m.jsonl:7: ")


def test_audio_formats_rates_and_channels(tmp_path):
    reference = sine()
    for subtype in ("PCM_16", "PCM_24", "PCM_32", "FLOAT", "PCM_U8"):
        samples = gs.load_audio(str(write_wav(tmp_path / f"{subtype}.wav", reference, subtype=subtype)))
        tolerance = 1e-2 if subtype == "PCM_U8" else 1e-4
        assert samples.dtype == torch.float32 and torch.allclose(samples, reference, atol=tolerance)
    flac = gs.load_audio(str(write_wav(tmp_path / "a.flac", reference)))
    assert torch.allclose(flac, reference, atol=1e-4)
    # 8 kHz -> resampled to 16 kHz: twice the samples, same tone
    low = gs.load_audio(str(write_wav(tmp_path / "8k.wav", sine(rate=8_000), rate=8_000)))
    assert low.numel() == 16_000
    spectrum = torch.fft.rfft(low).abs()
    assert spectrum.argmax().item() == 440                      # 1 s of audio: bin = Hz
    # stereo is averaged: (x + 0.5 x) / 2
    stereo = torch.stack([reference, 0.5 * reference], dim=1)
    soundfile.write(str(tmp_path / "stereo.wav"), stereo.numpy(), 16_000)
    assert torch.allclose(gs.load_audio(str(tmp_path / "stereo.wav")), 0.75 * reference, atol=1e-4)


def test_audio_longer_than_the_limit_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "MAX_AUDIO_SECONDS", 0.5)
    with pytest.raises(gs.UsageError, match="1 s long, more than the 0 s"):
        gs.load_audio(str(write_wav(tmp_path / "long.wav", sine())), "m.jsonl:3")


def test_every_clip_header_is_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    write_wav(tmp_path / "ok.wav", sine())
    write_wav(tmp_path / "long.wav", sine(seconds=61.0))
    write_wav(tmp_path / "short.wav", sine(seconds=0.001))
    (tmp_path / "cut.wav").write_bytes((tmp_path / "ok.wav").read_bytes()[:100])
    monkeypatch.setattr(gs, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "text.wav").write_text("not audio")
    for bad, message in [("long.wav", "61 s long, more than the 60 s"), ("short.wav", "1 ms long"),
                         ("cut.wav", "2 ms long, shorter than 50 ms"), ("text.wav", "cannot read audio")]:
        lines = [{"audio": "ok.wav", "translation": "x"}] * 3 + [{"audio": bad, "translation": "x"}]
        train = write_manifest(tmp_path / "train.jsonl", lines)
        test = write_manifest(tmp_path / "test.jsonl", lines[:1])
        assert gs.main(["--train", str(train), "--test", str(test), "--overwrite_output_dir",
                        "--output_dir", str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err
        assert f"train.jsonl:4: " in error and message in error and error.count("\n") == 1


def test_max_grad_norm_zero_does_not_clip():
    layer = torch.nn.Linear(2, 1, bias=False)
    for norm, expected_step in [(0.0, 30.0), (1.0, 1.0)]:      # gradient (30, 40), lr 1, SGD
        layer.weight.data.zero_()
        optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
        loss = layer(torch.tensor([[30.0, 40.0]])).sum()
        gs.backward(loss, gs.Timer())
        grad_norm = gs.optimizer_step(layer, optimizer, norm, gs.Timer())
        assert grad_norm.item() == pytest.approx(50.0)
        assert -layer.weight[0, 0].item() == pytest.approx(expected_step * (30 / 50 if norm else 1))


def test_an_output_dir_with_another_runs_files_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "checkpoint-000040").mkdir()
    monkeypatch.setattr(gs, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert gs.main(["--output_dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "holds another run's files (checkpoint-000040, results.json" in error
    assert "--overwrite_output_dir" in error and (tmp_path / "results.json").exists()
    file = tmp_path / "a-file"
    file.write_text("")
    for output_dir in (file, file / "below"):
        assert gs.main(["--output_dir", str(output_dir)]) == 2
        assert "cannot write there" in capsys.readouterr().err


@pytest.mark.parametrize("options,message", [
    (["--group_size", "1"], "needs at least 2"),
    (["--reward", "meteor"], "unknown --reward 'meteor'"),
    (["--task", "asr2"], "unknown --task 'asr2'"),
    (["--algo", "ppo"], "unknown --algo 'ppo'"),
    (["--loss_type", "mean"], "unknown --loss_type"),
    (["--scale_rewards", "max"], "unknown --scale_rewards"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--model", "no/such/dir"], "no such checkpoint directory"),
    (["--train", "missing.jsonl"], "--train missing.jsonl: manifest file not found"),
    (["--algo", "grpo", "--train_projector"], "--train_projector works with --algo sft only"),
    (["--steps", "-2"], "--steps must be at least 0 (or -1, the task's default)"),
    (["--eval_audio", "noise"], "unknown --eval_audio 'noise'"),
    (["--eps", "1.5"], "--eps 1.5: need 0 < eps < 1"),
    (["--lr", "-2"], "--lr -2.0: need lr == -1 or lr >= 0"),
    (["--weight_decay", "-1"], "--weight_decay must be at least 0"),
    (["--threads", "-1"], "--threads must be at least 0"),
    (["--sft_batch_size", "0"], "--sft_batch_size must be at least 1"),
    (["--max_grad_norm", "-1"], "--max_grad_norm must be at least 0"),
    (["--lr_scheduler", "bogus"], "unknown --lr_scheduler 'bogus'"),
    (["--eval_top_p", "2"], "need 0 < eval_top_p <= 1"),
    (["--eval_top_p", "0"], "need 0 < eval_top_p <= 1"),
    (["--eval_limit", "-1"], "--eval_limit must be at least 0"),
    (["--keep_checkpoints", "0"], "--keep_checkpoints must be at least 1"),
    (["--save_every", "-1"], "--save_every must be at least 0"),
    (["--warmup_ratio", "5"], "need 0 <= warmup_ratio <= 1"),
    (["--temperature", "1e-9"], "--temperature 1e-09: need 0.1 <= temperature"),
    (["--beta", "-0.1"], "--beta must be at least 0"),
    (["--policy_shaping", "-1"], "--policy_shaping must be at least 0"),
    (["--examples", "-1"], "--examples must be at least 0"),
    (["--log_every", "-1"], "--log_every must be at least 0"),
    (["--model", "data/granite-speech-tinyy"], "no such checkpoint directory"),
    (["--model", "data"], "not a complete checkpoint directory, no config.json, model.safetensors"),
    (["--train", "data"], "--train data: a directory, not a manifest file"),
] + ([(["--device", "cuda"], "no CUDA GPU")] if not torch.cuda.is_available() else []))
def test_bad_options_are_rejected_before_any_model_loads(options, message, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(gs, "load_model", no_model)
    assert gs.main(options) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and error.count("\n") == 1


def test_steps_default_to_the_tasks_own():
    steps = {task: gs.check_config(gs.Config(task=task)).steps for task in ("ast", "sqa", "asr")}
    assert steps == {"ast": 400, "sqa": 200, "asr": 200}
    assert gs.check_config(gs.Config(task="ast", steps=7)).steps == 7
    assert gs.check_config(gs.Config(task="sqa", steps=0)).steps == 0


# ---------------------------------------------------------------------------------------------
# End to end through the real CLI, on the shipped tiny model and a handful of toy clips
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_data(toy, tmp_path_factory):
    """8 training and 6 test clips of toy AST, as manifests with absolute audio paths; every
    rendering is a reference, so the lines have 1-4 of them (a manifest may list several)."""
    folder = tmp_path_factory.mktemp("small")
    manifests = {}
    for split, count in (("train", 8), ("test", 6)):
        lines = [{"audio": ex["audio_path"], "translation": ex["translation"] + ex["other_translations"]}
                 for ex in toy[("ast", split)][:count]]
        manifests[split] = str(write_manifest(folder / f"{split}.jsonl", lines))
    return manifests


def run_cli(small_data, output_dir, *options):
    argv = ["--task", "ast", "--train", small_data["train"], "--test", small_data["test"],
            "--steps", "3", "--batch_size", "2", "--group_size", "4", "--eval_batch_size", "6",
            "--max_completion_length", "24", "--log_every", "0", "--output_dir", str(output_dir),
            *options]
    return gs.main(argv)


def read_metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "mp_grpo", "sft"])
def test_cli_trains_evaluates_and_saves(algo, small_data, tmp_path, capsys):
    assert run_cli(small_data, tmp_path, "--algo", algo) == 0
    out = capsys.readouterr().out
    assert "BLEU" in out and "nrefs:var" in out and "s/step" in out
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6 and set(predictions[0]) == {
        "where", "references", "before_sampled", "before_greedy", "after_sampled", "after_greedy"}
    assert oct((tmp_path / "final" / "model.safetensors").stat().st_mode & 0o777) == oct(
        (tmp_path / "final" / "config.json").stat().st_mode & 0o777)
    results = json.loads((tmp_path / "results.json").read_text())
    for when in ("before", "after"):
        for mode in ("sampled", "greedy"):
            assert 0.0 <= results[when][mode]["bleu"] <= 100.0
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(math.isfinite(v) for m in metrics for v in m.values() if isinstance(v, float))
    if algo != "sft":
        assert all(0.0 <= m["reward"] <= 1.0 and m["ratio"] == 1.0 and m["clip_fraction"] == 0.0
                   and 0.0 < m["entropy"] < math.log(1024) for m in metrics)   # the tiny vocabulary
    from transformers import GraniteSpeechForConditionalGeneration
    model = GraniteSpeechForConditionalGeneration.from_pretrained(tmp_path / "final")
    assert sum(p.numel() for p in model.parameters()) > 1_000_000


@pytest.mark.slow
def test_every_group_is_logged_and_one_is_shown(small_data, tmp_path, capsys):
    assert run_cli(small_data, tmp_path, "--algo", "mp_grpo", "--steps", "2", "--log_every", "2",
                   "--skip_base_eval", "--eval_limit", "1") == 0
    groups = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [g["step"] for g in groups] == [1, 1, 2, 2]                  # batch_size 2: two groups
    for group in groups:
        answers, rewards = group["answers"], torch.tensor(group["rewards"])
        assert len(answers) == 4 and group["injected"] == 3 and answers[3] == group["references"][0]
        assert rewards[3] == 1.0                                 # the reference against itself
        bleu = gs.bleu_rewards(answers, [group["references"]] * 4)
        assert torch.allclose(rewards, bleu, atol=1e-4)
        assert torch.allclose(torch.tensor(group["advantages"]), gs.group_advantages(bleu, 4), atol=1e-4)
    shown = capsys.readouterr().out                        # tqdm.write: above the progress bar
    assert shown.count("group of ") == 1 and shown.count("<- the reference, injected (MP-GRPO)") == 1
    assert f"{groups[2]['rewards'][0]:>7.3f} {groups[2]['advantages'][0]:>+9.3f}  {groups[2]['answers'][0]}" in shown


@pytest.mark.slow
def test_encode_once_sampling_matches_generate_with_features(small_data):
    """Our rollout on a batch of 3 (audio encoded once, prompts left-padded) answers as the
    library's generate(input_features=...) does on each clip alone."""
    cfg = gs.check_config(gs.Config(train=small_data["train"], test=small_data["test"]))
    processor, model = gs.load_model(cfg, torch.device("cpu"))
    examples = gs.load_manifest(cfg.test, "ast")[:3]
    batch = gs.make_batch(examples, processor, torch.device("cpu"))
    eos = model.config.text_config.eos_token_id
    ours = gs.sample(model, batch, gs.encode_audio(model, batch), 1, 20, greedy=True)
    for row, example in enumerate(examples):
        alone = gs.make_batch([example], processor, torch.device("cpu"))
        library = model.generate(input_ids=alone.input_ids, attention_mask=alone.attention_mask,
                                 input_features=alone.input_features[0][None],
                                 input_features_mask=alone.audio_mask, do_sample=False,
                                 max_new_tokens=20, pad_token_id=eos, eos_token_id=eos,
                                 suppress_tokens=[model.config.audio_token_id])
        answer = library[0, alone.input_ids.shape[1]:]
        assert torch.equal(ours[row, :len(answer)], answer), row


@pytest.mark.slow
def test_a_clip_is_encoded_the_same_alone_and_in_a_batch(small_data):
    """No padding reaches the encoder: the audio embeddings of a clip do not depend on the
    other clips of its batch (the conformer has no padding mask)."""
    cfg = gs.check_config(gs.Config(train=small_data["train"], test=small_data["test"]))
    processor, model = gs.load_model(cfg, torch.device("cpu"))
    examples = gs.load_manifest(cfg.test, "ast")[:4]
    lengths = [gs.load_audio(ex["audio_path"]).numel() for ex in examples]
    assert len(set(lengths)) == 4                      # different lengths: padding is needed
    batch = gs.make_batch(examples, processor, torch.device("cpu"))
    together = gs.encode_audio(model, batch)
    for row, example in enumerate(examples):
        alone = gs.encode_audio(model, gs.make_batch([example], processor, torch.device("cpu")))[0]
        real = batch.audio_mask[row]
        assert alone.shape[0] == int(real.sum())      # one embedding per <|audio|> token
        assert torch.equal(together[row][real], alone)


@pytest.mark.slow
def test_steps_0_evaluates_only_and_listening_checks(small_data, tmp_path, capsys):
    assert run_cli(small_data, tmp_path / "speech", "--steps", "0", "--eval_limit", "4") == 0
    results = json.loads((tmp_path / "speech" / "results.json").read_text())
    assert set(results["eval"]) == {"sampled", "greedy"}
    assert len(results["eval"]["greedy"]["predictions"]) == 4
    assert not (tmp_path / "speech" / "final").exists()
    # Every metric is recomputed here from the saved answers: corpus BLEU/TER from sacrebleu,
    # ROUGE as the mean sentence F1, avg over the six with TER flipped (100 - TER).
    import sacrebleu
    sampled = results["eval"]["sampled"]
    references = [gs.references_of(ex) for ex in gs.load_manifest(small_data["test"], "ast")[:4]]
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(max(map(len, references)))]
    assert sampled["bleu"] == pytest.approx(sacrebleu.corpus_bleu(sampled["predictions"], streams).score)
    assert sampled["ter"] == pytest.approx(sacrebleu.corpus_ter(sampled["predictions"], streams).score)
    rouge2 = [max(gs.rouge_f1(p, ref, 2) for ref in r) for p, r in zip(sampled["predictions"], references)]
    assert sampled["rouge2"] == pytest.approx(100 * sum(rouge2) / 4)
    six = [sampled[k] for k in ("bleu", "chrf", "rouge1", "rouge2", "rouge_l")] + [100 - sampled["ter"]]
    assert sampled["avg"] == pytest.approx(sum(six) / 6)
    assert run_cli(small_data, tmp_path / "silence", "--steps", "0", "--eval_limit", "4",
                   "--eval_audio", "silence") == 0
    silent = json.loads((tmp_path / "silence" / "results.json").read_text())["eval"]["greedy"]
    # One second of silence gives every clip the same audio, so the same greedy answer.
    assert len(set(silent["predictions"])) == 1
    assert "WER" in capsys.readouterr().out
    examples = gs.load_manifest(small_data["test"], "ast")[:3]
    shuffled = gs.replacement_audio(examples, [0, 2], "shuffled")         # the next one, wrapped
    assert torch.equal(shuffled[0], gs.load_audio(examples[1]["audio_path"]))
    assert torch.equal(shuffled[1], gs.load_audio(examples[0]["audio_path"]))
    # A batch of one still hears another clip (issue 21, case 11).
    for name, audio in (("speech-1", "speech"), ("shuffled-1", "shuffled")):
        assert run_cli(small_data, tmp_path / name, "--steps", "0", "--eval_limit", "4",
                       "--eval_batch_size", "1", "--eval_audio", audio) == 0
    own, other = (json.loads((tmp_path / n / "results.json").read_text())["eval"]["greedy"]["predictions"]
                  for n in ("speech-1", "shuffled-1"))
    assert own != other
    with pytest.raises(gs.UsageError, match="needs at least 2 test clips"):
        gs.replacement_audio(examples[:1], [0], "shuffled")


@pytest.mark.slow
def test_equal_rewards_give_no_update_and_no_nan(small_data, tmp_path, monkeypatch):
    monkeypatch.setitem(gs.REWARDS, "bleu", lambda completions, refs: torch.full((len(completions),), 0.5))
    assert run_cli(small_data, tmp_path, "--steps", "1", "--skip_base_eval") == 0
    (metrics,) = read_metrics(tmp_path)
    assert metrics["zero_std_groups"] == 1.0 and metrics["loss"] == 0.0 and metrics["kl"] == 0.0
    from safetensors.torch import load_file
    before = load_file(str(DATA / "granite-speech-tiny" / "model.safetensors"))
    after = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert all(torch.equal(before[k].float(), after[k].float()) for k in before)   # A = 0: no step


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(small_data, tmp_path, monkeypatch, capsys):
    real_loss, calls = gs.grpo_loss, []

    def nan_on_third_step(*args, **kwargs):
        loss, diagnostics = real_loss(*args, **kwargs)
        if loss.requires_grad:                      # the update's call, not the log's
            calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), diagnostics
    monkeypatch.setattr(gs, "grpo_loss", nan_on_third_step)
    assert run_cli(small_data, tmp_path, "--save_every", "2", "--skip_base_eval") == 1
    error = capsys.readouterr().err
    assert "step 3: loss is nan" in error and "checkpoint-000002" in error
    assert (tmp_path / "checkpoint-000002" / "model.safetensors").is_file()
    assert not (tmp_path / "final").exists() and [m["step"] for m in read_metrics(tmp_path)] == [1, 2]


@pytest.mark.slow
def test_interrupted_run_resumes_like_an_uninterrupted_one(small_data, tmp_path, monkeypatch, capsys):
    import os
    import signal
    options = ("--steps", "5", "--skip_base_eval", "--save_every", "10")
    assert run_cli(small_data, tmp_path / "straight", *options) == 0
    straight = read_metrics(tmp_path / "straight")

    real_step, calls = gs.grpo_step, []

    def ctrl_c_during_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)       # what Ctrl-C does; the step still finishes
        return real_step(*args, **kwargs)
    monkeypatch.setattr(gs, "grpo_step", ctrl_c_during_third_step)
    assert run_cli(small_data, tmp_path / "cut", *options) == 1
    checkpoint = tmp_path / "cut" / "checkpoint-000003"
    assert f"continue with: python grpo_speech.py --resume {checkpoint}" in capsys.readouterr().err
    assert [m["step"] for m in read_metrics(tmp_path / "cut")] == [1, 2, 3]
    monkeypatch.setattr(gs, "grpo_step", real_step)
    # A damaged file is named, before any model loads.
    broken = tmp_path / "broken" / "checkpoint-000003"
    shutil.copytree(checkpoint, broken)
    (broken / "trainer_state.pt").write_bytes((checkpoint / "trainer_state.pt").read_bytes()[:50])
    assert gs.main(["--resume", str(broken)]) == 2
    assert "trainer_state.pt is missing or damaged" in capsys.readouterr().err
    # The printed command alone: every other option comes back from the checkpoint.
    assert gs.main(["--resume", str(checkpoint)]) == 0
    resumed = read_metrics(tmp_path / "cut")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5]
    groups = (tmp_path / "cut" / "completions.jsonl").read_text().splitlines()
    assert [json.loads(g)["step"] for g in groups] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    for a, b in zip(straight, resumed):
        for key in ("loss", "reward", "kl", "completion_tokens", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert resumed[3]["seconds"] > resumed[2]["seconds"]         # the clock continues
    # Resuming at or past --steps trains nothing: refused, not a silent rewrite of final/.
    assert gs.main(["--resume", str(checkpoint), "--steps", "3"]) == 2
    assert "at step 3 and --steps is 3: nothing left to train" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_in_the_final_evaluation_keeps_the_model_and_divergence_stops(small_data, tmp_path,
                                                                            monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(gs, "evaluate", interrupt)
    assert run_cli(small_data, tmp_path / "a", "--steps", "1", "--skip_base_eval") == 130
    assert (tmp_path / "a" / "final" / "model.safetensors").is_file()
    assert "stopped: interrupted" in capsys.readouterr().err

    def diverged(*args, **kwargs):       # what torch.multinomial says once the logits are NaN
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    monkeypatch.setattr(gs, "sample", diverged)
    assert run_cli(small_data, tmp_path / "b", "--skip_base_eval") == 1
    assert "stopped: step 1: probability tensor contains" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_every_keeps_the_dev_best_model_and_reports_both(small_data, tmp_path, monkeypatch):
    dev = write_manifest(tmp_path / "dev.jsonl", Path(small_data["test"]).read_text().splitlines()[:3])
    real_evaluate, dev_scores = gs.evaluate, [10.0, 30.0, 20.0]      # steps 2, 4, 6: best is 4

    def scripted_dev(model, processor, examples, cfg, greedy, seed):
        if len(examples) == 3:
            return {"bleu": dev_scores.pop(0)}
        return real_evaluate(model, processor, examples, cfg, greedy, seed)
    monkeypatch.setattr(gs, "evaluate", scripted_dev)
    out = tmp_path / "run"
    assert run_cli(small_data, out, "--steps", "6", "--eval_every", "2", "--dev", str(dev),
                   "--save_every", "2", "--keep_checkpoints", "3", "--skip_base_eval",
                   "--lr", "1e-3") == 0
    assert [m.get("dev_bleu") for m in read_metrics(out)] == [None, 10.0, None, 30.0, None, 20.0]
    assert json.loads((out / "best" / "best.json").read_text()) == {"step": 4, "dev_bleu": 30.0}
    from safetensors.torch import load_file
    best, step4, last = (load_file(out / d / "model.safetensors")
                         for d in ("best", "checkpoint-000004", "checkpoint-000006"))
    assert all(torch.equal(best[k], step4[k]) for k in best)
    assert not all(torch.equal(best[k], last[k]) for k in best)
    results = json.loads((out / "results.json").read_text())
    assert results["best"]["step"] == 4 and 0 <= results["best"]["greedy"]["bleu"] <= 100
    assert "best_greedy" in json.loads((out / "predictions.jsonl").read_text().splitlines()[0])


@pytest.mark.slow
def test_evaluating_does_not_change_training(small_data, tmp_path):
    """The base evaluation and --eval_every's dev evaluations fork the RNG: a run with them
    samples the same answers and ends with the same weights as one without (docs/tuning.md
    compares runs made both ways)."""
    dev = write_manifest(tmp_path / "dev.jsonl", Path(small_data["test"]).read_text().splitlines()[:3])
    plain, evaluated = tmp_path / "plain", tmp_path / "evaluated"
    assert run_cli(small_data, plain, "--steps", "2", "--skip_base_eval", "--eval_limit", "2") == 0
    assert run_cli(small_data, evaluated, "--steps", "2", "--eval_every", "1", "--dev", str(dev),
                   "--eval_limit", "2") == 0
    one, two = read_metrics(plain), read_metrics(evaluated)
    assert [m["dev_bleu"] for m in two] and all("dev_bleu" not in m for m in one)
    for a, b in zip(one, two):
        assert [a[k] for k in ("loss", "grad_norm", "reward", "kl")] == [b[k] for k in ("loss", "grad_norm", "reward", "kl")]
    from safetensors.torch import load_file
    w1, w2 = (load_file(d / "final" / "model.safetensors") for d in (plain, evaluated))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.slow
@pytest.mark.parametrize("algo, lora", [("grpo", ()), ("sft", ()), ("grpo", ("--lora_rank", "4"))])
def test_micro_batch_size_changes_memory_not_the_update(algo, lora, small_data, tmp_path):
    # One step: the same loss and gradient norm (a second step would sample from weights that
    # differ in the last float bits, hence other completions).
    logged = {}
    for name, extra in (("one", ()), ("micro", ("--micro_batch_size", "3")),
                        ("checkpointed", ("--micro_batch_size", "3", "--gradient_checkpointing"))):
        assert run_cli(small_data, tmp_path / name, "--algo", algo, "--steps", "1",
                       "--skip_base_eval", "--eval_limit", "1", *lora, *extra) == 0
        logged[name] = read_metrics(tmp_path / name)[0]
    assert logged["one"]["grad_norm"] > 0
    for name in ("micro", "checkpointed"):
        for key in ("loss", "grad_norm", "kl", "ratio", "clip_fraction")[:2 if algo == "sft" else 5]:
            assert logged[name][key] == pytest.approx(logged["one"][key], rel=1e-5, abs=1e-7), (name, key)


# ---------------------------------------------------------------------------------------------
# A checkpoint shaped like the real ones (data/make_real_shape.py): Granite 3.3 multipliers,
# logits_scaling 8, and a LoRA audio adapter saved as peft saves it
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_shape(tmp_path_factory):
    sys.path.insert(0, str(DATA))
    import make_real_shape
    return make_real_shape.build(tmp_path_factory.mktemp("real-shape") / "model")


def test_real_shape_adapter_is_merged_exactly(real_shape):
    from safetensors.torch import load_file
    from transformers import GraniteSpeechForConditionalGeneration
    plain = GraniteSpeechForConditionalGeneration.from_pretrained(real_shape)     # no peft here
    _, merged = gs.load_model(gs.Config(model=str(real_shape)), torch.device("cpu"))
    assert merged.config.has_lora_adapter is False
    lora, scale = load_file(real_shape / "adapter_model.safetensors"), 8 / 4       # alpha / r
    for layer in range(2):
        for module in ("q_proj", "v_proj"):
            key = f"base_model.model.model.language_model.layers.{layer}.self_attn.{module}"
            W = getattr(plain.model.language_model.layers[layer].self_attn, module).weight
            expected = W + scale * lora[f"{key}.lora_B.weight"] @ lora[f"{key}.lora_A.weight"]
            got = getattr(merged.model.language_model.layers[layer].self_attn, module).weight
            assert torch.allclose(got, expected, atol=1e-6)
        k_proj = merged.model.language_model.layers[layer].self_attn.k_proj.weight    # untouched
        assert torch.equal(k_proj, plain.model.language_model.layers[layer].self_attn.k_proj.weight)


def test_real_shape_logits_scaling_is_applied_once(real_shape):
    _, model = gs.load_model(gs.Config(model=str(real_shape)), torch.device("cpu"))
    assert gs.logits_scale(model) == 8.0
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        unscaled = model.lm_head(out.hidden_states[-1])
        # Granite Speech's head does not divide by logits_scaling (the text-only Granite model
        # does). If transformers starts doing it, this fails and gs.logits_scale must go.
        assert torch.allclose(out.logits, unscaled, atol=1e-5)
        ours = gs.completion_logits(model, ids[:, :2], torch.ones(1, 2, dtype=torch.long), None, None, ids[:, 2:])
        assert torch.allclose(ours, unscaled[:, 1:3] / 8.0, atol=1e-5)


def test_real_shape_bad_adapter_is_one_line(real_shape, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(real_shape, broken)
    (broken / "adapter_model.safetensors").unlink()
    assert gs.main(["--model", str(broken), "--steps", "0", "--output_dir", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err.splitlines()[-1]           # after the loader's progress bar
    assert error.startswith("error: --model ") and "has_lora_adapter is set but the adapter cannot be read" in error


@pytest.mark.slow
def test_real_shape_trains_saves_reloads_and_resumes(real_shape, small_data, tmp_path):
    out = tmp_path / "run"
    # MP-GRPO: a random model's samples all score 0, the injected reference gives the signal
    assert run_cli(small_data, out, "--model", str(real_shape), "--steps", "2", "--save_every", "1",
                   "--eval_limit", "3", "--skip_base_eval", "--lr", "1e-3", "--algo", "mp_grpo") == 0
    metrics = read_metrics(out)
    assert all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)
    after = [json.loads(line)["after_greedy"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    # final/ is a plain checkpoint (adapter merged): it reloads to the same answers
    assert json.loads((out / "final" / "config.json").read_text())["has_lora_adapter"] is False
    assert not (out / "final" / "adapter_config.json").exists()
    assert gs.main(["--steps", "0", "--model", str(out / "final"), "--test", small_data["test"],
                    "--eval_limit", "3", "--max_completion_length", "24",
                    "--output_dir", str(tmp_path / "reload")]) == 0
    reloaded = json.loads((tmp_path / "reload" / "results.json").read_text())["eval"]["greedy"]["predictions"]
    assert reloaded == after
    # resume from step 1 with the printed command alone reproduces step 2
    shutil.rmtree(out / "final")
    assert gs.main(["--resume", str(out / "checkpoint-000001"), "--overwrite_output_dir"]) == 0
    assert read_metrics(out)[1]["loss"] == pytest.approx(metrics[1]["loss"], rel=1e-4, abs=1e-6)


def test_lora_layer_by_hand():
    torch.manual_seed(0)
    base = torch.nn.Linear(3, 2)
    layer = gs.LoRALinear(base, rank=2, alpha=4)                  # scale alpha / r = 2
    x = torch.randn(5, 3)
    assert torch.equal(layer(x), base(x))                         # B = 0: starts at the base model
    with torch.no_grad():
        layer.lora_B.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    assert torch.allclose(layer(x), base(x) + 2 * x @ layer.lora_A.T @ layer.lora_B.T)
    assert torch.allclose(x @ layer.merged_weight().T + base.bias, layer(x), atol=1e-6)
    with gs.lora_off(layer):
        assert torch.equal(layer(x), base(x))
    assert layer.enabled
    layer(x).sum().backward()
    assert base.weight.grad is None and layer.lora_A.grad is not None and layer.lora_B.grad is not None


@pytest.mark.slow
def test_real_shape_lora_trains_only_the_lora_saves_plain_and_resumes(real_shape, small_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(small_data, out, "--model", str(real_shape), "--steps", "2", "--save_every", "1",
                   "--eval_limit", "3", "--skip_base_eval", "--lr", "1e-2", "--algo", "mp_grpo",
                   "--lora_rank", "4") == 0
    assert "+ reference" not in capsys.readouterr().out          # no second model in memory
    metrics = read_metrics(out)
    # pi_ref is the LoRA switched off: equal to the policy at step 1, not after the update.
    assert metrics[0]["kl"] == 0.0 and metrics[1]["kl"] > 0
    before = gs.load_model(gs.Config(model=str(real_shape)), torch.device("cpu"))[1].state_dict()
    after = gs.load_model(gs.Config(model=str(out / "final")), torch.device("cpu"))[1].state_dict()
    assert set(after) == set(before)                              # a plain checkpoint: no lora_ keys
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("model.language_model.layers.") and k.endswith("proj.weight")
                           for k in changed)                      # encoder, projector, norms, embeddings kept
    after_answers = [json.loads(line)["after_greedy"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert gs.main(["--steps", "0", "--model", str(out / "final"), "--test", small_data["test"],
                    "--eval_limit", "3", "--max_completion_length", "24",
                    "--output_dir", str(tmp_path / "reload")]) == 0
    reloaded = json.loads((tmp_path / "reload" / "results.json").read_text())["eval"]["greedy"]["predictions"]
    assert reloaded == after_answers
    assert gs.main(["--resume", str(out / "checkpoint-000001"), "--lora_rank", "8"]) == 2
    assert "trainable.safetensors does not fit" in capsys.readouterr().err
    shutil.rmtree(out / "final")        # resume: the base model + the checkpoint's LoRA
    assert gs.main(["--resume", str(out / "checkpoint-000001"), "--overwrite_output_dir"]) == 0
    assert read_metrics(out)[1]["loss"] == pytest.approx(metrics[1]["loss"], rel=1e-4, abs=1e-6)
    assert read_metrics(out)[1]["kl"] == pytest.approx(metrics[1]["kl"], rel=1e-4)


# ---------------------------------------------------------------------------------------------
# torchrun: 2 CPU processes (gloo) x P prompts must train exactly like 1 process x 2P prompts
# ---------------------------------------------------------------------------------------------
RUNNER = '''
import dataclasses, sys, zlib
import torch
sys.path.insert(0, {root!r})
import grpo_speech as gs
real_sample = gs.sample


def per_prompt_sample(model, batch, audio_embeds, num_samples, max_new_tokens, *args, **kwargs):
    # Each prompt's group from its own seed, alone: the same completions whichever process
    # or batch the prompt lands in (the real rollout draws all prompts from one RNG stream).
    rows = []
    for p, example in enumerate(batch.examples):
        real = batch.attention_mask[p].bool()
        one = dataclasses.replace(batch, examples=[example], input_ids=batch.input_ids[p][real][None],
                                  attention_mask=batch.attention_mask[p][real][None],
                                  input_features=batch.input_features[p:p + 1],
                                  audio_mask=batch.audio_mask[p:p + 1])
        with torch.random.fork_rng():
            torch.manual_seed(zlib.crc32(example["where"].encode()))
            ids = real_sample(model, one, audio_embeds[p:p + 1], num_samples, max_new_tokens, *args, **kwargs)
        eos = model.config.text_config.eos_token_id
        rows.append(torch.nn.functional.pad(ids, (0, max_new_tokens - ids.shape[1]), value=eos))
    return torch.cat(rows)


gs.sample = per_prompt_sample
sys.exit(gs.main(sys.argv[1:]))
'''


def torchrun(*args, **kwargs):
    """`torchrun --standalone` on the CPU (gloo); a failed run's assertion shows what the
    processes themselves wrote, not only torchrun's summary of who failed."""
    import subprocess
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", *args],
                         capture_output=True, text=True, **kwargs)
    own = run.stderr.split("Traceback (most recent call last):\n  File \"<frozen runpy>\"")[0]
    assert run.returncode == 0, own[-3000:]
    return run


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(small_data, tmp_path):
    import subprocess
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(root=str(ROOT)))
    common = ["--task", "ast", "--train", small_data["train"], "--test", small_data["test"],
              "--steps", "2", "--group_size", "4", "--max_completion_length", "24", "--eval_limit", "3",
              "--skip_base_eval", "--lr", "2e-5", "--threads", "1", "--log_every", "0", "--examples", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(runner), *common, "--batch_size", "4",
                             "--output_dir", str(tmp_path / "single")], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun("--nproc_per_node", "2", str(runner), *common, "--batch_size", "2", "--output_dir",
             str(tmp_path / "ddp"), env=env)
    one, two = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert [m["step"] for m in two] == [1, 2]                      # written once, by rank 0
    assert one[0]["grad_norm"] > 0
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm", "reward", "reward_std", "kl", "completion_tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    from safetensors.torch import load_file
    w1, w2 = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("single", "ddp"))
    base = load_file(DATA / "granite-speech-tiny" / "model.safetensors")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
    assert any((w1[k] - base[k].float()).abs().max() > 1e-5 for k in w1)          # it trained
    results = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("single", "ddp")]
    assert results[1]["after"]["greedy"]["bleu"] == pytest.approx(results[0]["after"]["greedy"]["bleu"])


@pytest.mark.slow
def test_bench_real_size_steps_run_and_report_every_setting():
    """bench.py --real: the real architecture (random weights, 2 layers, narrow) through
    grpo_step for every setting, each row with its phases and the memory estimate."""
    import subprocess
    run = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--real", "2b", "--layers", "2",
                          "--device", "cpu", "--narrow", "--threads", "2"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {}
    for line in run.stdout.splitlines():
        if line.startswith(("float32", "bfloat16")):
            words = line.split()
            assert "out" not in words, line
            step, rollout, forward, backward, ref, optim, tokens_per_s, _, _, guess = map(float, words[-10:])
            phases = rollout + forward + backward + ref + optim           # printed to 0.01 s each
            assert 0.3 * step < phases <= step + 0.03 and tokens_per_s > 0
            rows[(words[0], words[1], words[-12], words[-11])] = guess     # dtype, trains, micro, ckpt
    assert len(rows) == 7
    # The estimate: LoRA below the whole LLM (no reference copy, few trainable weights), bf16
    # below float32, and without checkpointing more than with it.
    assert rows[("float32", "LoRA", "4", "on")] < rows[("float32", "LLM", "4", "on")]
    assert rows[("bfloat16", "LLM", "4", "on")] < rows[("float32", "LLM", "4", "on")]
    assert rows[("float32", "LLM", "4", "off")] > rows[("float32", "LLM", "4", "on")]
    assert "encoder, float32:" in run.stdout



# ---------------------------------------------------------------------------------------------
# A run owns its output directory, checks everything before it deletes, and writes whole files
# ---------------------------------------------------------------------------------------------
def test_nan_samples_in_a_float_wav_are_named_before_the_model_loads(tmp_path, monkeypatch):
    samples = sine()
    samples[100] = float("nan")
    write_wav(tmp_path / "nan.wav", samples, subtype="FLOAT")
    write_wav(tmp_path / "ok.wav", sine(), subtype="FLOAT")
    manifest = write_manifest(tmp_path / "m.jsonl", [{"audio": "ok.wav", "translation": ["a"]},
                                                     {"audio": "nan.wav", "translation": ["b"]}])
    with pytest.raises(gs.UsageError, match=r"m.jsonl:2: audio .*nan.wav has NaN or infinite samples"):
        gs.ensure_audio(gs.load_manifest(manifest, "ast"))


def test_a_runs_output_dir_is_not_a_model_and_resume_names_what_to_do(small_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(small_data, out, "--steps", "1", "--save_every", "1", "--skip_base_eval",
                   "--eval_limit", "1") == 0
    assert json.loads((out / "results.json").read_text())["world_size"] == 1
    saved = json.loads((out / "checkpoint-000001" / "run.json").read_text())
    assert saved["world_size"] == 1 and Path(saved["config"]["output_dir"]).is_absolute()
    capsys.readouterr()
    cases = [(["--steps", "0", "--model", str(out)], "not a complete checkpoint directory, no "
              "config.json, model.safetensors, processor_config.json, tokenizer.json (a run's model is in its final/"),
             (["--resume", str(out / "final")], "a model, not a resumable checkpoint (no run.json); "
              f"to train it further, start a run with --model {out / 'final'}"),
             (["--resume", str(out / "checkpoint-000001"), "--steps", "3", "--lora_rank", "4"],
              "a checkpoint of the whole LLM, not of a LoRA")]
    for options, message in cases:
        assert gs.main(options) == 2, options
        error = capsys.readouterr().err.strip().splitlines()[-1]       # after the resume note
        assert error.startswith("error: ") and message in error, error
    # Another world size is another global batch: refused, with the command that continues it.
    run_json = out / "checkpoint-000001" / "run.json"
    run_json.write_text(json.dumps({**saved, "world_size": 2}))
    assert gs.main(["--resume", str(out / "checkpoint-000001"), "--steps", "3"]) == 2
    assert ("the run had 2 process(es), a global batch of 4 prompts; this one has 1. Continue it "
            f"with: torchrun --nproc_per_node 2 grpo_speech.py --resume {out / 'checkpoint-000001'}"
            ) in capsys.readouterr().err
    assert gs.resume_command(Path("a b"), 1) == "python grpo_speech.py --resume 'a b'"


def run_files(folder):
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in Path(folder).rglob("*") if p.is_file()}


def test_nothing_is_deleted_or_overwritten_before_every_input_is_checked(small_data, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert run_cli(small_data, out, "--steps", "2", "--save_every", "1", "--skip_base_eval",
                       "--eval_limit", "1") == 0
    finished = run_files(b)
    capsys.readouterr()
    bad = write_manifest(tmp_path / "bad.jsonl", ['{"audio": "x.wav", "translation": ["a"]}', "{oops"])
    cases = [  # resuming run A into run B; replacing B with a bad manifest; evaluating B's model into B
        (["--resume", str(a / "checkpoint-000001"), "--output_dir", str(b)], f"--output_dir {b} holds another run's files"),
        (["--resume", str(a / "checkpoint-000001"), "--output_dir", str(b), "--overwrite_output_dir",
          "--train", str(bad)], "bad.jsonl:2: not valid JSON"),
        (["--train", str(bad), "--test", small_data["test"], "--output_dir", str(b), "--overwrite_output_dir"],
         "bad.jsonl:2: not valid JSON"),
        (["--steps", "0", "--model", str(b / "final"), "--test", small_data["test"], "--output_dir", str(b),
          "--overwrite_output_dir"], f"is inside --output_dir {b}, whose old files --overwrite_output_dir would delete")]
    for options, message in cases:
        assert gs.main(options) == 2, options
        error = capsys.readouterr().err.strip().splitlines()[-1]       # after the resume note
        assert error.startswith("error: ") and message in error, error
        assert run_files(b) == finished                 # B untouched, its lock released
    assert not (b / ".lock").exists()


def test_a_second_run_into_a_busy_output_dir_is_refused_and_a_stale_lock_taken_over(small_data, tmp_path, capsys):
    import socket
    import subprocess
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    assert run_cli(small_data, out, "--steps", "1", "--skip_base_eval", "--eval_limit", "1") == 2
    assert f"--output_dir {out} is in use by another run (process {os.getppid()}" in capsys.readouterr().err
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lock").write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname()}))
    assert run_cli(small_data, out, "--steps", "1", "--skip_base_eval", "--eval_limit", "1") == 0
    assert (out / "final").is_dir() and not (out / ".lock").exists()


@pytest.mark.slow
def test_relative_output_dir_resumes_into_the_same_folder_from_anywhere(small_data, tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert run_cli(small_data, "rel", "--steps", "2", "--save_every", "1", "--skip_base_eval",
                   "--eval_limit", "1") == 0
    shutil.rmtree(tmp_path / "here" / "rel" / "checkpoint-000002")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert gs.main(["--resume", str(tmp_path / "here" / "rel" / "checkpoint-000001")]) == 0
    assert [m["step"] for m in read_metrics(tmp_path / "here" / "rel")] == [1, 2]
    assert not any((tmp_path / "elsewhere").iterdir())


@pytest.mark.slow
def test_ctrl_c_in_the_last_step_finishes_the_run(small_data, tmp_path, monkeypatch, capsys):
    import signal
    real_step, calls = gs.grpo_step, []

    def ctrl_c_in_step_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)
    monkeypatch.setattr(gs, "grpo_step", ctrl_c_in_step_two)
    assert run_cli(small_data, tmp_path, "--steps", "2", "--skip_base_eval", "--eval_limit", "1") == 0
    assert "stop requested at the last step: writing final/" in capsys.readouterr().err
    assert (tmp_path / "final").is_dir() and (tmp_path / "results.json").is_file()
    assert not list(tmp_path.glob("checkpoint-*"))


@pytest.mark.slow
def test_a_full_disk_keeps_the_last_checkpoint_and_leaves_nothing_half_written(small_data, tmp_path, monkeypatch, capsys):
    real_state, calls = gs.plain_state_dict, []

    def disk_full_on_second_save(model):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_state(model)
    monkeypatch.setattr(gs, "plain_state_dict", disk_full_on_second_save)
    assert run_cli(small_data, tmp_path, "--save_every", "1", "--skip_base_eval", "--eval_limit", "1") == 1
    error = capsys.readouterr().err
    assert (f"stopped: cannot write {tmp_path / 'checkpoint-000002'} (No space left on device); nothing "
            f"half-written was left. Kept: {tmp_path / 'checkpoint-000001'}") in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000001", "completions.jsonl", "metrics.jsonl"]
    calls.clear()
    calls.append(1)                                  # now the next save (final/) fails
    assert run_cli(small_data, tmp_path / "b", "--steps", "1", "--skip_base_eval", "--eval_limit", "1") == 1
    assert "cannot write" in capsys.readouterr().err and not (tmp_path / "b" / "final").exists()
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".tmp")]


TORCHRUN_AUDIO = """
import sys, torch
sys.path.insert(0, {root!r})
import grpo_speech as gs
torch.distributed.init_process_group("gloo")
gs.ensure_audio(gs.load_manifest({manifest!r}, "ast"))
print("rank", gs.rank(), "ok")
"""


@pytest.mark.slow
def test_torchrun_on_a_fresh_clone_makes_the_toy_audio_once(tmp_path):
    """Two processes find a toy clip missing (and a stray non-JSON manifest in data/): one
    synthesizes it, the other waits; both go on."""
    example = gs.load_manifest(DATA / "ast" / "test.jsonl", "ast")[0]
    clip, stray = Path(example["audio_path"]), DATA / "ast" / "zz-stray-test.jsonl"
    original = clip.read_bytes()
    runner = tmp_path / "runner.py"
    runner.write_text(TORCHRUN_AUDIO.format(root=str(ROOT), manifest=str(DATA / "ast" / "test.jsonl")))
    try:
        stray.write_text("this is not JSON\n")
        clip.unlink()
        run = torchrun("--nproc_per_node", "2", str(runner), env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=600)
        assert "rank 0 ok" in run.stdout and "rank 1 ok" in run.stdout
        assert run.stderr.count("Synthesizing 1 missing toy clips") == 1
        assert "zz-stray-test.jsonl:1: not JSON (1 such lines skipped)" in run.stderr
        assert clip.read_bytes() == original
    finally:
        stray.unlink(missing_ok=True)
        if not clip.exists():
            clip.write_bytes(original)


def test_sigterm_outside_training_stops_like_ctrl_c(small_data, tmp_path, monkeypatch, capsys):
    import signal

    def terminated(*args, **kwargs):                 # what a scheduler sends mid-evaluation
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(gs, "evaluate", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert run_cli(small_data, tmp_path, "--steps", "0", "--eval_limit", "1") == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "stopped: interrupted"
    assert signal.getsignal(signal.SIGTERM) is before            # main puts the handler back
