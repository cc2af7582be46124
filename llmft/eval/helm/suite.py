"""The HELM core suite: the packaged suite YAML (every scenario's adapter settings and main metric), loaded and
validated, and the scenarios a run selects from it."""

from __future__ import annotations

from pathlib import Path

from llmft.config.eval import HelmSuite, ScenarioSpec
from llmft.config.loading import load_validated

DEFAULT_SUITE = Path(__file__).with_name("core.yaml")  # package data: found after a wheel install too


def load_helm_suite(path: str | Path = DEFAULT_SUITE) -> HelmSuite:
    """Read and validate a suite YAML (``llmft/eval/helm/core.yaml``, package data, by default).

    Raises:
        llmft.config.RecipeError: the file is missing, not YAML, or invalid; one ``file:line: path: problem`` line
            per problem.
    """
    return load_validated(path, HelmSuite)


def select_scenarios(suite: HelmSuite, names: list[str]) -> list[ScenarioSpec]:
    """The suite's scenarios named in ``names`` (in that order); ``["all"]`` or ``[]`` selects every one.

    Raises:
        ValueError: a name is not in the suite; the message lists the known names.
    """
    by_name = {s.name: s for s in suite.scenarios}
    names = [n.strip() for n in names if n.strip()]
    if not names or names == ["all"]:
        return list(suite.scenarios)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown HELM scenario(s): {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [by_name[n] for n in names]
