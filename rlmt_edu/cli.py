"""The ``rlmt-edu`` command: regenerate data, train the chapter models, chat with a checkpoint.

    rlmt-edu data                      # the toy world's data files, into runs/data
    rlmt-edu pretrain                  # chapter 00, into runs/pretrained
    rlmt-edu sft                       # chapter 01, into runs/sft (from the committed pretrained checkpoint)
    rlmt-edu chat --question "what is 3 plus 4 ?"

New work goes under ``runs/`` (or ``--out``); only ``--update-committed`` writes over the committed files
under ``data/``. Every error is one line on stderr, ``rlmt-edu <command>: <message>``, and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import tempfile
from pathlib import Path

from rlmt_edu.paths import DATA, PRETRAINED, REWARD_MODEL, RUNS, SFT, relative_to_repo


def _print_table(title: str, metrics: dict) -> None:
    width = max(len(k) for k in metrics)
    print(f"\n{title}")
    print("-" * (width + 12))
    for key, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown:>9}")


def _first_last(rows: list[dict], window: int, key: str) -> str:
    """'first -> last': the mean of ``key`` over the first ``window`` rows and over the last ``window`` rows."""
    values = [row[key] for row in rows]
    return f"{sum(values[:window]) / window:.3f} -> {sum(values[-window:]) / window:.3f}"


def _replace(config, **overrides):
    """A frozen config with the overrides that are not None."""
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})


def cmd_data(args) -> int:
    from rlmt_edu.world.data import write_data

    written = write_data(args.out)
    print(f"wrote {len(written)} files to {args.out}")
    return 0


def cmd_pretrain(args) -> int:
    from rlmt_edu.chapters import PRETRAIN_CONFIG, run_pretrain

    config = _replace(PRETRAIN_CONFIG, steps=args.steps, seed=args.seed)
    _, _, metrics = run_pretrain(config, out=Path(args.out), device=args.device, progress=not args.quiet)
    _print_table(f"pretrained model saved to {args.out}", metrics)
    return 0


def cmd_sft(args) -> int:
    from rlmt_edu.chapters import SFT_CONFIG, run_sft

    config = _replace(SFT_CONFIG, steps=args.steps, seed=args.seed)
    _, _, metrics = run_sft(config, init=Path(args.init), out=Path(args.out), device=args.device,
                            progress=not args.quiet)
    _print_table(f"SFT model saved to {args.out}", metrics)
    return 0


def cmd_chat(args) -> int:
    import torch

    from rlmt_edu.evaluation import answer
    from rlmt_edu.model import load_checkpoint

    model, tokenizer = load_checkpoint(args.checkpoint, device=args.device, argument="checkpoint")
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    greedy = args.temperature == 0

    def reply(question: str) -> str:
        return answer(model, tokenizer, [question], greedy=greedy, temperature=args.temperature or 1.0,
                      generator=generator, max_new_tokens=args.max_new_tokens)[0]

    if args.question is not None:
        print(reply(args.question))
        return 0
    if not sys.stdin.isatty():  # piped: one answer per question line, and nothing else on stdout
        code = 0
        for question in filter(None, (line.strip() for line in sys.stdin)):
            try:
                print(reply(question), flush=True)
            except ValueError as error:  # an empty line keeps the n-th answer on the n-th line
                print(flush=True)
                print(f"rlmt-edu chat: {error}", file=sys.stderr)
                code = 2
        return code
    print(f"chatting with {args.checkpoint} (empty line or Ctrl-D to stop)")
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            break
        if not question:
            break
        try:
            print(f"model> {reply(question)}")
        except ValueError as error:
            print(f"(not asked: {error})")
    return 0


def cmd_reinforce(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlmt_edu import plots
    from rlmt_edu.algorithms.critic import CriticConfig, build_critic, train_critic
    from rlmt_edu.algorithms.reinforce import ReinforceConfig, gradient_variance, reinforce
    from rlmt_edu.rl import REWARDS, prompt_pool, prompts_answered_wrong
    from rlmt_edu.model import load_checkpoint
    from rlmt_edu.utils import choose_device

    config = _replace(ReinforceConfig(), steps=args.steps, seed=args.seed, baseline=args.baseline,
                      prompts=args.prompts, reward=args.reward, learning_rate=args.lr,
                      prompts_per_step=args.prompts_per_step)
    model, tokenizer = load_checkpoint(args.init, device=choose_device(args.device), argument="init")
    device = next(model.parameters()).device
    out = Path(args.out)
    questions = prompt_pool(config.prompts)
    if not args.all_prompts:  # chapter 03's setting: where every sample earns R = 1 there is nothing to learn
        questions = prompts_answered_wrong(model, tokenizer, questions, reward_fn=REWARDS[config.reward])
        if not questions:
            raise SystemExit(f"rlmt-edu reinforce: the start model answers every '{config.prompts}' prompt "
                             "perfectly (greedy); use --all-prompts to train on them anyway")
    critic = None
    if config.baseline == "critic" or args.gradient_variance:
        critic = build_critic(args.init, device=device)
        critic_config = CriticConfig(seed=config.seed, steps=args.critic_steps)
        train_critic(critic, model, tokenizer, questions, critic_config,
                     reward_fn=REWARDS[config.reward], progress=not args.quiet)
    metrics = {"baseline": config.baseline, "reward": config.reward, "prompts": config.prompts,
               "prompts_used": len(questions)}
    if args.gradient_variance:
        stats = gradient_variance(model, tokenizer, questions, reward_fn=REWARDS[config.reward],
                                  baselines=("none", "mean", "critic"), critic=critic, seed=config.seed)
        for name in ("none", "mean", "critic"):
            metrics[f"grad_variance/{name}"] = stats[name]["variance"]
            metrics[f"grad_cosine_to_none/{name}"] = stats[name]["cosine_to_none"]
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.bar(["none", "mean", "critic"], [stats[n]["variance"] for n in ("none", "mean", "critic")])
        ax.set_ylabel("total gradient variance")
        ax.set_title("one mini-batch's policy gradient")
        plots.save_figure(fig, out / "gradient_variance.png")
    history = reinforce(model, tokenizer, config, questions=questions, critic=critic, progress=not args.quiet)
    history.to_json(out / f"reinforce_{config.baseline}.json")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    plots.plot_history(history, ["reward/mean"], ax=axes[0], smooth=5, title="sampled reward", ylabel="R")
    plots.plot_history(history, ["eval/gold_score", "eval/accuracy"], ax=axes[1], title="held-out, greedy")
    plots.save_figure(fig, out / f"reinforce_{config.baseline}.png")
    rewards = history.series("reward/mean")[1]
    window = max(1, min(10, len(rewards) // 2))  # the first and the last `window` steps never overlap
    metrics.update({
        f"reward/first_{window}_steps": sum(rewards[:window]) / window,
        f"reward/last_{window}_steps": sum(rewards[-window:]) / window,
        "eval/gold_score_before": history.series("eval/gold_score")[1][0],
        "eval/gold_score_after": history.last("eval/gold_score"),
        "eval/accuracy_before": history.series("eval/accuracy")[1][0],
        "eval/accuracy_after": history.last("eval/accuracy"),
    })
    _print_table(f"REINFORCE ({config.baseline} baseline); plots in {out}", metrics)
    return 0


def cmd_trpo(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlmt_edu import plots
    from rlmt_edu.algorithms.trpo import PenaltyConfig, TRPOConfig, plot_trpo, trpo, trpo_penalty
    from rlmt_edu.model import load_checkpoint
    from rlmt_edu.rl import REWARDS, prompt_pool, prompts_answered_wrong
    from rlmt_edu.utils import choose_device

    model, tokenizer = load_checkpoint(args.init, device=choose_device(args.device), argument="init")
    out = Path(args.out)
    common = dict(updates=args.updates, prompts_per_update=args.prompts_per_update, seed=args.seed)
    questions = prompt_pool(TRPOConfig().prompts)
    if not args.all_prompts:  # as chapter 03: where every sample earns R = 1 there is nothing to learn
        questions = prompts_answered_wrong(model, tokenizer, questions, reward_fn=REWARDS[TRPOConfig().reward])
        if not questions:
            raise ValueError("init: the start model answers every train-pool prompt perfectly (greedy); "
                             "use --all-prompts to train on them anyway")
    if args.beta is None:  # the constrained form, Eq. 10 (the default)
        config = _replace(TRPOConfig(), delta=args.delta, **common)
        history = trpo(model, tokenizer, config, questions=questions, progress=not args.quiet)
        name, title = "trpo", f"TRPO, constrained form (Eq. 10, δ = {config.delta:g})"
        fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), layout="constrained")
        plot_trpo(history, {}, config.delta, axes=axes)
    else:  # the penalty form, Eq. 9
        config = _replace(PenaltyConfig(), beta=args.beta, **common)
        history = trpo_penalty(model, tokenizer, config, questions=questions, progress=not args.quiet)
        name, title = f"trpo_penalty_beta{config.beta:g}", f"TRPO, penalty form (Eq. 9, β = {config.beta:g})"
        fig, axes = plt.subplots(1, 3, figsize=(15, 3.5), layout="constrained")
        plots.plot_history(history, ["kl/mean"], ax=axes[0], title="mean KL(π_old‖π_new) per update")
        axes[0].axhline(TRPOConfig().delta, color="black", linestyle="--", linewidth=1,
                        label=f"TRPO's default δ = {TRPOConfig().delta:g}")
        axes[0].legend(frameon=False)
        plots.plot_history(history, ["reward/mean"], ax=axes[1], smooth=5, title="sampled reward", ylabel="R")
        plots.plot_history(history, ["eval/gold_score", "eval/accuracy"], ax=axes[2], title="held-out, greedy")
    history.to_json(out / f"{name}.json")
    plots.save_figure(fig, out / f"{name}.png")
    plt.close(fig)

    updates = [row for row in history if row["step"] >= 0]
    rewards = [row["reward/mean"] for row in updates]
    window = max(1, min(10, len(rewards) // 2))  # the first and the last `window` updates never overlap
    metrics = {"reward": config.reward, "prompts": config.prompts, "prompts_used": len(questions),
               "updates": len(updates)}
    if args.beta is None:
        accepted = [row for row in updates if row["step/accepted"]]
        metrics.update({
            "step/accepted_rate": len(accepted) / len(updates),
            "step/skipped": updates[-1]["step/skipped"],
            "kl/delta": config.delta,
            "kl/final_accepted": accepted[-1]["kl/mean"] if accepted else "none accepted",
            "kl/max_accepted": max(row["kl/mean"] for row in accepted) if accepted else "none accepted",
        })
    else:
        kls = [row["kl/mean"] for row in updates]
        metrics.update({"kl/beta": config.beta, "kl/final": kls[-1], "kl/max": max(kls),
                        "kl/mean_over_updates": sum(kls) / len(kls)})
    metrics[f"reward/first_{window} -> last_{window}"] = (
        f"{sum(rewards[:window]) / window:.3f} -> {sum(rewards[-window:]) / window:.3f}")
    start, end = history[0], history[-1]
    for key in sorted(k for k in start if k.startswith("eval/")):
        metrics[f"{key} (before -> after)"] = f"{start[key]:.3f} -> {end[key]:.3f}"
    _print_table(f"{title}; plots in {out}", metrics)
    return 0


def cmd_ppo(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlmt_edu import plots
    from rlmt_edu.algorithms.ppo import PPOConfig, plot_ppo, ppo
    from rlmt_edu.algorithms.reward_model import load_reward_model, reward_model_reward
    from rlmt_edu.model import load_checkpoint
    from rlmt_edu.utils import choose_device

    device = choose_device(args.device)
    policy, tokenizer = load_checkpoint(args.init, device=device, argument="init")
    reward_model, reward_tokenizer = load_reward_model(args.reward_model, device=device)
    prompts = args.prompts_per_iteration or PPOConfig().prompts_per_iteration
    config = _replace(PPOConfig(), beta=args.beta, epsilon=args.epsilon, iterations=args.iterations,
                      seed=args.seed, epochs=args.epochs, loss_normalization=args.normalization,
                      prompts_per_iteration=prompts, critic_warmup=args.critic_warmup,
                      minibatch_size=min(PPOConfig().minibatch_size, prompts))  # a small batch is one mini-batch
    out = Path(args.out)
    history = ppo(policy, tokenizer, reward_model_reward(reward_model, reward_tokenizer), config,
                  progress=not args.quiet)
    name = f"ppo_beta{config.beta:g}_eps{config.epsilon:g}"
    history.to_json(out / f"{name}.json")
    fig, axes = plt.subplots(1, 5, figsize=(22, 3.8), layout="constrained")
    plot_ppo({f"β={config.beta:g}, ε={config.epsilon:g}": [history]}, axes=axes[:4])
    plots.plot_history(history, ["eval/gold_score", "eval/proxy"], ax=axes[4], title="held-out, greedy")
    plots.save_figure(fig, out / f"{name}.png")
    plt.close(fig)

    updates = [row for row in history if row["step"] >= 0]
    window = max(1, min(5, len(updates) // 2))
    first_last = functools.partial(_first_last, updates, window)

    metrics = {"beta": config.beta, "epsilon": config.epsilon, "iterations": len(updates),
               f"sampled proxy R (first {window} -> last {window})": first_last("reward/proxy"),
               f"sampled gold (first {window} -> last {window})": first_last("reward/gold"),
               f"KL to SFT per response (first {window} -> last {window})": first_last("kl/sft"),
               f"length, words (first {window} -> last {window})": first_last("response/length"),
               "clip fraction (mean)": sum(r["ppo/clip_fraction"] for r in updates) / len(updates)}
    start, end = history[0], history[-1]
    for key in sorted(k for k in start if k.startswith("eval/")):
        metrics[f"held-out {key.removeprefix('eval/')} (before -> after)"] = f"{start[key]:.3f} -> {end[key]:.3f}"
    _print_table(f"PPO (Eq. 11) with β = {config.beta:g} in the reward (Eq. 12); plots in {out}", metrics)
    return 0


def cmd_grpo(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlmt_edu import plots
    from rlmt_edu.algorithms.grpo import GRPOConfig, grpo, plot_grpo
    from rlmt_edu.model import load_checkpoint
    from rlmt_edu.rl import REWARDS, prompt_pool
    from rlmt_edu.utils import choose_device

    device = choose_device(args.device)
    policy, tokenizer = load_checkpoint(args.init, device=device, argument="init")
    config = _replace(GRPOConfig(), steps=args.steps, questions_per_step=args.questions, group_size=args.group_size,
                      updates_per_batch=args.updates_per_batch, epsilon=args.epsilon, beta=args.beta,
                      normalization=args.normalization, scale_by_std=True if args.scale_by_std else None,
                      kl_estimator=args.kl_estimator, learning_rate=args.lr, prompts=args.prompts, seed=args.seed)
    reward = args.reward or "exact_match"
    out = Path(args.out)
    extra = {"practice": prompt_pool(config.prompts)} if config.prompts == "math_practice" else None
    history = grpo(policy, tokenizer, REWARDS[reward], config, extra_eval=extra, progress=not args.quiet)
    name = f"grpo_{config.prompts}_{config.normalization}_beta{config.beta:g}"
    history.to_json(out / f"{name}.json")
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8), layout="constrained")
    plot_grpo({name: [history]}, axes=axes, accuracy_key="practice/accuracy" if extra else "eval/accuracy")
    plots.save_figure(fig, out / f"{name}.png")
    plt.close(fig)

    steps = [row for row in history if row["step"] >= 0]
    window = max(1, min(5, len(steps) // 2))
    first_last = functools.partial(_first_last, steps, window)

    metrics = {"prompts": config.prompts, "reward": reward, "Q x G": f"{config.questions_per_step} x {config.group_size}",
               "steps": len(steps), f"sampled reward (first {window} -> last {window})": first_last("reward/mean"),
               f"zero-signal groups (first {window} -> last {window})": first_last("groups/zero_signal"),
               f"length, words (first {window} -> last {window})": first_last("response/length"),
               "KL to SFT per response (last)": steps[-1]["kl/sft"]}
    start, end = history[0], history[-1]
    for key in sorted(k for k in start if "/" in k and k.split("/")[1] in ("accuracy", "gold_score", "length")
                      or k.startswith("eval/accuracy/") or k.startswith("eval/gold_score/")):
        metrics[f"held-out {key} (before -> after)"] = f"{start[key]:.3f} -> {end[key]:.3f}"
    _print_table(f"GRPO (Eq. 13-14), {config.normalization} normalisation, β = {config.beta:g}; plots in {out}", metrics)
    return 0


def cmd_grape(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlmt_edu import plots
    from rlmt_edu.algorithms.grape import (
        GRAPEConfig,
        confidence_table_from_history,
        grape,
        plot_confidence_table,
        plot_grape_runs,
        prompt_sft,
        reward_model_judge,
    )
    from rlmt_edu.algorithms.reward_model import load_reward_model, reward_model_reward
    from rlmt_edu.model import load_checkpoint
    from rlmt_edu.utils import choose_device
    from rlmt_edu.world.data import load_questions
    from rlmt_edu.world.rubrics import POOR_ITEM, NoisyJudge, world_rubrics

    device = choose_device(args.device)
    policy, tokenizer = load_checkpoint(args.init, device=device, argument="init")
    reward_model, _ = load_reward_model(args.reward_model, device=device)
    config = _replace(GRAPEConfig(learning_rate=1e-4), steps=args.steps, questions_per_step=args.questions,
                      group_size=args.group_size, revision_probability=args.revision_probability,
                      loss=args.loss, sft_in_group=True if args.sft_in_group else None,
                      use_confidence=False if args.no_confidence else None, epsilon=args.epsilon,
                      learning_rate=args.lr, seed=args.seed)
    rubrics = world_rubrics(reward_model_judge(reward_model, tokenizer, policy), seed=config.seed)
    if args.miscalibrated:
        category, item = POOR_ITEM
        rubrics[category] = rubrics[category].with_judge(item, NoisyJudge("concise", 0.6, seed=config.seed,
                                                                          stated_confidence=1.0))
    if not args.no_warmup:
        prompt_sft(policy, tokenizer, rubrics, load_questions("train"), progress=not args.quiet)
    history = grape(policy, tokenizer, rubrics, config, proxy_fn=reward_model_reward(reward_model, tokenizer),
                    progress=not args.quiet)
    name = f"grape_{config.loss}_p{config.revision_probability:g}" + ("_miscalibrated" if args.miscalibrated else "")
    out = Path(args.out)
    history.to_json(out / f"{name}.json")
    fig, axes = plt.subplots(1, 5, figsize=(22, 3.8), layout="constrained")
    plot_grape_runs({name: [history]}, axes=axes[:4])
    table = confidence_table_from_history(history)
    plot_confidence_table(table, ax=axes[4])
    plots.save_figure(fig, out / f"{name}.png")
    plt.close(fig)

    steps = [row for row in history if row["step"] >= 0]
    window = max(1, min(5, len(steps) // 2))
    first_last = functools.partial(_first_last, steps, window)
    start, end = history[0], history[-1]
    metrics = {"Q x G": f"{config.questions_per_step} x {config.group_size}", "steps": len(steps),
               "loss": config.loss, f"R, Eq. 15 (first {window} -> last {window})": first_last("grape/R"),
               "revision share of responses": f"{sum(r['grape/revision_share'] for r in steps) / len(steps):.3f}"}
    for category in ("math", "facts", "safety"):
        drawn = [row for row in steps if f"grape/R/{category}" in row]  # steps whose batch had this category
        if drawn:
            share = max(1, min(window, len(drawn) // 2))
            metrics[f"{category}: R (first {share} -> last {share} steps with it)"] = \
                _first_last(drawn, share, f"grape/R/{category}")
        for mode, prefix in (("system prompt", "eval"), ("plain prompt", "plain")):
            key = f"{prefix}/gold_score/{category}"
            metrics[f"{category}: held-out gold, {mode} (before -> after)"] = f"{start[key]:.3f} -> {end[key]:.3f}"
    for prefix in ("eval", "plain"):
        metrics[f"held-out reward-model score, {prefix} (before -> after)"] = \
            f"{start[prefix + '/proxy']:.3f} -> {end[prefix + '/proxy']:.3f}"
        metrics[f"held-out length in words, {prefix} (before -> after)"] = \
            f"{start[prefix + '/length']:.2f} -> {end[prefix + '/length']:.2f}"
    for row in table:
        flag = "  REVIEW" if row["review"] else ""
        metrics[f"phi-bar {row['category']}/{row['item']}"] = f"{row['phi_bar']:.3f}{flag}"
    _print_table(f"GRAPE (Eq. 15-16, {config.loss}); plots in {out}", metrics)
    return 0


def cmd_dpo(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlmt_edu import plots
    from rlmt_edu.algorithms.dpo import DPOConfig, dpo, gold_win_rate, pairs_with_responses, plot_dpo
    from rlmt_edu.algorithms.preference_data import load_preference_pairs
    from rlmt_edu.model import load_checkpoint
    from rlmt_edu.rl import drift_from_reference, heldout_questions
    from rlmt_edu.utils import choose_device

    device = choose_device(args.device)
    policy, tokenizer = load_checkpoint(args.init, device=device, argument="init")
    reference, _ = load_checkpoint(args.init, device=device, argument="init")
    reference.requires_grad_(False)
    config = _replace(DPOConfig(), loss=args.loss, beta=args.beta, steps=args.steps, batch_size=args.batch_size,
                      learning_rate=args.lr, seed=args.seed)
    train, dropped = pairs_with_responses(load_preference_pairs("train", args.pairs))
    if dropped:
        print(f"{dropped} training pairs with an empty response left out")
    questions = heldout_questions()
    history = dpo(policy, tokenizer, train, config, reference=reference,
                  heldout_pairs=load_preference_pairs("heldout", args.pairs), eval_questions=questions,
                  progress=not args.quiet)
    out = Path(args.out)
    name = f"dpo_beta{config.beta:g}" if config.loss == "dpo" else "naive"
    history.to_json(out / f"{name}.json")
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8), layout="constrained")
    plot_dpo({name: [history]}, axes=axes)
    plots.save_figure(fig, out / f"{name}.png")
    plt.close(fig)
    wins = gold_win_rate(policy, reference, tokenizer, questions, seed=config.seed)
    start, end = history[0], history[-1]
    metrics = {"loss": config.loss, "beta": config.beta, "steps": config.steps, "final loss": end["loss"],
               "gold win rate vs SFT (4 samples per held-out question)": wins["win_rate"],
               "wins / ties / losses": f"{wins['wins']} / {wins['ties']} / {wins['losses']}",
               "KL to SFT (held-out, per token)": drift_from_reference(policy, reference, tokenizer, questions)["drift/kl"]}
    for key in ("pairs/label_accuracy", "pairs/gold_accuracy", "pairs/logp_chosen", "pairs/logp_rejected",
                "eval/gold_score", *(f"eval/gold_score/{c}" for c in ("math", "facts", "safety"))):
        metrics[f"held-out {key} (before -> after)"] = f"{start[key]:.3f} -> {end[key]:.3f}"
    _print_table(f"{'DPO' if config.loss == 'dpo' else 'the naive preference loss'} (§4.9); plots in {out}", metrics)
    return 0


def cmd_preference_data(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlmt_edu import plots
    from rlmt_edu.algorithms.preference_data import (
        PreferenceDataConfig, generate_preference_data, length_spread, write_preference_data)
    from rlmt_edu.model import load_checkpoint

    config = _replace(PreferenceDataConfig(), seed=args.seed, samples_per_question=args.samples_per_question,
                      temperature=args.temperature)
    model, tokenizer = load_checkpoint(args.init, device=args.device, argument="init")  # CPU: the committed bytes
    records = generate_preference_data(model, tokenizer, config, progress=not args.quiet)
    for path in write_preference_data(records, args.out):
        print(f"wrote {path}")
    metrics = {"pairs/train": len(records["train"]), "pairs/heldout": len(records["heldout"]),
               **{k: v for k, v in length_spread(records["train"]).items() if k != "pairs"}}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    lengths = [len(r[k].split()) for r in records["train"] for k in ("response_i", "response_j")]
    gaps = [len(r["chosen"].split()) - len(r["rejected"].split()) for r in records["train"]]
    axes[0].hist(lengths, bins=range(0, 26))
    axes[0].set_xlabel("response length (words)")
    axes[1].hist(gaps, bins=range(-24, 26))
    axes[1].set_xlabel("length of chosen - length of rejected")
    plots.save_figure(fig, Path(args.plots) / "preference_lengths.png")
    _print_table(f"preference pairs from {args.init}; plot in {args.plots}", metrics)
    return 0


def cmd_reward_model(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from transformers import AutoTokenizer

    from rlmt_edu import plots
    from rlmt_edu.algorithms.preference_data import load_preference_pairs
    from rlmt_edu.algorithms.reward_model import (
        REWARD_MODEL_CONFIG, plot_length_bias, response_table, run_reward_model)
    from rlmt_edu.utils import choose_device

    config = _replace(REWARD_MODEL_CONFIG, steps=args.steps, seed=args.seed, readout=args.readout,
                      learning_rate=args.lr)
    model, history, metrics = run_reward_model(config, init=args.init, out=Path(args.out),
                                               device=choose_device(args.device), progress=not args.quiet)
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.5))
    plots.plot_history(history, ["loss/reward_model"], ax=axes[0], smooth=10, title="Eq. 6 loss")
    plots.plot_history(history, ["heldout/accuracy", "heldout/gold_accuracy"], ax=axes[1],
                       labels=["vs labels", "vs gold"], title="held-out pairwise accuracy")
    tokenizer = AutoTokenizer.from_pretrained(args.out, local_files_only=True)
    plot_length_bias(response_table(model, tokenizer, load_preference_pairs("heldout")), ax=axes[2])
    plots.save_figure(fig, Path(args.plots) / "reward_model.png")
    _print_table(f"reward model saved to {args.out}; plots in {args.plots}", metrics)
    return 0


def cmd_rejection_sampling(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlmt_edu import plots
    from rlmt_edu.algorithms.rejection_sampling import RejectionSamplingConfig, plot_rounds, rejection_sampling
    from rlmt_edu.model import load_checkpoint
    from rlmt_edu.utils import choose_device

    config = _replace(RejectionSamplingConfig(), ranker=args.ranker, rounds=args.rounds, seed=args.seed,
                      prompts_per_round=args.prompts_per_round, group_size=args.group_size,
                      temperature=args.temperature, sft_steps=args.sft_steps, learning_rate=args.lr)
    model, tokenizer = load_checkpoint(args.init, device=choose_device(args.device), argument="init")
    device = next(model.parameters()).device
    out = Path(args.out)
    metrics = {"ranker": config.ranker}
    preference_model = None
    if config.ranker == "preference_model":
        from rlmt_edu.algorithms.preference_data import load_preference_pairs
        from rlmt_edu.algorithms.preference_model import (
            PreferenceModelConfig, build_preference_model, train_preference_model)

        preference_model = build_preference_model(args.init, device=device)
        pm_history = train_preference_model(
            preference_model, tokenizer, load_preference_pairs("train"),
            _replace(PreferenceModelConfig(), steps=args.pm_steps, seed=config.seed),
            heldout=load_preference_pairs("heldout"), progress=not args.quiet)
        pm_history.to_json(out / "preference_model.json")
        fig, ax = plt.subplots(figsize=(5, 3.3))
        plots.plot_history(pm_history, ["preference/bce"], ax=ax, smooth=20, title="§3 binary cross entropy")
        plots.save_figure(fig, out / "preference_model_bce.png")
        metrics["pm/heldout_accuracy_labels"] = pm_history.last("preference/heldout_accuracy_labels")
        metrics["pm/heldout_accuracy_gold"] = pm_history.last("preference/heldout_accuracy_gold")
    history = rejection_sampling(model, tokenizer, config, preference_model=preference_model,
                                 progress=not args.quiet)
    history.to_json(out / f"rejection_sampling_{config.ranker}.json")
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.3))
    plot_rounds({config.ranker: history}, axes=axes)
    plots.save_figure(fig, out / f"rejection_sampling_{config.ranker}.png")
    first, last = history[0], history[-1]
    metrics["winners/correct_share (round 0)"] = first["winners/correct_share"]
    for key in ("samples/gold", "samples/correct_share", "diversity/distinct", "diversity/token_entropy",
                "eval/gold", "eval/accuracy"):
        metrics[f"{key} (round 0 -> {config.rounds})"] = f"{first[key]:.3f} -> {last[key]:.3f}"
    _print_table(f"rejection sampling ({config.ranker} ranker); plots in {out}", metrics)
    return 0


def cmd_book(args) -> int:
    try:
        import nbclient  # noqa: F401
        import nbconvert  # noqa: F401
    except ImportError as error:
        raise ValueError(f"the book runs the notebooks with nbclient and nbconvert ({error.name} is missing): "
                         "pip install -e '.[notebooks]'") from None
    from rlmt_edu.book import ChapterFailed, list_chapters, run_book, select_chapters
    from rlmt_edu.results import load_results, results_markdown, results_table

    every = list_chapters()
    chapters = select_chapters(args.chapters, every)
    command = "rlmt-edu book" + (f" --chapters {args.chapters}" if args.chapters else "") + \
        (f" --device {args.device}" if args.device else "")
    out = Path(args.out)
    try:
        runs = run_book(chapters, out=out, device=args.device, timeout=args.timeout, progress=not args.quiet,
                        command=command, all_chapters=every)
    except ChapterFailed as error:
        raise ValueError(f"{error} (the pages of the chapters before it are in {out / 'index.html'}; "
                         f"the notebook as far as it ran: {out / 'notebooks' / (error.chapter.name + '.failed.ipynb')})"
                         ) from None
    metrics = {run.chapter.name: f"{run.wall_s:.1f} s" + ("" if run.peak_mb is None else f", peak {run.peak_mb:.0f} MB")
               for run in runs}
    metrics["total"] = f"{sum(run.wall_s for run in runs):.1f} s"
    _print_table(f"the book, {len(runs)} chapters; open {out / 'index.html'}", metrics)
    table = results_table(load_results(out / "results"))
    if table:
        print()
        print(results_markdown(table), end="")
    return 0


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``rlmt-edu <command>: <message>``, like the commands' own."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message}\n")


def _checked(convert, ok, expected: str):
    """An argparse ``type=``: ``convert(text)``, refused (one clean line, exit 2) unless ``ok(value)``."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


POSITIVE_INT = _checked(int, lambda v: v >= 1, "an int >= 1")
NON_NEGATIVE_INT = _checked(int, lambda v: v >= 0, "an int >= 0")
POSITIVE = _checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
PROBABILITY = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
NON_NEGATIVE = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
POSITIVE_OR_INF = _checked(float, lambda v: v > 0 and not math.isnan(v), "a number > 0 (inf: no clipping)")

DEVICE_HELP = "cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)"
SEED_HELP = "random seed (default: the chapter's)"
QUIET_HELP = "no progress bar"
CPU_CAVEAT = ("on another CPU (or thread count, or library version) the numbers differ slightly, so the tests "
              "that compare against the committed data may then fail")


def _add_out(p, what: str, default: Path, committed: Path, caveat: str = CPU_CAVEAT) -> None:
    """``--out`` (default under runs/) and, exclusive with it, ``--update-committed`` (write to ``committed``)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--out", default=str(default), help=f"{what} (default: {relative_to_repo(default)})")
    group.add_argument("--update-committed", action="store_true",
                       help=f"overwrite the committed files under {relative_to_repo(committed)}/ instead; {caveat}")
    p.set_defaults(committed_out=committed)


def _add_run_options(p, name: str) -> None:
    """--seed, --device, --out (default runs/<name>) and --quiet: what every RL training command takes."""
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=None, help=SEED_HELP)
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--out", default=str(RUNS / name), help=f"folder for plots and histories (default: runs/{name})")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlmt-edu", description=__doc__.split("\n\n")[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="regenerate the toy world's data files")
    _add_out(p, "folder to write the data files to", RUNS / "data", DATA,
             caveat="generation is pure Python, so the bytes are the same on every machine")
    p.set_defaults(func=cmd_data)

    for name, helptext, committed in (
        ("pretrain", "pretrain a tiny GPT on the corpus (chapter 00)", PRETRAINED),
        ("sft", "instruction-tune the pretrained model (chapter 01)", SFT),
    ):
        p = sub.add_parser(name, help=helptext)
        _add_out(p, "checkpoint folder", RUNS / committed.name, committed)
        p.add_argument("--steps", type=POSITIVE_INT, default=None, help="optimiser steps (default: the chapter's)")
        p.add_argument("--seed", type=NON_NEGATIVE_INT, default=None, help=SEED_HELP)
        p.add_argument("--device", default=None, help=DEVICE_HELP)
        p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
        if name == "sft":
            p.add_argument("--init", default=str(PRETRAINED),
                           help="checkpoint to start from (default: the committed data/checkpoints/pretrained)")
        p.set_defaults(func=cmd_pretrain if name == "pretrain" else cmd_sft, checkpoint_out=True)

    p = sub.add_parser("reinforce",
                       help="REINFORCE from the SFT checkpoint, with or without a baseline (chapters 03-04)")
    p.add_argument("--init", default=str(SFT), help="checkpoint to start from (default: data/checkpoints/sft)")
    p.add_argument("--baseline", choices=("none", "mean", "critic"), default=None, help="default: mean")
    p.add_argument("--reward", choices=("gold", "exact_match"), default=None, help="default: gold")
    p.add_argument("--prompts", choices=("train_pool", "math", "facts", "safety"), default=None,
                   help="prompt pool (default: train_pool, every category)")
    p.add_argument("--all-prompts", action="store_true",
                   help="train on the whole pool (default: only the prompts the start model answers wrong, "
                        "greedily, as in chapter 03; on the others every sample earns the same reward)")
    p.add_argument("--steps", type=POSITIVE_INT, default=None, help="policy updates (default: the chapter's)")
    p.add_argument("--prompts-per-step", type=POSITIVE_INT, default=None,
                   help="S, prompts sampled per policy update (default: the chapter's)")
    p.add_argument("--lr", type=POSITIVE, default=None, help="policy learning rate (default: the chapter's)")
    p.add_argument("--critic-steps", type=POSITIVE_INT, default=60, help="critic pre-fit steps (baseline critic)")
    p.add_argument("--gradient-variance", action="store_true",
                   help="first measure the gradient variance of each baseline at the start policy")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=None, help=SEED_HELP)
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--out", default=str(RUNS / "reinforce"), help="folder for plots (default: runs/reinforce)")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    p.set_defaults(func=cmd_reinforce)

    p = sub.add_parser("trpo", help="TRPO from the SFT checkpoint: the trust-region constraint, or the KL penalty "
                                    "(chapter 07)")
    p.add_argument("--init", default=str(SFT), help="checkpoint to start from (default: data/checkpoints/sft)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--delta", type=POSITIVE, default=None,
                      help="δ, the trust region's radius in mean KL per token: the constrained form, Eq. 10 "
                           "(the default form; default δ: the chapter's)")
    form.add_argument("--beta", type=NON_NEGATIVE, default=None,
                      help="β: switch to the penalty form, Eq. 9, with this fixed KL penalty scale")
    p.add_argument("--all-prompts", action="store_true",
                   help="train on the whole train pool (default: only the prompts the start model answers wrong, "
                        "greedily, as in chapter 03)")
    p.add_argument("--updates", type=POSITIVE_INT, default=None, help="policy updates (default: the chapter's)")
    p.add_argument("--prompts-per-update", type=POSITIVE_INT, default=None,
                   help="S, prompts sampled per policy update (default: the chapter's)")
    _add_run_options(p, "trpo")
    p.set_defaults(func=cmd_trpo)

    p = sub.add_parser("ppo", help="PPO against the reward model, the KL to the SFT model in the reward (chapter 08)")
    p.add_argument("--init", default=str(SFT), help="checkpoint to start from and the frozen reference of Eq. 12 "
                                                    "(default: data/checkpoints/sft)")
    p.add_argument("--reward-model", default=str(REWARD_MODEL),
                   help="reward model checkpoint (default: data/checkpoints/reward_model)")
    p.add_argument("--beta", type=NON_NEGATIVE, default=None, help="β of Eq. 12 (0: no KL term; default: 1)")
    p.add_argument("--epsilon", type=POSITIVE_OR_INF, default=None, help="ε of Eq. 11's clip (inf: none; default: 0.2)")
    p.add_argument("--iterations", type=POSITIVE_INT, default=None, help="PPO iterations (default: the chapter's)")
    p.add_argument("--epochs", type=POSITIVE_INT, default=None, help="passes over each batch (default: 4)")
    p.add_argument("--prompts-per-iteration", type=POSITIVE_INT, default=None,
                   help="S, prompts sampled per iteration (default: 32)")
    p.add_argument("--critic-warmup", type=NON_NEGATIVE_INT, default=None,
                   help="batches the critic is fitted on before the first policy step (default: 10)")
    p.add_argument("--normalization", choices=("per_sample", "token_mean"), default=None,
                   help="per_sample: Eq. 11's Σ_t then / S (default); token_mean: TRL's mean over tokens")
    _add_run_options(p, "ppo")
    p.set_defaults(func=cmd_ppo)

    p = sub.add_parser("grpo", help="GRPO with a verifiable reward, no critic, no reward model (chapter 09)")
    p.add_argument("--init", default=str(SFT), help="checkpoint to start from (default: data/checkpoints/sft)")
    p.add_argument("--prompts", choices=("math_practice", "math", "facts", "safety", "train_pool"), default=None,
                   help="prompt pool (default: math_practice, held-out sums never demonstrated)")
    p.add_argument("--reward", choices=("exact_match", "gold"), default=None, help="R(text) (default: exact_match)")
    p.add_argument("--steps", type=POSITIVE_INT, default=None, help="GRPO steps (default: 30)")
    p.add_argument("--questions", type=POSITIVE_INT, default=None, help="Q, questions per step (default: 8)")
    p.add_argument("--group-size", type=POSITIVE_INT, default=None, help="G, responses per question, >= 2 (default: 8)")
    p.add_argument("--updates-per-batch", type=POSITIVE_INT, default=None,
                   help="gradient steps per sampled batch (default: 1, on-policy)")
    p.add_argument("--epsilon", type=POSITIVE_OR_INF, default=None, help="ε of Eq. 14's clip (default: 0.2)")
    p.add_argument("--beta", type=NON_NEGATIVE, default=None, help="weight of a KL term to SFT (default: 0, Eq. 14)")
    p.add_argument("--kl-estimator", choices=("k3", "k3_ratio_corrected"), default=None, help="default: k3")
    p.add_argument("--normalization", choices=("paper", "sequence_mean", "token_mean"), default=None,
                   help="paper: Eq. 14's Σ_t then / QG (default); sequence_mean: the original GRPO; token_mean")
    p.add_argument("--scale-by-std", action="store_true", help="divide advantages by the group's std (original GRPO)")
    p.add_argument("--lr", type=POSITIVE, default=None, help="learning rate (default: 3e-5)")
    _add_run_options(p, "grpo")
    p.set_defaults(func=cmd_grpo)

    p = sub.add_parser("grape", help="GRAPE: rubric judges, confidence-weighted rewards, GRPO's update (chapter 11)")
    p.add_argument("--init", default=str(SFT), help="checkpoint to start from (default: data/checkpoints/sft)")
    p.add_argument("--reward-model", default=str(REWARD_MODEL),
                   help="the human-preference item's judge (default: data/checkpoints/reward_model)")
    p.add_argument("--steps", type=POSITIVE_INT, default=None, help="GRAPE steps (default: 30)")
    p.add_argument("--questions", type=POSITIVE_INT, default=None, help="Q, questions per step (default: 8)")
    p.add_argument("--group-size", type=POSITIVE_INT, default=None, help="G, responses per question (default: 8)")
    p.add_argument("--revision-probability", type=PROBABILITY, default=None,
                   help="p, the chance a response is a revision of one of its group (default: 0.25)")
    p.add_argument("--loss", choices=("eq14", "eq17"), default=None,
                   help="eq14: GRPO's token-level clip (default); eq17: the sequence-level Alt. GRAPE loss")
    p.add_argument("--sft-in-group", action="store_true", help="one of the G responses is the SFT answer")
    p.add_argument("--no-confidence", action="store_true", help="φ̄ = 1 everywhere: R = Σ ω τ")
    p.add_argument("--miscalibrated", action="store_true",
                   help="the poor facts judge states confidence 1 (confident and wrong)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the system-prompt SFT warm-up (only for a checkpoint that already had it)")
    p.add_argument("--epsilon", type=POSITIVE_OR_INF, default=None, help="ε of the clip (default: 0.2)")
    p.add_argument("--lr", type=POSITIVE, default=None, help="learning rate (default: 1e-4)")
    _add_run_options(p, "grape")
    p.set_defaults(func=cmd_grape)

    p = sub.add_parser("dpo", help="DPO (or the naive preference loss) on the preference pairs (chapter 10)")
    p.add_argument("--init", default=str(SFT), help="checkpoint to start from and the frozen reference π0 "
                                                    "(default: data/checkpoints/sft)")
    p.add_argument("--pairs", default=None, help="folder with preference_pairs_{train,heldout}.jsonl (default: data/)")
    p.add_argument("--loss", choices=("dpo", "naive"), default=None, help="default: dpo")
    p.add_argument("--beta", type=POSITIVE, default=None, help="β of the DPO loss (default: 0.1)")
    p.add_argument("--steps", type=POSITIVE_INT, default=None, help="gradient steps (default: 40)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=None, help="pairs per step (default: 32)")
    p.add_argument("--lr", type=POSITIVE, default=None, help="learning rate (default: 5e-5)")
    _add_run_options(p, "dpo")
    p.set_defaults(func=cmd_dpo)

    p = sub.add_parser("preference-data", help="sample, pair and label responses of the SFT model (chapter 05 data)")
    p.add_argument("--init", default=str(SFT), help="checkpoint to sample from (default: data/checkpoints/sft)")
    _add_out(p, "folder for the two JSONL files", RUNS / "preference_data", DATA)
    p.add_argument("--plots", default=str(RUNS / "preference_data"),
                   help="folder for the plot (default: runs/preference_data)")
    p.add_argument("--samples-per-question", type=POSITIVE_INT, default=None,
                   help="responses sampled per question (default: the chapter's)")
    p.add_argument("--temperature", type=POSITIVE, default=None, help="sampling temperature (default: the chapter's)")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=None, help=SEED_HELP)
    p.add_argument("--device", default="cpu", help="default cpu: the committed files were sampled on the CPU")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    p.set_defaults(func=cmd_preference_data)

    p = sub.add_parser("reward-model", help="train the reward model of chapter 05 on the preference pairs")
    p.add_argument("--init", default=str(SFT),
                   help="checkpoint whose trunk starts the model (default: data/checkpoints/sft)")
    _add_out(p, "checkpoint folder", RUNS / "reward_model", REWARD_MODEL)
    p.add_argument("--plots", default=str(RUNS / "reward_model"),
                   help="folder for the plots (default: runs/reward_model)")
    p.add_argument("--steps", type=POSITIVE_INT, default=None, help="optimiser steps (default: the chapter's)")
    p.add_argument("--readout", choices=("likelihood", "last"), default=None,
                   help="likelihood: mean log-likelihood + a head at <EOS> (default, beyond the paper); "
                        "last: §4.4's head at <EOS> only (use --lr 1e-3)")
    p.add_argument("--lr", type=POSITIVE, default=None, help="peak learning rate (default: 3e-4)")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=None, help=SEED_HELP)
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    p.set_defaults(func=cmd_reward_model, checkpoint_out=True)

    p = sub.add_parser("rejection-sampling", help="rounds of §3's sample / rank / keep / SFT loop (chapter 02)")
    p.add_argument("--init", default=str(SFT), help="checkpoint to start from (default: data/checkpoints/sft)")
    p.add_argument("--ranker", choices=("gold", "labeller", "preference_model"), default=None,
                   help="who picks the best of G (default: gold); preference_model first trains one on the pairs")
    p.add_argument("--rounds", type=POSITIVE_INT, default=None,
                   help="sample / rank / SFT rounds (default: the chapter's)")
    p.add_argument("--prompts-per-round", type=POSITIVE_INT, default=None,
                   help="Q, prompts drawn per round (default: the chapter's)")
    p.add_argument("--group-size", type=POSITIVE_INT, default=None, help="G, samples per prompt (at least 2)")
    p.add_argument("--temperature", type=POSITIVE, default=None, help="sampling temperature (default: the chapter's)")
    p.add_argument("--sft-steps", type=POSITIVE_INT, default=None, help="SFT steps per round")
    p.add_argument("--lr", type=POSITIVE, default=None, help="SFT learning rate")
    p.add_argument("--pm-steps", type=POSITIVE_INT, default=None, help="preference-model training steps")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=None, help=SEED_HELP)
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--out", default=str(RUNS / "rejection_sampling"),
                   help="folder for plots and histories (default: runs/rejection_sampling)")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    p.set_defaults(func=cmd_rejection_sampling)

    p = sub.add_parser("book", help="run every chapter notebook in order and write a static HTML book with the "
                                    "results table of every method (runs/book/index.html)")
    p.add_argument("--chapters", default=None,
                   help="which chapters: 06-09, 3,7 or 00-02,11 (default: all)")
    p.add_argument("--device", default=None, help="the device every notebook trains on: " + DEVICE_HELP)
    p.add_argument("--out", default=str(RUNS / "book"), help="folder for the book (default: runs/book)")
    p.add_argument("--timeout", type=POSITIVE_INT, default=1200, help="seconds one cell may run (default: 1200)")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    p.set_defaults(func=cmd_book)

    p = sub.add_parser("chat", help="ask a checkpoint questions: --question, else one per line of stdin")
    p.add_argument("--checkpoint", default=str(SFT), help="language-model checkpoint (default: data/checkpoints/sft)")
    p.add_argument("--question", default=None, help="ask one question and exit (non-interactive)")
    p.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="0 for greedy answers (default)")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=24, help="longest answer, in tokens (default: 24)")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cpu)")
    p.set_defaults(func=cmd_chat)
    return parser


def _check_writable(args) -> None:
    """Fail before any work if an output folder cannot be written: create it, then a probe file in it.

    A checkpoint is written beside its folder and moved into place (``save_checkpoint``), so for one the
    parent folder is probed.
    """
    for name in ("out", "plots"):
        if getattr(args, name, None) is None:
            continue
        path = Path(getattr(args, name))
        file = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        folder = path.parent if name == "out" and getattr(args, "checkpoint_out", False) else path
        reason = f"{str(file)!r} is a file, not a folder" if file is not None else _probe(folder)
        if reason is not None:
            raise ValueError(f"--{name}: expected a folder that can be written, got {str(path)!r} ({reason})")


def _probe(folder: Path) -> str | None:
    """None if ``folder`` can be created and a file written in it (and removed again), else why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".rlmt-edu-probe."):
            return None
    except OSError as error:
        return error.strerror


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "update_committed", False):
            args.out = str(args.committed_out)
        if getattr(args, "device", None) is not None:
            from rlmt_edu.utils import choose_device

            choose_device(args.device)  # a device that is not here fails now, not after loading and training
        _check_writable(args)
        return args.func(args)
    except ValueError as error:
        print(f"rlmt-edu {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
