"""Chapters 00-01 procedures: a short seeded run moves its metric the right way, and reproduces exactly."""

import pytest
import torch

from rlmt_edu.algorithms.pretrain import PretrainConfig, pretrain, split_corpus, unigram_nll
from rlmt_edu.algorithms.sft import SFTConfig, sft
from rlmt_edu.chapters import corpus_lines, sft_pairs
from rlmt_edu.model import ModelConfig, build_model
from rlmt_edu.world.vocab import world_tokenizer

SMALL = ModelConfig(n_layer=2, n_head=2, n_embd=64)


@pytest.fixture(scope="module")
def tokenizer():
    return world_tokenizer()


def test_pretrain_short_run_lowers_loss_and_beats_unigram(tokenizer):
    config = PretrainConfig(steps=120, batch_size=16, eval_every=60, model=SMALL)
    _, history = pretrain(corpus_lines(), tokenizer, config, device="cpu", progress=False)
    losses = history.series("loss/train")[1]
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10
    assert history.last("eval/heldout_nll") < history.last("eval/unigram_nll")


def test_pretrain_same_seed_same_numbers(tokenizer):
    config = PretrainConfig(steps=8, batch_size=4, eval_every=4, model=SMALL)
    runs = [pretrain(corpus_lines(), tokenizer, config, device="cpu", progress=False)[1] for _ in range(2)]
    assert runs[0].series("loss/train") == runs[1].series("loss/train")


def test_split_corpus_is_seeded_and_disjoint():
    lines = [f"line {i}" for i in range(100)]
    train, heldout = split_corpus(lines, 0.1, seed=3)
    assert len(heldout) == 10 and not set(train) & set(heldout)
    assert split_corpus(lines, 0.1, seed=3) == (train, heldout)


def test_unigram_nll_of_a_uniform_stream_is_log_vocab():
    stream = torch.arange(10).repeat(50)
    assert unigram_nll(stream, stream, vocab_size=10) == pytest.approx(torch.log(torch.tensor(10.0)).item(), abs=1e-3)


def test_sft_short_run_lowers_the_eq2_loss(tokenizer):
    model = build_model(tokenizer, SMALL, seed=0)
    history = sft(model, tokenizer, sft_pairs()[:64], SFTConfig(steps=40, batch_size=16, learning_rate=2e-3), progress=False)
    losses = history.series("loss/sft")[1]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_sft_answer_only_mask_ignores_the_question(tokenizer):
    """With answer_only the loss counts answer tokens only, so it is smaller than the full-text loss."""
    pairs = sft_pairs()[:16]
    losses = {}
    for answer_only in (True, False):
        model = build_model(tokenizer, SMALL, seed=0)
        config = SFTConfig(steps=1, batch_size=16, answer_only=answer_only)
        losses[answer_only] = sft(model, tokenizer, pairs, config, progress=False).last("loss/sft")
    assert losses[True] < losses[False]


@pytest.mark.parametrize(
    "field, value",
    [("steps", 0), ("batch_size", -1), ("window", 1000), ("heldout_fraction", 1.5), ("learning_rate", 0.0)],
)
def test_pretrain_config_rejects(field, value):
    with pytest.raises(ValueError, match=field):
        PretrainConfig(**{field: value})


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", 0), ("learning_rate", -1.0)])
def test_sft_config_rejects(field, value):
    with pytest.raises(ValueError, match=field):
        SFTConfig(**{field: value})


def test_sft_rejects_empty_pairs(tokenizer):
    with pytest.raises(ValueError, match="pairs"):
        sft(build_model(tokenizer, SMALL), tokenizer, [], progress=False)


def test_pretrain_rejects_empty_corpus(tokenizer):
    with pytest.raises(ValueError, match="lines"):
        pretrain([], tokenizer, progress=False)
