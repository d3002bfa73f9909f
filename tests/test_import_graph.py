"""The import graph points one way (DESIGN §3): losses at the bottom, procedures above the shared machinery,
recipes and the command line on top, and no cycle anywhere — counting imports inside functions too."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rlmt_edu"

# lower number = lower layer; a module may import only modules of its own layer or below
LAYERS = {
    "rlmt_edu.losses": 0,
    "rlmt_edu.paths": 0,
    "rlmt_edu.utils": 1,
    "rlmt_edu.tokenizer": 1,
    "rlmt_edu.world": 2,
    "rlmt_edu.model": 2,
    "rlmt_edu.rollout": 3,
    "rlmt_edu.evaluation": 4,
    "rlmt_edu.plots": 4,
    "rlmt_edu.rl": 5,
    "rlmt_edu.algorithms": 6,
    "rlmt_edu.chapters": 7,
    "rlmt_edu.equations": 7,
    "rlmt_edu.results": 7,
    "rlmt_edu.integrations": 7,
    "rlmt_edu.widgets": 7,
    "rlmt_edu.cli": 8,
    "rlmt_edu.book": 8,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module that ``path`` imports, anywhere in the file (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == "rlmt_edu":  # from rlmt_edu import plots
            found.update(f"rlmt_edu.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def layer(module: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{module}: not in LAYERS; give it a layer in {__file__}")


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: {m for m in imports_of(path) if m.split(".")[0] == "rlmt_edu"} for name, path in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_only_its_own_layer_or_below(module):
    for imported in GRAPH[module]:
        assert layer(imported) <= layer(module), f"{module} (layer {layer(module)}) imports {imported} (layer {layer(imported)})"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("rlmt_edu.losses")))
def test_the_losses_import_only_torch_and_the_standard_library(module):
    for imported in imports_of(MODULES[module]):
        top = imported.split(".")[0]
        assert top in ("torch", "__future__") or top in sys.stdlib_module_names or imported.startswith(
            "rlmt_edu.losses"), f"{module} imports {imported}"


def test_there_is_no_import_cycle():
    def resolve(name: str) -> str | None:  # "rlmt_edu.losses._checks" is a module; "rlmt_edu.x.y" may be a name
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        return name or None

    edges = {m: {resolve(i) for i in GRAPH[m]} - {None, m} for m in MODULES}
    # a package's __init__ importing its own submodules is not a cycle of the layering kind
    edges = {m: {i for i in targets if not i.startswith(m + ".")} for m, targets in edges.items()}
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(edges[module]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [module, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[module] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])


def test_the_rl_machinery_has_one_home():
    """The prompt pools, sampler, rewards and scoring are defined in rlmt_edu.rl and nowhere else."""
    shared = {"prompt_pool", "heldout_questions", "PromptSampler", "sample_responses", "gold_reward",
              "exact_match_reward", "score_responses", "heldout_scores", "prompts_answered_wrong"}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        if name == "rlmt_edu.rl":
            assert shared <= defined
        else:
            assert not shared & defined, f"{name} defines {sorted(shared & defined)}"
