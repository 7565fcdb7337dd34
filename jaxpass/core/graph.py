"""``print(t.graph)``: the rewritten program, with its inputs named by parameter path."""

from __future__ import annotations

import dataclasses
import re

import jax

from jaxpass.core.program import Program


def _input_names(program: Program) -> list[str]:
    names = [f"params{p}" for p in program.param_paths]
    inp = program.inputs
    for prefix, tree in (("state", inp.state), ("args", inp.args), ("kwargs", inp.kwargs)):
        names += [prefix + jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return names


@dataclasses.dataclass(frozen=True)
class Graph:
    """A program ready to print: a table of named inputs, then the jaxpr."""

    program: Program
    title: str = "jaxpass program"

    @property
    def jaxpr(self):
        return self.program.closed

    def count(self, primitive: str) -> int:
        """How many equations (at any depth) bind ``primitive``."""
        return sum(1 for s in self.program.provenance if s.primitive == primitive)

    def __str__(self) -> str:
        text = str(self.program.closed)
        first = text.split("\n", 1)[0]
        m = re.match(r"\{ lambda (.*?); (.*?)\. let", first)
        var_names = m.group(2).split() if m else []
        lines = [self.title, "inputs:"]
        invars = self.program.jaxpr.invars
        for i, (v, name) in enumerate(zip(invars, _input_names(self.program))):
            var = var_names[i].split(":")[0] if i < len(var_names) else "?"
            lines.append(f"  {var:>4}  {str(v.aval):<22} {name}")
        lines.append(text)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Graph({len(self.program.jaxpr.eqns)} top-level equations)"
