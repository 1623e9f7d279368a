"""The import direction of llm_jax, read from the source: lower layers never import higher ones.

  L0  foundations   console, paths, fields, packages, xla_flags, devices, sharding, checkpoint,
                    workdir_lock (each other only)
  L1  model/        -> L0                  data/ -> L0 (data never imports model, nor model data)
  L2  rundir        -> L0, L1              the run directory every tool reads
  L3  train/        -> L0..L2              infer/ -> L0..L2 (train and infer never import each other)
  L4  eval/ -> L0..L3 · serve/ -> L0..L2, infer · convert/ -> L0..L2 · plan/ -> L0..L2, train
      rl/ -> L0..L3 (online RL: joins the sampler in infer/ to the objective in train/)
  L5  main, jobs, config_check, chat, notebook, __init__ -> anything

Every import counts, also one inside a function. A command-line entry point (a `__main__.py`, a
`bench*.py`, a module that defines absl flags at import, or the code under
`if __name__ == "__main__":`) may import anything, and nothing in the library imports it. No
library module imports the top-level `configs/` package (the configs import llm_jax, never the
reverse), so `llm_jax` works without the repository root on sys.path. The module graph has no
cycle. Standard library only: the test reads the files, it imports nothing of llm_jax.
"""

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llm_jax"

FOUNDATIONS = {"console", "paths", "fields", "packages", "xla_flags", "devices", "sharding",
               "checkpoint", "workdir_lock"}
ENTRIES = {"__init__", "main", "jobs", "config_check", "chat", "notebook",
           "bench", "bench_matmul"}  # the last two: old command names that say the new ones
# room -> the rooms its library code may import (its own always included)
ALLOWED = {
    "foundation": set(),
    "model": {"foundation"},
    "data": {"foundation"},
    "rundir": {"foundation", "model", "data"},
    "train": {"foundation", "model", "data", "rundir"},
    "infer": {"foundation", "model", "data", "rundir"},
    "eval": {"foundation", "model", "data", "rundir", "train", "infer"},
    "serve": {"foundation", "model", "data", "rundir", "infer"},
    "convert": {"foundation", "model", "data", "rundir"},
    "plan": {"foundation", "model", "data", "rundir", "train"},
    "rl": {"foundation", "model", "data", "rundir", "train", "infer"},
    "entry": {"foundation", "model", "data", "rundir", "train", "infer", "eval", "serve", "convert",
              "plan", "rl"},
}


def room_of(module: str) -> str:
  """"llm_jax.train.loop" -> "train"; "llm_jax.sharding" -> "foundation"."""
  parts = module.split(".")[1:]
  if not parts or parts[0] in ENTRIES:
    return "entry"
  if parts[0] in FOUNDATIONS:
    return "foundation"
  if parts[0] == "rundir":
    return "rundir"
  if parts[0] in ALLOWED:
    return parts[0]
  raise AssertionError(f"{module}: a module outside the layer table; add it to tests/test_layers.py")


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__" and len(parts) > 1:
    parts = parts[:-1]
  return ".".join(parts)


def _is_main_guard(node: ast.AST) -> bool:
  return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
          and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _defines_flags(tree: ast.Module) -> bool:
  """absl flags defined at import time (module level): the module is a command line."""
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)) or _is_main_guard(node):
      continue
    for sub in ast.walk(node):
      if (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute)
          and sub.func.attr.startswith("DEFINE")):
        return True
  return False


def is_cli_module(path: pathlib.Path, tree: ast.Module) -> bool:
  return path.name == "__main__.py" or path.name.startswith("bench") or _defines_flags(tree)


class _Imports(ast.NodeVisitor):
  """(line, imported module, inside CLI code) for every import of a file, nested ones included."""

  def __init__(self, module: str, is_package: bool, modules: set[str]):
    self.module, self.is_package, self.modules = module, is_package, modules
    self.found: list[tuple[int, str, bool]] = []
    self._cli_depth = 0

  def _add(self, line: int, target: str) -> None:
    self.found.append((line, target, self._cli_depth > 0))

  def visit_If(self, node: ast.If) -> None:
    if _is_main_guard(node):
      self._cli_depth += 1
      self.generic_visit(node)
      self._cli_depth -= 1
    else:
      self.generic_visit(node)

  def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
    # A module's `main(argv)` is its command line (absl's app.run(main)).
    cli = node.name == "main" and node.col_offset == 0
    self._cli_depth += cli
    self.generic_visit(node)
    self._cli_depth -= cli

  def visit_Import(self, node: ast.Import) -> None:
    for alias in node.names:
      self._add(node.lineno, alias.name)

  def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
    if node.level:
      base = self.module.split(".")
      base = base[:len(base) - node.level + (1 if self.is_package else 0)]
      prefix = ".".join(base + ([node.module] if node.module else []))
    else:
      prefix = node.module or ""
    for alias in node.names:
      full = f"{prefix}.{alias.name}"
      self._add(node.lineno, full if full in self.modules else prefix)


def _read_tree():
  files = sorted(PACKAGE.rglob("*.py"))
  modules = {_module_name(p) for p in files}
  parsed = {}
  for path in files:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    name = _module_name(path)
    visitor = _Imports(name, path.name == "__init__.py", modules)
    visitor.visit(tree)
    parsed[name] = (path, is_cli_module(path, tree), visitor.found)
  return parsed


def _internal(target: str, modules) -> str | None:
  """The llm_jax module an import names (the longest known prefix), or None."""
  parts = target.split(".")
  for k in range(len(parts), 0, -1):
    if ".".join(parts[:k]) in modules:
      return ".".join(parts[:k])
  return None


def findings(parsed) -> list[str]:
  """Every import that breaks the layer rules, as 'path:line: why'."""
  out = []
  clis = {m for m, (_, cli, _) in parsed.items() if cli}
  for module, (path, cli, imports) in parsed.items():
    where_file = path.relative_to(ROOT)
    for line, target, in_cli_code in imports:
      where = f"{where_file}:{line}"
      if target == "configs" or target.startswith("configs."):
        if not (cli or in_cli_code or module == "llm_jax.notebook"):
          out.append(f"{where}: library code imports {target} (configs import llm_jax, never the "
                     "reverse: take the config as an argument)")
        continue
      dep = _internal(target, parsed)
      if dep is None or dep == module or cli or in_cli_code:
        continue
      if dep in clis:
        out.append(f"{where}: imports the command line {dep} (entry points are leaves)")
        continue
      src_room, dst_room = room_of(module), room_of(dep)
      if dst_room != src_room and dst_room not in ALLOWED[src_room]:
        out.append(f"{where}: {src_room} imports {dst_room} ({module} -> {dep})")
  return out


def cycles(parsed) -> list[list[str]]:
  """The module graph's cycles (every import, nested ones and CLI code included), one per strongly
  connected component of more than one module."""
  graph = {m: set() for m in parsed}
  for module, (_, _, imports) in parsed.items():
    for _, target, _ in imports:
      dep = _internal(target, parsed)
      if dep and dep != module and not module.startswith(dep + "."):
        graph[module].add(dep)
  index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

  def strongconnect(v):  # Tarjan
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        strongconnect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      strongconnect(v)
  return out


def test_imports_follow_the_layers():
  bad = findings(_read_tree())
  assert not bad, "imports against the layer order (see tests/test_layers.py):\n" + "\n".join(bad)


def test_no_import_cycles():
  found = cycles(_read_tree())
  assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_every_module_has_a_room():
  for module in _read_tree():
    room_of(module)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
  """The rules catch what they claim to: an upward import inside a function, a library import of
  configs/, a cycle, and an import of a command line."""
  pkg = tmp_path / "llm_jax"
  for sub in ("model", "train", "serve"):
    (pkg / sub).mkdir(parents=True)
    (pkg / sub / "__init__.py").write_text("")
  (pkg / "__init__.py").write_text("")
  (pkg / "model" / "layers.py").write_text(
      "def f():\n  from llm_jax.train import loop\n  from configs import base\n")
  (pkg / "train" / "loop.py").write_text("from llm_jax.model import layers\n")
  (pkg / "serve" / "bench.py").write_text("from llm_jax.train import loop\n")
  (pkg / "serve" / "app.py").write_text("from llm_jax.serve import bench\n")
  monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
  parsed = _read_tree()
  bad = "\n".join(findings(parsed))
  assert "llm_jax/model/layers.py:2: model imports train" in bad
  assert "llm_jax/model/layers.py:3: library code imports configs" in bad
  assert "llm_jax/serve/app.py:1: imports the command line llm_jax.serve.bench" in bad
  assert "serve/bench.py" not in bad  # a benchmark may import anything
  assert cycles(parsed) == [["llm_jax.model.layers", "llm_jax.train.loop"]]


if __name__ == "__main__":
  pytest.main([__file__, "-q"])
