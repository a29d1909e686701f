// Web MIDI for the control page: control changes (knobs, faders) move sliders; notes press buttons (presets,
// Pause, Freeze, Record, Snapshot, Randomise, Hide, Full screen) and flip toggles (ControlNet and IP-Adapter on/off;
// any element with data-midi). Learn: click "MIDI learn", touch a slider or
// click a button (while learning a click only picks the button, it does not press it), then turn a knob or hit
// a pad. Mappings live in this browser (localStorage "rtd.midi"): "cc:<channel>:<number>" or
// "note:<channel>:<number>" -> element id.
"use strict";

class RtdMidi {
  constructor(say) {
    this.say = say;
    this.map = RtdMidi.load();
    this.target = null; this.learning = false; this.access = null;
    document.addEventListener("click", (e) => this.pick(e), true);  // capture: before the button's own handler
    // delegated, so sliders added later (the ControlNet rows) are learnable too
    const slider = (e) => { const el = e.target; if (el.matches && el.matches("input[type=range]")) this.choose(el); };
    document.addEventListener("pointerdown", slider, true);
    document.addEventListener("focusin", slider, true);
    const button = document.getElementById("midiLearn");
    if (!navigator.requestMIDIAccess) {
      button.disabled = true; button.title = "Web MIDI is not available in this browser";
      return;
    }
    button.addEventListener("click", () => {
      if (this.learning) { this.stopLearning(); say(""); return; }
      this.startLearning(); this.connect();
    });
    if (Object.keys(this.map).length) this.connect();  // mappings from an earlier session work at once
  }

  static label(el) {  // what the user reads on a button or beside a toggle
    const text = el.tagName === "BUTTON" ? el.textContent : (el.closest("label") || el).textContent;
    return (text || "").trim() || el.id;
  }

  static load() {
    const raw = JSON.parse(localStorage.getItem("rtd.midi") || "{}"), map = {};
    for (const [k, v] of Object.entries(raw)) map[/^\d+:\d+$/.test(k) ? `cc:${k}` : k] = v;  // older "ch:cc" keys
    return map;
  }

  async connect() {
    if (this.access) return;
    try {
      this.access = await navigator.requestMIDIAccess();
      const hook = () => this.access.inputs.forEach((i) => { i.onmidimessage = (m) => this.handle(m.data); });
      hook(); this.access.onstatechange = hook;
    } catch (e) { this.say(`MIDI unavailable: ${e.message}`); }
  }

  choose(el) {
    if (!this.learning) return;
    if (this.target) this.target.classList.remove("learn-target");
    this.target = el; el.classList.add("learn-target");
    this.say(el.type !== "range" ? `MIDI learn: now hit a pad or key for "${RtdMidi.label(el)}"`
      : `MIDI learn: now turn a knob or fader for ${el.id}`, true);
  }

  pick(e) {
    const el = e.target.closest && e.target.closest("[data-midi]");
    if (!this.learning || !el) return;
    e.preventDefault(); e.stopImmediatePropagation();
    this.choose(el);
  }

  handle(data) {
    const [status, number, value] = data, type = status & 0xf0, channel = status & 0x0f;
    let kind;
    if (type === 0xb0) kind = "cc";
    else if (type === 0x90 && value > 0) kind = "note";  // note-on; velocity 0 is a note-off
    else return;
    const key = `${kind}:${channel}:${number}`;
    if (this.learning && this.target) {
      const wantsNote = this.target.type !== "range";
      if (wantsNote !== (kind === "note")) {
        this.say(wantsNote ? "a button is played by a note (pad or key), not a knob" :
          "a slider follows a knob or fader (control change), not a note");
        return;
      }
      for (const [k, id] of Object.entries(this.map)) if (id === this.target.id) delete this.map[k];
      this.map[key] = this.target.id; localStorage.setItem("rtd.midi", JSON.stringify(this.map));
      this.say(`MIDI ${kind === "cc" ? "CC" : "note"} ${number} (channel ${channel + 1}) → ` +
        `${this.target.type !== "range" ? RtdMidi.label(this.target) : this.target.id}`, true);
      this.stopLearning(); return;
    }
    const el = this.map[key] && document.getElementById(this.map[key]);
    if (!el) return;
    if (kind === "note") { el.click(); return; }
    const min = Number(el.min), max = Number(el.max);
    el.value = min + (value / 127) * (max - min);
    el.dispatchEvent(new Event("input"));
  }

  startLearning() {
    this.learning = true; document.body.classList.add("learning");
    document.getElementById("midiLearn").classList.add("on");
    this.say("MIDI learn: touch a slider or click a button, then use a knob, fader, pad or key", true);
  }

  stopLearning() {
    this.learning = false; document.body.classList.remove("learning");
    document.getElementById("midiLearn").classList.remove("on");
    if (this.target) this.target.classList.remove("learn-target"); this.target = null;
  }
}
