"""The Python API of a TensorRT bindings wheel, read without importing it (test helper).

``import tensorrt`` needs the TensorRT libraries (hundreds of MB, CUDA); the bindings wheel alone
(``tensorrt-cu12-bindings`` for 10.x, ``tensorrt-cu13-bindings`` for 11.x, about 1.3 MB each) holds the
pybind11 extension module ``tensorrt_bindings/tensorrt.so`` and its ``__init__.py``. The module keeps its ELF
symbol table, and pybind11 registers every name with a call to a template instantiated per C++ type:

    pybind11::enum_<nvinfer1::BuilderFlag>::value(char const* name, ...)          lea rsi, "FP16"; call
    pybind11::class_<nvinfer1::IBuilderConfig>::def<...>(char const* name, ...)    (often inlined, or a
        .constprop clone with the name inside its own body)
    pybind11::detail::generic_type::initialize(type_record const&)                 every class and enum:
        the caller loads &typeid(T) and the Python name ("Builder" for nvinfer1::IBuilder) before the call
    pybind11::detail::enum_base::export_values()                                   values also in the parent

So the scan (x86-64, the pinned wheels are manylinux x86_64): read .symtab (function address -> mangled name,
typeinfo objects), demangle the pybind11 ones with libstdc++'s ``__cxa_demangle`` (ctypes), find every
``call rel32`` (e8) in ``.text`` that targets one of them, and every ``lea r64, [rip+disp32]`` that loads an
identifier string from ``.rodata``. A name belongs to:
  - the enum of a ``value`` call it is loaded (into rsi) just before;
  - the class of a ``class_<T>::def*`` clone whose body loads it;
  - otherwise the class or enum whose registration (``initialize`` call or typed call) last precedes it in
    the same function: registration code is straight-line, one class after another.
The last rule also collects argument names (``py::arg("flag")``), so a class's set is a superset of its
members; ``test_scanner_reads_known_differences_between_10_and_11`` pins what must and must not be found.
A registration whose template arguments never name its class is skipped: GCC merges identical bodies
(-fipa-icf) without leaving a symbol, so its calls may be for any class.

Result (``TrtApi.scopes``): Python scope ("BuilderFlag", "IBuilderConfig", "ILogger.Severity"; "" is the
module, with the ``__init__.py``'s names) -> names, with members of pybind11 base classes added.
"""

from __future__ import annotations

import ast
import bisect
import ctypes
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LEA = {b"\x48\x8d\x35": "rsi", b"\x48\x8d\x15": "rdx"}  # lea r64, [rip + disp32]
_WINDOW = 48


@dataclass
class TrtApi:
    """What one bindings wheel exposes. ``scopes``: Python scope -> member names ("" is the module)."""

    version: str
    scopes: dict[str, set[str]] = field(default_factory=dict)


def _demangler():
    lib = ctypes.CDLL("libstdc++.so.6")
    fn = lib.__cxa_demangle
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    free = ctypes.CDLL(None).free
    free.argtypes = [ctypes.c_void_p]

    def demangle(name: str) -> str | None:
        status = ctypes.c_int()
        p = fn(name.encode(), None, None, ctypes.byref(status))
        if status.value != 0 or not p:
            return None
        try:
            return ctypes.string_at(p).decode()
        finally:
            free(p)

    return demangle


def _sections(data: bytes) -> dict[str, dict]:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian 64-bit ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    secs = []
    for i in range(shnum):
        name, typ, _, addr, off, size, link, _, _, _ = struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
        secs.append({"name": name, "addr": addr, "off": off, "size": size, "link": link})
    names_off = secs[shstrndx]["off"]
    out = {}
    for s in secs:
        s["name"] = data[names_off + s["name"]:data.index(b"\0", names_off + s["name"])].decode()
        s["_link"] = secs[s["link"]]
        out[s["name"]] = s
    return out


def _symbols(data: bytes, secs: dict[str, dict]) -> tuple[dict[int, str], dict[int, str]]:
    """(function address -> mangled name, typeinfo object address -> mangled name) from .symtab."""
    sym = secs.get(".symtab")
    if sym is None:
        raise ValueError("the extension module has no .symtab (stripped?): cannot tell members apart")
    strtab = sym["_link"]["off"]
    funcs, typeinfo = {}, {}
    for i in range(sym["size"] // 24):
        st_name, st_info, _, _, st_value, _ = struct.unpack_from("<IBBHQQ", data, sym["off"] + 24 * i)
        if not st_value or st_info & 0xF not in (1, 2):
            continue
        name = data[strtab + st_name:data.index(b"\0", strtab + st_name)].decode()
        if st_info & 0xF == 2:  # STT_FUNC
            funcs[st_value] = name
        elif name.startswith("_ZTI"):  # STT_OBJECT typeinfo for T
            typeinfo[st_value] = name
    return funcs, typeinfo


def _template_args(s: str, start: int) -> tuple[list[str], int]:
    """Top-level template arguments of ``s`` from the '<' at ``start``; returns (args, index after '>')."""
    depth, args, cur = 0, [], start + 1
    i = start
    while i < len(s):
        c = s[i]
        if c in "<(":
            depth += 1
        elif c in ">)":
            depth -= 1
            if depth == 0:
                args.append(s[cur:i].strip())
                return args, i + 1
        elif c == "," and depth == 1:
            args.append(s[cur:i].strip())
            cur = i + 1
        i += 1
    raise ValueError(f"unbalanced template arguments in {s!r}")


def _registration(demangled: str) -> tuple[str, str, list[str]] | None:
    """('value' | 'def' | 'ctor' | 'module_def', C++ type, bases) for a pybind11 registration function."""
    for head in ("pybind11::class_<", "pybind11::enum_<"):
        pos = demangled.find(head)
        # the qualified name, not the return type: "class_<T>& class_<T>::def<...>(...)"
        while pos != -1:
            args, end = _template_args(demangled, pos + len(head) - 1)
            m = re.match(r"::(~?\w+)", demangled[end:])
            if m:
                what = m.group(1)
                if what == "value" and head.endswith("enum_<"):
                    return "value", args[0], []
                if what.startswith("def"):
                    # GCC folds identical bodies (-fipa-icf) without leaving an alias: a registration whose
                    # template arguments never name the class (def_property_static<is_method, ...>) may be
                    # called for any class, so its calls say nothing about which class they register for.
                    tail = demangled[end:]
                    short = args[0].rsplit("::", 1)[-1]
                    if not re.search(rf"\b{re.escape(short)}\b", tail):
                        return None
                    return "def", args[0], args[1:]
                if what in ("class_", "enum_"):
                    return "ctor", args[0], args[1:]
                return None
            pos = demangled.find(head, end)
    if re.search(r"(^|\s|&)pybind11::module_::def<", demangled):
        return "module_def", "", []
    return None


def _strip_ns(t: str) -> str:
    """'nvinfer1::v_1_0::ILogger' -> 'nvinfer1::ILogger' (TensorRT's inline ABI namespaces)."""
    return re.sub(r"\bv_\d+_\d+::", "", t).strip()


def scan_extension(data: bytes) -> tuple[dict[str, set[str]], dict[str, str], dict[str, list[str]], set[str]]:
    """(C++ type -> member names, C++ type -> Python name, C++ type -> C++ bases, module-level names)."""
    secs = _sections(data)
    text, ro = secs[".text"], secs[".rodata"]
    code = data[text["off"]:text["off"] + text["size"]]
    demangle = _demangler()
    funcs, typeinfo_syms = _symbols(data, secs)
    targets: dict[int, tuple[str, str, list[str]]] = {}
    type_init: set[int] = set()
    export_values: set[int] = set()
    for addr, mangled in funcs.items():
        if "pybind11" not in mangled[:40] or mangled.endswith(".cold"):
            continue
        if mangled.startswith("_ZN8pybind116detail12generic_type10initialize"):
            type_init.add(addr)  # every class and enum: record.type = &typeid(T), record.name = "Name"
            continue
        if mangled.startswith("_ZN8pybind116detail9enum_base13export_values"):
            export_values.add(addr)  # the enum's values also become attributes of its parent scope
            continue
        dm = demangle(mangled.split(".", 1)[0])
        reg = _registration(dm) if dm else None
        if reg:
            targets[addr] = reg
    typeinfo = {a: (demangle(n) or "").removeprefix("typeinfo for ") for a, n in typeinfo_syms.items()}

    def rip_refs(lo: int, hi: int, regs: bytes = b"\x05\x0d\x15\x1d\x25\x2d\x35\x3d"):
        """(code offset, register byte, target address) of every lea r64, [rip+disp32] in code[lo:hi]."""
        for m in re.finditer(rb"[\x48\x4c]\x8d[" + regs + rb"]", code[lo:hi]):
            q = lo + m.start()
            if q + 7 <= hi:
                disp, = struct.unpack_from("<i", code, q + 3)
                yield q, code[q:q + 3], text["addr"] + q + 7 + disp

    def string_at(vaddr: int) -> str | None:
        off = vaddr - ro["addr"]
        if not 0 <= off < ro["size"]:
            return None
        off += ro["off"]
        end = data.find(b"\0", off)
        try:
            s = data[off:end].decode()
        except UnicodeDecodeError:
            return None
        return s if _IDENT.fullmatch(s) else None

    def lea_before(p: int, reg: str) -> str | None:
        found = None
        for q, op, target in rip_refs(max(0, p - _WINDOW), p):
            if _LEA.get(op) == reg:
                found = string_at(target)
        return found

    def first_ident_in(addr: int) -> str | None:
        p = addr - text["addr"]
        for _, _, target in rip_refs(p, p + 512):
            s = string_at(target)
            if s and not s.startswith("_"):
                return s
        return None

    # Scope events in code order: where a class or enum starts being registered.
    starts = sorted(funcs)
    events: list[tuple[int, str]] = []  # (code offset, C++ type)
    members: dict[str, set[str]] = {}
    pynames: dict[str, str] = {}
    bases: dict[str, list[str]] = {}
    module: set[str] = set()
    exported_at: list[int] = []
    for m in re.finditer(rb"\xe8", code):
        p = m.start()
        rel, = struct.unpack_from("<i", code, p + 1)
        target = text["addr"] + p + 5 + rel
        if target in export_values:
            exported_at.append(p)
            continue
        if target in type_init:  # the last typeinfo and the last identifier loaded before the call
            ti = name = None
            for _, _, ref in rip_refs(max(0, p - 600), p):
                if ref in typeinfo:
                    ti = typeinfo[ref]
                s = string_at(ref)
                if s and not s.startswith("_"):
                    name = s
            if ti:
                events.append((p, _strip_ns(ti)))
                if name:
                    pynames.setdefault(_strip_ns(ti), name)
            continue
        reg = targets.get(target)
        if reg is None:
            continue
        kind, cxx, extra = reg
        cxx = _strip_ns(cxx)
        if kind == "ctor":
            name = lea_before(p, "rdx") or first_ident_in(target)
            if name:
                pynames.setdefault(cxx, name)
            bases.setdefault(cxx, [_strip_ns(b) for b in extra])
            events.append((p, cxx))
            continue
        name = lea_before(p, "rsi")
        if kind == "module_def":
            if name:
                module.add(name)
            continue
        events.append((p, cxx))
        if extra:
            bases.setdefault(cxx, [_strip_ns(b) for b in extra])
        if name:
            members.setdefault(cxx, set()).add(name)
    # Inlined registrations (class_::def is small) leave no typed call: attribute every identifier loaded
    # between a scope event and the next one, inside the same function, to that scope. This also collects
    # argument names (py::arg("flag")), so a scope is a superset of its members: lenient, never strict.
    events.sort()
    positions = [e[0] for e in events]
    for q, _, ref in rip_refs(0, len(code)):
        s = string_at(ref)
        if s is None or s.startswith("_"):
            continue
        fn_start = starts[bisect.bisect_right(starts, text["addr"] + q) - 1]
        reg = targets.get(fn_start)
        if reg is not None and reg[0] == "def":  # inside class_<T>::def<...>.constprop: the name is baked in
            members.setdefault(_strip_ns(reg[1]), set()).add(s)
            continue
        i = bisect.bisect_right(positions, q) - 1
        if i < 0:
            continue
        if fn_start > text["addr"] + positions[i]:  # the event is in an earlier function
            continue
        members.setdefault(events[i][1], set()).add(s)
    exported: set[str] = set()
    for p in exported_at:  # export_values() right after an enum's values: that enum (same function)
        i = bisect.bisect_right(positions, p) - 1
        if i >= 0 and starts[bisect.bisect_right(starts, text["addr"] + p) - 1] <= text["addr"] + positions[i]:
            exported.add(events[i][1])
    for enum in exported:
        parent = enum.rpartition("::")[0]
        if parent in pynames or parent in members:  # nested: ILogger.Severity.WARNING is ILogger.WARNING too
            members.setdefault(parent, set()).update(members.get(enum, ()))
        else:
            module.update(members.get(enum, ()))
    return members, pynames, bases, module


def _init_names(source: str) -> tuple[set[str], str | None, dict[str, set[str]]]:
    """Module-level names the wheel's ``__init__.py`` defines, its ``__version__``, and attributes it
    patches onto classes (``DataType.itemsize = property(...)``)."""
    tree = ast.parse(source)
    names, patched, version = set(), {}, None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    names.add(t.id)
                    if t.id == "__version__" and isinstance(node.value, ast.Constant):
                        version = str(node.value.value)
                elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name):
                    patched.setdefault(t.value.id, set()).add(t.attr)
    return names, version, patched


def read_wheel(path: str | Path) -> TrtApi:
    """The API of one ``tensorrt-cu1x-bindings`` wheel (a zip; nothing is imported or extracted to disk)."""
    with zipfile.ZipFile(path) as z:
        so = next(n for n in z.namelist() if re.search(r"/tensorrt[^/]*\.so$", n))
        init = next(n for n in z.namelist() if n.endswith("/__init__.py") and n.count("/") == 1)
        data, source = z.read(so), z.read(init).decode()
    members, pynames, bases, module = scan_extension(data)
    init_names, version, patched = _init_names(source)
    if version is None:
        raise ValueError(f"{path}: no __version__ in {init}")

    def pyname(cxx: str) -> str | None:
        outer, _, inner = cxx.rpartition("::")  # nested: nvinfer1::ILogger::Severity -> ILogger.Severity
        if outer in pynames and inner:
            return f"{pynames[outer]}.{pynames.get(cxx, inner)}"
        return pynames.get(cxx)

    def all_members(cxx: str, seen: frozenset = frozenset()) -> set[str]:
        out = set(members.get(cxx, ()))
        for b in bases.get(cxx, ()):
            if b not in seen and b in members:
                out |= all_members(b, seen | {cxx})
        return out

    api = TrtApi(version=version)
    api.scopes[""] = set(module) | init_names | {n for n in pynames.values()}
    for cxx in set(members) | set(pynames):
        name = pyname(cxx)
        if name is None:
            continue
        api.scopes.setdefault(name, set()).update(all_members(cxx))
    for cls, attrs in patched.items():
        api.scopes.setdefault(cls, set()).update(attrs)
    return api
