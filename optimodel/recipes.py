"""Recipes: a named list of passes with options, in YAML, validated before anything runs.

    name: cnn-int8
    description: ...
    passes:
      - fold
      - fuse: {preset: cnn}
      - quantize: {mode: static, calib_data: random}
    bench: {runs: 50, threads: 1}

YAML is read with the safe loader only (no `!!python/...` objects). An unknown key,
pass or option is an error naming the line and the valid choices. Command-line
`--set PASS.OPTION=VALUE` overrides a recipe's options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from optimodel.errors import UsageError
from optimodel.passes import Pass, available_passes, get_pass

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
TOP_LEVEL_KEYS = {"name", "description", "passes", "verify", "bench", "eval"}
SECTION_KEYS = {
    "verify": {"samples", "data"},
    "bench": {
        "enabled",
        "runs",
        "warmup",
        "threads",
        "providers",
        "if_slower",
        "max_latency_ratio",
    },
    "eval": {"max_drop", "data"},
}


class RecipeError(UsageError):
    """A recipe file that cannot be used; exit code 2 like any bad usage."""


@dataclass
class PassStep:
    """One pass of a recipe and the line it was declared on."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    line: int = 0


@dataclass
class Recipe:
    """A validated recipe."""

    name: str
    source: str
    description: str = ""
    steps: list[PassStep] = field(default_factory=list)
    verify: dict[str, Any] = field(default_factory=dict)
    bench: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)

    def build(self) -> list[Pass]:
        """Pass instances; an unknown option names the recipe line."""
        passes = []
        for step in self.steps:
            try:
                passes.append(get_pass(step.name, **step.options))
            except UsageError as exc:
                raise RecipeError(f"{self.source}:{step.line}: {exc.message}") from None
        return passes

    def override(self, settings: list[str] | None) -> None:
        """Apply `PASS.OPTION=VALUE` settings from the command line."""
        for setting in settings or []:
            key, sep, raw = setting.partition("=")
            pass_name, dot, option = key.strip().partition(".")
            if not sep or not dot or not option:
                raise UsageError(f"bad --set '{setting}': expected PASS.OPTION=VALUE")
            steps = [s for s in self.steps if s.name == pass_name]
            if not steps:
                names = ", ".join(s.name for s in self.steps)
                raise UsageError(
                    f"--set {setting}: recipe '{self.name}' has no pass '{pass_name}' ({names})"
                )
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw
            for step in steps:
                step.options[option.replace("-", "_")] = value

    def bind_data(self, data: str | None) -> None:
        """`optimize --data` calibrates quantization and scores pruning's accuracy budget,
        unless the recipe names its own data."""
        if not data:
            return
        for step in self.steps:
            static = step.options.get("mode") == "static"
            if (
                step.name == "quantize"
                and static
                and step.options.get("calib_data")
                in (
                    None,
                    "random",
                )
            ):
                step.options["calib_data"] = data
            budgeted = step.options.get("accuracy_budget") is not None
            if step.name == "quantize" and budgeted and not step.options.get("eval_data"):
                step.options["eval_data"] = data
            if step.name == "prune" and budgeted:
                if not step.options.get("eval_data"):
                    step.options["eval_data"] = data

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "description": self.description,
            "passes": [{"name": s.name, "options": s.options} for s in self.steps],
            "verify": self.verify,
            "bench": self.bench,
            "eval": self.eval,
        }


def recipe_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve(config: str) -> Path:
    """A recipe path: an existing file, or the name of a shipped recipe in configs/."""
    path = Path(config)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / f"{config}.yaml", CONFIG_DIR / config):
        if candidate.is_file():
            return candidate
    raise UsageError(
        f"--config {config}: no such recipe file or shipped recipe; shipped: "
        f"{', '.join(recipe_names()) or 'none'}"
    )


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _plain(node: yaml.Node, source: str) -> Any:
    """Build Python values from a composed node with the safe constructor only."""
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark or node.start_mark
        raise RecipeError(
            f"{source}:{mark.line + 1}: {exc.problem}; recipes hold plain data only "
            "(no Python objects)"
        ) from None
    finally:
        loader.dispose()


def load_recipe(config: str, data: str | None = None) -> Recipe:
    """Read and validate a recipe (name of a shipped one, or a path); `data` as for
    `bind_data`, since some passes need data to be valid at all."""
    path = resolve(config)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{source}{where}: not valid YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{source}: cannot read the recipe: {exc}") from None
    if root is not None:
        _plain(root, source)  # refuses non-data tags (!!python/...) anywhere, with the line
    if not isinstance(root, yaml.MappingNode):
        raise RecipeError(f"{source}: a recipe is a mapping with a 'passes' list")
    recipe = Recipe(name=path.stem, source=source)
    passes = available_passes()
    seen_passes = False
    for key_node, value_node in root.value:
        key = _plain(key_node, source)
        if key not in TOP_LEVEL_KEYS:
            raise RecipeError(
                f"{source}:{_line(key_node)}: unknown key '{key}'; valid: "
                f"{', '.join(sorted(TOP_LEVEL_KEYS))}"
            )
        if key == "passes":
            seen_passes = True
            recipe.steps = _steps(value_node, source, passes)
        elif key in SECTION_KEYS:
            recipe.__dict__[key] = _section(key, value_node, source)
        else:
            recipe.__dict__[key] = str(_plain(value_node, source))
    if not seen_passes or not recipe.steps:
        raise RecipeError(f"{source}: the recipe has no 'passes'")
    recipe.bind_data(data)
    recipe.build()  # options checked now, before any model is read
    return recipe


def _section(key: str, node: yaml.Node, source: str) -> dict[str, Any]:
    value = _plain(node, source)
    if not isinstance(value, dict):
        raise RecipeError(f"{source}:{_line(node)}: '{key}' must be a mapping")
    unknown = sorted(set(value) - SECTION_KEYS[key])
    if unknown:
        raise RecipeError(
            f"{source}:{_line(node)}: unknown '{key}' setting(s) {', '.join(unknown)}; valid: "
            f"{', '.join(sorted(SECTION_KEYS[key]))}"
        )
    return value


def _steps(node: yaml.Node, source: str, passes: dict[str, type[Pass]]) -> list[PassStep]:
    if not isinstance(node, yaml.SequenceNode):
        raise RecipeError(f"{source}:{_line(node)}: 'passes' must be a list")
    steps = []
    for item in node.value:
        line = _line(item)
        if isinstance(item, yaml.ScalarNode):
            name, options = str(_plain(item, source)), {}
        elif isinstance(item, yaml.MappingNode) and len(item.value) == 1:
            name = str(_plain(item.value[0][0], source))
            options = _plain(item.value[0][1], source) or {}
            if not isinstance(options, dict):
                raise RecipeError(f"{source}:{line}: options of pass '{name}' must be a mapping")
        else:
            raise RecipeError(f"{source}:{line}: a pass is a name or 'name: {{option: value}}'")
        if name not in passes:
            raise RecipeError(
                f"{source}:{line}: unknown pass '{name}'; available: {', '.join(passes)}"
            )
        options = {str(k).replace("-", "_"): v for k, v in options.items()}
        steps.append(PassStep(name, options, line))
    return steps
