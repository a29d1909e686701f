"""Operator types of the TouchDesigner stand-in (see td_standin.py): the TOPs and DATs the component uses,
with the parameter names Derivative's operator pages list."""

from __future__ import annotations

import fnmatch
import socket
import time
import types

import numpy as np
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket

from td_standin_core import COMP, OP, OPTYPES, CookLevel, ParMode, baseCOMP, tdError


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


class selectTOP(TOP):
    """Shows the TOP its ``top`` parameter names (an operator reference)."""

    OPTYPE, MAX_INPUTS = "selectTOP", 0
    PARS = {"top": ("OP", "", ())}

    def _image(self):
        src = self.par.top.eval()
        return None if src is None else src._image()


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


OPTYPES.update({c.OPTYPE: c for c in (baseCOMP, inTOP, outTOP, nullTOP, constantTOP, switchTOP, fitTOP, selectTOP,
                                      scriptTOP,
                                 textDAT, executeDAT, parameterexecuteDAT, oscoutDAT, oscinDAT)})
