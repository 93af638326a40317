"""List scheduler: exact times of a hand-computed DAG, longest chain first, bad DAGs, and random DAGs
against the invariants of a greedy list schedule (deps respected, one task at a time per resource,
no resource idle while one of its tasks is ready, makespan >= critical path and every resource's work)."""

from __future__ import annotations

import math
import random
import re

import pytest

from conftest import test_seed

from vortex_hybrid.scheduler import list_scheduler as ls
Task, schedule = ls.Task, ls.schedule


def test_hand_computed_dag():
    tasks = [Task("a", "gpu", 1.0), Task("g", "gpu", 0.5, ("a",)), Task("b", "cpu", 4.0, ("a",)),
             Task("c", "gpu", 2.0, ("a",)), Task("d", "pcie", 3.0, ("a",)),
             Task("e", "gpu", 1.0, ("c", "d")), Task("f", "gpu", 0.5, ("b", "e"))]
    s = schedule(tasks)
    # bottom levels: f .5, e 1.5, d 4.5, c 3.5, b 4.5, g .5, a 5.5; at t=1 the GPU has g and c
    # ready and takes c (3.5 > 0.5); e waits for d (ends at 4)
    assert s.priority == {"a": 5.5, "g": 0.5, "b": 4.5, "c": 3.5, "d": 4.5, "e": 1.5, "f": 0.5}
    assert s.start == {"a": 0, "c": 1, "b": 1, "d": 1, "g": 3, "e": 4, "f": 5}
    assert s.end == {"a": 1, "c": 3, "b": 5, "d": 4, "g": 3.5, "e": 5, "f": 5.5}
    assert s.order == ("a", "c", "b", "d", "g", "e", "f")
    assert s.makespan_s == 5.5
    assert s.critical_path == ("a", "b", "f")       # a-d-e-f is as long; b comes first in input


@pytest.mark.parametrize("gpu_attend, first, cpu_start, makespan", [(1.0, "sel C", 1.0, 6.0),
                                                                     (5.5, "sel G", 2.0, 7.5)])
def test_longest_chain_starts_first(gpu_attend, first, cpu_start, makespan):
    """Both selections are ready at 0 on one GPU; the one heading the longer chain goes first,
    whatever the input order (second case: then sel C, heading 6 s, before attend G's 5.5 s)."""
    tasks = [Task("sel G", "gpu", 1.0), Task("attend G", "gpu", gpu_attend, ("sel G",)),
             Task("sel C", "gpu", 1.0), Task("cpu", "cpu", 5.0, ("sel C",))]
    s = schedule(tasks)
    assert s.order[0] == first and s.start["cpu"] == cpu_start and s.makespan_s == makespan
    assert s.critical_path == ((first, "cpu") if first == "sel C" else (first, "attend G"))


def test_zero_duration_tasks_free_their_dependents_at_once():
    s = schedule([Task("a", "gpu", 0), Task("b", "gpu", 0, ("a",)), Task("c", "cpu", 2, ("b",)),
                  Task("d", "gpu", 1, ("b",))])
    assert s.start == {"a": 0, "b": 0, "c": 0, "d": 0} and s.makespan_s == 2


def test_empty():
    s = schedule([])
    assert s.order == () and s.makespan_s == 0 and s.critical_path == ()


@pytest.mark.parametrize("tasks, match", [
    ([Task("a", "gpu", 1, ("b",)), Task("b", "cpu", 1, ("a",))], "a -> b -> a"),
    ([Task("x", "gpu", 1, ("a",)), Task("a", "gpu", 1, ("b",)), Task("b", "cpu", 1, ("a",))],
     "a -> b -> a"),
    ([Task("a", "gpu", 1, ("a",))], "a -> a"),
    ([Task("a", "gpu", 1), Task("b", "gpu", 1, ("a", "zz"))], "'b' depends on unknown tasks \\['zz'\\]"),
    ([Task("a", "gpu", 1), Task("a", "cpu", 2)], "'a' is used twice"),
    (["a"], "Task"),
])
def test_bad_dags(tasks, match):
    with pytest.raises(ValueError, match=match):
        schedule(tasks)


@pytest.mark.parametrize("bad", [-1.0, -1e-12, math.nan, math.inf, True, "1", None])
def test_bad_duration_names_the_task_and_value(bad):
    with pytest.raises(ValueError, match=re.escape(f"'fetch': duration_s={bad!r}")):
        Task("fetch", "pcie", bad)


def test_bad_fields():
    with pytest.raises(ValueError, match="resource"):
        Task("a", "", 1.0)
    with pytest.raises(ValueError, match="name"):
        Task(3, "gpu", 1.0)
    with pytest.raises(ValueError, match="deps='b'"):
        Task("a", "gpu", 1.0, "b")
    assert Task("a", "gpu", 1.0, ["b"]).deps == ("b",)


def random_dag(rng: random.Random) -> list[Task]:
    n = rng.randint(1, 30)
    tasks = []
    for i in range(n):
        deps = tuple(f"t{j}" for j in rng.sample(range(i), rng.randint(0, min(i, 3))))
        dur = rng.choice([0.0, rng.random(), float(rng.randint(1, 4))])
        tasks.append(Task(f"t{i}", rng.choice(["gpu", "cpu", "pcie", "host"]), dur, deps))
    rng.shuffle(tasks)                      # input order need not be topological
    return tasks


def test_random_dags_keep_the_list_schedule_invariants():
    rng = random.Random(test_seed())
    for _ in range(200):
        tasks = random_dag(rng)
        s = schedule(tasks)
        assert s == schedule(tasks)                                   # deterministic
        by = {t.name: t for t in tasks}
        assert sorted(s.order) == sorted(by) and [s.start[n] for n in s.order] == \
            sorted(s.start[n] for n in s.order)
        for t in tasks:
            assert s.end[t.name] == s.start[t.name] + t.duration_s
            ready = max((s.end[d] for d in t.deps), default=0.0)
            assert s.start[t.name] >= ready
            # greedy: its resource is busy all the time between the task being ready and starting
            busy = sorted((s.start[u.name], s.end[u.name]) for u in tasks
                          if u.resource == t.resource and u is not t and s.start[u.name] < s.start[t.name]
                          and s.end[u.name] > ready)
            covered = ready
            for a, b in busy:
                assert a <= covered, f"{t.resource} idle at {covered} while {t.name} was ready"
                covered = max(covered, b)
            assert covered >= s.start[t.name]
        for r in {t.resource for t in tasks}:
            spans = sorted((s.start[t.name], s.end[t.name]) for t in tasks if t.resource == r)
            assert all(e0 <= s1 for (_, e0), (s1, _) in zip(spans, spans[1:])), f"{r} overlaps"
            assert s.makespan_s >= sum(t.duration_s for t in tasks if t.resource == r) - 1e-9
        path = s.critical_path
        assert not by[path[0]].deps and all(a in by[b].deps for a, b in zip(path, path[1:]))
        assert not any(path[-1] in t.deps for t in tasks)
        length = sum(by[n].duration_s for n in path)
        assert math.isclose(length, max(s.priority.values()), rel_tol=1e-12, abs_tol=1e-12)
        assert s.makespan_s >= length - 1e-9
