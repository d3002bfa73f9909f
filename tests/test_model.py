"""The tiny GPT: building it, checkpoints (safetensors, atomic), and per-token log-probs of whole sequences."""

import json
import logging
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from rlmt_edu.model import (
    METADATA_FILE,
    ModelConfig,
    build_model,
    build_reward_model,
    build_value_model,
    config_dict,
    context_length,
    load_checkpoint,
    load_metadata,
    position_ids_from_mask,
    save_checkpoint,
    sequence_logprobs,
)
from rlmt_edu.tokenizer import build_tokenizer

WORDS = (
    "a the cat dog cow spider bird fish has is lives in on farm sea forest legs what how many does "
    "plus minus 0 1 2 3 4 5 6 7 8 . ? , eats grass meat red blue says moo woof"
).split()
SMALL = ModelConfig(n_layer=2, n_head=2, n_embd=32, n_positions=24)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(WORDS)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(tokenizer, SMALL, seed=0)


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


# ---- building -------------------------------------------------------------------------------------------


def test_build_emits_no_warnings_and_no_transformers_log(tokenizer):
    handler = _Collect()
    root = hf_logging.get_logger("transformers")
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = build_model(tokenizer)
            model.generate(input_ids=torch.tensor([_ids(tokenizer, "<USER> a cat <MODEL>")]),
                           attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=2, do_sample=False)
    finally:
        root.removeHandler(handler)
    assert [str(w.message) for w in caught] == []
    assert [m for m in handler.messages if "warn" in m.lower() or "recommend" in m.lower()] == []


def test_special_ids_are_inside_the_vocabulary(tokenizer, model):
    config = model.config
    assert config.vocab_size == len(tokenizer) == model.get_input_embeddings().num_embeddings
    assert config.eos_token_id == config.bos_token_id == tokenizer.convert_tokens_to_ids("<EOS>")
    assert config.pad_token_id == tokenizer.convert_tokens_to_ids("<PAD>")
    for token_id in (config.eos_token_id, config.bos_token_id, config.pad_token_id):
        assert 0 <= token_id < config.vocab_size
    assert model.generation_config.pad_token_id == config.pad_token_id
    assert model.generation_config.eos_token_id == config.eos_token_id


def test_default_config_is_cpu_sized_and_fields_reach_gpt2(tokenizer):
    defaults = ModelConfig()
    assert (defaults.n_layer, defaults.n_head, defaults.n_embd, defaults.n_positions) == (4, 4, 128, 64)
    model = build_model(tokenizer, SMALL)
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (2, 2, 32)
    assert context_length(model) == SMALL.n_positions == 24
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.transformer.wte.weight
    assert not model.training
    assert ModelConfig(**json.loads(json.dumps(config_dict(SMALL)))) == SMALL


def test_build_is_seeded_and_leaves_the_global_rng_alone(tokenizer):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(tokenizer, SMALL, seed=5)
    assert torch.equal(torch.rand(3), expected_next)  # building drew from a forked RNG
    b = build_model(tokenizer, SMALL, seed=5)
    c = build_model(tokenizer, SMALL, seed=6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.transformer.h[0].attn.c_attn.weight, c.transformer.h[0].attn.c_attn.weight)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"n_embd": 30, "n_head": 4}, "n_head"),
        ({"n_layer": 0}, "n_layer"),
        ({"n_positions": 2.5}, "n_positions"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"layer_norm_epsilon": 0.0}, "layer_norm_epsilon"),
    ],
)
def test_bad_model_config_is_rejected(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        ModelConfig(**kwargs)


def test_build_rejects_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="seed"):
        build_model(tokenizer, SMALL, seed=-1)
    with pytest.raises(ValueError, match="config"):
        build_model(tokenizer, {"n_layer": 2})


# ---- checkpoints ----------------------------------------------------------------------------------------


def _logits(model, tokenizer):
    ids = torch.tensor([_ids(tokenizer, "<USER> how many legs does a spider have ? <MODEL> a spider has")])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_save_load_round_trip_gives_identical_logits_tokenizer_and_metadata(tmp_path, tokenizer, model):
    meta = {"config": config_dict(SMALL), "metrics": {"loss": 1.25}}
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", metadata=meta)
    loaded, loaded_tokenizer = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(_logits(loaded, loaded_tokenizer), _logits(model, tokenizer))
    text = "<USER> what is 3 plus 4 ? <MODEL> 3 plus 4 is 7 . <EOS>"
    assert loaded_tokenizer.encode(text, add_special_tokens=False) == _ids(tokenizer, text)
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    assert loaded_tokenizer.eos_token_id == tokenizer.eos_token_id
    assert load_metadata(tmp_path / "ckpt") == meta
    assert not loaded.training


def test_checkpoint_is_safetensors_only_and_loads_without_unpickling(tmp_path, tokenizer, model, monkeypatch):
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert METADATA_FILE not in names and load_metadata(tmp_path / "ckpt") == {}

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(_logits(loaded, tokenizer), _logits(model, tokenizer))


def test_plain_transformers_loads_a_saved_checkpoint(tmp_path, tokenizer, model):
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", use_safetensors=True, local_files_only=True)
    plain_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ckpt", local_files_only=True)
    assert type(plain).__name__ == "GPT2LMHeadModel"
    assert len(plain_tokenizer) == len(tokenizer)
    assert torch.equal(_logits(plain.eval(), plain_tokenizer), _logits(model, tokenizer))


def test_saving_leaves_no_temporary_folder_and_overwrites(tmp_path, tokenizer, model):
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", metadata={"round": 1})
    other = build_model(tokenizer, SMALL, seed=1)
    save_checkpoint(other, tokenizer, tmp_path / "ckpt", metadata={"round": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(_logits(loaded, tokenizer), _logits(other, tokenizer))
    assert load_metadata(tmp_path / "ckpt") == {"round": 2}


def test_a_failing_write_leaves_the_old_checkpoint_intact(tmp_path, tokenizer, model, monkeypatch):
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", metadata={"round": 1})
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "ckpt").iterdir())
    other = build_model(tokenizer, SMALL, seed=1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    # the model weights are written first, then the tokenizer save crashes half-way through the checkpoint
    monkeypatch.setattr(type(tokenizer), "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(other, tokenizer, tmp_path / "ckpt", metadata={"round": 2})
    monkeypatch.undo()
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "ckpt").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(_logits(loaded, tokenizer), _logits(model, tokenizer))


def test_unserialisable_metadata_is_rejected_before_writing(tmp_path, tokenizer, model):
    with pytest.raises(ValueError, match="metadata"):
        save_checkpoint(model, tokenizer, tmp_path / "ckpt", metadata={"tensor": torch.ones(2)})
    with pytest.raises(ValueError, match="metadata"):
        save_checkpoint(model, tokenizer, tmp_path / "ckpt", metadata={"loss": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_loading_something_that_is_not_a_checkpoint_names_path(tmp_path, tokenizer, model):
    with pytest.raises(ValueError, match="path.*no such folder"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="path.*config.json"):
        load_checkpoint(tmp_path / "empty")
    # a tokenizer alone is not a model checkpoint
    tokenizer.save_pretrained(tmp_path / "tokenizer_only")
    with pytest.raises(ValueError, match="path"):
        load_checkpoint(tmp_path / "tokenizer_only")
    # a config without weights is not one either
    model.config.save_pretrained(tmp_path / "config_only")
    with pytest.raises(ValueError, match="path.*safetensors"):
        load_checkpoint(tmp_path / "config_only")
    # weights without a tokenizer cannot be used either
    model.save_pretrained(tmp_path / "model_only")
    with pytest.raises(ValueError, match="path.*tokenizer"):
        load_checkpoint(tmp_path / "model_only")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="path"):
        load_checkpoint(tmp_path / "a_file")


# ---- critic and reward model: the same trunk with a scalar head ------------------------------------------


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory, tokenizer, model):
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("lm") / "ckpt")


def test_value_model_is_the_trunk_with_a_seeded_dropout_free_head_per_token(lm_folder, tokenizer, model):
    handler = _Collect()
    hf_logging.get_logger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            critic = build_value_model(lm_folder)
    finally:
        hf_logging.get_logger("transformers").removeHandler(handler)
    assert [str(w.message) for w in caught] == [] and handler.messages == []
    for (name, p_lm), p_critic in zip(model.transformer.named_parameters(), critic.transformer.parameters()):
        assert torch.equal(p_lm, p_critic), name
    ids = torch.tensor([_ids(tokenizer, "<USER> a cat <MODEL> moo <EOS>")])
    critic.train()  # no dropout anywhere: train mode gives the same values twice
    values = critic(input_ids=ids).logits  # (1, T, 1)
    assert values.shape == (1, ids.shape[1], 1)
    torch.testing.assert_close(critic(input_ids=ids).logits, values, atol=0, rtol=0)
    torch.manual_seed(9)
    expected_next = torch.rand(2)
    torch.manual_seed(9)
    again, other = build_value_model(lm_folder), build_value_model(lm_folder, seed=1)
    assert torch.equal(torch.rand(2), expected_next)  # the global RNG was left alone
    assert torch.equal(again.classifier.weight, critic.classifier.weight)
    assert not torch.equal(other.classifier.weight, critic.classifier.weight)


def test_reward_model_reads_the_last_real_token_and_round_trips(lm_folder, tokenizer, tmp_path):
    reward_model = build_reward_model(lm_folder)
    short = _ids(tokenizer, "<USER> a cat <MODEL> moo <EOS>")
    long = _ids(tokenizer, "<USER> a dog <MODEL> a dog says woof . <EOS>")
    pad = tokenizer.pad_token_id
    batch = torch.tensor([short + [pad] * (len(long) - len(short)), long])  # right-padded
    mask = (torch.arange(len(long))[None] < torch.tensor([[len(short)], [len(long)]])).long()
    with torch.no_grad():
        rewards = reward_model(input_ids=batch, attention_mask=mask).logits[:, 0]  # (2,)
        alone = reward_model(input_ids=torch.tensor([short])).logits[:, 0]
    assert rewards.shape == (2,)
    torch.testing.assert_close(rewards[0], alone[0], atol=1e-5, rtol=0)
    with torch.no_grad():
        reward_model.score.weight.add_(0.5)  # "train" the head, then save and load it back
    save_checkpoint(reward_model, tokenizer, tmp_path / "rm")
    loaded = build_reward_model(tmp_path / "rm")
    assert torch.equal(loaded.score.weight, reward_model.score.weight)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=batch, attention_mask=mask).logits,
                                   reward_model(input_ids=batch, attention_mask=mask).logits, atol=0, rtol=0)


def test_scalar_head_models_reject_what_is_not_a_checkpoint(tmp_path, lm_folder):
    for build in (build_value_model, build_reward_model):
        with pytest.raises(ValueError, match="init.*no such folder"):
            build(tmp_path / "missing")
        with pytest.raises(ValueError, match="seed"):
            build(lm_folder, seed=-1)


# ---- per-token log-probs --------------------------------------------------------------------------------


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]])
    assert torch.equal(position_ids_from_mask(mask), expected)


def test_sequence_logprobs_is_log_softmax_at_the_next_token(tokenizer, model):
    ids = torch.tensor([_ids(tokenizer, "<USER> what is 3 plus 4 ? <MODEL> 7 . <EOS>")])  # (1, L)
    logp = sequence_logprobs(model, ids, torch.ones_like(ids))  # (1, L-1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]  # (L, V)
    naive = torch.stack([torch.log_softmax(logits[t], -1)[ids[0, t + 1]] for t in range(ids.shape[1] - 1)])
    assert logp.shape == (1, ids.shape[1] - 1)
    torch.testing.assert_close(logp[0], naive, atol=1e-6, rtol=0)
    hot = sequence_logprobs(model, ids, torch.ones_like(ids), temperature=0.5)
    naive_hot = torch.stack([torch.log_softmax(logits[t] / 0.5, -1)[ids[0, t + 1]] for t in range(ids.shape[1] - 1)])
    torch.testing.assert_close(hot[0], naive_hot, atol=1e-5, rtol=0)


def test_left_and_right_padded_rows_get_the_same_logprobs_as_alone(tokenizer, model):
    short = _ids(tokenizer, "<USER> a cat <MODEL> moo <EOS>")
    long = _ids(tokenizer, "<USER> how many legs does a spider have ? <MODEL> 8 <EOS>")
    pad, gap = tokenizer.pad_token_id, len(long) - len(short)
    alone = sequence_logprobs(model, torch.tensor([short]), torch.ones(1, len(short), dtype=torch.long))[0]
    left = torch.tensor([[pad] * gap + short, long])
    left_mask = torch.tensor([[0] * gap + [1] * len(short), [1] * len(long)])
    right = torch.tensor([short + [pad] * gap, long])
    right_mask = torch.tensor([[1] * len(short) + [0] * gap, [1] * len(long)])
    left_logp = sequence_logprobs(model, left, left_mask)  # (2, L-1)
    right_logp = sequence_logprobs(model, right, right_mask)  # (2, L-1)
    torch.testing.assert_close(left_logp[0, gap:], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(right_logp[0, : len(short) - 1], alone, atol=1e-5, rtol=0)
    # entries whose token is padding, or that have only padding before them, are exactly 0
    assert torch.equal(left_logp[0, :gap], torch.zeros(gap))
    assert torch.equal(right_logp[0, len(short) - 1:], torch.zeros(gap))
    # and without position ids from the mask the left-padded row would differ: the test can fail
    with torch.no_grad():
        shifted = model(input_ids=left, attention_mask=left_mask).logits[0, gap:-1]
    shifted_logp = torch.log_softmax(shifted, -1).gather(-1, torch.tensor(short[1:])[:, None])[:, 0]
    assert (shifted_logp - alone).abs().max() > 1e-4


def test_sequence_logprobs_gradients_are_finite_with_padding(tokenizer):
    model = build_model(tokenizer, SMALL, seed=3)
    short = _ids(tokenizer, "<USER> a cow <MODEL> moo <EOS>")
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad, pad] + short, short + [pad, pad]])
    mask = torch.tensor([[0, 0] + [1] * len(short), [1] * len(short) + [0, 0]])
    sequence_logprobs(model, ids, mask).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_sequence_logprobs_rejects_bad_inputs(tokenizer, model):
    ids = torch.tensor([_ids(tokenizer, "<USER> a cat <MODEL> moo")])
    ones = torch.ones_like(ids)
    too_long = torch.full((1, SMALL.n_positions + 1), 7)
    with pytest.raises(ValueError, match="input_ids.*context"):
        sequence_logprobs(model, too_long, torch.ones_like(too_long))
    with pytest.raises(ValueError, match="attention_mask"):
        sequence_logprobs(model, ids, ones[:, :-1])
    with pytest.raises(ValueError, match="attention_mask"):
        sequence_logprobs(model, ids, ones * 2)
    with pytest.raises(ValueError, match="input_ids"):
        sequence_logprobs(model, ids[:, :1], ones[:, :1])
    with pytest.raises(ValueError, match="input_ids"):
        sequence_logprobs(model, ids.float(), ones)
    with pytest.raises(ValueError, match="temperature"):
        sequence_logprobs(model, ids, ones, temperature=0.0)
    with pytest.raises(ValueError, match="input_ids.*token ids"):
        sequence_logprobs(model, ids + 1000, ones)
