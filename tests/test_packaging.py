"""The install story: pyproject.toml, environment.yml, README.md and .ci/run agree with each other."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

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
