"""Priority list scheduling of a task DAG over resources that each run one task at a time.

A `Task` runs on one resource (any name: "gpu", "cpu", "pcie", "host") for `duration_s`, once every
task named in `deps` has ended. `schedule` gives each task the priority of its bottom level (the
longest chain from its start to the end of the DAG, its own duration included: longest chain first)
and simulates: whenever a resource is free, it starts its ready task of highest priority (ties: input
order); at one instant, resources are served in order of first appearance. Deterministic. A task of
zero duration ends where it starts, so its dependents may start at that instant.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Task:
    """One unit of work: `resource` runs it for `duration_s` after every task of `deps` has ended."""
    name: str
    resource: str
    duration_s: float
    deps: tuple[str, ...] = ()

    def __post_init__(self):
        for field in ("name", "resource"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                raise ValueError(f"task {self.name!r}: {field}={getattr(self, field)!r} must be a "
                                 "non-empty string")
        d = self.duration_s
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0:
            raise ValueError(f"task {self.name!r}: duration_s={d!r} must be a finite number >= 0")
        if isinstance(self.deps, str) or not all(isinstance(x, str) for x in self.deps):
            raise ValueError(f"task {self.name!r}: deps={self.deps!r} must be a sequence of task names")
        object.__setattr__(self, "deps", tuple(self.deps))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Start and end times (s) of every task, `order` = names in start order, the makespan, each
    task's priority (bottom level, s) and the names on a longest chain (`critical_path`)."""
    order: tuple[str, ...]
    start: dict
    end: dict
    makespan_s: float
    priority: dict
    critical_path: tuple[str, ...]


def _topological(tasks: list[Task]) -> list[Task]:
    """Tasks in an order where deps come first; ValueError naming a cycle when there is one."""
    by_name = {t.name: t for t in tasks}
    waiting = {t.name: len(set(t.deps)) for t in tasks}
    users: dict[str, list[str]] = {t.name: [] for t in tasks}
    for t in tasks:
        for d in set(t.deps):
            users[d].append(t.name)
    todo = [t.name for t in tasks if waiting[t.name] == 0]
    out = []
    while todo:
        n = todo.pop()
        out.append(by_name[n])
        for u in users[n]:
            waiting[u] -= 1
            if waiting[u] == 0:
                todo.append(u)
    if len(out) < len(tasks):       # every task left waits on another task left: walk to a repeat
        path, n = [], next(t.name for t in tasks if waiting[t.name])
        while n not in path:
            path.append(n)
            n = next(d for d in by_name[n].deps if waiting[d])
        cycle = path[path.index(n):] + [n]
        raise ValueError(f"dependency cycle: {' -> '.join(cycle)} (each waits for the next)")
    return out


def schedule(tasks) -> Schedule:
    """List-schedule `tasks` (module docstring). ValueError for a repeated name, an unknown dep or a
    dependency cycle, naming the task."""
    tasks = list(tasks)
    if not all(isinstance(t, Task) for t in tasks):
        raise ValueError(f"tasks must be Task objects, got {[type(t).__name__ for t in tasks]}")
    index: dict[str, int] = {}
    for i, t in enumerate(tasks):
        if t.name in index:
            raise ValueError(f"task name {t.name!r} is used twice (tasks {index[t.name]} and {i})")
        index[t.name] = i
    for t in tasks:
        unknown = [d for d in t.deps if d not in index]
        if unknown:
            raise ValueError(f"task {t.name!r} depends on unknown tasks {unknown}")
    users: dict[str, list[Task]] = {t.name: [] for t in tasks}
    for t in tasks:
        for d in t.deps:
            users[d].append(t)
    prio: dict[str, float] = {}
    for t in reversed(_topological(tasks)):                 # users before the tasks they wait for
        prio[t.name] = t.duration_s + max((prio[u.name] for u in users[t.name]), default=0.0)

    resources = list(dict.fromkeys(t.resource for t in tasks))
    free_at = dict.fromkeys(resources, 0.0)
    start: dict[str, float] = {}
    end: dict[str, float] = {}
    order: list[str] = []
    now = 0.0
    while len(order) < len(tasks):
        started = True
        while started:                                      # zero-length tasks free things at `now`
            started = False
            for r in resources:
                if free_at[r] > now:
                    continue
                ready = [t for t in tasks if t.resource == r and t.name not in start
                         and all(end.get(d, math.inf) <= now for d in t.deps)]
                if ready:
                    t = max(ready, key=lambda t: (prio[t.name], -index[t.name]))
                    start[t.name], end[t.name] = now, now + t.duration_s
                    free_at[r] = end[t.name]
                    order.append(t.name)
                    started = True
        if len(order) < len(tasks):
            now = min(e for e in end.values() if e > now)   # the next task to end
    sources = [t for t in tasks if not t.deps]                # a longest chain starts at one
    path = [max(sources, key=lambda t: (prio[t.name], -index[t.name]))] if tasks else []
    while path and users[path[-1].name]:
        path.append(max(users[path[-1].name], key=lambda t: (prio[t.name], -index[t.name])))
    return Schedule(tuple(order), start, end, max(end.values(), default=0.0), prio,
                    tuple(t.name for t in path))
