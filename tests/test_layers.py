"""The layer rules of DESIGN.md ("Layers", "Never:"), checked on the source with `ast`.

Every module under src/phalanx is parsed; every import counts, wherever it is written: at
module level, inside a function, under `if TYPE_CHECKING:`, relative or absolute, and
`importlib.import_module("phalanx....")` with a literal (or f-string) prefix. Nothing is
imported: the checks take milliseconds and need no torch.

What "the root package" means here: `phalanx/__init__.py`, the lazy public API. A module
imports it when it binds the package object (`import phalanx`, `import phalanx as px`,
`import phalanx.x` without `as`) or takes a name from it that is not a submodule
(`from phalanx import allreduce`, `from .. import __version__`, which go through the
package's `__getattr__` or its globals). `from phalanx import runtime` / `from .. import api`
import the submodules `phalanx.runtime` / `phalanx.api` and are ordinary layer imports.

A "core" module is any module below the facades: the facades (`horovod/`, `lightning`) are
"thin over the API" and `bench/` runs user-style scripts, so those three may use
`import phalanx as px` like any user program; nothing else may.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "phalanx"

# DESIGN.md's layer order, bottom first. A module may import its own layer and those below.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "observe"),      # every exception class; timeline and metrics (leaves)
    ("env", "config"),          # the one place PHALANX_* is read; typed settings
    ("coord",),                 # membership, generations, heartbeats, store (no torch)
    ("static",),                # torchrun-style static jobs
    ("comm",),                  # one process group per generation, shm, hierarchical
    ("runtime",),               # this process's membership in a job
    ("api", "subgroups"),       # the module-level collective API
    ("train",),                 # DistributedOptimizer
    ("elastic",),               # State, recovery loop, checkpoints, chaos
    ("data",),                  # sharding, datasets, ShardedLoader, map_reduce
    ("launch",),                # the `phalanx` CLI, the supervisor, starters
    ("ray", "spark"),           # starters on engines users already run
    ("horovod", "lightning"),   # facades over the public API
    ("bench",),                 # `phalanx bench ...`
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
FACADES = ("horovod", "lightning", "bench")

# Imports that break a rule, one case each, with its reason. Keep these lists short: the test
# fails when an entry is no longer needed, so fixed code cannot leave a stale excuse behind.
LAYER_EXCEPTIONS: dict[tuple[str, str], str] = {
    ("phalanx.launch.cli", "phalanx.bench"):
        "TODO(issue 21): `phalanx bench NAME` is dispatched by the launch CLI, which imports "
        "phalanx.bench.NAME by name (importlib). Fix: the console entry point dispatches "
        "`bench` itself (a top-level CLI above both launch and bench), or bench registers "
        "its commands; launch/* is being edited by others.",
}
# (module, name taken from the root package; "phalanx" for the package itself) -> reason
ROOT_EXCEPTIONS: dict[tuple[str, str], str] = {
}


@dataclass(frozen=True, slots=True)
class Import:
    source: str     # importing module, dotted
    target: str     # imported module, dotted (for a root-package name: "phalanx")
    line: int
    path: str       # file, relative to src/
    root: bool      # binds the root package or takes a non-module name from it
    name: str = ""  # for a root import: the name taken ("phalanx": the package itself)


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package) for every module of phalanx."""
    out = {}
    for p in sorted((SRC / ROOT).rglob("*.py")):
        parts = p.relative_to(SRC).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


MODULES = _modules()


@functools.cache
def _tree(module: str) -> ast.Module:
    path = MODULES[module][0]
    return ast.parse(path.read_text(), str(path))


def _dynamic_target(call: ast.Call, module: str) -> str | None:
    """The module named by `importlib.import_module(...)` / `__import__(...)`, as far as a
    literal prefix tells (f"phalanx.bench.{name}" -> "phalanx.bench")."""
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    if name not in ("import_module", "__import__") or not call.args:
        return None
    arg, text, complete = call.args[0], "", True
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        text = arg.value
    elif isinstance(arg, ast.JoinedStr):
        for v in arg.values:
            if isinstance(v, ast.Constant):
                text += str(v.value)
            elif isinstance(v.value, ast.Name) and v.value.id == "__name__":
                text += module
            else:
                complete = False
                break
    if not complete:
        text = text.rsplit(".", 1)[0] if "." in text else ""
    text = text.rstrip(".")
    return text or None


def imports_of(module: str) -> list[Import]:
    """Every phalanx import of one module (see the module docstring for what counts)."""
    path, is_pkg = MODULES[module]
    return _imports(module, _tree(module), is_pkg=is_pkg, rel=str(path.relative_to(SRC)))


def _imports(module: str, tree: ast.Module, *, is_pkg: bool, rel: str) -> list[Import]:
    package = module if is_pkg else module.rpartition(".")[0]
    out: list[Import] = []

    def add(target: str, line: int, root: bool = False, name: str = ROOT) -> None:
        if target == ROOT or target.startswith(ROOT + "."):
            out.append(Import(module, target, line, rel, root, name if root else ""))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                # `import phalanx.x` binds `phalanx`; `import phalanx.x as y` binds only x.
                add(a.name, node.lineno, root=a.name == ROOT or a.asname is None)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level - 1 > len(base) - 1:
                    raise AssertionError(f"{rel}:{node.lineno}: relative import leaves phalanx")
                base = base[:len(base) - (node.level - 1)]
                frm = ".".join(base + ([node.module] if node.module else []))
            else:
                frm = node.module or ""
            for a in node.names:
                sub = f"{frm}.{a.name}"
                if sub in MODULES:
                    add(sub, node.lineno)               # a submodule: an ordinary import
                else:
                    add(frm, node.lineno, root=frm == ROOT, name=a.name)   # a name of `frm`
        elif isinstance(node, ast.Call):
            target = _dynamic_target(node, module)
            if target is not None:
                add(target, node.lineno, root=target == ROOT)
    return out


ALL_IMPORTS = [i for m in MODULES for i in imports_of(m)]


def _top(module: str) -> str:
    """'phalanx.comm.group' -> 'comm'; the root package itself -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _rank(module: str) -> int | None:
    return RANK.get(_top(module))


def _imports_of_layer(*tops: str) -> list[Import]:
    return [i for i in ALL_IMPORTS if _top(i.source) in tops]


def _fmt(found: list[Import]) -> str:
    return "\n".join(f"  {i.path}:{i.line}: {i.source} imports {i.target}"
                     + (f" ({i.name})" if i.name and i.name != ROOT else "") for i in found)


def _third_party(module: str, names: tuple[str, ...]) -> list[tuple[int, str]]:
    """(line, module) of imports of `names` (and their submodules) outside phalanx."""
    hits = []
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            # `from torch import distributed` imports torch.distributed
            mods = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Call) and (t := _dynamic_target(node, module)):
            mods = [t]
        else:
            continue
        hits += [(node.lineno, m) for m in mods
                 if any(m == n or m.startswith(n + ".") for n in names)]
    return hits


# --------------------------------------------------------------------------- the checks
_SAMPLE = """
import importlib
from typing import TYPE_CHECKING
import torch.distributed
from . import buckets
if TYPE_CHECKING:
    from ..comm.group import Group
def f():
    import phalanx as px
    import phalanx.api
    import phalanx.runtime as rt
    from .. import api, allreduce
    from phalanx import errors
    importlib.import_module(f"phalanx.bench.{px}")
    importlib.import_module(f"{__name__}.sub")
"""


def test_the_parser_sees_what_it_should() -> None:
    """Guard the checker itself on a sample module `phalanx.train.sample`: relative, absolute,
    function-level, TYPE_CHECKING and dynamic imports, and which of them touch the root."""
    found = {(i.target, i.root, i.name) for i in _imports(
        "phalanx.train.sample", ast.parse(_SAMPLE), is_pkg=False, rel="sample.py")}
    assert found == {
        ("phalanx.train.buckets", False, ""),
        ("phalanx.comm.group", False, ""),       # under TYPE_CHECKING: counts too
        ("phalanx", True, "phalanx"),            # import phalanx as px
        ("phalanx.api", True, "phalanx"),        # import phalanx.api binds `phalanx`
        ("phalanx.runtime", False, ""),          # ... but not with `as`
        ("phalanx.api", False, ""),              # from .. import api: a submodule
        ("phalanx", True, "allreduce"),          # from .. import allreduce: the lazy API
        ("phalanx.errors", False, ""),
        ("phalanx.bench", False, ""),            # f"phalanx.bench.{...}"
        ("phalanx.train.sample.sub", False, ""),  # f"{__name__}.sub"
    }, found
    with pytest.raises(AssertionError, match="leaves phalanx"):
        _imports("phalanx.train.sample", ast.parse("from .... import x"), is_pkg=False,
                 rel="sample.py")


def test_every_module_has_a_layer() -> None:
    unplaced = sorted({m for m in MODULES if m != ROOT and _rank(m) is None})
    assert not unplaced, (f"modules in no layer of DESIGN.md: {unplaced}; add their package "
                          "to LAYERS here and to the Layers section of DESIGN.md")


def test_imports_go_down_the_layers() -> None:
    bad, used = [], set()
    for i in ALL_IMPORTS:
        src, dst = _rank(i.source), _rank(i.target)
        if i.source == ROOT or i.target == ROOT or src is None or dst is None or dst <= src:
            continue
        key = next((k for k in LAYER_EXCEPTIONS
                    if i.source == k[0] and (i.target == k[1] or i.target.startswith(k[1] + "."))),
                   None)
        if key is not None:
            used.add(key)
        else:
            bad.append(i)
    assert not bad, "imports that go up the layer order of DESIGN.md:\n" + _fmt(bad)
    stale = set(LAYER_EXCEPTIONS) - used
    assert not stale, f"LAYER_EXCEPTIONS no longer needed, remove them: {sorted(stale)}"


def test_leaves_import_nothing_else_from_phalanx() -> None:
    for leaf in ("errors", "observe"):
        bad = [i for i in _imports_of_layer(leaf) if _top(i.target) != leaf]
        assert not bad, f"{leaf} is a leaf (DESIGN.md):\n" + _fmt(bad)


def test_coord_imports_neither_torch_nor_comm() -> None:
    bad = [i for i in _imports_of_layer("coord") if _top(i.target) == "comm"]
    assert not bad, "coord imports comm:\n" + _fmt(bad)
    torch = [(MODULES[m][0].relative_to(SRC), line, name) for m in MODULES if _top(m) == "coord"
             for line, name in _third_party(m, ("torch",))]
    assert not torch, f"coord imports torch: {torch}"


def test_comm_imports_no_train_data_elastic_or_launch() -> None:
    bad = [i for i in _imports_of_layer("comm")
           if _top(i.target) in ("train", "data", "elastic", "launch")]
    assert not bad, "comm imports a layer above it:\n" + _fmt(bad)


def test_nothing_below_launch_imports_launch() -> None:
    bad = [i for i in ALL_IMPORTS if i.source != ROOT and (_rank(i.source) or 0) < RANK["launch"]
           and _top(i.target) == "launch"]
    assert not bad, "a module below launch imports launch:\n" + _fmt(bad)


def test_no_core_module_imports_the_root_package() -> None:
    bad, used = [], set()
    for i in ALL_IMPORTS:
        if not i.root or i.source == ROOT or _top(i.source) in FACADES:
            continue
        if (i.source, i.name) in ROOT_EXCEPTIONS:
            used.add((i.source, i.name))
        else:
            bad.append(i)
    assert not bad, ("core modules import the root package `phalanx` (import the module that "
                     "defines the name instead, e.g. `from .. import api`):\n" + _fmt(bad))
    stale = set(ROOT_EXCEPTIONS) - used
    assert not stale, f"ROOT_EXCEPTIONS no longer needed, remove them: {sorted(stale)}"


def _closure(module: str) -> set[str]:
    """`module` and every phalanx module it imports, directly or through others."""
    seen, todo = {module}, [module]
    while todo:
        for i in imports_of(todo.pop()):
            if i.target in MODULES and i.target not in seen:
                seen.add(i.target)
                todo.append(i.target)
    return seen


def test_sharding_math_touches_no_process_group() -> None:
    """data/sharding.py takes rank and world size as arguments: neither it nor anything it
    imports (transitively) imports torch.distributed or a phalanx module that holds or reaches
    a process group (comm, runtime, api, subgroups, the data layer's seam `_collective`)."""
    reached = _closure("phalanx.data.sharding")
    groups = sorted(m for m in reached if _top(m) in ("comm", "runtime", "api", "subgroups")
                    or m == "phalanx.data._collective")
    assert not groups, f"data/sharding.py reaches a process group through {groups}"
    dist = [(m, line) for m in sorted(reached)
            for line, _ in _third_party(m, ("torch.distributed",))]
    assert not dist, f"data/sharding.py reaches torch.distributed: {dist}"


@pytest.mark.parametrize("module", ["phalanx.train._comm", "phalanx.data._collective"])
def test_the_seams_import_the_api_module(module: str) -> None:
    """The train and data seams reach collectives through phalanx.api, not the root package
    (they did through `import phalanx` until issue 21)."""
    assert "phalanx.api" in {i.target for i in imports_of(module)}
