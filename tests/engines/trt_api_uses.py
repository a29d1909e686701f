"""Every TensorRT name a source file uses, found by reading its syntax tree (test helper).

What counts as a use (``Use.chain`` is a path from the ``tensorrt`` module, e.g. ("BuilderFlag", "FP16")):

- an attribute chain on the module, which the code always names ``trt`` (``trt = import_tensorrt()``,
  ``import tensorrt as trt``, a ``trt`` parameter) or ``self.trt``: ``trt.ILogger.Severity.ERROR``;
- an attribute of a TensorRT object: the object's type is known from where it came from:
    ``x = trt.Builder(...)``                       x: Builder (a class called on the module)
    ``y = x.create_network(...)``                  y: RETURNS[("Builder", "create_network")]
    ``def f(config: trt.IBuilderConfig)``          an annotation (``if TYPE_CHECKING: import tensorrt``)
    ``self.engine = ...``                          typed for the whole class, like a local
  then ``y.get_input(0).name`` is ("INetworkDefinition", "get_input") and ("ITensor", "name");
- a method a class derived from a TensorRT class defines (``class _L(trt.ILogger): def log``), when the base
  has (in any version) a member of that name: TensorRT calls it, so it must exist in every version;
- a keyword argument of a call on a TensorRT object (``config.set_timing_cache(c, ignore_mismatch=False)``):
  the scan's class scopes include argument names;
- ``hasattr(obj, "name")`` and ``getattr(obj, "name", default)`` are probes (``Use.probe``): the name may be
  missing from a version (that is why it is probed) but must exist in at least one.

A call on a TensorRT object whose result is kept in a variable must have its result type in ``RETURNS``
(None: a plain Python value), so that the new variable's uses are checked too; ``undeclared`` lists the ones
that are not, and the test fails on them.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

# (TensorRT scope, method) -> scope of what it returns (None: a plain value, nothing to check on it)
RETURNS: dict[tuple[str, str], str | None] = {
    ("Builder", "create_network"): "INetworkDefinition",
    ("Builder", "create_builder_config"): "IBuilderConfig",
    ("Builder", "create_optimization_profile"): "IOptimizationProfile",
    ("Builder", "build_serialized_network"): "IHostMemory",
    ("INetworkDefinition", "get_input"): "ITensor",
    ("INetworkDefinition", "get_output"): "ITensor",
    ("OnnxParser", "get_error"): "ParserError",
    ("IBuilderConfig", "create_timing_cache"): "ITimingCache",
    ("IBuilderConfig", "get_timing_cache"): "ITimingCache",
    ("ITimingCache", "serialize"): "IHostMemory",
    ("Runtime", "deserialize_cuda_engine"): "ICudaEngine",
    ("ICudaEngine", "create_execution_context"): "IExecutionContext",
    ("ICudaEngine", "get_tensor_name"): None,
    ("ICudaEngine", "get_tensor_mode"): "TensorIOMode",
    ("ICudaEngine", "get_tensor_dtype"): "DataType",
    ("IExecutionContext", "execute_async_v3"): None,
    ("IExecutionContext", "set_input_shape"): None,
    ("IExecutionContext", "set_optimization_profile_async"): None,
}

MODULE_NAMES = {"trt"}  # what the tensorrt module is called in our code


@dataclass(frozen=True)
class Use:
    file: str
    line: int
    chain: tuple[str, ...]  # from the module: ("BuilderFlag", "FP16")
    probe: bool = False
    keyword: bool = False  # chain[-1] is a keyword argument of a method of chain[:-1]

    def __str__(self) -> str:
        note = " (probed)" if self.probe else " (keyword argument)" if self.keyword else ""
        return f"{self.file}:{self.line}: trt.{'.'.join(self.chain)}{note}"


@dataclass
class Uses:
    uses: list[Use] = field(default_factory=list)
    undeclared: list[str] = field(default_factory=list)  # "file:line: Scope.method" results kept but untyped
    overrides: list[Use] = field(default_factory=list)  # methods of our subclasses of TensorRT classes


def _dotted(node: ast.AST) -> list[str] | None:
    """['self', 'engine', 'x'] for self.engine.x; None for anything but names and attributes."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def _module_chain(node: ast.AST) -> tuple[str, ...] | None:
    """('BuilderFlag', 'FP16') for trt.BuilderFlag.FP16 / self.trt.BuilderFlag.FP16; None otherwise."""
    d = _dotted(node)
    if not d:
        return None
    if d[0] in MODULE_NAMES:
        chain = d[1:]
    elif d[:2] == ["self", "trt"]:
        chain = d[2:]
    else:
        return None
    for i, name in enumerate(chain):  # trt.__version__.split: a str's method, not TensorRT's
        if name.startswith("__"):
            chain = chain[:i + 1]
            break
    return tuple(chain) or None


class _Scan(ast.NodeVisitor):
    def __init__(self, file: str, out: Uses, class_types: dict[str, str]) -> None:
        self.file, self.out = file, out
        self.env: dict[str, str] = dict(class_types)  # "config" / "self.engine" -> TensorRT scope
        self.class_types = class_types

    # ---- types -----------------------------------------------------------------------------------------
    def type_of(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            base = _module_chain(node.args[0]) or (() if _dotted(node.args[0]) == ["trt"] else None)
            if base is not None:  # getattr(trt, "ICudaEngine", None): that class (or None)
                return ".".join((*base, str(node.args[1].value)))
            return None
        if isinstance(node, ast.Call):
            chain = _module_chain(node.func)
            if chain and len(chain) == 1:  # trt.Builder(logger): a class of the module
                return chain[0]
            if isinstance(node.func, ast.Attribute):
                recv = self.type_of(node.func.value)
                if recv is not None:
                    return RETURNS.get((recv, node.func.attr))
            return None
        d = _dotted(node)
        if d is not None:
            return self.env.get(".".join(d))
        return None

    def _annotation(self, ann: ast.AST | None) -> str | None:
        if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
            try:
                ann = ast.parse(ann.value, mode="eval").body
            except SyntaxError:
                return None
        chain = _module_chain(ann) if ann is not None else None
        return ".".join(chain) if chain else None

    def _bind(self, target: ast.AST, value: ast.AST, line: int) -> None:
        if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
            for t, v in zip(target.elts, value.elts):
                self._bind(t, v, line)
            return
        d = _dotted(target)
        if d is None:
            return
        name = ".".join(d)
        typ = self.type_of(value)
        if (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
                and (recv := self.type_of(value.func.value)) is not None
                and (recv, value.func.attr) not in RETURNS):
            self.out.undeclared.append(f"{self.file}:{line}: {recv}.{value.func.attr} (add it to RETURNS)")
        if typ is not None:
            self.env[name] = typ
            if d[0] == "self":
                self.class_types[name] = typ
        else:
            self.env.pop(name, None)

    # ---- visitors --------------------------------------------------------------------------------------
    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        saved = self.env
        self.env = dict(self.class_types)
        for a in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
            t = self._annotation(a.annotation)
            if t:
                self.env[a.arg] = t
        self.generic_visit(node)
        self.env = saved

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        bases = [".".join(c) for b in node.bases if (c := _module_chain(b))]
        for base in bases:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and not item.name.startswith("__"):
                    self.out.overrides.append(Use(self.file, item.lineno, (base, item.name)))
        inner = _Scan(self.file, self.out, {})
        for _ in range(2):  # attributes typed in one method are known in the others
            inner.out = Uses() if _ == 0 else self.out
            inner.env = {}
            for item in node.body:
                inner.visit(item)
        for b in node.bases:
            self.visit(b)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        for t in node.targets:
            self._bind(t, node.value, node.lineno)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.generic_visit(node)
        t = self._annotation(node.annotation)
        d = _dotted(node.target)
        if t and d:
            self.env[".".join(d)] = t
        elif node.value is not None:
            self._bind(node.target, node.value, node.lineno)

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        if isinstance(f, ast.Name) and f.id in ("hasattr", "getattr") and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            obj, name = node.args[0], node.args[1].value
            base = _module_chain(obj)
            if base is None and (t := self.type_of(obj)) is not None:
                base = tuple(t.split("."))
            if base is None and _dotted(obj) in [[m] for m in MODULE_NAMES]:
                base = ()
            if base is not None:
                probe = f.id == "hasattr" or len(node.args) == 3
                self.out.uses.append(Use(self.file, node.lineno, (*base, name), probe=probe))
        elif isinstance(f, ast.Attribute) and (recv := self.type_of(f.value)) is not None:
            # keyword names are in the class's scope: the scan collects argument names with its members
            for kw in node.keywords:
                if kw.arg:
                    self.out.uses.append(Use(self.file, node.lineno, (*recv.split("."), kw.arg), keyword=True))
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain = _module_chain(node)
        if chain is not None:
            if not chain[-1].startswith("__") or chain[-1] == "__version__":
                self.out.uses.append(Use(self.file, node.lineno, chain))
            return  # the whole chain is one use
        recv = self.type_of(node.value)
        if recv is not None and not node.attr.startswith("__"):
            self.out.uses.append(Use(self.file, node.lineno, (*recv.split("."), node.attr)))
        self.generic_visit(node)


def collect(paths: list[Path], root: Path | None = None) -> Uses:
    out = Uses()
    for path in paths:
        name = str(path.relative_to(root)) if root else path.name
        _Scan(name, out, {}).visit(ast.parse(path.read_text(), filename=str(path)))
    return out


def collect_source(source: str, name: str = "<source>") -> Uses:
    out = Uses()
    _Scan(name, out, {}).visit(ast.parse(source))
    return out
