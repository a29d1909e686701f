# Helpers for sending controls through an OSC Out DAT (port 8247). Put in a Text DAT named `controls` and
# call e.g. op('controls').module.prompt(op('oscout1'), 'a watercolor city'). sendOSC() is the OSC Out
# DAT's documented method: sendOSC(address, [values]).
import json


def prompt(osc_out, text):
    osc_out.sendOSC("/prompt", [str(text)])


def prompt_list(osc_out, pairs):
    """pairs: [(text, weight), ...]; sent as JSON (the bridge accepts packets up to 64 KiB)."""
    osc_out.sendOSC("/prompt_list", [json.dumps([[str(t), float(w)] for t, w in pairs])])


def seed(osc_out, value):
    osc_out.sendOSC("/seed", [int(value)])


def guidance(osc_out, value):
    osc_out.sendOSC("/guidance_scale", [float(value)])


def t_list(osc_out, steps):
    osc_out.sendOSC("/t_list", [int(s) for s in steps])


def pause(osc_out):
    osc_out.sendOSC("/pause", [])


def play(osc_out):
    osc_out.sendOSC("/play", [])


def step(osc_out):
    osc_out.sendOSC("/process_frame", [])


def status(osc_out):
    osc_out.sendOSC("/get_status", [])
