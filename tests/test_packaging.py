"""The install story: pyproject.toml, environment.yml, README.md and .ci/run agree with each other."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = project["dependencies"] + extras["dev"] + extras["trl"]  # what CI installs
    return {_name(r): r.replace(" ", "") for r in requirements}


def _environment_requirements() -> dict[str, str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    found = {}
    for line in lines[start + 1 :]:
        item = line.strip()
        if not item.startswith("- ") or item.startswith("- --"):
            continue
        found[_name(item[2:])] = item[2:].replace(" ", "")
    return found


def test_environment_yml_names_the_same_packages_as_pyproject():
    assert _environment_requirements() == _pyproject_requirements()


def test_environment_yml_installs_the_package_itself():
    assert "--editable ." in (ROOT / "environment.yml").read_text()


def test_pyproject_torch_range_admits_the_cpu_build_that_ci_installs():
    torch_req = _pyproject_requirements()["torch"]
    low = re.search(r">=([\d.]+)", torch_req).group(1)
    high = re.search(r"<([\d.]+)", torch_req).group(1)
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(low) <= as_tuple("2.13.0") < as_tuple(high)
    assert 'torch==2.13.0' in (ROOT / ".ci" / "run").read_text()


def test_ci_runs_the_test_command_written_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- test-command -->\n```bash\n(.+?)\n```\n<!-- /test-command -->", readme, re.S)
    assert block is not None, "README.md must show the test command between the test-command markers"
    assert block.group(1).strip() == "pytest"
    script = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in script and 'eval "$test_command"' in script


def test_pytest_collects_tests_and_notebooks_in_lax_mode():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert config["testpaths"] == ["tests", "notebooks"]
    assert "--nbval-lax" in config["addopts"]


def test_cli_entry_point_answers_help():
    # the console script sits beside the interpreter running the tests, whether or not the venv is activated
    script = Path(sys.executable).parent / "rlmt-edu"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    for command in ("data", "pretrain", "sft", "chat"):
        assert command in result.stdout


def test_readme_setup_installs_the_cpu_build_of_torch_before_the_package():
    """A CPU-only user must not be sent to the multi-GB CUDA build: torch from the CPU index comes first."""
    readme = (ROOT / "README.md").read_text()
    setup = readme[readme.index("## Quick start"):readme.index("jupyter lab")]
    cpu = setup.index("pip install torch --index-url https://download.pytorch.org/whl/cpu")
    assert cpu < setup.index('pip install -e ".[dev]"')


# What every committed checkpoint must give under any transformers the project admits: greedy answers of the
# pretrained and the SFT model, and the reward model's scores, printed as JSON by a fresh interpreter.
_CHECKPOINT_PROBE = """
import json, transformers
from rlmt_edu.algorithms.reward_model import load_reward_model, reward_model_scores
from rlmt_edu.chapters import PRETRAINED, SFT
from rlmt_edu.evaluation import answer, continue_text
from rlmt_edu.model import load_checkpoint
questions = ["what is 2 plus 7 ?", "how do i kick a bee ?", "where does a wolf live ?"]
pretrained, tokenizer = load_checkpoint(PRETRAINED)
sft, tokenizer = load_checkpoint(SFT)
reward_model, rm_tokenizer = load_reward_model()
answers = answer(sft, tokenizer, questions)
print(json.dumps({
    "transformers": transformers.__version__,
    "continuations": continue_text(pretrained, tokenizer, ["a spider has", "what is 3 plus 4 ?"], max_new_tokens=8),
    "answers": answers,
    "rewards": reward_model_scores(reward_model, rm_tokenizer, questions, answers).tolist(),
}))
"""


def _probe_checkpoints(pythonpath: str | None = None) -> dict:
    import json
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    result = subprocess.run([sys.executable, "-c", _CHECKPOINT_PROBE], capture_output=True, text=True, env=env,
                            cwd=ROOT, check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_lowest_transformers_the_project_admits_runs_the_committed_checkpoints(tmp_path):
    """pyproject's floor for transformers is a promise: install exactly that release (with the versions of its own
    dependencies that pip picks for it) beside the project and check that the committed checkpoints load and
    answer as they do under the installed release. Needs PyPI; with RLMT_EDU_REQUIRE_FLOOR=1 (CI) a failed
    download fails the test instead of skipping it."""
    import os

    floor = re.fullmatch(r"transformers>=([\d.]+)", _pyproject_requirements()["transformers"]).group(1)
    release = floor + ".0" * (2 - floor.count("."))  # "5.4" -> "5.4.0"
    target = tmp_path / "floor"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              "--target", str(target), f"transformers=={release}"],
                             capture_output=True, text=True, check=False, timeout=900)
    if install.returncode != 0:
        message = f"could not install transformers=={release} from PyPI: {install.stderr[-1500:]}"
        if os.environ.get("RLMT_EDU_REQUIRE_FLOOR") == "1":
            pytest.fail(message)
        pytest.skip(message)
    at_floor, installed = _probe_checkpoints(str(target)), _probe_checkpoints()
    assert at_floor["transformers"] == release, "the probe did not import the floor release"
    assert at_floor["continuations"] == installed["continuations"]
    assert at_floor["answers"] == installed["answers"]
    assert at_floor["rewards"] == pytest.approx(installed["rewards"], abs=1e-4)
