"""Eval option checks, run in seconds before any model loads: pre-flight (ConfigError) and again when the
eval stage starts (StageError), each failure one line naming the field."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any

import yaml

from lora_pipeline.config import EvalConfig
from lora_pipeline.errors import ConfigError, LoraPipelineError, StageError
from lora_pipeline.evaluation.backends import (
    MAX_TOKEN_KEYS,
    gen_kwarg_problem,
    model_arg_problem,
    model_arg_value_problem,
    resolve_backend,
    vllm_missing,
)
from lora_pipeline.evaluation.values import GEN_KWARG_RULES, MODEL_ARG_RULES, value_problem
from lora_pipeline.models import first_line

# The task name that scores the run's own held-out data (the dataset stage's eval.jsonl) instead of an
# lm-eval task.
SPLIT_TASK = "split"


def lm_eval_tasks(tasks: list[str]) -> list[str]:
    """The tasks lm-eval scores: all but the run's own split."""
    return [t for t in tasks if t != SPLIT_TASK]


def check_eval_options(cfg: EvalConfig) -> None:
    """Pre-flight, in seconds: backend, include_path, task names, model_args and gen_kwargs keys for the
    backend, and local tasks' data files. Raises ConfigError naming the field; the eval stage runs the same
    checks (as StageError) when it starts."""
    checked_options(cfg, ConfigError)


def checked_options(cfg: EvalConfig, error: type[LoraPipelineError]) -> tuple[str, Any]:
    """The checks of check_eval_options; returns the backend that will score and the lm-eval task manager
    (None when only the run's own split is scored: indexing lm-eval's tasks is then wasted time)."""
    backend = scoring_backend(cfg, error)
    if cfg.include_path and not Path(cfg.include_path).is_dir():
        raise error(f"not a directory: {cfg.include_path}", field="eval.include_path")
    for key, value in cfg.model_args.items():
        if problem := (
            model_arg_problem(key, backend)
            or model_arg_value_problem(key, value, backend)
            or value_problem(MODEL_ARG_RULES, key, value)
        ):
            raise error(problem, field="eval.model_args")
    for key, value in cfg.gen_kwargs.items():
        if problem := (
            gen_kwarg_problem(key, backend)
            or value_problem(GEN_KWARG_RULES, key, value)
            or _max_tokens_problem(key, value)
        ):
            raise error(problem, field="eval.gen_kwargs")
    tasks = lm_eval_tasks(cfg.tasks)
    if not tasks:
        return backend, None
    task_manager = _task_manager(cfg, tasks)
    known = set(task_manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        if cfg.include_path and (broken := _unindexed_yaml(Path(cfg.include_path), unknown)):
            name, yaml_path, why = broken
            raise error(f"task {name!r}: lm-eval could not load {yaml_path} ({why})", field="eval.include_path")
        hint = "" if cfg.include_path else " (local task YAMLs need eval.include_path)"
        raise error(
            f"unknown lm-eval task(s): {', '.join(unknown)}{hint}; '{SPLIT_TASK}' scores the run's own eval split",
            field="eval.tasks",
        )
    _check_group_members(task_manager, tasks, error)
    _check_local_data(cfg, task_manager, tasks, error)
    build_tasks(task_manager, tasks, error, cfg.include_path)
    return backend, task_manager


def check_portable_options(cfg: EvalConfig) -> None:
    """The model_args / gen_kwargs checks that need no fact about the machine that will score (its CUDA, its
    vllm, its task index), for `compile`: a bad value is found on the desk, not in the eval pod after
    training. A key is refused when no backend eval.backend may resolve to takes it (the pipeline sets it, or
    neither knows it)."""
    backends = ("hf", "vllm") if cfg.backend == "auto" else (cfg.backend,)
    for key, value in cfg.model_args.items():
        problems = [model_arg_problem(key, b) for b in backends]
        if problem := (problems[0] if all(problems) else None) or value_problem(MODEL_ARG_RULES, key, value):
            raise ConfigError(problem, field="eval.model_args")
    for key, value in cfg.gen_kwargs.items():
        problems = [gen_kwarg_problem(key, b) for b in backends]
        if problem := (
            (problems[0] if all(problems) else None)
            or value_problem(GEN_KWARG_RULES, key, value)
            or _max_tokens_problem(key, value)
        ):
            raise ConfigError(problem, field="eval.gen_kwargs")


def _max_tokens_problem(key: str, value: Any) -> str | None:
    # Caught before generation, where it is a ValueError after the models have loaded.
    if key in MAX_TOKEN_KEYS and value is not None and (type(value) is not int or value < 1):
        return f"{key} must be a positive integer, got {value!r}"
    return None


def _unindexed_yaml(root: Path, names: list[str]) -> tuple[str, Path, str] | None:
    """(name, YAML, why) for a task YAML under `root` that names one of `names` and that lm-eval's index
    skipped without a word: an `include:` of a file that is not there, or YAML it cannot parse."""
    for path in sorted(root.rglob("*.y*ml")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            text, unreadable = "", str(exc)
        else:
            unreadable = ""
        for name in names:
            if not re.search(rf"^task:\s*['\"]?{re.escape(name)}['\"]?\s*$", text, re.MULTILINE):
                continue
            include = re.search(r"^include:\s*['\"]?([^'\"\n]+?)['\"]?\s*$", text, re.MULTILINE)
            if include and not (path.parent / include.group(1)).expanduser().is_file():
                return name, path, f"its include: {include.group(1)} is not beside it"
            try:
                yaml.load(text, Loader=_TagTolerantLoader)  # noqa: S506 (a SafeLoader)
            except yaml.YAMLError as exc:
                return name, path, f"not valid YAML: {first_line(exc)}"
            return name, path, unreadable or "see --eval.verbosity DEBUG for lm-eval's reason"
    return None


def scoring_backend(cfg: EvalConfig, error: type[LoraPipelineError] = ConfigError) -> str:
    """hf or vllm: an explicit vllm on a machine without it is an error, not a silent hf run."""
    if cfg.backend == "vllm" and (missing := vllm_missing()):
        raise error(f"the vllm backend needs {missing} on this machine (auto falls back to hf)", field="eval.backend")
    return resolve_backend(cfg.backend)


def _task_manager(cfg: EvalConfig, tasks: list[str]) -> Any:
    """Index only the local task YAMLs when they hold every task asked for: indexing lm-eval's
    thousands of built-in tasks costs ~8 s on a small CPU."""
    from lm_eval.tasks import TaskManager

    if cfg.include_path:
        local = TaskManager(include_path=cfg.include_path, include_defaults=False)
        # a local group may list built-in tasks: then the full index is needed
        if all(t in local.all_tasks for t in tasks) and _unknown_member(local, tasks) is None:
            return local
    return TaskManager(include_path=cfg.include_path or None)


def _check_group_members(task_manager: Any, names: list[str], error: type[LoraPipelineError]) -> None:
    """Every task a group lists by name is known: lm-eval skips an unknown one while indexing, and building the
    group then fails with "expected str, bytes or os.PathLike object, not NoneType"."""
    if missing := _unknown_member(task_manager, names):
        group, yaml_path, child = missing
        raise error(
            f"group {group!r} ({yaml_path}) lists task {child!r}, which lm-eval does not know", field="eval.tasks"
        )


def _unknown_member(task_manager: Any, names: list[str]) -> tuple[str, Any, str] | None:
    """(group, its YAML, member) for the first task a group reached from `names` lists and the index lacks."""
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        entry = task_manager.task_index.get(name)
        if entry is None or name in seen or not (entry.cfg and "group" in entry.cfg):
            continue
        seen.add(name)
        children = entry.cfg.get("task") or []
        for child in children if isinstance(children, list) else [children]:
            if isinstance(child, str) and child not in task_manager.task_index:
                return name, entry.yaml_path, child
            if isinstance(child, str):
                todo.append(child)
    return None


def _check_local_data(cfg: EvalConfig, task_manager: Any, tasks: list[str], error: type[LoraPipelineError]) -> None:
    """The data files named by local task YAMLs exist. lm-eval finds out only when it builds the task, deep in
    `datasets`, and relative paths there resolve against the working directory, not against the YAML."""
    if not cfg.include_path:
        return
    root = Path(cfg.include_path).resolve()
    for name, yaml_path, task_cfg in _local_tasks(task_manager, tasks, root):
        for path in _data_paths(task_cfg):
            if _found(path):
                continue
            where = f"task {name!r} ({yaml_path}) reads {path}, which does not exist"
            if not Path(path).expanduser().is_absolute():
                where += f" (relative paths in task YAMLs resolve against the working directory, {Path.cwd()})"
            raise error(where, field="eval.include_path")


def _local_tasks(task_manager: Any, names: list[str], root: Path) -> list[tuple[str, Path, dict]]:
    """(name, yaml path, config) of the tasks under `root` that `names` reach, through groups and tags too."""
    found: list[tuple[str, Path, dict]] = []
    todo: list[tuple[str | dict, Path | None]] = [(name, None) for name in names]  # (task, YAML that named it)
    seen: set[str] = set()
    while todo:
        item, parent = todo.pop()
        if isinstance(item, dict):  # a task written inline in a group's YAML
            if parent and root in parent.resolve().parents:
                found.append((str(item.get("task")), parent, item))
            continue
        entry = task_manager.task_index.get(item)
        if entry is None or item in seen:
            continue
        seen.add(item)
        if entry.yaml_path is None:  # a tag: its entry lists the tasks carrying it
            todo += [(task, None) for task in sorted(entry.tags)]
        elif entry.cfg and "group" in entry.cfg:
            children = entry.cfg.get("task") or []
            todo += [(child, entry.yaml_path) for child in (children if isinstance(children, list) else [children])]
        elif entry.cfg and root in Path(entry.yaml_path).resolve().parents:
            found.append((item, entry.yaml_path, entry.cfg))
    return found


def _data_paths(task_cfg: dict) -> list[str]:
    """Local paths a task config makes `datasets` read: data_files entries, and a path-like dataset_path."""
    paths: list[str] = []
    dataset_path = task_cfg.get("dataset_path")
    if isinstance(dataset_path, str) and dataset_path.startswith((".", "/", "~")):
        paths.append(dataset_path)
    data_files = (task_cfg.get("dataset_kwargs") or {}).get("data_files")
    for value in data_files.values() if isinstance(data_files, dict) else [data_files]:
        paths += value if isinstance(value, list) else [value]
    return [p for p in paths if isinstance(p, str) and "://" not in p]


def _found(path: str) -> bool:
    """A file or directory, or a glob pattern that matches one; relative to the working directory, as in datasets."""
    return bool(glob.glob(os.path.expanduser(path), recursive=True))


# (task manager, tasks) built in this process: pre-flight builds them, and the eval stage of the same `run`
# need not build them again before lm-eval does.
_built: set[tuple[str, tuple[str, ...]]] = set()


def build_tasks(
    task_manager: Any, tasks: list[str], error: type[LoraPipelineError] = StageError, include_path: str = ""
) -> None:
    """Build the tasks in pre-flight, before any training, and before any model loads. Whatever fails here (a
    hub dataset that cannot be fetched offline, a broken YAML, a split the dataset lacks) is about the tasks
    the user chose, so it is one line naming them, not lm-eval's traceback; nothing has been written yet."""
    key = (include_path, tuple(tasks))
    if key in _built:
        return
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # `datasets` reading a task's data: a bar per split, before the one line
    try:
        task_manager.load(list(tasks))
    except Exception as exc:
        raise error(f"cannot build lm-eval task(s) {', '.join(tasks)}: {_reason(exc)}", field="eval.tasks") from exc
    finally:
        if bars:
            datasets.enable_progress_bars()
    _built.add(key)


def _reason(exc: BaseException) -> str:
    """The error's first line, plus that of its root cause: `datasets` wraps the telling error (a JSON parse
    error, a missing file, no network) in a generic one."""
    chain = [exc]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    root = chain[-1]
    if root is exc:
        # texts that say nothing alone: a KeyError's is the key (a test_split the data lacks reads "'validation'"),
        # a StopIteration's is empty (lm-eval reads a first document the split does not have)
        if isinstance(exc, KeyError):
            return f"no {first_line(exc)} in the task's data"
        if isinstance(exc, StopIteration):
            return "the task's split has no rows"
        return first_line(exc)
    return f"{first_line(exc)} ({type(root).__name__}: {first_line(root)})"


class _TagTolerantLoader(yaml.SafeLoader):
    """SafeLoader that reads lm-eval's `!function module.name` tags as plain text."""


_TagTolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)
