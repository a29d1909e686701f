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

Files: td_standin_core.py (parameters, pages, connectors, OP and COMP), td_standin_ops.py (the TOP and DAT
types), this one (the project: frames, start, reopen, exit).
"""

from __future__ import annotations

import socket

from td_standin_core import (COMP, OP, OPTYPES, CookLevel, Page, Par, ParCollection, ParMode,  # noqa: F401
                             tdAttributeError, tdError)
from td_standin_ops import (DAT, TOP, executeDAT, oscinDAT, parameterexecuteDAT,  # noqa: F401
                            scriptTOP)


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

