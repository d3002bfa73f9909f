"""The sampler (Figure 1): agrees with ``generate``, its log-probs with a full forward pass, its lean GPT-2
forward with the ``transformers`` one; seeded, stops at <EOS>, rejects bad input."""

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlmt_edu.model import ModelConfig, build_model, position_ids_from_mask, sequence_logprobs
from rlmt_edu.rollout import LeanGPT2, Rollout, left_pad, policy_logits, policy_logprobs, sample
from rlmt_edu.tokenizer import build_tokenizer

WORDS = (
    "a the cat dog cow spider bird fish has is lives in on farm sea forest legs what how many does "
    "plus minus 0 1 2 3 4 5 6 7 8 . ? , eats grass meat red blue says moo woof"
).split()
# a larger initialisation than the default makes a random model's greedy continuations varied (with the default
# 0.02 it repeats the last prompt token), so that "equals generate" and the EOS tests are not trivially met
CONFIG = ModelConfig(n_layer=2, n_head=4, n_embd=64, n_positions=32, initializer_range=0.2)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(WORDS)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(tokenizer, CONFIG, seed=0)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = [
        "<USER> how many legs does a spider have ? <MODEL>",
        "<USER> a cat <MODEL>",
        "<USER> what is 3 plus 4 ? <MODEL>",
        "<MODEL>",
    ]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def _ids(tokenizer):
    return {"eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id}


def _generate(model, prompt_ids, prompt_mask, max_new_tokens, **kwargs):
    out = model.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens, do_sample=False, **kwargs
    )
    return out[:, prompt_ids.shape[1]:]


# ---- the lean forward is the same function as transformers' GPT-2 ----------------------------------------


def test_lean_forward_equals_hf_logits_on_full_left_padded_sequences(model, prompts, tokenizer):
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)  # (B, P)
    lean = LeanGPT2(model, ids.shape[0], ids.shape[1])
    with torch.no_grad():
        ours = lean.forward(ids, position_ids_from_mask(mask), mask, all_logits=True)  # (B, P, V)
        theirs = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    real = mask.bool()
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)
    assert bool(torch.isfinite(ours).all())  # padding rows too: no NaN from all-masked attention


def test_the_lean_backend_gives_the_hf_log_probs_and_gradients(model, prompts, tokenizer):
    """``sequence_logprobs(backend="lean")``: LeanGPT2 without a cache, differentiable, the same numbers."""
    from rlmt_edu.model import sequence_logprobs

    ids, mask = left_pad(prompts, tokenizer.pad_token_id)  # (B, P)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for backend in ("hf", "lean", "auto"):
        logp = sequence_logprobs(model, ids, mask, backend=backend)  # (B, P-1)
        results[backend] = (logp.detach(), torch.autograd.grad(logp.sum(), params))
    for backend in ("lean", "auto"):
        torch.testing.assert_close(results[backend][0], results["hf"][0], atol=1e-5, rtol=0)
        for ours, theirs in zip(results[backend][1], results["hf"][1]):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="backend: expected one of"):
        sequence_logprobs(model, ids, mask, backend="fast")
    dropping = build_model(tokenizer, dataclasses.replace(CONFIG, dropout=0.1), seed=0).train()
    with pytest.raises(ValueError, match="backend: 'lean' needs a plain GPT-2 model without active dropout"):
        sequence_logprobs(dropping, ids, mask, backend="lean")
    auto = sequence_logprobs(dropping.eval(), ids, mask, backend="auto")  # eval(): no dropout, lean is allowed
    torch.testing.assert_close(auto, sequence_logprobs(dropping, ids, mask), atol=1e-5, rtol=0)


def test_lean_forward_equals_hf_logits_step_by_step_with_the_cache(model, prompts, tokenizer):
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    batch, prompt_length = ids.shape
    new_tokens = torch.randint(7, len(tokenizer), (batch, 5), generator=torch.Generator().manual_seed(0))
    lean = LeanGPT2(model, batch, prompt_length + 5)
    with torch.no_grad():
        step_logits = [lean(ids, position_ids_from_mask(mask), mask)]  # (B, V)
        for t in range(5):
            token = new_tokens[:, t:t + 1]  # (B, 1)
            positions = mask.sum(1, keepdim=True) + t  # (B, 1)
            step_logits.append(lean(token, positions, torch.ones_like(token)))
        full_ids = torch.cat([ids, new_tokens], 1)
        full_mask = torch.cat([mask, torch.ones_like(new_tokens)], 1)
        full_positions = position_ids_from_mask(full_mask)
        full = model(input_ids=full_ids, attention_mask=full_mask, position_ids=full_positions).logits
    for t, logits in enumerate(step_logits):
        torch.testing.assert_close(logits, full[:, prompt_length - 1 + t], atol=1e-5, rtol=0)


def test_lean_forward_follows_the_current_weights(tokenizer, prompts):
    model = build_model(tokenizer, CONFIG, seed=1)
    ids, mask = left_pad(prompts[:1], tokenizer.pad_token_id)
    before = LeanGPT2(model, 1, ids.shape[1])(ids, position_ids_from_mask(mask), mask)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(3.0)  # e.g. an optimizer step
    after = LeanGPT2(model, 1, ids.shape[1])(ids, position_ids_from_mask(mask), mask)
    with torch.no_grad():
        expected = model(input_ids=ids).logits[:, -1]
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=0)


# ---- sampling ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "hf"])
def test_greedy_sampling_equals_generate(model, prompts, tokenizer, backend):
    rollout = sample(model, prompts, max_new_tokens=12, greedy=True, backend=backend, **_ids(tokenizer))
    expected = _generate(model, rollout.prompt_ids, rollout.prompt_mask, 12)
    assert torch.equal(rollout.response_ids, expected)
    assert rollout.prompt_ids.shape == (4, max(len(p) for p in prompts))
    # left padding: every prompt ends in the last column
    assert bool((rollout.prompt_mask[:, -1] == 1).all())
    for row, ids in enumerate(prompts):
        assert rollout.prompt_ids[row, -len(ids):].tolist() == ids
        assert int(rollout.prompt_mask[row].sum()) == len(ids)


def test_cached_logprobs_equal_a_full_forward_pass(model, prompts, tokenizer):
    rollout = sample(model, prompts, max_new_tokens=10, generator=torch.Generator().manual_seed(1), **_ids(tokenizer))
    full = sequence_logprobs(model, *rollout.sequences())  # (B, P+N-1)
    torch.testing.assert_close(full[:, rollout.response_slice] * rollout.response_mask, rollout.logp, atol=1e-5, rtol=0)
    rescored = policy_logprobs(model, rollout)  # (B, N)
    torch.testing.assert_close(rescored, rollout.logp, atol=1e-5, rtol=0)
    assert bool((rollout.logp[rollout.response_mask.bool()] < 0).all())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_policy_logits_are_the_distributions_the_sampled_tokens_were_scored_under(model, prompts, tokenizer,
                                                                                temperature):
    rollout = sample(model, prompts, max_new_tokens=8, temperature=temperature,
                     generator=torch.Generator().manual_seed(3), **_ids(tokenizer))
    logits = policy_logits(model, rollout, temperature=temperature)  # (B, N, V)
    assert logits.shape == (*rollout.response_ids.shape, model.config.vocab_size)
    picked = torch.log_softmax(logits, -1).gather(-1, rollout.response_ids[..., None])[..., 0]  # (B, N)
    torch.testing.assert_close(picked * rollout.response_mask, rollout.logp, atol=1e-5, rtol=0)


def test_policy_logits_rejects_what_is_not_a_rollout(model):
    with pytest.raises(ValueError, match="rollout: expected a Rollout"):
        policy_logits(model, "not a rollout")


def test_logprobs_are_under_the_tempered_distribution(model, prompts, tokenizer):
    rollout = sample(model, prompts, max_new_tokens=6, temperature=0.7,
                     generator=torch.Generator().manual_seed(2), **_ids(tokenizer))
    assert rollout.temperature == 0.7
    torch.testing.assert_close(policy_logprobs(model, rollout, temperature=0.7), rollout.logp, atol=1e-5, rtol=0)
    assert (policy_logprobs(model, rollout) - rollout.logp).abs().max() > 1e-3  # the untempered π differs


def test_policy_logprobs_has_gradients(tokenizer, prompts):
    model = build_model(tokenizer, CONFIG, seed=4)
    rollout = sample(model, prompts, max_new_tokens=4, generator=torch.Generator().manual_seed(0), **_ids(tokenizer))
    logp = policy_logprobs(model, rollout)
    assert logp.requires_grad and not rollout.logp.requires_grad
    logp.sum().backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    assert float(model.transformer.wte.weight.grad.abs().sum()) > 0


def test_rollout_tensors_can_enter_a_loss_with_gradients(tokenizer, prompts):
    model = build_model(tokenizer, CONFIG, seed=5)
    rollout = sample(model, prompts, max_new_tokens=4, generator=torch.Generator().manual_seed(0), **_ids(tokenizer))
    assert not any(x.is_inference() for x in (rollout.prompt_ids, rollout.response_ids, rollout.logp,
                                               rollout.response_mask, rollout.prompt_mask))
    ratio = torch.exp(policy_logprobs(model, rollout) - rollout.logp)  # (B, N)
    loss = -(ratio * rollout.response_mask).sum() / rollout.response_mask.sum()
    loss.backward()
    torch.testing.assert_close(ratio.detach() * rollout.response_mask, rollout.response_mask.float(), atol=1e-5, rtol=0)
    assert float(model.transformer.wpe.weight.grad.abs().sum()) > 0


def test_same_seed_same_samples_other_seed_other_samples(model, prompts, tokenizer):
    def draw(seed, **kwargs):
        return sample(model, prompts * 4, max_new_tokens=8, generator=torch.Generator().manual_seed(seed),
                      **_ids(tokenizer), **kwargs)

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logp, b.logp)
    assert not torch.equal(a.response_ids, c.response_ids)
    # the lean and the transformers forward draw the same tokens from the same seed
    assert torch.equal(draw(0, backend="hf").response_ids, a.response_ids)


def test_sampling_with_a_generator_leaves_the_global_rng_alone(model, prompts, tokenizer):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    sample(model, prompts, max_new_tokens=5, generator=torch.Generator().manual_seed(0), **_ids(tokenizer))
    assert torch.equal(torch.rand(3), expected)


def test_sampled_tokens_follow_the_tempered_model_distribution(model, tokenizer):
    # one prompt, many draws of the first token: empirical frequencies ≈ softmax(logits / temperature).
    # At temperature 0.5 the top token has p ≈ 0.32 (0.14 untempered, 0.02 uniform), so a sampler drawing
    # from the wrong distribution would be far off.
    prompt = tokenizer.encode("<USER> a cow <MODEL>", add_special_tokens=False)
    draws = 3000
    rollout = sample(model, [prompt] * draws, max_new_tokens=1, temperature=0.5,
                     generator=torch.Generator().manual_seed(0), **_ids(tokenizer))
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1] / 0.5, -1)  # (V,)
    assert probs.max() > 0.3
    freq = torch.bincount(rollout.response_ids[:, 0], minlength=probs.shape[0]).float() / draws
    assert (freq - probs).abs().max() < 0.035  # about 4 standard errors at p = 0.32
    torch.testing.assert_close(rollout.logp[:, 0], probs.log()[rollout.response_ids[:, 0]], atol=1e-5, rtol=0)


def test_rows_stop_at_eos_which_is_part_of_the_response(model, prompts, tokenizer):
    pad = tokenizer.pad_token_id
    free = sample(model, prompts, max_new_tokens=12, greedy=True, eos_id=None, pad_id=pad)
    rows = free.response_ids.tolist()
    # pretend that a token row 0 emits greedily (not first) is <EOS>, one that some other row never emits
    eos = next(tok for tok in rows[0][1:] if tok != pad and tok not in rows[0][:1] and any(tok not in r for r in rows))
    stopped = sample(model, prompts, max_new_tokens=12, greedy=True, eos_id=eos, pad_id=pad)
    assert stopped.response_ids.shape == (len(prompts), 12)  # a row that never emits <EOS> runs to the end
    expected = _generate(model, free.prompt_ids, free.prompt_mask, 12, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(stopped.response_ids, expected)
    for row, tokens in enumerate(rows):
        n = tokens.index(eos) + 1 if eos in tokens else 12
        assert stopped.response_ids[row, :n].tolist() == tokens[:n]
        assert stopped.response_mask[row].tolist() == [1] * n + [0] * (12 - n)
        assert stopped.response_ids[row, n:].tolist() == [pad] * (12 - n)
        assert stopped.logp[row, n:].tolist() == [0.0] * (12 - n)
        torch.testing.assert_close(stopped.logp[row, :n], free.logp[row, :n])
    assert 1 < int(stopped.response_lengths[0]) < 12
    assert stopped.response_ids[0, int(stopped.response_lengths[0]) - 1] == eos  # <EOS> is in the response
    _, attention_mask = stopped.sequences()
    assert torch.equal(attention_mask[:, stopped.prompt_ids.shape[1]:], stopped.response_mask)


def test_all_rows_ending_at_once_stops_the_loop(model, prompts, tokenizer):
    free = sample(model, prompts[:1], max_new_tokens=8, greedy=True, eos_id=None, pad_id=tokenizer.pad_token_id)
    eos = int(free.response_ids[0, 0])
    stopped = sample(model, prompts[:1], max_new_tokens=8, greedy=True, eos_id=eos, pad_id=tokenizer.pad_token_id)
    assert stopped.response_ids.tolist() == [[eos]] and stopped.response_mask.tolist() == [[1]]


def test_decode_gives_response_text_without_special_tokens(model, prompts, tokenizer):
    rollout = sample(model, prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(3), **_ids(tokenizer))
    texts = rollout.decode(tokenizer)
    assert len(texts) == len(prompts)
    for row, text in enumerate(texts):
        kept = [i for i, m in zip(rollout.response_ids[row].tolist(), rollout.response_mask[row].tolist()) if m]
        words = [w for w in tokenizer.convert_ids_to_tokens(kept) if w not in tokenizer.all_special_tokens]
        assert text.split() == words
        assert "<" not in text


def test_sampling_restores_training_mode(tokenizer, prompts):
    model = build_model(tokenizer, ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32, dropout=0.5)).train()
    a = sample(model, prompts, max_new_tokens=4, generator=torch.Generator().manual_seed(0), **_ids(tokenizer))
    assert model.training
    # dropout was off while sampling: the log-probs match an eval-mode forward pass
    torch.testing.assert_close(policy_logprobs(model.eval(), a), a.logp, atol=1e-5, rtol=0)


def test_a_non_gpt2_causal_lm_uses_its_own_forward(tokenizer, prompts):
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(config).eval()
    assert not LeanGPT2.supports(llama)
    rollout = sample(llama, prompts, max_new_tokens=6, greedy=True, **_ids(tokenizer))
    assert torch.equal(rollout.response_ids, _generate(llama, rollout.prompt_ids, rollout.prompt_mask, 6))
    drawn = sample(llama, prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(0), **_ids(tokenizer))
    torch.testing.assert_close(policy_logprobs(llama, drawn), drawn.logp, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="backend"):
        sample(llama, prompts, max_new_tokens=2, backend="lean", **_ids(tokenizer))


# ---- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), "1"])
def test_temperature_must_be_a_positive_number(model, prompts, tokenizer, temperature):
    with pytest.raises(ValueError, match="temperature"):
        sample(model, prompts, max_new_tokens=2, temperature=temperature, **_ids(tokenizer))


def test_prompts_longer_than_the_context_are_rejected(model, tokenizer):
    too_long = [[7] * (CONFIG.n_positions + 1)]
    with pytest.raises(ValueError, match="prompts.*context"):
        sample(model, too_long, max_new_tokens=1, **_ids(tokenizer))
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample(model, [[7] * (CONFIG.n_positions - 3)], max_new_tokens=4, **_ids(tokenizer))
    fits = sample(model, [[7] * (CONFIG.n_positions - 3)], max_new_tokens=3, eos_id=None,
                  pad_id=tokenizer.pad_token_id, greedy=True)
    assert fits.response_ids.shape == (1, 3)


@pytest.mark.parametrize("bad", [[], [[]], [[3, 4], []], "hello", [[3, -1]], [[3, 10_000]], [[3, 4.0]], [[True]]])
def test_empty_or_invalid_prompts_are_rejected(model, tokenizer, bad):
    with pytest.raises(ValueError, match="prompts"):
        sample(model, bad, max_new_tokens=2, **_ids(tokenizer))


def test_other_bad_arguments_are_rejected(model, prompts, tokenizer):
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    for max_new_tokens in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="max_new_tokens"):
            sample(model, prompts, max_new_tokens=max_new_tokens, eos_id=eos, pad_id=pad)
    with pytest.raises(ValueError, match="pad_id"):
        sample(model, prompts, max_new_tokens=2, eos_id=eos, pad_id=-1)
    with pytest.raises(ValueError, match="eos_id"):
        sample(model, prompts, max_new_tokens=2, eos_id=len(tokenizer), pad_id=pad)
    with pytest.raises(ValueError, match="greedy"):
        sample(model, prompts, max_new_tokens=2, greedy=1, eos_id=eos, pad_id=pad)
    with pytest.raises(ValueError, match="generator"):
        sample(model, prompts, max_new_tokens=2, generator=0, eos_id=eos, pad_id=pad)
    with pytest.raises(ValueError, match="backend"):
        sample(model, prompts, max_new_tokens=2, backend="vllm", eos_id=eos, pad_id=pad)
    with pytest.raises(ValueError, match="rollout"):
        policy_logprobs(model, {"response_ids": None})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_generator_must_live_on_the_model_device(tokenizer, prompts):
    model = build_model(tokenizer, CONFIG).to("cuda")
    with pytest.raises(ValueError, match="generator.*cuda"):
        sample(model, prompts, max_new_tokens=2, generator=torch.Generator(), **_ids(tokenizer))
    rollout = sample(model, prompts, max_new_tokens=4, generator=torch.Generator("cuda").manual_seed(0),
                     **_ids(tokenizer))
    assert rollout.response_ids.device.type == "cuda"
    torch.testing.assert_close(policy_logprobs(model, rollout), rollout.logp, atol=1e-4, rtol=0)


def test_rollout_is_a_plain_dataclass_of_tensors(model, prompts, tokenizer):
    rollout = sample(model, prompts, max_new_tokens=3, greedy=True, **_ids(tokenizer))
    assert isinstance(rollout, Rollout)
    batch, n = rollout.response_ids.shape
    assert rollout.response_mask.shape == rollout.logp.shape == (batch, n)
    assert rollout.logp.dtype == torch.float32 and rollout.response_ids.dtype == torch.long
    input_ids, attention_mask = rollout.sequences()
    assert input_ids.shape == attention_mask.shape == (batch, rollout.prompt_ids.shape[1] + n)
