"""Core of the TouchDesigner stand-in (see td_standin.py): errors, parameters, pages, connectors and the
operator and component base classes. Operator types register themselves in ``OPTYPES``."""

from __future__ import annotations

import enum
import fnmatch
import re

OPTYPES: dict = {}  # operator type name -> class (filled by td_standin_ops)


class tdError(Exception):
    pass


class tdAttributeError(AttributeError):
    pass


class ParMode(enum.Enum):
    CONSTANT = 0
    EXPRESSION = 1
    EXPORT = 2
    BIND = 3


class CookLevel(enum.Enum):
    AUTOMATIC = 0
    ON_CHANGE = 1
    WHEN_USED = 2
    ALWAYS = 3


_CUSTOM_NAME = re.compile(r"[A-Z][a-z0-9]*\Z")
_OP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_UNSET = object()


# ------------------------------------------------------------------------------------------------ parameters
class Par:
    _FIELDS = {"val", "expr", "mode", "default", "min", "max", "normMin", "normMax", "clampMin", "clampMax",
               "readOnly", "label", "menuNames", "menuLabels", "enable", "help"}

    def __init__(self, owner, name, style, default=None, menu=(), custom=False, label=None):
        d = self.__dict__
        d.update(owner=owner, name=name, style=style, isCustom=custom, label=label or name, _expr="",
                 mode=ParMode.CONSTANT, min=0, max=1, normMin=0, normMax=1, clampMin=False, clampMax=False,
                 readOnly=False, enable=True, help="", menuNames=list(menu), menuLabels=list(menu))
        d["default"] = default if default is not None else self._zero()
        d["_val"] = d["default"]

    def _zero(self):
        return {"Int": 0, "Float": 0.0, "Toggle": False, "Pulse": False, "Menu": (self.menuNames or [""])[0]}.get(
            self.style, "")

    def __setattr__(self, k, v):
        if k not in self._FIELDS:
            raise tdAttributeError(f"'td.Par' object has no attribute '{k}'")
        if k == "val":
            self._set(v)
        elif k == "expr":
            self.__dict__["_expr"] = str(v)
            self.__dict__["mode"] = ParMode.EXPRESSION
        elif k == "default":
            self.__dict__["default"] = self._coerce(v)
        else:
            self.__dict__[k] = v

    @property
    def isPulse(self):
        return self.style == "Pulse"

    @property
    def isMenu(self):
        return self.style == "Menu"

    @property
    def val(self):
        return self._val

    @property
    def expr(self):
        return self._expr

    def _coerce(self, v):
        s = self.style
        try:
            if s == "Int":
                v = int(float(v)) if isinstance(v, (str, Par)) else int(v)
            elif s == "Float":
                v = float(v)
            elif s in ("Toggle", "Pulse"):
                v = bool(float(v)) if isinstance(v, str) and v.strip() else bool(v)
            elif s == "Menu":
                v = self.menuNames[v] if isinstance(v, int) and not isinstance(v, bool) else str(v)
                if v not in self.menuNames:
                    raise tdError(f"Invalid menu value {v!r} for {self.owner.path}:{self.name}; "
                                  f"expected one of {self.menuNames}")
            elif s in ("OP", "TOP"):
                v = v.eval() if isinstance(v, Par) else v  # an expression may give a Par: TD uses its value
                v = v.path if isinstance(v, OP) else ("" if v is None else str(v))
            else:
                v = str(v)
        except (TypeError, ValueError, IndexError):
            raise tdError(f"Invalid value {v!r} for {s} parameter {self.owner.path}:{self.name}") from None
        if s in ("Int", "Float"):
            if self.clampMin and v < self.min:
                v = type(v)(self.min)
            if self.clampMax and v > self.max:
                v = type(v)(self.max)
        return v

    def _set(self, v):
        self.owner._check()
        if self.style == "Header":
            raise tdError(f"{self.name} is a header; it has no value")
        prev, new = self.eval(), self._coerce(v)
        self.__dict__["_val"] = new
        self.__dict__["mode"] = ParMode.CONSTANT
        if new != prev:
            self.owner.project._par_changed(self, prev)

    def eval(self):
        self.owner._check()
        if self.mode is ParMode.EXPRESSION:
            o = self.owner
            ns = {"me": o, "parent": o.parent, "op": o.parent().op if o.isCOMP else o.op,
                  "absTime": o.project.absTime}
            value = self._coerce(eval(self._expr, ns))
        else:
            value = self._val
        if self.style in ("OP", "TOP"):
            return self.owner.op(value) if value else None
        return value

    def pulse(self):
        if self.style != "Pulse":
            raise tdError(f"{self.name} is not a pulse parameter")
        self.owner.project._pulsed(self)

    def __bool__(self):
        return bool(self.eval())

    def __int__(self):
        return int(self.eval())

    def __float__(self):
        return float(self.eval())

    def __str__(self):
        return str(self.eval())

    def __repr__(self):
        return f"type:Par name:{self.name} owner:{self.owner.path} value:{self.eval()!r}"


class ParCollection:
    def __init__(self, owner):
        self.__dict__["_owner"], self.__dict__["_pars"] = owner, {}

    def __getattr__(self, name):
        try:
            return self.__dict__["_pars"][name]
        except KeyError:
            raise tdAttributeError(f"'td.ParCollection' object has no attribute '{name}' "
                                   f"({self._owner.OPTYPE} {self._owner.path})") from None

    def __setattr__(self, name, value):
        getattr(self, name).val = value

    def _add(self, par):
        self.__dict__["_pars"][par.name] = par


class Page:
    def __init__(self, owner, name):
        self.owner, self.name, self.pars = owner, name, []

    def _append(self, style, name, label=None, size=1, order=None, replace=True, menu=()):
        if not _CUSTOM_NAME.match(name):
            raise tdError(f"Invalid custom parameter name {name!r}: an upper-case letter, then lower-case "
                          "letters and digits")
        if size != 1:
            raise NotImplementedError("the stand-in makes parameters of size 1 only")
        existing = self.owner.par._pars.get(name)
        if existing is not None:
            if not existing.isCustom or not replace:
                raise tdError(f"Parameter {name!r} already exists on {self.owner.path}")
            for page in self.owner.customPages:
                if existing in page.pars:
                    page.pars.remove(existing)
        par = Par(self.owner, name, style, menu=menu, custom=True, label=label)
        self.owner.par._add(par)
        self.pars.append(par)
        return [par]

    def appendStr(self, name, label=None, order=None, replace=True):
        return self._append("Str", name, label, order=order, replace=replace)

    def appendInt(self, name, label=None, size=1, order=None, replace=True):
        return self._append("Int", name, label, size, order, replace)

    def appendFloat(self, name, label=None, size=1, order=None, replace=True):
        return self._append("Float", name, label, size, order, replace)

    def appendToggle(self, name, label=None, order=None, replace=True):
        return self._append("Toggle", name, label, order=order, replace=replace)

    def appendPulse(self, name, label=None, order=None, replace=True):
        return self._append("Pulse", name, label, order=order, replace=replace)

    def appendMenu(self, name, label=None, order=None, replace=True):
        return self._append("Menu", name, label, order=order, replace=replace)

    def appendTOP(self, name, label=None, order=None, replace=True):
        return self._append("TOP", name, label, order=order, replace=replace)

    def appendFile(self, name, label=None, order=None, replace=True):
        return self._append("File", name, label, order=order, replace=replace)

    def appendFolder(self, name, label=None, order=None, replace=True):
        return self._append("Folder", name, label, order=order, replace=replace)

    def appendHeader(self, name, label=None, order=None, replace=True):
        return self._append("Header", name, label, order=order, replace=replace)


# ------------------------------------------------------------------------------------------------ operators
class Connector:
    def __init__(self, owner, index, is_input):
        self.owner, self.index, self.isInput, self.isOutput = owner, index, is_input, not is_input

    @property
    def connections(self):
        if self.isInput:
            src = self.owner._inputs.get(self.index)
            return [] if src is None else [src.outputConnectors[0]]
        return [o.inputConnectors[i] for o in self.owner.project._all() for i, s in o._inputs.items()
                if s is self.owner]

    def connect(self, target):
        if self.isInput:
            src = target.owner if isinstance(target, Connector) else target
            dst, i = self.owner, self.index
        else:
            src = self.owner
            conn = target if isinstance(target, Connector) else target.inputConnectors[0]
            dst, i = conn.owner, conn.index
        if src.FAMILY != dst.input_family:
            raise tdError(f"cannot connect {src.FAMILY} {src.path} to an input of {dst.OPTYPE} {dst.path}")
        dst._inputs[i] = src

    def disconnect(self):
        if self.isInput:
            self.owner._inputs.pop(self.index, None)


class OP:
    OPTYPE, FAMILY, MAX_INPUTS, isCOMP = "", "", 0, False
    PARS: dict = {}  # name -> (style, default, menu)
    _SETTABLE = {"nodeX", "nodeY", "name", "viewer", "display", "render", "bypass", "lock", "comment", "color",
                 "text", "expose"}

    def __init__(self, project, parent, name):
        d = self.__dict__
        d.update(project=project, _parent=parent, _name=name, nodeX=0, nodeY=0, viewer=False, display=False,
                 render=False, bypass=False, lock=False, comment="", color=(0.55, 0.55, 0.55), expose=True,
                 par=ParCollection(self), customPages=[], docked=[], storage={}, _startup={}, _inputs={},
                 valid=True, cookCount=0, _warnings=[], _errors=[], _cooked_frame=-1)
        for pname, (style, default, menu) in self.PARS.items():
            self.par._add(Par(self, pname, style, default, menu))

    @property
    def input_family(self):
        return self.FAMILY

    def __setattr__(self, k, v):
        if k not in self._SETTABLE or (k == "text" and self.FAMILY != "DAT"):
            raise tdAttributeError(f"'td.{self.OPTYPE}' object has no attribute '{k}'")
        self._check()
        object.__setattr__(self, k, v)

    def _check(self):
        if not self.__dict__["valid"]:
            raise tdError("Cannot access an operator that has been deleted")

    @property
    def name(self):
        return self._name

    @property
    def path(self):
        p = self._parent
        return "/" if p is None else (p.path.rstrip("/") + "/" + self._name)

    @property
    def type(self):
        return self.OPTYPE

    def parent(self, n=1):
        o = self
        for _ in range(n):
            o = o._parent
        return o

    @property
    def inputConnectors(self):
        return [Connector(self, i, True) for i in range(self.MAX_INPUTS)]

    @property
    def outputConnectors(self):
        return [Connector(self, 0, False)]

    @property
    def inputs(self):
        return [self._inputs[i] for i in sorted(self._inputs)]

    @property
    def customPars(self):
        return [p for page in self.customPages for p in page.pars]

    def op(self, path):
        self._check()
        path = str(path)
        if path.startswith("/"):
            cur, parts = self.project.root, [p for p in path.split("/") if p]
        else:
            cur, parts = self, [p for p in path.split("/") if p]
            if parts and parts[0] not in ("..", ".") and not self.isCOMP:
                cur = self._parent  # a bare name from a non-COMP is a sibling
        for part in parts:
            if part == "..":
                cur = cur._parent
            elif part != ".":
                cur = cur._children.get(part) if cur is not None and cur.isCOMP else None
            if cur is None:
                return None
        return cur

    def appendCustomPage(self, name):
        raise tdAttributeError(f"'td.{self.OPTYPE}' object has no attribute 'appendCustomPage'")

    def store(self, key, value):
        self.storage[key] = value
        return value

    def fetch(self, key, default=_UNSET, search=True, storeDefault=False):
        o = self
        while o is not None:
            if key in o.storage:
                return o.storage[key]
            o = o._parent if search else None
        if default is _UNSET:
            raise tdError(f"Could not find key {key!r} in storage of {self.path}")
        if storeDefault:
            self.storage[key] = default
        return default

    def unstore(self, keys1, *keys):
        for pattern in (keys1, *keys):
            for k in [k for k in self.storage if fnmatch.fnmatchcase(k, pattern)]:
                del self.storage[k]

    def storeStartupValue(self, key, value):
        self._startup[key] = value

    def unstoreStartupValue(self, *keys):
        for k in keys:
            self._startup.pop(k, None)

    def cook(self, force=False, recurse=False):
        self._check()
        self.__dict__["cookCount"] += 1
        self.__dict__["_cooked_frame"] = self.project.frames
        self._cook()

    def _cook(self):
        pass

    def _initialize(self):
        pass

    def destroy(self):
        self._check()
        for d in list(self.docked):
            if d.valid:
                d.destroy()
        for o in self.project._all():
            for i, s in list(o._inputs.items()):
                if s is self:
                    del o._inputs[i]
        del self._parent._children[self._name]
        self.__dict__["valid"] = False

    def warnings(self, recurse=False):
        return "\n".join(self._warnings)

    def errors(self, recurse=False):
        return "\n".join(self._errors)


class COMP(OP):
    FAMILY, isCOMP = "COMP", True

    def __init__(self, project, parent, name):
        super().__init__(project, parent, name)
        self.__dict__["_children"] = {}

    @property
    def input_family(self):
        return "TOP"

    @property
    def MAX_INPUTS(self):
        return sum(c.OPTYPE == "inTOP" for c in self._children.values())

    @property
    def children(self):
        return list(self._children.values())

    def create(self, OPtype, name=None, initialize=True):
        self._check()
        cls = OPTYPES.get(OPtype if isinstance(OPtype, str) else getattr(OPtype, "OPTYPE", None))
        if cls is None:
            raise tdError(f"Unknown operator type {OPtype!r}")
        if name is None:
            base, n = cls.OPTYPE[: -len(cls.FAMILY)].lower(), 1
            while f"{base}{n}" in self._children:
                n += 1
            name = f"{base}{n}"
        if not _OP_NAME.match(name) or name in self._children:
            raise tdError(f"Invalid or taken operator name {name!r} in {self.path}")
        o = cls(self.project, self, name)
        self._children[name] = o
        if initialize:
            o._initialize()
        return o

    def appendCustomPage(self, name):
        page = Page(self, name)
        self.customPages.append(page)
        return page


class baseCOMP(COMP):
    OPTYPE = "baseCOMP"
