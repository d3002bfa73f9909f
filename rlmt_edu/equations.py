"""The machine-checked map from the paper's equations to code, tests and notebooks.

``INDEX`` lists every numbered equation (1-15, 17, 18) and every unnumbered formula the text builds on. Each
entry names the one function that implements it, the test module that proves it, and the chapter notebook
that teaches it. ``tests/test_equations_index.py`` fails when an entry's function or test is missing, and
the README's equation table is generated from this list (``python -m rlmt_edu.equations``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Equation:
    label: str  #: how the paper refers to it: "Eq. 11", or a section for unnumbered formulas
    name: str  #: the quantity, in words
    function: str  #: dotted path of the implementing function
    test: str  #: test module (path from the repository root)
    notebook: str  #: chapter notebook (path from the repository root)

    def resolve(self):
        """Import and return the implementing function."""
        module, _, attr = self.function.rpartition(".")
        return getattr(importlib.import_module(module), attr)


_NB = {
    1: "notebooks/01_instruction_tuning_sft.ipynb",
    2: "notebooks/02_rejection_sampling.ipynb",
    3: "notebooks/03_reinforce.ipynb",
    4: "notebooks/04_value_and_advantage.ipynb",
    5: "notebooks/05_reward_model.ipynb",
    6: "notebooks/06_importance_sampling_and_kl.ipynb",
    7: "notebooks/07_trpo.ipynb",
    8: "notebooks/08_ppo_and_kl_in_reward.ipynb",
    9: "notebooks/09_grpo.ipynb",
    10: "notebooks/10_dpo.ipynb",
    11: "notebooks/11_grape.ipynb",
    12: "notebooks/12_information_theory.ipynb",
}
_L = "rlmt_edu.losses."
_T = "tests/test_losses_"


def _e(label, name, module, function, chapter):
    return Equation(label, name, f"{_L}{module}.{function}", f"{_T}{module}.py", _NB[chapter])


INDEX: tuple[Equation, ...] = (
    _e("Eq. 1", "negative log-likelihood of one text", "nll", "nll", 1),
    _e("Eq. 2", "SFT loss: mean NLL over samples", "nll", "sft_loss", 1),
    _e("§3", "preference model's binary cross entropy", "preference", "preference_bce_loss", 2),
    _e("§4.1", "reward-weighted loss (REINFORCE, no baseline)", "policy_gradient", "reward_weighted_loss", 3),
    _e("Eq. 3", "REINFORCE loss with a baseline", "policy_gradient", "reinforce_loss", 3),
    _e("Eq. 4", "advantage A = R - V", "advantage", "advantage", 4),
    _e("§4.3", "generalized advantage estimator (GAE)", "advantage", "gae", 4),
    _e("§4.4", "P(text_i) from two rewards (softmax = sigmoid)", "preference", "preference_probability", 5),
    _e("Eq. 5", "reward function loss (BCE on rewards)", "preference", "reward_function_loss", 5),
    _e("Eq. 6", "reward model loss -log σ(R_w - R_l)", "preference", "reward_model_loss", 5),
    _e("Eq. 18", "importance sampling estimate", "importance", "importance_sampling_estimate", 6),
    _e("Eq. 7", "importance-weighted policy loss", "importance", "importance_weighted_loss", 6),
    _e("Eq. 8", "KL divergence over the vocabulary", "kl", "kl_divergence", 6),
    _e("§4.7, Eq. 12", "per-token KL estimator k1 (log-ratio)", "kl", "kl_estimator_k1", 6),
    _e("beyond the paper", "per-token KL estimator k2 (½ squared log-ratio)", "kl", "kl_estimator_k2", 6),
    _e("beyond the paper", "per-token KL estimator k3 (expm1 form)", "kl", "kl_estimator_k3", 6),
    _e("Eq. 9", "TRPO loss with a KL penalty", "trpo", "trpo_penalty_loss", 7),
    _e("Eq. 10", "TRPO trust-region constraint (mean KL <= δ)", "trpo", "trpo_constraint_satisfied", 7),
    _e("Eq. 11", "PPO clipped loss", "ppo", "ppo_clip_loss", 8),
    _e("Eq. 12", "KL-shaped per-token reward R'", "ppo", "kl_shaped_rewards", 8),
    _e("§4.7", "advantage on the shaped reward A' = R' - V", "ppo", "kl_shaped_advantage", 8),
    _e("Eq. 13", "group-relative advantage (Dr. GRPO)", "grpo", "group_relative_advantage", 9),
    _e("Eq. 14", "GRPO loss (sum over tokens / QG)", "grpo", "grpo_loss", 9),
    _e("§4.9", "naive preference loss on log-probabilities", "dpo", "naive_preference_loss", 10),
    _e("§4.9", "DPO loss", "dpo", "dpo_loss", 10),
    _e("§6.1", "mean rubric confidence φ̄ over a category", "grape", "mean_rubric_confidence", 11),
    _e("Eq. 15", "GRAPE confidence-weighted rubric reward", "grape", "grape_reward", 11),
    _e("Eq. 17", "GRAPE sequence-level clipped loss", "grape", "grape_sequence_loss", 11),
    _e("Lemma 8.1", "variance of plain vs confidence-weighted averages", "grape", "average_variances", 11),
    _e("§8.2", "entropy", "information", "entropy", 12),
    _e("§8.3", "cross entropy", "information", "cross_entropy", 12),
)

#: The numbered equations of the paper; each must appear in INDEX (Eq. 16 is an empty line in the paper).
NUMBERED = tuple(f"Eq. {n}" for n in (*range(1, 16), 17, 18))


def markdown_table(root: Path | None = None) -> str:
    """The README's equation table, one row per INDEX entry."""
    root = root or Path(__file__).resolve().parent.parent
    rows = ["| paper | quantity | function | test | notebook |", "|---|---|---|---|---|"]
    for eq in INDEX:
        module, _, fn = eq.function.rpartition(".")
        path = module.replace(".", "/") + ".py"
        nb = Path(eq.notebook)
        nb_cell = f"[{nb.stem}]({eq.notebook})" if (root / nb).exists() else f"{nb.stem} (planned)"
        rows.append(f"| {eq.label} | {eq.name} | [`{fn}`]({path}) | [{Path(eq.test).name}]({eq.test}) | {nb_cell} |")
    return "\n".join(rows)


def update_readme(readme: Path | None = None) -> bool:
    """Rewrite the table between ``<!-- equations -->`` markers in README.md. Returns True if it changed."""
    root = Path(__file__).resolve().parent.parent
    readme = readme or root / "README.md"
    text = readme.read_text()
    start, end = "<!-- equations -->\n", "\n<!-- /equations -->"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    new = f"{head}{start}{markdown_table(root)}{end}{tail}"
    if new != text:
        readme.write_text(new)
    return new != text


if __name__ == "__main__":
    import sys

    if "--update-readme" in sys.argv:
        print("README.md updated" if update_readme() else "README.md already up to date")
    else:
        print(markdown_table())
