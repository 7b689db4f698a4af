"""Evaluation tasks as small validated dataclasses, with the same spec syntax as methods
(``passkey:digits=7``, ``niah:depths=7``, ``ruler:subtasks=niah_single_1;vt``, ``jsonl:path=x.jsonl``).

A task expands into one or more *subtasks* (the ``task`` column of the results: ``passkey``,
``niah``, ``ruler/vt``, ...), and produces, for a subtask and a length, the deterministic list of
samples of that cell. Generation tasks score each output 0-100; ``ppl`` measures losses instead.
"""

from longlab.eval.tasks import longbench, niah, passkey, perplexity, ruler  # noqa: F401  (register the tasks)
from longlab.eval.tasks.base import TASKS, CellContext, HeldOut, Task, describe_tasks, parse_task, stable_seed

__all__ = ["TASKS", "CellContext", "HeldOut", "Task", "describe_tasks", "parse_task", "stable_seed"]
