"""A stand-in for the part of TouchDesigner's Python API the rtdiffusion component uses (TouchDesigner itself
cannot run here). It follows Derivative's documentation and raises where TouchDesigner would:

- ``COMP.create(OPtype, name)`` with the type as a string ('baseCOMP', 'scriptTOP', ...); unknown types and
  taken or malformed names raise. Operators take no attributes they do not have (``op.nodex = 1`` raises).
- ``op.par.<name>``: built-in parameter names are the ones the operator pages list (Script TOP ``callbacks``,
  OSC Out DAT ``address``/``port``, Execute DAT ``framestart``, ...); any other name raises AttributeError.
  Values are coerced by style (Int, Float, Toggle, Str, Menu: an unknown menu entry raises); ``.expr`` puts a
  parameter in expression mode, evaluated with ``me``, ``parent()`` and ``op()`` as TouchDesigner does.
- ``appendCustomPage`` (COMPs and Script OPs only) and ``Page.appendStr/Int/Float/Toggle/Pulse/Menu/File/
  Folder/Header(name, label=None, ..., replace=True)`` returning the new parameters; a custom parameter name
  must be an upper-case letter followed by lower-case letters and digits.
- ``inputConnectors[i].connect(op)`` only within a family and within the operator's input count.
- Paths: ``comp.op('child')`` looks inside a COMP; from any other operator a name is a sibling and ``'..'``
  its parent COMP. DAT modules get ``me``, ``op``, ``parent`` (and ``CookLevel`` on 2025 builds).
- Cooking: nothing cooks by itself (no viewer is open, as in Perform mode). ``frame()`` runs one frame:
  OSC In DATs deliver what arrived on their real UDP socket to ``onReceiveOSC``, Parameter Execute DATs get
  the frame's ``onValueChange`` calls, Execute DATs ``onFrameStart``, then operators whose Script callbacks'
  ``onGetCookLevel`` returned ``CookLevel.ALWAYS`` cook (on ``build=2025`` only; older builds never ask).
- ``TOP.numpyArray(delayed=...)``: float32 [H, W, 4] 0..1, bottom row first, channels in the machine's order
  (``Project(numpy_order='BGRA')`` stands for a machine that returns BGRA); ``delayed=True`` returns the
  previous call's download (None the first time). ``scriptTOP.copyNumpyArray`` checks shape and dtype.
- ``oscoutDAT.sendOSC(address, values, ...)`` sends real UDP with the documented type rules (int i/h,
  float f, str s, bool T/F, bytes b).
- ``store/fetch/unstore/storeStartupValue``; ``Project.reopen()`` is "save and open again": parameter values
  and storage are kept, startup values applied, DAT modules recompiled, ``onStart`` run.
"""

from __future__ import annotations

import enum
import fnmatch
import re
import socket
import time
import types

import numpy as np
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket


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
            elif s == "OP":
                v = v.path if isinstance(v, OP) else str(v)
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
        if self.style == "OP":
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
        return sum(isinstance(c, inTOP) for c in self._children.values())

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


def _callbacks_dat(host):
    """What creating a Script TOP / OSC In DAT does in TouchDesigner: a docked callbacks DAT."""
    dat = host._parent.create("textDAT", f"{host.name}_callbacks")
    dat.text = "# template callbacks\n"
    host.docked.append(dat)
    host.par.callbacks = dat.name


class TOP(OP):
    FAMILY, MAX_INPUTS = "TOP", 1
    _RES = {"outputresolution": ("Menu", "useinput", ("useinput", "eighth", "quarter", "half", "2x", "4x", "8x",
                                                       "fit", "limit", "custom")),
            "resolutionw": ("Int", 256, ()), "resolutionh": ("Int", 256, ())}

    def _initialize(self):
        self.__dict__["_pending"] = None

    def _image(self):  # [H, W, 4] float32 RGBA 0..1, bottom row first, or None
        src = self._inputs.get(0)
        return None if src is None else src._image()

    @property
    def width(self):
        img = self._image()
        return 0 if img is None else img.shape[1]

    @property
    def height(self):
        img = self._image()
        return 0 if img is None else img.shape[0]

    def _resolution(self, img):
        p = self.par
        if p.outputresolution.eval() == "custom" or img is None:
            return int(p.resolutionh.eval()), int(p.resolutionw.eval())
        return img.shape[:2]

    def numpyArray(self, delayed=False, writable=False, neverNone=False):
        self._check()
        img = self._image()
        if img is not None:
            img = img.astype(np.float32, copy=True)
            if self.project.numpy_order == "BGRA":
                img = img[..., [2, 1, 0, 3]]
        if delayed:
            img, self.__dict__["_pending"] = self.__dict__.get("_pending"), img
            if img is None and neverNone:
                img = np.zeros((self.height or 1, self.width or 1, 4), np.float32)
        return img


class inTOP(TOP):
    OPTYPE, MAX_INPUTS = "inTOP", 0

    def _image(self):
        comp = self._parent
        ins = sorted((c for c in comp._children.values() if isinstance(c, inTOP)), key=lambda c: c.nodeY, reverse=True)
        src = comp._inputs.get(ins.index(self))
        return np.zeros((256, 256, 4), np.float32) if src is None else src._image()


class nullTOP(TOP):
    OPTYPE = "nullTOP"


class outTOP(TOP):
    OPTYPE = "outTOP"


class constantTOP(TOP):
    OPTYPE, MAX_INPUTS = "constantTOP", 0
    PARS = {**TOP._RES, "outputresolution": TOP._RES["outputresolution"][:1] + ("custom",) + TOP._RES[
        "outputresolution"][2:], "colorr": ("Float", 0.0, ()), "colorg": ("Float", 0.0, ()),
        "colorb": ("Float", 0.0, ()), "alpha": ("Float", 1.0, ())}

    def _image(self):
        h, w = self._resolution(None)
        p = self.par
        return np.broadcast_to(np.array([p.colorr.eval(), p.colorg.eval(), p.colorb.eval(), p.alpha.eval()],
                                        np.float32), (h, w, 4)).copy()


class switchTOP(TOP):
    OPTYPE, MAX_INPUTS = "switchTOP", 16
    PARS = {"index": ("Float", 0.0, ()), "blend": ("Toggle", False, ())}

    def _image(self):
        ins = self.inputs
        if not ins:
            return None
        return ins[int(min(max(self.par.index.eval(), 0), len(ins) - 1))]._image()


class fitTOP(TOP):
    OPTYPE = "fitTOP"
    PARS = {**TOP._RES, "fit": ("Menu", "fitbest", ("fithorz", "fitvert", "fitbest", "fitoutside", "nativeres"))}

    def _image(self):
        img = super()._image()
        if img is None:
            return None
        h, w = self._resolution(img)
        rows = (np.arange(h) * img.shape[0] // h)
        cols = (np.arange(w) * img.shape[1] // w)
        return img[rows][:, cols]


class scriptTOP(TOP):
    OPTYPE = "scriptTOP"
    PARS = {**TOP._RES, "callbacks": ("OP", "", ()), "setuppars": ("Pulse", False, ())}

    def _initialize(self):
        super()._initialize()
        self.__dict__.update(_copied=None, cookLevel=None)
        _callbacks_dat(self)

    def appendCustomPage(self, name):
        return COMP.appendCustomPage(self, name)

    def _module(self):
        dat = self.par.callbacks.eval()
        return None if dat is None else dat.module

    def _cook(self):
        self.__dict__["_warnings"], self.__dict__["_errors"] = [], []
        mod = self._module()
        if mod is not None:
            mod.onCook(self)

    def _ask_cook_level(self):
        mod = self._module()
        if self.project.build >= 2025 and mod is not None and hasattr(mod, "onGetCookLevel"):
            self.__dict__["cookLevel"] = mod.onGetCookLevel(self)

    def copyNumpyArray(self, arr):
        if (not isinstance(arr, np.ndarray) or arr.ndim != 3 or not 1 <= arr.shape[2] <= 4
                or arr.dtype not in (np.uint8, np.uint16, np.float32)):
            raise tdError(f"copyNumpyArray takes a [rows, cols, 1-4] uint8/uint16/float32 array; got "
                          f"{getattr(arr, 'shape', type(arr))} {getattr(arr, 'dtype', '')}")
        scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(arr.dtype, 1.0)
        img = np.zeros(arr.shape[:2] + (4,), np.float32)
        img[..., 3] = 1.0
        img[..., : arr.shape[2]] = arr / scale
        if self.project.numpy_order == "BGRA" and arr.shape[2] >= 3:
            img[..., [0, 2]] = img[..., [2, 0]]
        self.__dict__["_copied"] = img

    def _image(self):
        return self._copied

    def addWarning(self, message):
        self._warnings.append(str(message))

    def addError(self, message):
        self._errors.append(str(message))


class DAT(OP):
    FAMILY, MAX_INPUTS = "DAT", 1
    PARS: dict = {}

    def _initialize(self):
        self.__dict__.update(_text="", _mod=None)

    @property
    def text(self):
        return self._text

    @text.setter
    def text(self, value):
        self.__dict__.update(_text=str(value), _mod=None)

    def _globals(self):
        g = {"me": self, "op": self.op, "parent": self.parent, "ParMode": ParMode, "absTime": self.project.absTime}
        if self.project.build >= 2025:
            g["CookLevel"] = CookLevel
        return g

    @property
    def module(self):
        if self._mod is None:
            mod = types.ModuleType(self.name)
            mod.__dict__.update(self._globals())
            exec(compile(self._text, f"<DAT {self.path}>", "exec"), mod.__dict__)
            self.__dict__["_mod"] = mod
        return self._mod

    def run(self, *args, **kwargs):
        ns = {**self._globals(), "args": args, "__name__": "__main__"}
        exec(compile(self._text, f"<DAT {self.path}>", "exec"), ns)


class textDAT(DAT):
    OPTYPE = "textDAT"


_EXEC = {"active": ("Toggle", True, ()), "executeloc": ("Menu", "here", ("current", "here", "op")),
         "fromop": ("OP", "", ())}


class executeDAT(DAT):
    OPTYPE = "executeDAT"
    PARS = {**_EXEC, **{k: ("Toggle", False, ()) for k in ("start", "create", "exit", "framestart", "frameend",
                                                           "playstatechange", "devicechange", "projectpresave",
                                                           "projectpostsave")}}


class parameterexecuteDAT(DAT):
    OPTYPE = "parameterexecuteDAT"
    PARS = {**_EXEC, "op": ("Str", "", ()), "pars": ("Str", "*", ()), "valuechange": ("Toggle", True, ()),
            "valueschanged": ("Toggle", False, ()), "onpulse": ("Toggle", True, ()),
            "expressionchange": ("Toggle", False, ()), "exportchange": ("Toggle", False, ()),
            "enablechange": ("Toggle", False, ()), "modechange": ("Toggle", False, ()),
            "custom": ("Toggle", True, ()), "builtin": ("Toggle", False, ())}

    def watches(self, par):
        p = self.par
        if not p.active.eval() or not (p.custom.eval() if par.isCustom else p.builtin.eval()):
            return False
        targets = [self.op(t) for t in str(p.op.eval()).split()]
        return par.owner in targets and any(fnmatch.fnmatchcase(par.name, pat) for pat in p.pars.eval().split())


_NET = {"active": ("Toggle", True, ()), "protocol": ("Menu", "msging", ("msging", "multicastmsging",
                                                                        "reliablemsging")),
        "address": ("Str", "localhost", ()), "port": ("Int", 10000, ()), "localaddress": ("Str", "", ()),
        "shared": ("Toggle", False, ()), "addscope": ("Str", "*", ()), "typetag": ("Toggle", False, ()),
        "splitbundle": ("Toggle", False, ()), "splitmessage": ("Toggle", False, ()),
        "bundletimestamp": ("Toggle", False, ()), "callbacks": ("OP", "", ()), **_EXEC}


class oscoutDAT(DAT):
    OPTYPE = "oscoutDAT"
    PARS = _NET

    def sendOSC(self, address, values, *more, asBundle=False, useNonStandardTypes=True, use64BitPrecision=False):
        if len(more) % 2:
            raise tdError("sendOSC takes address, values pairs")
        sent = 0
        pairs = [(address, values)] + [(more[i], more[i + 1]) for i in range(0, len(more), 2)]
        for addr, vals in pairs:
            if not isinstance(addr, str) or not addr.startswith("/"):
                raise tdError(f"OSC address must be a string starting with '/'; got {addr!r}")
            b = OscMessageBuilder(addr)
            for v in vals:
                if isinstance(v, bool):
                    b.add_arg(v, "T" if v else "F") if useNonStandardTypes else b.add_arg(int(v), "i")
                elif isinstance(v, int):
                    fits = -2**31 <= v < 2**31
                    if not fits and not useNonStandardTypes:
                        raise tdError(f"integer {v} does not fit in 32 bits")
                    b.add_arg(v, "h" if use64BitPrecision or not fits else "i")
                elif isinstance(v, float):
                    b.add_arg(v, "d" if use64BitPrecision else "f")
                elif isinstance(v, str):
                    b.add_arg(v, "s")
                elif isinstance(v, (bytes, bytearray)):
                    b.add_arg(bytes(v), "b")
                else:
                    raise tdError(f"sendOSC cannot send {type(v).__name__} {v!r}")
            if self.par.active.eval():
                dgram = b.build().dgram
                host = self.par.address.eval()
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    sent += s.sendto(dgram, ("127.0.0.1" if host == "localhost" else host, self.par.port.eval()))
        return sent


class oscinDAT(DAT):
    OPTYPE = "oscinDAT"
    PARS = {**_NET, "maxlines": ("Int", 10, ())}

    def _initialize(self):
        super()._initialize()
        self.__dict__.update(_sock=None, _bound=None, _rows=0)
        _callbacks_dat(self)

    def _poll(self):
        port = self.par.port.eval() if self.par.active.eval() else None
        if self._bound != port:
            self._close()
            if port:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind(("127.0.0.1", port))
                s.setblocking(False)
                self.__dict__.update(_sock=s, _bound=port)
        while self._sock is not None:
            try:
                dgram, peer = self._sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            for m in OscPacket(dgram).messages:
                msg = m.message
                self.__dict__["_rows"] += 1
                cb = self.par.callbacks.eval()
                if cb is not None and hasattr(cb.module, "onReceiveOSC"):
                    cb.module.onReceiveOSC(self, self._rows, f"{msg.address} {msg.params}", dgram, time.time(),
                                           msg.address, tuple(msg.params), peer)

    def _close(self):
        if self._sock is not None:
            self._sock.close()
        self.__dict__.update(_sock=None, _bound=None)


OPTYPES = {c.OPTYPE: c for c in (baseCOMP, inTOP, outTOP, nullTOP, constantTOP, switchTOP, fitTOP, scriptTOP,
                                 textDAT, executeDAT, parameterexecuteDAT, oscoutDAT, oscinDAT)}


# -------------------------------------------------------------------------------------------------- project
class _AbsTime:
    """``absTime``: ``frame`` counts the frames since the process started."""

    def __init__(self, project):
        self._project = project

    @property
    def frame(self):
        return self._project.frames

    @property
    def seconds(self):
        return self._project.frames / 60.0

class Project:
    """One TouchDesigner process with /project1. ``build``: 2023 (no cook levels) or 2025 (CookLevel)."""

    def __init__(self, build=2023, numpy_order="RGBA"):
        self.build, self.numpy_order, self.frames = build, numpy_order, 0
        self.absTime = _AbsTime(self)
        self.root = COMP(self, None, "")
        self.root.__dict__["_name"] = ""
        self.project1 = self.root.create("baseCOMP", "project1")
        self._changes = []

    def op(self, path):
        return self.root.op(path)

    def _all(self, comp=None):
        for c in (comp or self.root)._children.values():
            yield c
            if c.isCOMP:
                yield from self._all(c)

    def _execs(self, cls, flag):
        return [o for o in self._all() if isinstance(o, cls) and o.par.active.eval() and getattr(o.par, flag).eval()]

    def _par_changed(self, par, prev):
        self._changes.append((par, prev))

    def _pulsed(self, par):
        owner = par.owner
        if isinstance(owner, scriptTOP):
            mod = owner._module()
            if par.name == "setuppars" and mod is not None:
                mod.onSetupParameters(owner)
            elif par.isCustom and mod is not None:
                mod.onPulse(par)
        for d in self._execs(parameterexecuteDAT, "onpulse"):
            if d.watches(par):
                d.module.onPulse(par)

    def start(self):
        for d in self._execs(executeDAT, "start"):
            d.module.onStart()

    def frame(self):
        """One frame: OSC in, parameter callbacks, onFrameStart, cook-level ALWAYS operators, onFrameEnd."""
        self.frames += 1
        for d in [o for o in self._all() if isinstance(o, oscinDAT)]:
            d._poll()
        changes, self._changes = self._changes, []
        for par, prev in changes:
            if par.owner.valid:
                for d in self._execs(parameterexecuteDAT, "valuechange"):
                    if d.watches(par):
                        d.module.onValueChange(par, prev)
        for d in self._execs(executeDAT, "framestart"):
            d.module.onFrameStart(self.frames)
        for o in list(self._all()):  # the cook pass: at most once a frame, forced cooks included
            if isinstance(o, scriptTOP) and o.valid:
                o._ask_cook_level()
                if o.cookLevel is CookLevel.ALWAYS and o._cooked_frame != self.frames:
                    o.cook()
        for d in self._execs(executeDAT, "frameend"):
            d.module.onFrameEnd(self.frames)

    def reopen(self):
        """Save, quit and open the project again (same process): values and storage kept, startup values
        applied, modules recompiled, onStart run."""
        for o in self._all():
            if isinstance(o, oscinDAT):
                o._close()
            o.storage.update(o._startup)
            if isinstance(o, DAT):
                o.__dict__["_mod"] = None
        self._changes = []
        self.start()

    def exit(self):
        for d in self._execs(executeDAT, "exit"):
            d.module.onExit()
        for o in self._all():
            if isinstance(o, oscinDAT):
                o._close()


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

