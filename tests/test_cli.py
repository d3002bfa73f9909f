"""The rlmt-edu command line: data regeneration, chat, outputs under runs/, and one-line errors (exit code 2)."""

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlmt_edu import cli
from rlmt_edu.cli import build_parser, main
from rlmt_edu.paths import DATA, PRETRAINED, REWARD_MODEL, RUNS, SFT
from rlmt_edu.world.data import DATA_DIR

SCRIPT = Path(sys.executable).parent / "rlmt-edu"


def _usage_error(argv, capsys) -> str:
    """The one stderr line of an argparse error (exit code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


def _error(argv, capsys) -> str:
    """The one stderr line of a command's own error (exit code 2)."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    return captured.err.strip()


def test_data_command_writes_the_committed_files(tmp_path):
    assert main(["data", "--out", str(tmp_path)]) == 0
    for path in sorted(tmp_path.iterdir()):
        assert path.read_bytes() == (DATA_DIR / path.name).read_bytes(), path.name


def test_pretrain_command_writes_a_checkpoint_to_out(tmp_path, capsys):
    from rlmt_edu.model import load_checkpoint

    assert main(["pretrain", "--steps", "2", "--quiet", "--out", str(tmp_path / "pt")]) == 0
    assert f"pretrained model saved to {tmp_path / 'pt'}" in capsys.readouterr().out
    model, _ = load_checkpoint(tmp_path / "pt")
    assert type(model).__name__ == "GPT2LMHeadModel"


# ---- nothing overwrites the committed data unless asked ----


@pytest.mark.parametrize("command, default, committed", [
    ("data", RUNS / "data", DATA),
    ("pretrain", RUNS / "pretrained", PRETRAINED),
    ("sft", RUNS / "sft", SFT),
    ("preference-data", RUNS / "preference_data", DATA),
    ("reward-model", RUNS / "reward_model", REWARD_MODEL),
])
def test_outputs_go_under_runs_unless_update_committed(command, default, committed, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "_check_writable", lambda args: None)  # touch nothing in the repository
    monkeypatch.setattr(cli, f"cmd_{command.replace('-', '_')}", lambda args: seen.append(args.out) or 0)
    assert main([command]) == 0
    assert main([command, "--update-committed"]) == 0
    assert seen == [str(default), str(committed)]


def test_out_and_update_committed_together_are_an_error(tmp_path, capsys):
    message = _usage_error(["pretrain", "--out", str(tmp_path), "--update-committed"], capsys)
    assert message == "rlmt-edu pretrain: argument --update-committed: not allowed with argument --out"


def test_update_committed_help_says_it_overwrites_data():
    for command in ("data", "pretrain", "sft", "preference-data", "reward-model"):
        helptext = " ".join(_subparser(command).format_help().split())
        assert "--update-committed overwrite the committed files under data/" in helptext
        if command != "data":  # the data files are pure Python: the same bytes everywhere
            assert "on another CPU" in helptext and "may then fail" in helptext


def test_the_recipes_save_nothing_by_default():
    import inspect

    from rlmt_edu.algorithms.reward_model import run_reward_model
    from rlmt_edu.chapters import run_pretrain, run_sft

    for recipe in (run_pretrain, run_sft, run_reward_model):
        assert inspect.signature(recipe).parameters["out"].default is None, recipe.__name__


# ---- help ----


def _subparser(command: str) -> argparse.ArgumentParser:
    actions = build_parser()._actions
    return next(a for a in actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def test_every_option_of_every_command_has_help():
    actions = build_parser()._actions
    commands = next(a for a in actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [f"{name} {'/'.join(action.option_strings)}" for name, parser in commands.items()
               for action in parser._actions if not action.help]
    assert missing == []


def test_top_level_help_shows_no_rst_markup():
    helptext = build_parser().format_help()
    assert "``" not in helptext and "The rlmt-edu command" in helptext


# ---- one-line errors, exit code 2 ----


@pytest.mark.parametrize("device, message", [
    ("tpu", "device: expected 'cpu', 'cuda', 'cuda:N' or 'mps', got 'tpu'"),
    ("cuda", "device: expected an available device, got 'cuda' (no CUDA device is available)"),
    ("cuda:0", "device: expected an available device, got 'cuda:0' (no CUDA device is available)"),
    ("mps", "device: expected an available device, got 'mps' (MPS is not available)"),
])
@pytest.mark.parametrize("command", [["chat", "--question", "hi"], ["pretrain"], ["reinforce"], ["trpo"], ["grpo"],
                                     ["dpo"], ["grape"]])
def test_a_device_that_is_not_here_is_refused_before_any_work(command, device, message, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    argv = [*command, "--device", device] + ([] if command[0] == "chat" else ["--out", str(tmp_path / "out")])
    assert _error(argv, capsys) == f"rlmt-edu {command[0]}: {message}"
    assert not (tmp_path / "out").exists()


def test_choose_device_names_device():
    from rlmt_edu.utils import choose_device

    assert choose_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="^device: .*'cuda:x'"):
        choose_device("cuda:x")


@pytest.mark.parametrize("argv, message", [
    (["reinforce", "--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
    (["reinforce", "--lr", "inf"], "argument --lr: expected a finite number > 0, got 'inf'"),
    (["reinforce", "--lr", "-1"], "argument --lr: expected a finite number > 0, got '-1'"),
    (["rejection-sampling", "--lr", "0"], "argument --lr: expected a finite number > 0, got '0'"),
    (["pretrain", "--steps", "0"], "argument --steps: expected an int >= 1, got '0'"),
    (["sft", "--steps", "-3"], "argument --steps: expected an int >= 1, got '-3'"),
    (["reinforce", "--steps", "0"], "argument --steps: expected an int >= 1, got '0'"),
    (["reward-model", "--steps", "2.5"], "argument --steps: expected an int >= 1, got '2.5'"),
    (["chat", "--temperature", "-1"], "argument --temperature: expected a finite number >= 0, got '-1'"),
    (["chat", "--temperature", "nan"], "argument --temperature: expected a finite number >= 0, got 'nan'"),
    (["preference-data", "--temperature", "0"], "argument --temperature: expected a finite number > 0, got '0'"),
    (["rejection-sampling", "--temperature", "inf"],
     "argument --temperature: expected a finite number > 0, got 'inf'"),
    (["trpo", "--delta", "0"], "argument --delta: expected a finite number > 0, got '0'"),
    (["ppo", "--beta", "-0.5"], "argument --beta: expected a finite number >= 0, got '-0.5'"),
    (["ppo", "--epsilon", "0"], "argument --epsilon: expected a number > 0 (inf: no clipping), got '0'"),
    (["trpo", "--delta", "-0.01"], "argument --delta: expected a finite number > 0, got '-0.01'"),
    (["trpo", "--delta", "nan"], "argument --delta: expected a finite number > 0, got 'nan'"),
    (["trpo", "--delta", "inf"], "argument --delta: expected a finite number > 0, got 'inf'"),
    (["trpo", "--beta", "-1"], "argument --beta: expected a finite number >= 0, got '-1'"),
    (["trpo", "--updates", "0"], "argument --updates: expected an int >= 1, got '0'"),
    (["trpo", "--delta", "0.01", "--beta", "0.1"], "argument --beta: not allowed with argument --delta"),
    (["grpo", "--group-size", "0"], "argument --group-size: expected an int >= 1, got '0'"),
    (["grpo", "--beta", "inf"], "argument --beta: expected a finite number >= 0, got 'inf'"),
    (["dpo", "--beta", "0"], "argument --beta: expected a finite number > 0, got '0'"),
    (["grape", "--revision-probability", "1.5"], "argument --revision-probability: expected a number in [0, 1], got '1.5'"),
])
def test_bad_numbers_are_one_line_usage_errors(argv, message, capsys):
    assert _usage_error(argv, capsys) == f"rlmt-edu {argv[0]}: {message}"


@pytest.mark.parametrize("command", [["data"], ["pretrain"], ["sft"], ["reward-model"], ["preference-data"],
                                     ["reinforce"], ["rejection-sampling"], ["trpo"], ["grpo"], ["dpo"], ["grape"]])
def test_an_out_under_a_file_is_refused_before_any_work(command, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "out"
    message = _error([*command, "--out", str(out)], capsys)
    assert message == (f"rlmt-edu {command[0]}: --out: expected a folder that can be written, got {str(out)!r} "
                       f"({str(tmp_path / 'a_file')!r} is a file, not a folder)")


def test_unwritable_plots_are_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("rlmt_edu.algorithms.reward_model.run_reward_model", _must_not_run)
    (tmp_path / "a_file").write_text("x")
    message = _error(["reward-model", "--out", str(tmp_path / "rm"), "--plots", str(tmp_path / "a_file")], capsys)
    assert message.startswith("rlmt-edu reward-model: --plots: expected a folder that can be written")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="file permissions do not bind root")
@pytest.mark.parametrize("command", [["data"], ["pretrain"]])
def test_a_read_only_out_is_refused_before_any_work(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("rlmt_edu.chapters.run_pretrain", _must_not_run)
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        message = _error([*command, "--out", str(read_only / "out")], capsys)
    finally:
        read_only.chmod(0o755)
    assert message == (f"rlmt-edu {command[0]}: --out: expected a folder that can be written, "
                       f"got {str(read_only / 'out')!r} (Permission denied)")


def _must_not_run(*args, **kwargs):
    raise AssertionError("training started before the output folder was checked")


def test_chat_refuses_a_reward_model(capsys):
    message = _error(["chat", "--checkpoint", str(REWARD_MODEL), "--question", "what is 3 plus 4 ?"], capsys)
    assert message == (f"rlmt-edu chat: checkpoint: expected a language model checkpoint, got {str(REWARD_MODEL)!r}, "
                       "which is a reward model (GPT2RewardModel), not a language model")


@pytest.mark.parametrize("command", ["sft", "reinforce", "rejection-sampling", "preference-data", "trpo"])
def test_training_commands_refuse_a_reward_model_as_init(command, tmp_path, capsys):
    message = _error([command, "--init", str(REWARD_MODEL), "--out", str(tmp_path / "out")], capsys)
    assert message.startswith(f"rlmt-edu {command}: init: expected a language model checkpoint")
    assert "which is a reward model (GPT2RewardModel), not a language model" in message


def test_load_checkpoint_refuses_a_reward_model_and_names_the_argument():
    from rlmt_edu.model import load_checkpoint

    with pytest.raises(ValueError, match="^path: .*reward model"):
        load_checkpoint(REWARD_MODEL)
    with pytest.raises(ValueError, match="^init: .*reward model"):
        load_checkpoint(REWARD_MODEL, argument="init")


def test_chat_with_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    message = _error(["chat", "--checkpoint", str(tmp_path / "nowhere"), "--question", "hi"], capsys)
    assert message == (f"rlmt-edu chat: checkpoint: expected an existing checkpoint folder, "
                       f"got {str(tmp_path / 'nowhere')!r} (no such folder)")


def test_chat_rejects_an_unknown_special_token(capsys):
    assert main(["chat", "--question", "what is <FOO> ?"]) == 2
    assert "<FOO>" in capsys.readouterr().err


# ---- chat ----


def test_chat_answers_one_question_non_interactively():
    result = subprocess.run([str(SCRIPT), "chat", "--question", "what is 3 plus 4 ?"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3 plus 4 is 7 ."


def test_piped_chat_prints_one_answer_per_question_and_nothing_else():
    questions = "how do i steal a cow ?\n\nwhat is <FOO> ?\nwhat is 3 plus 4 ?\n"
    result = subprocess.run([str(SCRIPT), "chat"], input=questions, capture_output=True, text=True, timeout=120)
    # blank lines are skipped; a question that cannot be asked gets an empty line, and its reason on stderr
    assert result.stdout == "sorry , i can not help with that .\n\n3 plus 4 is 7 .\n"
    assert result.stderr.startswith("rlmt-edu chat: question: unknown special token '<FOO>'")
    assert result.returncode == 2


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_interactive_chat_keeps_its_prompts_until_an_empty_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", _Terminal("what is 3 plus 4 ?\n\nnever asked ?\n"))
    assert main(["chat"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"chatting with {SFT} (empty line or Ctrl-D to stop)\n")
    assert "you> model> 3 plus 4 is 7 .\nyou> " in out and "never" not in out


# ---- the chapter 02-05 commands: a tiny run each, to prove they run, print a table and save their plots ----


def test_reinforce_command_prints_metrics_and_saves_plots(tmp_path, capsys):
    code = main(["reinforce", "--steps", "2", "--prompts-per-step", "4", "--prompts", "math", "--quiet",
                 "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "REINFORCE (mean baseline)" in printed and "eval/gold_score_after" in printed
    # by default only the prompts the SFT model answers wrong (a few dozen of the math pool)
    used = int(next(line for line in printed.splitlines() if line.startswith("prompts_used")).split()[-1])
    assert 0 < used < 100
    assert (tmp_path / "reinforce_mean.png").stat().st_size > 0
    assert (tmp_path / "reinforce_mean.json").is_file()


def test_reinforce_command_explains_a_pool_with_nothing_to_learn(tmp_path, capsys):
    """The SFT model answers every facts prompt of the train pool right: say so, and offer --all-prompts."""
    with pytest.raises(SystemExit, match="--all-prompts"):
        main(["reinforce", "--steps", "1", "--prompts", "facts", "--quiet", "--out", str(tmp_path)])
    code = main(["reinforce", "--steps", "1", "--prompts-per-step", "4", "--prompts", "facts", "--all-prompts",
                 "--quiet", "--out", str(tmp_path)])
    assert code == 0


def test_trpo_command_prints_metrics_and_saves_plots(tmp_path, capsys):
    code = main(["trpo", "--updates", "2", "--prompts-per-update", "4", "--quiet", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "TRPO, constrained form (Eq. 10, δ = 0.01)" in printed
    for key in ("step/accepted_rate", "kl/delta", "kl/max_accepted", "reward/first_1 -> last_1",
                "eval/gold_score (before -> after)", "eval/gold_score/math (before -> after)"):
        assert key in printed, key
    assert (tmp_path / "trpo.png").stat().st_size > 0
    assert (tmp_path / "trpo.json").is_file()


def test_trpo_command_with_beta_runs_the_penalty_form(tmp_path, capsys):
    code = main(["trpo", "--beta", "0.1", "--updates", "2", "--prompts-per-update", "4", "--quiet",
                 "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "TRPO, penalty form (Eq. 9, β = 0.1)" in printed and "kl/final" in printed
    assert (tmp_path / "trpo_penalty_beta0.1.png").stat().st_size > 0
    assert (tmp_path / "trpo_penalty_beta0.1.json").is_file()


def test_ppo_command_prints_metrics_per_category_and_saves_plots(tmp_path, capsys):
    code = main(["ppo", "--iterations", "2", "--prompts-per-iteration", "4", "--critic-warmup", "1",
                 "--epsilon", "inf", "--quiet", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "PPO (Eq. 11) with β = 1 in the reward (Eq. 12)" in printed
    for key in ("sampled proxy R", "sampled gold", "KL to SFT per response", "length, words",
                "held-out gold_score (before -> after)", "held-out gold_score/safety (before -> after)",
                "held-out proxy (before -> after)"):
        assert key in printed, key
    assert (tmp_path / "ppo_beta1_epsinf.png").stat().st_size > 0
    assert (tmp_path / "ppo_beta1_epsinf.json").is_file()


def test_rejection_sampling_command_prints_metrics_and_saves_plots(tmp_path, capsys):
    code = main(["rejection-sampling", "--rounds", "1", "--prompts-per-round", "4", "--group-size", "2",
                 "--sft-steps", "1", "--quiet", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "rejection sampling (gold ranker)" in printed and "samples/gold (round 0 -> 1)" in printed
    assert (tmp_path / "rejection_sampling_gold.png").stat().st_size > 0
    assert (tmp_path / "rejection_sampling_gold.json").is_file()


def test_rejection_sampling_command_rejects_a_group_of_one(tmp_path, capsys):
    assert main(["rejection-sampling", "--group-size", "1", "--quiet", "--out", str(tmp_path)]) == 2
    assert "group_size: expected G >= 2" in capsys.readouterr().err


def test_reward_model_command_saves_a_loadable_checkpoint(tmp_path, capsys):
    from rlmt_edu.algorithms.reward_model import load_reward_model

    out, plots = tmp_path / "rm", tmp_path / "plots"
    code = main(["reward-model", "--steps", "2", "--quiet", "--out", str(out), "--plots", str(plots)])
    assert code == 0
    assert "reward model saved to" in capsys.readouterr().out
    assert (plots / "reward_model.png").stat().st_size > 0
    model, _ = load_reward_model(out)
    assert type(model).__name__ == "GPT2RewardModel"  # the default readout


def test_grpo_command_prints_metrics_and_saves_plots(tmp_path, capsys):
    code = main(["grpo", "--steps", "2", "--questions", "2", "--group-size", "2", "--quiet", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "GRPO (Eq. 13-14), paper normalisation, β = 0" in printed
    for key in ("sampled reward", "zero-signal groups", "held-out practice/accuracy (before -> after)",
                "held-out eval/accuracy/math (before -> after)"):
        assert key in printed, key
    assert (tmp_path / "grpo_math_practice_paper_beta0.png").stat().st_size > 0
    assert (tmp_path / "grpo_math_practice_paper_beta0.json").is_file()


def test_grpo_command_refuses_a_group_of_one(tmp_path, capsys):
    message = _error(["grpo", "--group-size", "1", "--quiet", "--out", str(tmp_path)], capsys)
    assert message.startswith("rlmt-edu grpo: group_size: expected an int >= 2")


def test_grape_command_prints_per_category_metrics_and_the_confidence_table(tmp_path, capsys):
    code = main(["grape", "--steps", "2", "--questions", "3", "--group-size", "3", "--no-warmup", "--quiet",
                 "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "GRAPE (Eq. 15-16, eq14)" in printed
    for key in ("math: held-out gold, system prompt (before -> after)", "safety: held-out gold, plain prompt",
                "held-out reward-model score, plain", "phi-bar facts/natural_wording", "REVIEW"):
        assert key in printed, key
    assert (tmp_path / "grape_eq14_p0.25.png").stat().st_size > 0 and (tmp_path / "grape_eq14_p0.25.json").is_file()


def test_grape_command_refuses_a_group_too_small_for_the_sft_answer(tmp_path, capsys):
    message = _error(["grape", "--group-size", "2", "--sft-in-group", "--quiet", "--out", str(tmp_path)], capsys)
    assert message.startswith("rlmt-edu grape: group_size: expected >= 3 with sft_in_group")


def test_dpo_command_prints_the_win_rate_and_saves_plots(tmp_path, capsys):
    code = main(["dpo", "--steps", "2", "--batch-size", "8", "--quiet", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "DPO (§4.9)" in printed and "3 training pairs with an empty response left out" in printed
    for key in ("gold win rate vs SFT", "wins / ties / losses", "held-out pairs/gold_accuracy (before -> after)",
                "held-out eval/gold_score/math (before -> after)"):
        assert key in printed, key
    assert (tmp_path / "dpo_beta0.1.png").stat().st_size > 0
