// The control page's ControlNet panel and IP-Adapter section (see demo/conditioning.py for the messages).
// Settings go over the page's websocket as {"t": "controlnet" | "ip_adapter", ...}; one request in flight at a
// time, a newer value for the same control replaces a pending one (sliders send their newest value). The style
// image is the file's own bytes in a binary "RTDS" message; the server answers "applied" (then the thumbnail is
// fetched from /api/style.png) or an error naming what was wrong, and the engine keeps its previous style.
"use strict";

class RtdConditioning {
  static STYLE_HEADER = 16;

  constructor({ link, say, onEdit }) {
    this.link = link; this.say = say; this.onEdit = onEdit;
    this.units = [];  // [{index, model, preprocessor}] from hello
    this.ip = null; this.maxStyleBytes = 8 * 1024 * 1024;
    this.pending = new Map();  // "controlnet:0" | "ip_adapter" -> message to send
    this.busy = null; this.busySince = 0; this.styleId = 0;
    this.styleBusy = false; this.stylePending = null;  // one style image in flight (the server decodes it aside)
    this.sent = { controlnet: 0, ip_adapter: 0, style_image: 0 }; this.applied = []; this.errors = [];
    const $ = (id) => document.getElementById(id);
    this.$ = $;
    $("ipScale").addEventListener("input", () => this.queue("ip_adapter", { scale: Number($("ipScale").value) }));
    $("ipEnabled").addEventListener("change", () => this.queue("ip_adapter", { enabled: $("ipEnabled").checked }));
    const drop = $("styleDrop"), file = $("styleFile");
    drop.addEventListener("click", () => file.click());
    drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); file.click(); } });
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault(); drop.classList.remove("over");
      if (e.dataTransfer && e.dataTransfer.files.length) this.upload(e.dataTransfer.files[0]);
    });
    file.addEventListener("change", () => { if (file.files.length) this.upload(file.files[0]); file.value = ""; });
    setInterval(() => { if (this.busy && performance.now() - this.busySince > 10000) this.done(); }, 1000);
  }

  // ---- from the server ------------------------------------------------------------------------------------
  hello(info, controls) {
    if (!info) return;
    this.units = info.controlnets || []; this.ip = info.ip_adapter; this.maxStyleBytes = info.max_style_bytes || this.maxStyleBytes;
    this.busy = null; this.pending.clear(); this.styleBusy = false; this.stylePending = null;
    this.buildRows();
    this.$("cnSection").hidden = !this.units.length;
    this.$("ipSection").hidden = !this.ip;
    if (this.ip) this.$("ipModel").textContent = this.ip.model;
    this.showStyle(info.style);
    this.sync(controls, true);
  }

  buildRows() {
    const box = this.$("controlnets"); box.innerHTML = "";
    for (const u of this.units) {
      const i = u.index, row = document.createElement("div");
      row.className = "cn"; row.id = `cn${i}`;
      const name = String(u.model).split(/[\\/]/).pop();
      row.innerHTML =
        `<label class="cn-head"><input type="checkbox" id="cnOn${i}" data-midi> <span class="cn-name"></span>` +
        `<span class="cn-pre"></span></label>` +
        `<label>Scale <input id="cnScale${i}" type="range" min="0" max="2" step="0.01" value="1"><output></output></label>` +
        `<label>Start <input id="cnStart${i}" type="range" min="0" max="1" step="0.01" value="0"><output></output></label>` +
        `<label>End <input id="cnEnd${i}" type="range" min="0" max="1" step="0.01" value="1"><output></output></label>` +
        `<p class="hint cn-state" id="cnState${i}"></p>`;
      row.querySelector(".cn-name").textContent = name; row.querySelector(".cn-name").title = u.model;
      row.querySelector(".cn-pre").textContent = u.preprocessor;
      box.append(row);
      const send = (field, el, value) => { RtdConditioning.showValue(el); this.queue("controlnet", { [field]: value() }, i); };
      for (const [field, id] of [["scale", `cnScale${i}`], ["start", `cnStart${i}`], ["end", `cnEnd${i}`]]) {
        const el = this.$(id); el.addEventListener("input", () => send(field, el, () => Number(el.value)));
      }
      const on = this.$(`cnOn${i}`); on.addEventListener("change", () => send("enabled", on, () => on.checked));
    }
  }

  // A server-applied value wins unless the user is on that control or edited within 1.5 s (app.js decides).
  sync(c, force) {
    if (!c) return;
    const set = (id, v) => { const el = this.$(id); if (!el || v === undefined || v === null) return;
      if (!force && document.activeElement === el) return;
      if (el.type === "checkbox") el.checked = v; else { if (el.type === "range" && v > Number(el.max)) el.max = String(v); el.value = v; }
      RtdConditioning.showValue(el); };
    (c.controlnets || []).forEach((u, i) => {
      set(`cnScale${i}`, u.scale); set(`cnOn${i}`, u.enabled); set(`cnStart${i}`, u.start); set(`cnEnd${i}`, u.end);
    });
    if (c.ip_adapter_scale !== null && c.ip_adapter_scale !== undefined) { set("ipScale", c.ip_adapter_scale); set("ipEnabled", c.ip_adapter_enabled); }
  }

  // What the engine itself reports (status message "conditioning"): shown under each control.
  status(cond) {
    if (!cond) return;
    const f = (x) => (typeof x === "number" ? x.toFixed(2) : "?");
    (cond.controlnets || []).forEach((u, i) => {
      const el = this.$(`cnState${i}`);
      if (el) el.textContent = `engine: ${u.enabled ? "on" : "off"} · scale ${f(u.scale)} · steps ${f(u.start)}–${f(u.end)}`;
    });
    const ip = cond.ip_adapter, el = this.$("ipState");
    if (ip && el) {
      const images = Array.isArray(ip.images) ? ip.images.length : (ip.images ?? 0);
      el.textContent = `engine: ${ip.enabled ? "on" : "off"} · scale ${f(ip.scale)} · ${images} image(s) · ` +
        `${ip.tokens ?? "?"} tokens · ${ip.encodes ?? 0} encode(s)`;
    }
    if (cond.style && (!this.style || cond.style.version !== this.style.version)) this.showStyle(cond.style);
  }

  showStyle(style) {
    this.style = style || null;
    const img = this.$("styleThumb"), text = this.$("styleText");
    if (!style) { img.hidden = true; text.textContent = "Drop a style image here (PNG or JPEG), or click to choose"; return; }
    img.src = `/api/style.png?v=${style.version}`; img.hidden = false; img.alt = style.name;
    text.textContent = `${style.name} · ${style.width}×${style.height} · drop or click to replace`;
  }

  // {"t": "applied" | "error", "what": ...} for a request of this page; true when it was one.
  reply(msg) {
    if (!msg.what) return false;
    if (msg.t === "applied") {
      this.applied.push(msg.what);
      if (msg.what === "style_image") { this.showStyle(msg.style); this.say(`style image set (${msg.style.width}×${msg.style.height})`, true); }
    } else {
      this.errors.push(msg.message);
      this.say(msg.what === "style_image" ? `style image refused: ${msg.message}` : `server: ${msg.message}`);
    }
    if (msg.what === "style_image") { this.styleBusy = false; this.sendStyle(); } else this.done();
    return true;
  }

  // ---- to the server --------------------------------------------------------------------------------------
  queue(what, change, index) {
    this.onEdit();
    const key = index === undefined ? what : `${what}:${index}`;
    const msg = this.pending.get(key) || (index === undefined ? { t: what } : { t: what, index });
    this.pending.set(key, Object.assign(msg, change));
    this.pump();
  }

  pump() {
    if (this.busy || !this.link.open) return;
    const next = this.pending.entries().next();
    if (next.done) return;
    const [key, msg] = next.value; this.pending.delete(key);
    this.busy = key; this.busySince = performance.now();
    this.link.sendJson(msg);
    this.sent[key.split(":")[0]] += 1;
  }

  done() { this.busy = null; this.pump(); }

  async upload(file) {
    if (!this.ip) { this.say("this engine has no IP-Adapter: start the demo with --ip-adapter MODEL"); return; }
    if (file.size > this.maxStyleBytes) {
      this.say(`style image refused: ${file.name} is ${(file.size / 1048576).toFixed(1)} MiB; at most ` +
               `${(this.maxStyleBytes / 1048576).toFixed(0)} MiB`);
      return;
    }
    const bytes = new Uint8Array(await file.arrayBuffer()), H = RtdConditioning.STYLE_HEADER;
    let name = new TextEncoder().encode(file.name);
    if (name.byteLength > 200) name = new TextEncoder().encode(file.name.slice(-40));
    const buf = new ArrayBuffer(H + name.byteLength + bytes.byteLength), dv = new DataView(buf);
    [0x52, 0x54, 0x44, 0x53].forEach((b, i) => dv.setUint8(i, b));  // "RTDS"
    dv.setUint8(4, 1);
    dv.setUint16(6, name.byteLength, true);
    dv.setUint32(8, ++this.styleId, true);
    dv.setUint32(12, bytes.byteLength, true);
    new Uint8Array(buf, H).set(name);
    new Uint8Array(buf, H + name.byteLength).set(bytes);
    this.say(`sending ${file.name}…`, true);
    this.stylePending = buf;
    this.sendStyle();
  }

  sendStyle() {  // the newest chosen file, once the previous one is answered
    if (this.styleBusy || !this.stylePending || !this.link.open) return;
    this.link.sendBinary(this.stylePending); this.stylePending = null;
    this.styleBusy = true; this.sent.style_image += 1;
  }

  // Every conditioning control, for a preset.
  presetFields() {
    const b = {};
    if (this.units.length) {
      b.controlnets = this.units.map((u) => ({
        scale: Number(this.$(`cnScale${u.index}`).value), enabled: this.$(`cnOn${u.index}`).checked,
        start: Number(this.$(`cnStart${u.index}`).value), end: Number(this.$(`cnEnd${u.index}`).value) }));
    }
    if (this.ip) { b.ip_adapter_scale = Number(this.$("ipScale").value); b.ip_adapter_enabled = this.$("ipEnabled").checked; }
    return b;
  }

  static showValue(el) {
    const out = el.parentElement && el.parentElement.querySelector("output");
    if (out && el.type === "range") out.textContent = Number(el.value).toFixed(2);
  }
}
