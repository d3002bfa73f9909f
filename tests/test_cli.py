"""The rlmt-edu command line: data regeneration, chat, and clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from rlmt_edu.cli import main
from rlmt_edu.world.data import DATA_DIR

SCRIPT = Path(sys.executable).parent / "rlmt-edu"


def test_data_command_writes_the_committed_files(tmp_path):
    assert main(["data", "--out", str(tmp_path)]) == 0
    for path in sorted(tmp_path.iterdir()):
        assert path.read_bytes() == (DATA_DIR / path.name).read_bytes(), path.name


def test_chat_answers_one_question_non_interactively():
    result = subprocess.run([str(SCRIPT), "chat", "--question", "what is 3 plus 4 ?"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3 plus 4 is 7 ."


def test_chat_reads_questions_from_stdin_until_an_empty_line():
    result = subprocess.run([str(SCRIPT), "chat"], input="how do i steal a cow ?\n\n",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "model> sorry , i can not help with that ." in result.stdout


def test_chat_with_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["chat", "--checkpoint", str(tmp_path / "nowhere"), "--question", "hi"]) == 2
    assert "path" in capsys.readouterr().err


def test_chat_rejects_an_unknown_special_token(capsys):
    assert main(["chat", "--question", "what is <FOO> ?"]) == 2
    assert "<FOO>" in capsys.readouterr().err


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
    assert model.config.num_labels == 1
