"""The bridge to TRL, with the real ``trl`` (the ``trl`` extra, installed in CI): the paper's settings
translated, TRL's loss equal to rlmt_edu's on one batch, and TRL's GRPOTrainer training the tiny SFT model
with GRAPE's rubric reward."""

import importlib
import sys

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed: pip install -e '.[trl]'")

from rlmt_edu.algorithms.grpo import GRPOConfig, grpo_kl_term  # noqa: E402
from rlmt_edu.integrations import trl as bridge  # noqa: E402
from rlmt_edu.losses.grpo import group_relative_advantage, grpo_loss  # noqa: E402
from rlmt_edu.model import load_checkpoint  # noqa: E402
from rlmt_edu.paths import SFT  # noqa: E402
from rlmt_edu.rl import exact_match_reward, gold_reward, prompt_pool  # noqa: E402
from rlmt_edu.rollout import policy_logprobs, sample  # noqa: E402
from rlmt_edu.tokenizer import encode_prompt  # noqa: E402

Q, G, NEW_TOKENS = 2, 4, 12


@pytest.fixture(scope="module")
def sft():
    model, tokenizer = load_checkpoint(SFT)
    return model, tokenizer


def _trainer(model, tokenizer, questions, reward_fn, config, tmp_path, **overrides):
    trl_config = bridge.trl_grpo_config(config, output_dir=str(tmp_path), use_cpu=True, **overrides)
    return bridge.trl.GRPOTrainer(model=model, reward_funcs=bridge.reward_func(reward_fn, questions),
                                  args=trl_config, train_dataset=bridge.prompt_dataset(questions),
                                  processing_class=tokenizer)


def test_a_missing_trl_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # makes `import trl` fail
    monkeypatch.delitem(sys.modules, "rlmt_edu.integrations.trl")
    with pytest.raises(ImportError, match=r'pip install -e "\.\[trl\]"'):
        importlib.import_module("rlmt_edu.integrations.trl")


@pytest.mark.parametrize("ours, loss_type, scale, bias", [
    (GRPOConfig(), "dr_grpo", "none", False),
    (GRPOConfig(normalization="sequence_mean", scale_by_std=True), "grpo", "group", False),
    (GRPOConfig(normalization="token_mean", beta=0.1, kl_estimator="k3_ratio_corrected"), "bnpo", "none", True),
])
def test_the_paper_settings_translate_to_grpo_config(tmp_path, ours, loss_type, scale, bias):
    config = bridge.trl_grpo_config(ours, output_dir=str(tmp_path))
    assert (config.loss_type, config.scale_rewards, config.use_bias_correction_kl) == (loss_type, scale, bias)
    assert config.per_device_train_batch_size == ours.questions_per_step * ours.group_size
    assert (config.num_generations, config.num_iterations) == (ours.group_size, ours.updates_per_batch)
    assert (config.epsilon, config.beta, config.learning_rate) == (ours.epsilon, ours.beta, ours.learning_rate)
    assert config.max_completion_length == ours.max_new_tokens and config.max_steps == ours.steps
    assert [row[0] for row in bridge.config_rows(ours, config)][:2] == ["Q·G (batch of responses)", "G"]
    assert bridge.trl_grpo_config(ours, output_dir=str(tmp_path), bf16=False, beta=0.5).beta == 0.5  # overrides win


def test_the_mapping_table_names_every_counterpart():
    table = bridge.mapping_markdown()
    for needle in ('loss_type="dr_grpo"', 'scale_rewards="none"', "num_iterations", "use_bias_correction_kl",
                   "up to a constant", "| none |"):
        assert needle in table
    assert {row["maps"].split(" ")[0] for row in bridge.MAPPING} >= {"exact", "up", "none"}


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="config: expected rlmt_edu.algorithms.grpo.GRPOConfig"):
        bridge.trl_grpo_config({"beta": 0.1}, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="questions: expected at least one question"):
        bridge.prompt_dataset([])
    with pytest.raises(ValueError, match="reward_fn: expected a callable"):
        bridge.reward_func(0.5, prompt_pool("math"))
    reward = bridge.reward_func(exact_match_reward, prompt_pool("math"))
    with pytest.raises(ValueError, match="question_index: expected the column"):
        reward(prompts=["p"], completions=["c"])


def test_a_reward_function_finds_each_completions_question():
    questions = prompt_pool("math")[:3]
    reward = bridge.reward_func(gold_reward, questions)
    data = bridge.prompt_dataset(questions)
    assert data["prompt"][0] == f"<USER> {questions[0].question} <MODEL>"
    completions = [questions[2].answer, "no idea .", questions[0].answer]
    got = reward(prompts=[data["prompt"][i] for i in (2, 1, 0)], completions=completions, question_index=[2, 1, 0])
    assert got == pytest.approx(gold_reward([questions[i] for i in (2, 1, 0)], completions).tolist())
    assert got[0] == pytest.approx(1.0) and reward.__name__ == "gold_reward"


def _one_batch(model, tokenizer):
    """Q × G sampled responses to prompts of one length (so TRL's and our layouts coincide without padding)."""
    questions = prompt_pool("math")
    length = len(encode_prompt(tokenizer, questions[0].question))
    chosen = [q for q in questions if len(encode_prompt(tokenizer, q.question)) == length][:Q]
    batch = [q for q in chosen for _ in range(G)]
    rollout = sample(model, [encode_prompt(tokenizer, q.question) for q in batch], max_new_tokens=NEW_TOKENS,
                     temperature=1.0, generator=torch.Generator().manual_seed(0), eos_id=tokenizer.eos_token_id,
                     pad_id=tokenizer.pad_token_id)
    return chosen, rollout


@pytest.mark.parametrize("normalization, estimator, divisor", [
    ("paper", "k3", NEW_TOKENS),  # dr_grpo = Eq. 14 / max_completion_length
    ("paper", "k3_ratio_corrected", NEW_TOKENS),
    ("sequence_mean", "k3", 1),
    ("token_mean", "k3", 1),
])
def test_trl_loss_equals_ours_on_one_batch(sft, tmp_path, normalization, estimator, divisor):
    model, tokenizer = sft
    model = model.eval()  # TRL's eval mode: no division by gradient-accumulation steps
    chosen, rollout = _one_batch(model, tokenizer)
    mask = rollout.response_mask  # (B, N)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        logp_now = policy_logprobs(model, rollout)  # (B, N)
    # π0 and π_SFT as other distributions than π1, so the ratios clip and the KL is not zero
    logp_old = ((logp_now + 0.4 * torch.randn(logp_now.shape, generator=generator)).clamp(max=0) * mask)
    logp_ref = ((logp_now - 0.3 * torch.rand(logp_now.shape, generator=generator)) * mask)
    advantages = group_relative_advantage(torch.rand(Q, G, generator=generator))  # (Q, G), Eq. 13
    config = GRPOConfig(questions_per_step=Q, group_size=G, max_new_tokens=NEW_TOKENS, beta=0.1, epsilon=0.2,
                        normalization=normalization, kl_estimator=estimator)
    trainer = _trainer(model, tokenizer, chosen, exact_match_reward, config, tmp_path)
    inputs = {"prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
              "completion_ids": rollout.response_ids, "completion_mask": mask,
              "advantages": advantages.flatten(), "old_per_token_logps": logp_old,
              "ref_per_token_logps": logp_ref, "num_items_in_batch": mask.sum()}

    model.zero_grad()
    theirs = trainer._compute_loss(model, inputs)
    theirs.backward()
    their_grad = torch.cat([p.grad.flatten() for p in model.parameters()])

    model.zero_grad()
    logp = policy_logprobs(model, rollout).view(Q, G, -1)  # (Q, G, N), with a gradient
    shape = (Q, G, -1)
    ours, _ = grpo_loss(logp, logp_old.view(shape), advantages, mask.view(shape), epsilon=0.2,
                        normalization=normalization)
    ours = ours + 0.1 * grpo_kl_term(logp, logp_old.view(shape), logp_ref.view(shape), mask.view(shape),
                                     estimator=estimator, normalization=normalization)
    (ours / divisor).backward()
    our_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()

    assert abs(ours.item()) > 1e-3  # a batch where the loss is not trivially zero
    assert theirs.item() == pytest.approx(ours.item() / divisor, rel=1e-5, abs=1e-7)
    assert torch.allclose(their_grad, our_grad, rtol=1e-4, atol=1e-7)


def test_trl_trains_the_tiny_sft_model_with_the_grape_reward(tmp_path):
    from rlmt_edu.algorithms.grape import reward_model_judge, rubric_reward
    from rlmt_edu.algorithms.reward_model import load_reward_model
    from rlmt_edu.world.rubrics import world_rubrics

    policy, tokenizer = load_checkpoint(SFT)
    start = {name: p.detach().clone() for name, p in policy.named_parameters()}
    reward_model, _ = load_reward_model()
    rubrics = world_rubrics(reward_model_judge(reward_model, tokenizer, policy))
    questions = prompt_pool("train_pool")[:16]
    calls = []
    grape = rubric_reward(rubrics)

    def counted(batch, responses):
        rewards = grape(batch, responses)
        calls.append(rewards)
        return rewards

    config = GRPOConfig(steps=3, questions_per_step=2, group_size=4, max_new_tokens=NEW_TOKENS, learning_rate=1e-4)
    trainer = _trainer(policy, tokenizer, questions, counted, config, tmp_path,
                       logging_strategy="steps", logging_steps=1)
    trainer.train()
    logged = [row for row in trainer.state.log_history if "reward" in row]
    assert [len(r) for r in calls] == [8, 8, 8]  # three steps of Q × G = 2 × 4 completions
    # what TRL logged as each step's reward is the mean of what Eq. 15 returned for that step's completions
    assert [row["reward"] for row in logged] == pytest.approx([r.mean().item() for r in calls], abs=1e-4)
    moved = max((p.detach() - start[name]).abs().max().item() for name, p in policy.named_parameters())
    assert moved > 1e-6, "no parameter moved"


def test_the_readme_table_is_the_mapping():
    from rlmt_edu.paths import REPO

    readme = (REPO / "README.md").read_text()
    start, end = readme.index("<!-- trl-mapping -->\n"), readme.index("<!-- /trl-mapping -->")
    assert readme[start + len("<!-- trl-mapping -->\n"):end] == bridge.mapping_markdown()


def test_the_example_script_trains_the_tiny_model_with_trl(tmp_path):
    import runpy

    from rlmt_edu.paths import REPO

    script = runpy.run_path(str(REPO / "examples" / "grpo_with_trl.py"))
    summary = script["main"](["--steps", "2", "--questions", "2", "--group-size", "2", "--out", str(tmp_path)])
    assert summary["steps"] == 2 and 0.0 <= summary["reward_first"] <= 1.5


@pytest.mark.parametrize("name", ["ddp", "deepspeed_zero2", "deepspeed_zero3"])
def test_the_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import ClusterConfig

    from rlmt_edu.paths import REPO

    config = ClusterConfig.from_yaml_file(REPO / "examples" / "accelerate" / f"{name}.yaml")
    assert config.distributed_type.value == ("MULTI_GPU" if name == "ddp" else "DEEPSPEED")
    if name != "ddp":
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
