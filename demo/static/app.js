// The control page: a source (camera, video file or test pattern) resized to the engine's size and streamed
// over the websocket, the live output, and the controls. One input frame in flight: the next is captured and
// sent only after the server's "ack"; camera ticks in between are skipped (the newest frame always wins).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const sendCanvas = $("send"), sendCtx = sendCanvas.getContext("2d", { willReadFrequently: true });
  const video = $("video"), overlay = $("overlay"), message = $("message");
  const view = new RTD.FrameView($("out"));
  const params = new URLSearchParams(location.search);
  const input = { id: 0, inFlight: false, sent: 0, skipped: 0, acked: 0, source: null, stream: null };
  let engine = null, status = null, lastLocalEdit = 0;

  function say(text, ok = false) { message.textContent = text; message.className = ok ? "ok" : ""; }

  // ---- websocket ------------------------------------------------------------------------------------------
  const link = new RTD.Link("control", {
    hello: (msg) => {
      engine = msg;
      sendCanvas.width = msg.width; sendCanvas.height = msg.height;
      input.inFlight = false;
      $("conn").textContent = `live ${msg.width}×${msg.height}`; $("conn").className = "badge live";
      const steps = $("steps"); steps.innerHTML = "";
      for (let i = 1; i <= msg.max_steps; i++) steps.add(new Option(String(i)));
      syncControls(msg.controls, true);
    },
    ack: () => { input.inFlight = false; input.acked += 1; },
    status: (msg) => { status = msg; syncControls(msg.controls, false); },
    error: (msg) => { input.inFlight = false; say(`server: ${msg.message}`); },
    replaced: () => { say("another control page took over; reload to take control back"); },
    frame: (frame) => view.show(frame),
    closed: () => { $("conn").textContent = "disconnected"; $("conn").className = "badge"; input.inFlight = false; },
  });

  // ---- sources ----------------------------------------------------------------------------------------------
  function stopStream() {
    if (input.stream) input.stream.getTracks().forEach((t) => t.stop());
    input.stream = null; video.pause(); video.removeAttribute("src"); video.srcObject = null;
  }
  async function useSource(kind) {
    stopStream();
    $("source").value = kind; input.source = kind;
    localStorage.setItem("rtd.source", kind);
    if (kind === "camera") {
      try {
        input.stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
        video.srcObject = input.stream; await video.play();
        say("camera on", true);
      } catch (e) {
        say(`no camera (${e.name}: ${e.message}); showing the test pattern`);
        input.source = "pattern"; $("source").value = "pattern";
      }
    } else if (kind === "file") {
      $("file").click();
    }
  }
  $("source").addEventListener("change", (e) => useSource(e.target.value));
  $("file").addEventListener("change", async (e) => {
    const f = e.target.files[0]; if (!f) return;
    stopStream(); input.source = "file";
    video.src = URL.createObjectURL(f);
    try { await video.play(); say(`playing ${f.name}`, true); } catch (err) { say(`cannot play ${f.name}: ${err.message}`); }
  });

  function drawPattern(ctx, w, h, t) {
    for (let i = 0; i < 8; i++) {
      ctx.fillStyle = `hsl(${(i * 45 + t * 40) % 360} 80% 50%)`;
      ctx.fillRect((i * w) / 8, 0, w / 8 + 1, h);
    }
    ctx.fillStyle = "#fff";
    ctx.beginPath();
    ctx.arc(w / 2 + Math.cos(t) * w / 4, h / 2 + Math.sin(t * 1.3) * h / 4, Math.max(4, w / 8), 0, 2 * Math.PI);
    ctx.fill();
  }
  function drawCover(ctx, src, sw, sh, w, h) {  // crop to the engine's aspect, then scale
    const scale = Math.max(w / sw, h / sh), cw = w / scale, ch = h / scale;
    ctx.drawImage(src, (sw - cw) / 2, (sh - ch) / 2, cw, ch, 0, 0, w, h);
  }
  function capture() {
    const w = sendCanvas.width, h = sendCanvas.height;
    if (input.source !== "pattern" && video.readyState >= 2 && video.videoWidth) {
      drawCover(sendCtx, video, video.videoWidth, video.videoHeight, w, h);
      return true;
    }
    if (input.source === "pattern") { drawPattern(sendCtx, w, h, performance.now() / 1000); return true; }
    return false;  // camera or file not ready yet
  }
  async function tick() {
    if (!engine || !link.open) return;
    if (input.inFlight) { input.skipped += 1; return; }
    if (!capture()) return;
    const ts = RTD.nowMs(), id = ++input.id, w = sendCanvas.width, h = sendCanvas.height;
    input.inFlight = true;
    try {
      let buf;
      if ($("encoding").value === "jpeg") {
        const blob = await new Promise((resolve) => sendCanvas.toBlob(resolve, "image/jpeg", 0.9));
        buf = RTD.packFrame(RTD.FORMAT.JPEG, id, ts, w, h, new Uint8Array(await blob.arrayBuffer()));
      } else {
        buf = RTD.packFrame(RTD.FORMAT.RGBA, id, ts, w, h, sendCtx.getImageData(0, 0, w, h).data);
      }
      link.sendBinary(buf); input.sent += 1;
    } catch (e) { input.inFlight = false; say(`could not send a frame: ${e.message}`); }
  }
  let timer = null;
  function startTimer() {
    clearInterval(timer);
    const fps = Math.min(60, Math.max(1, Number($("fps").value) || 30));
    timer = setInterval(tick, 1000 / fps);
  }
  $("fps").addEventListener("change", startTimer);

  // ---- controls -------------------------------------------------------------------------------------------
  // One request in flight per route; a newer value replaces a pending one (sliders send their newest value).
  const posters = {};
  function post(route, body, method = "POST") {
    lastLocalEdit = performance.now();
    const p = posters[route] || (posters[route] = { busy: false, pending: null });
    p.pending = Object.assign(p.pending || {}, body);
    if (p.busy) return Promise.resolve();
    return (async () => {
      while (p.pending) {
        const b = p.pending; p.pending = null; p.busy = true;
        try {
          const r = await fetch(route, { method, headers: { "Content-Type": "application/json" }, body: JSON.stringify(b) });
          const j = await r.json();
          if (!r.ok) say(j.error || `${route}: HTTP ${r.status}`);
          // a random seed chosen by the server is shown, but never over a seed the user is typing
          else { say(""); if (j.seed !== undefined && document.activeElement !== $("seed")) $("seed").value = j.seed; }
        } catch (e) { say(`${route}: ${e.message}`); } finally { p.busy = false; }
      }
    })();
  }
  const num = (id) => Number($(id).value);
  const promptBody = () => ({ prompt_a: $("promptA").value, prompt_b: $("promptB").value, blend: num("blend"),
                              method: $("method").value, negative_prompt: $("negative").value });
  const sendPrompt = () => post("/api/prompt", promptBody());
  const sendSteps = () => post("/api/steps", { strength: num("strength"), steps: num("steps") });
  const sendGuidance = () => post("/api/guidance", { guidance_scale: num("guidance"), delta: num("delta"), cfg: $("cfg").value });
  const sendFilter = () => post("/api/filter", { enabled: $("filter").checked, threshold: num("threshold"), max_skip: num("maxSkip") });
  const sendCache = () => post("/api/cache", { enabled: $("cache").checked, maxframes: num("cacheFrames"), interval: num("cacheInterval") });
  // An empty or half-typed seed field sends nothing (Number("") would be 0, a real seed).
  const sendSeed = () => {
    const raw = $("seed").value.trim();
    if (!/^\d+$/.test(raw) || !Number.isSafeInteger(Number(raw))) {
      if (raw) say(`seed: expected a whole number from 0 to ${Number.MAX_SAFE_INTEGER}`);
      return;
    }
    post("/api/seed", { seed: Number(raw) });
  };

  for (const id of ["promptA", "promptB", "negative"]) {
    $(id).addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); sendPrompt(); } });
    $(id).addEventListener("change", sendPrompt);
  }
  const bind = (ids, fn, ev = "input") => ids.forEach((id) => $(id).addEventListener(ev, fn));
  bind(["blend"], sendPrompt); bind(["method"], sendPrompt, "change");
  bind(["strength"], sendSteps); bind(["steps"], sendSteps, "change");
  bind(["guidance", "delta"], sendGuidance); bind(["cfg"], sendGuidance, "change");
  bind(["threshold"], sendFilter); bind(["filter", "maxSkip"], sendFilter, "change");
  bind(["cache", "cacheFrames", "cacheInterval"], sendCache, "change");
  bind(["seed"], sendSeed, "change");
  $("seedRandom").addEventListener("click", () => post("/api/seed", { random: true }));
  for (const el of document.querySelectorAll("input[type=range]")) {
    const out = el.parentElement.querySelector("output");
    const show = () => { if (out) out.textContent = Number(el.value).toFixed(2); };
    el.addEventListener("input", show); show();
  }

  const playback = { paused: false, frozen: false };
  function setPlayback(change) { post("/api/playback", change); }
  $("pause").addEventListener("click", () => setPlayback({ paused: !playback.paused }));
  $("freeze").addEventListener("click", () => setPlayback({ frozen: !playback.frozen }));
  function snapshot() {
    const a = document.createElement("a");
    a.href = "/api/snapshot.png"; a.download = `rtdiffusion-${Date.now()}.png`; a.click();
  }
  $("snapshot").addEventListener("click", snapshot);
  $("full").addEventListener("click", () => RTD.fullscreen($("stage")));
  $("hide").addEventListener("click", () => document.body.classList.toggle("panel-hidden"));

  // The server's view of the controls wins, except right after a local edit or while a field has focus.
  function syncControls(c, force) {
    if (!c) return;
    playback.paused = c.paused; playback.frozen = c.frozen;
    $("pause").classList.toggle("on", c.paused); $("freeze").classList.toggle("on", c.frozen);
    $("pause").textContent = c.paused ? "Resume" : "Pause";
    if (!force && performance.now() - lastLocalEdit < 1500) return;
    const set = (id, v) => { const el = $(id); if (document.activeElement === el || v === undefined) return;
      if (el.type === "checkbox") el.checked = v; else el.value = v;
      el.dispatchEvent(new Event("rtd-sync")); };
    set("promptA", c.prompt_a); set("promptB", c.prompt_b); set("blend", c.blend); set("method", c.method);
    set("negative", c.negative_prompt); set("seed", c.seed); set("strength", c.strength); set("steps", c.steps);
    set("guidance", c.guidance_scale); set("delta", c.delta); set("cfg", c.cfg);
    set("filter", c.similar_filter); set("threshold", c.similar_threshold); set("maxSkip", c.similar_max_skip);
    set("cache", c.cache_enabled); set("cacheFrames", c.cache_maxframes); set("cacheInterval", c.cache_interval);
    for (const el of document.querySelectorAll("input[type=range]")) {
      const out = el.parentElement.querySelector("output"); if (out) out.textContent = Number(el.value).toFixed(2);
    }
  }

  // ---- keys -------------------------------------------------------------------------------------------------
  async function preset(n, store) {
    if (store) {
      const b = promptBody(); delete b.method;
      await post(`/api/presets/${n}`, { ...b, seed: num("seed") }, "PUT");
      say(`stored preset ${n}`, true);
    } else {
      await post(`/api/presets/${n}/apply`, {});
    }
  }
  document.addEventListener("keydown", (e) => {
    const t = e.target.tagName;
    if (t === "TEXTAREA" || t === "INPUT" || t === "SELECT" || e.ctrlKey || e.metaKey || e.altKey) return;
    const digit = /^Digit([1-9])$/.exec(e.code);
    if (digit) { preset(Number(digit[1]), e.shiftKey); e.preventDefault(); return; }
    switch (e.code) {
      case "Space": setPlayback({ paused: !playback.paused }); break;
      case "KeyX": setPlayback({ frozen: !playback.frozen }); break;
      case "KeyR": post("/api/seed", { random: true }); break;
      case "KeyS": snapshot(); break;
      case "KeyF": RTD.fullscreen($("stage")); break;
      case "KeyH": document.body.classList.toggle("panel-hidden"); break;
      default: return;
    }
    e.preventDefault();
  });

  // ---- Web MIDI learn: click "MIDI learn", move a slider, then turn a knob -------------------------------
  const midi = {
    map: JSON.parse(localStorage.getItem("rtd.midi") || "{}"),  // "channel:cc" -> slider id
    target: null, learning: false,
    handle(data) {
      const [status, cc, value] = data;
      if ((status & 0xf0) !== 0xb0) return;  // control change only
      const key = `${status & 0x0f}:${cc}`;
      if (this.learning && this.target) {
        this.map[key] = this.target.id; localStorage.setItem("rtd.midi", JSON.stringify(this.map));
        say(`MIDI CC ${cc} (channel ${(status & 0x0f) + 1}) → ${this.target.id}`, true);
        this.stopLearning(); return;
      }
      const el = this.map[key] && $(this.map[key]); if (!el) return;
      const min = Number(el.min), max = Number(el.max);
      el.value = min + (value / 127) * (max - min);
      el.dispatchEvent(new Event("input"));
    },
    startLearning() {
      this.learning = true; document.body.classList.add("learning");
      say("MIDI learn: move a slider, then turn a knob", true);
    },
    stopLearning() {
      this.learning = false; document.body.classList.remove("learning");
      if (this.target) this.target.classList.remove("learn-target"); this.target = null;
    },
  };
  for (const el of document.querySelectorAll("input[type=range]")) {
    el.addEventListener("pointerdown", () => { if (midi.learning) { midi.target = el; el.classList.add("learn-target"); } });
    el.addEventListener("focus", () => { if (midi.learning) { midi.target = el; el.classList.add("learn-target"); } });
  }
  if (navigator.requestMIDIAccess) {
    $("midiLearn").addEventListener("click", async () => {
      if (midi.learning) { midi.stopLearning(); say(""); return; }
      midi.startLearning();
      if (!midi.access) {
        try {
          midi.access = await navigator.requestMIDIAccess();
          const hook = () => midi.access.inputs.forEach((i) => { i.onmidimessage = (m) => midi.handle(m.data); });
          hook(); midi.access.onstatechange = hook;
        } catch (e) { say(`MIDI unavailable: ${e.message}`); }
      }
    });
  } else {
    $("midiLearn").disabled = true; $("midiLearn").title = "Web MIDI is not available in this browser";
  }

  // ---- overlay and start ------------------------------------------------------------------------------------
  setInterval(() => {
    if (!view.stats.shown) return;
    const s = status ? { ...status, dropped_in: (status.dropped_in || 0) + input.skipped } : null;
    overlay.textContent = RTD.overlayText(view, s);
  }, 250);
  startTimer();
  const first = params.get("source") || localStorage.getItem("rtd.source") || "camera";
  useSource(first === "file" ? "pattern" : first);  // a file needs a click to choose it
  window.rtdApp = { view, link, input, midi, useSource, post, get status() { return status; } };
})();
