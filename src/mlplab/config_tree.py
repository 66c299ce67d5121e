"""The run's resolved config as a tree: compact on the console, in full in the run dir.

At the start of a run (``print_config=true``, the default) the console shows one line per
config group: the option chosen and its few keys that matter most, plus any key of that
group set on the command line or by the data's recipe (``conf/recipe/``), e.g.
``optimizer: sgd  lr=0.05 momentum=0.9``. The whole
resolved config, every key of every group, goes to ``<run dir>/config_tree.log``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.text import Text
from rich.tree import Tree

from mlplab.atomic import atomic_write_text
from mlplab.groups import CONF_DIR, group_options

TREE_FILE = "config_tree.log"
#: The groups shown, in this order, and the keys of each always shown (when the option has them).
GROUPS: dict[str, tuple[str, ...]] = {
    "data": ("batch_size",),
    "augment": (),
    "model": ("hidden_sizes", "hidden_size", "activation", "dropout", "batch_norm"),
    "loss": (),
    "optimizer": ("lr", "momentum", "weight_decay"),
    "scheduler": (),
    "trainer": ("max_epochs", "accelerator", "devices"),
    "callbacks": (),
    "logger": (),
}
#: Top-level keys on the last line, and the presets named there when one is chosen.
TOP_KEYS = ("engine", "seed", "steps_per_call")
PRESETS = ("experiment", "debug", "hparams_search")
#: Console width for the tree: a longer line is cut with an ellipsis, never wrapped.
WIDTH = 120


def _choices() -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


def _recipe(choices: dict[str, Any]) -> str | None:
    """The recipe chosen (``conf/recipe/<data>.yaml``), if there is one and it is not ``none``."""
    choice = choices.get("recipe")
    if choice in (None, "None", "none") or str(choice) not in group_options("recipe"):
        return None
    return str(choice)


def _recipe_keys(recipe: str | None) -> list[str]:
    """The dotted keys the recipe sets (``loss.label_smoothing``, ...), from its file under ``conf/``."""
    path = CONF_DIR / "recipe" / f"{recipe}.yaml"
    if recipe is None or not path.is_file():
        return []
    node = OmegaConf.load(path)
    keys: list[str] = []

    def walk(n: Any, prefix: str) -> None:
        for k, v in n.items():
            if k == "defaults":
                continue
            if isinstance(v, DictConfig):
                walk(v, f"{prefix}{k}.")
            else:
                keys.append(f"{prefix}{k}")

    walk(node, "")
    return keys


def _overridden(group: str, recipe_keys: list[str]) -> list[str]:
    """The keys of ``group`` set on this run's command line (``optimizer.lr=0.1`` -> ``lr``)
    or by its recipe (``recipe_keys``, dotted)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    keys = []
    for key in [str(o).lstrip("+~").split("=", 1)[0] for o in HydraConfig.get().overrides.task] + recipe_keys:
        if key.startswith(f"{group}."):
            keys.append(key[len(group) + 1 :].split(".", 1)[0])
    return keys


def _value(node: Any) -> str:
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=True)
    return str(node)


def _group_line(cfg: DictConfig, group: str, choice: Any, recipe_keys: list[str]) -> Text:
    node = cfg.get(group)
    line = Text(f"{group}: ", style="bold")
    if node is None or (isinstance(node, DictConfig) and not node):
        line.append(str(choice) if choice not in (None, "None") else "none")
        return line
    if choice not in (None, "None"):
        line.append(str(choice))
    elif isinstance(node, DictConfig) and "_target_" in node:
        line.append(str(node["_target_"]).rsplit(".", 1)[-1])
    if isinstance(node, DictConfig) and "_target_" not in node:  # callbacks, logger: a dict of objects
        names = [str(k) for k, v in node.items() if isinstance(v, DictConfig) and "_target_" in v]
        line.append(f"  ({', '.join(names)})", style="dim")
        return line
    keys = [k for k in GROUPS[group] if k in node]
    keys += [k for k in dict.fromkeys(_overridden(group, recipe_keys)) if k in node and k not in keys]
    shown = " ".join(f"{k}={_value(node[k])}" for k in keys)
    if shown:
        line.append(f"  {shown}")
    return line


def compact_tree(cfg: DictConfig) -> Tree:
    """One line per group: its option and its main (and command-line) keys."""
    choices = _choices()
    recipe = _recipe(choices)
    recipe_keys = _recipe_keys(recipe)  # read once, for every group's line
    tree = Tree(Text(f"config (all of it: {TREE_FILE} in the run dir)", style="bold"), guide_style="dim")
    for group in GROUPS:
        if group in cfg:
            tree.add(_group_line(cfg, group, choices.get(group), recipe_keys))
    top = [f"{k}={_value(cfg[k])}" for k in TOP_KEYS if k in cfg]
    top += [f"recipe={recipe}"] if recipe else []
    top += [f"{p}={choices[p]}" for p in PRESETS if choices.get(p) not in (None, "None")]
    tree.add(Text("  ".join(top)))
    return tree


def full_tree(cfg: DictConfig) -> Tree:
    """Every top-level section, resolved, as YAML."""
    tree = Tree("config", guide_style="dim")
    container = OmegaConf.to_container(cfg, resolve=True)
    for key, value in container.items():
        if isinstance(value, (dict, list)) and value:
            text = OmegaConf.to_yaml(value).rstrip()
            tree.add(str(key)).add(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
        else:
            tree.add(f"{key}: {value}")
    return tree


def render(tree: Tree, width: int = WIDTH) -> str:
    """``tree`` as plain text (no colours)."""
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, force_terminal=False, soft_wrap=False).print(tree)
    return buffer.getvalue()


def print_config_tree(cfg: DictConfig) -> None:
    """The compact tree on stdout; the full one in ``<paths.output_dir>/config_tree.log``."""
    console = Console(soft_wrap=False)
    if not console.is_terminal:  # a file or a pipe: no terminal width to fit
        console = Console(width=WIDTH, soft_wrap=False)
    console.print(compact_tree_cut(cfg))
    out = OmegaConf.select(cfg, "paths.output_dir", default=None)
    if out is not None:
        Path(str(out)).mkdir(parents=True, exist_ok=True)  # made by Hydra already, unless called outside it
        atomic_write_text(Path(str(out)) / TREE_FILE, render(full_tree(cfg)))


def compact_tree_cut(cfg: DictConfig) -> Tree:
    """:func:`compact_tree` whose lines are cut (an ellipsis) rather than wrapped."""
    tree = compact_tree(cfg)
    for child in tree.children:
        if isinstance(child.label, Text):
            child.label.no_wrap, child.label.overflow = True, "ellipsis"
    return tree
