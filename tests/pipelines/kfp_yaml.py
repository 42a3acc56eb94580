"""Read a compiled KFP pipeline back as a task graph: display name -> executor, upstream tasks, platform spec."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Task:
    name: str  # display name (taskInfo.name)
    internal: str  # key in its DAG
    executor: str | None  # None for groups (loops, conditions, exit handler)
    caching: bool
    upstream: set[str] = field(default_factory=set)  # display names of leaf tasks it waits for
    groups: list[str] = field(default_factory=list)  # enclosing groups, outermost first
    # input artifact name -> display names of the leaf tasks that produce it (followed through the groups it
    # enters and the loops it is collected from)
    artifacts: dict[str, set[str]] = field(default_factory=dict)


def load(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    docs = list(yaml.safe_load_all(Path(path).read_text(encoding="utf-8")))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def leaf_tasks(spec: dict[str, Any]) -> dict[str, list[Task]]:
    """Every executor task by display name (a name may occur more than once, e.g. a shard's task)."""
    components = spec["components"]
    out: dict[str, list[Task]] = defaultdict(list)

    def leaves_of(comp_name: str) -> set[str]:
        comp = components[comp_name]
        if "dag" not in comp:
            return set()
        names: set[str] = set()
        for t in comp["dag"]["tasks"].values():
            sub = components[t["componentRef"]["name"]]
            names |= leaves_of(t["componentRef"]["name"]) if "dag" in sub else {t["taskInfo"]["name"]}
        return names

    def producers(dag: dict[str, Any], task_key: str, output_key: str) -> set[str]:
        t = dag["tasks"][task_key]
        comp = components[t["componentRef"]["name"]]
        if "dag" not in comp:
            return {t["taskInfo"]["name"]}
        selectors = comp["dag"]["outputs"]["artifacts"][output_key]["artifactSelectors"]
        return set().union(
            *(producers(comp["dag"], sel["producerSubtask"], sel["outputArtifactKey"]) for sel in selectors)
        )

    def sources(dag: dict[str, Any], t: dict[str, Any], env: dict[str, set[str]]) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for name, ref in t.get("inputs", {}).get("artifacts", {}).items():
            if "taskOutputArtifact" in ref:
                out = ref["taskOutputArtifact"]
                found[name] = producers(dag, out["producerTask"], out["outputArtifactKey"])
            elif "componentInputArtifact" in ref:
                found[name] = env.get(ref["componentInputArtifact"], set())
        return found

    def walk(
        dag: dict[str, Any], inherited: set[str], groups: list[str], env: dict[str, set[str]] | None = None
    ) -> None:
        env = env or {}
        tasks = dag["tasks"]
        for internal, t in tasks.items():
            ref = t["componentRef"]["name"]
            comp = components[ref]
            ups = set(inherited)
            for dep in t.get("dependentTasks", []):
                dep_ref = tasks[dep]["componentRef"]["name"]
                ups |= (
                    leaves_of(dep_ref) if "dag" in components[dep_ref] else {tasks[dep]["taskInfo"]["name"]}
                )
            # An exit task runs after the group it guards.
            if t.get("triggerPolicy", {}).get("strategy") == "ALL_UPSTREAM_TASKS_COMPLETED":
                ups |= {
                    n
                    for d in t.get("dependentTasks", [])
                    for n in leaves_of(tasks[d]["componentRef"]["name"])
                }
            name = t["taskInfo"]["name"]
            if "dag" in comp:
                walk(comp["dag"], ups, [*groups, name], sources(dag, t, env))
            else:
                out[name].append(
                    Task(
                        name=name,
                        internal=internal,
                        executor=comp["executorLabel"],
                        caching=bool(t.get("cachingOptions", {}).get("enableCache", False)),
                        upstream=ups,
                        groups=groups,
                        artifacts=sources(dag, t, env),
                    )
                )

    walk(spec["root"]["dag"], set(), [])
    return dict(out)


def executor_platform(platform: dict[str, Any], executor: str) -> dict[str, Any]:
    return (
        platform.get("platforms", {})
        .get("kubernetes", {})
        .get("deploymentSpec", {})
        .get("executors", {})
        .get(executor, {})
    )


def container(spec: dict[str, Any], executor: str) -> dict[str, Any]:
    return spec["deploymentSpec"]["executors"][executor]["container"]
