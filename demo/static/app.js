// The control page: a source (camera, video file or test pattern) resized to the engine's size and streamed
// over the websocket, the live output, and the controls. One input frame in flight: the next is captured and
// sent only after the server's "ack"; camera ticks in between are skipped (the newest frame always wins).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const sendCanvas = $("send"), sendCtx = sendCanvas.getContext("2d", { willReadFrequently: true });
  const video = $("video"), overlay = $("overlay"), message = $("message");
  const view = new RTD.FrameView($("out"));
  const inView = $("inView"), inCtx = inView.getContext("2d");
  const params = new URLSearchParams(location.search);
  const input = { id: 0, inFlight: false, sent: 0, skipped: 0, acked: 0, source: null, stream: null, firstSentAt: 0,
                  bitmaps: new Map() };  // frame id -> ImageBitmap of what was sent (the side-by-side view)
  const rates = new RTD.Rates();
  let engine = null, status = null, lastLocalEdit = 0, errorsSeen = 0, cond = null;

  function say(text, ok = false) { message.textContent = text; message.className = ok ? "ok" : ""; message.title = text; }

  // ---- websocket ------------------------------------------------------------------------------------------
  const link = new RTD.Link("control", {
    hello: (msg) => {
      engine = msg;
      sendCanvas.width = inView.width = msg.width; sendCanvas.height = inView.height = msg.height;
      input.inFlight = false;
      const steps = $("steps"); steps.innerHTML = "";
      for (let i = 1; i <= msg.max_steps; i++) steps.add(new Option(String(i)));
      cond.hello(msg.conditioning, msg.controls);
      syncControls(msg.controls, true); showRecord(msg.record);
    },
    ack: () => { input.inFlight = false; input.acked += 1; },
    status: (msg) => {
      status = msg; syncControls(msg.controls, false); showRecord(msg.record); cond.status(msg.conditioning);
      rates.sample({ in: msg.frames_in || 0, out: msg.frames_out || 0,
                     skipped: (msg.dropped_in || 0) + (msg.dropped_out || 0) + input.skipped });
      if (msg.errors > errorsSeen) { errorsSeen = msg.errors; say(`engine error: ${msg.last_error}`); }
    },
    error: (msg) => { if (cond.reply(msg)) return; input.inFlight = false; say(`server: ${msg.message}`); },
    applied: (msg) => cond.reply(msg),
    replaced: () => { say("another control page took over; reload to take control back"); },
    frame: (frame) => view.show(frame),
    closed: () => { input.inFlight = false; cond.busy = null; cond.styleBusy = false; },
  });
  cond = new RtdConditioning({ link, say, onEdit: () => { lastLocalEdit = performance.now(); } });
  view.onShown = (frame) => {  // the side-by-side view shows the input this output was made from
    const bitmap = input.bitmaps.get(frame.id);
    if (bitmap && document.body.classList.contains("compare")) inCtx.drawImage(bitmap, 0, 0);
    for (const [id, b] of input.bitmaps) if (id <= frame.id && frame.ts > 0) { b.close(); input.bitmaps.delete(id); }
  };

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
      if (document.body.classList.contains("compare")) {
        input.bitmaps.set(id, await createImageBitmap(sendCanvas));
        while (input.bitmaps.size > 8) { const [old, b] = input.bitmaps.entries().next().value; b.close(); input.bitmaps.delete(old); }
      }
      let buf;
      if ($("encoding").value === "jpeg") {
        const blob = await new Promise((resolve) => sendCanvas.toBlob(resolve, "image/jpeg", 0.9));
        buf = RTD.packFrame(RTD.FORMAT.JPEG, id, ts, w, h, new Uint8Array(await blob.arrayBuffer()));
      } else {
        buf = RTD.packFrame(RTD.FORMAT.RGBA, id, ts, w, h, sendCtx.getImageData(0, 0, w, h).data);
      }
      link.sendBinary(buf); input.sent += 1;
      if (!input.firstSentAt) input.firstSentAt = RTD.nowMs();
    } catch (e) { input.inFlight = false; say(`could not send a frame: ${e.message}`); }
  }
  let timer = null;
  function startTimer() {
    clearInterval(timer);
    const fps = Math.min(60, Math.max(1, Number($("fps").value) || 30));
    timer = setInterval(tick, 1000 / fps);
  }
  $("fps").addEventListener("change", startTimer);
  function setCompare(on) {
    document.body.classList.toggle("compare", on); $("compare").checked = on;
    localStorage.setItem("rtd.compare", on ? "1" : "");
  }
  $("compare").addEventListener("change", (e) => setCompare(e.target.checked));

  // ---- controls -------------------------------------------------------------------------------------------
  // One request in flight per route; a newer value replaces a pending one (sliders send their newest value).
  const posters = {}, requests = {};  // requests: calls per route (the browser test reads it)
  function post(route, body, method = "POST", onOk = null) {
    lastLocalEdit = performance.now();
    requests[route] = (requests[route] || 0) + 1;
    const p = posters[route] || (posters[route] = { busy: false, pending: null, waiters: [] });
    p.pending = Object.assign(p.pending || {}, body);
    if (onOk) p.waiters.push(onOk);
    if (p.busy) return Promise.resolve();
    return (async () => {
      while (p.pending) {
        const b = p.pending, waiters = p.waiters; p.pending = null; p.waiters = []; p.busy = true;
        try {
          const r = await fetch(RTD.withStream(route), { method, headers: { "Content-Type": "application/json" }, body: JSON.stringify(b) });
          const j = await r.json();
          if (!r.ok) say(j.error || `${route}: HTTP ${r.status}`);
          else {
            say("");
            // a random seed chosen by the server is shown, but never over a seed the user is typing
            if (j.seed !== undefined && document.activeElement !== $("seed")) $("seed").value = j.seed;
            waiters.forEach((w) => w(j));
          }
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
  const seedValue = () => {
    const raw = $("seed").value.trim();
    return /^\d+$/.test(raw) && Number.isSafeInteger(Number(raw)) ? Number(raw) : null;
  };
  // An empty or half-typed seed field sends nothing (Number("") would be 0, a real seed).
  const sendSeed = () => {
    const seed = seedValue();
    if (seed === null) {
      if ($("seed").value.trim()) say(`seed: expected a whole number from 0 to ${Number.MAX_SAFE_INTEGER}`);
      return;
    }
    post("/api/seed", { seed });
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
  const showRange = (el) => { const out = el.parentElement.querySelector("output"); if (out) out.textContent = Number(el.value).toFixed(2); };
  for (const el of document.querySelectorAll("input[type=range]")) { el.addEventListener("input", () => showRange(el)); showRange(el); }

  // Pause and Freeze toggle the page's own state at once (a second press before the server's reply still
  // toggles back); the server's state wins again 1.5 s after the last press.
  const playback = { paused: false, frozen: false, localAt: -1e9 };
  function setPlayback(change) {
    if (playback.paused && change.paused === false) input.firstSentAt = RTD.nowMs();  // resumed: late counts from now
    Object.assign(playback, change, { localAt: performance.now() });
    showPlayback();
    post("/api/playback", change, "POST", (c) => { playback.paused = c.paused; playback.frozen = c.frozen; showPlayback(); });
  }
  function showPlayback() {
    $("pause").classList.toggle("on", playback.paused); $("freeze").classList.toggle("on", playback.frozen);
    $("pause").textContent = playback.paused ? "Resume" : "Pause";
  }
  const togglePause = () => setPlayback({ paused: !playback.paused });
  const toggleFreeze = () => setPlayback({ frozen: !playback.frozen });
  const togglePanel = () => document.body.classList.toggle("panel-hidden");
  function snapshot() {
    const a = document.createElement("a");
    a.href = RTD.withStream("/api/snapshot.png"); a.download = `rtdiffusion-${Date.now()}.png`; a.click();
  }
  $("pause").addEventListener("click", togglePause);
  $("freeze").addEventListener("click", toggleFreeze);
  $("snapshot").addEventListener("click", snapshot);
  $("full").addEventListener("click", () => RTD.fullscreen($("stage")));
  $("hide").addEventListener("click", togglePanel);

  // ---- recording (on the server, H.264 MP4): the finished file is offered as a download link ---------------
  let recording = false;
  function showRecord(r) {
    if (!r) return;
    recording = r.recording;
    $("record").classList.toggle("on", r.recording);
    $("record").textContent = r.recording ? `Stop recording (${r.frames})` : "Record";
    const link = $("recording");
    if (r.last && r.last.url) {
      link.href = r.last.url; link.download = r.last.file; link.hidden = false;
      link.textContent = `Download ${r.last.file} (${r.last.frames} frames)`;
    }
  }
  const toggleRecord = () => post("/api/record", { recording: !recording }, "POST", (r) => {
    showRecord(r);
    if (r.last && !r.recording) {
      if (r.last.url) say(`recorded ${r.last.frames} frames: use the download link`, true);
      else say(`nothing recorded: ${r.last.error}`);
    }
  });
  $("record").addEventListener("click", toggleRecord);

  // The server's view of the controls wins, except right after a local edit or while a field has focus.
  function syncControls(c, force) {
    if (!c) return;
    if (force || performance.now() - playback.localAt > 1500) {
      if (playback.paused && !c.paused) input.firstSentAt = RTD.nowMs();  // resumed: late counts from now
      playback.paused = c.paused; playback.frozen = c.frozen; showPlayback();
    }
    if (!force && performance.now() - lastLocalEdit < 1500) return;
    const set = (id, v) => { const el = $(id); if (document.activeElement === el || v === undefined) return;
      if (el.type === "checkbox") el.checked = v; else el.value = v; };
    set("promptA", c.prompt_a); set("promptB", c.prompt_b); set("blend", c.blend); set("method", c.method);
    set("negative", c.negative_prompt); set("seed", c.seed); set("strength", c.strength); set("steps", c.steps);
    set("guidance", c.guidance_scale); set("delta", c.delta); set("cfg", c.cfg);
    set("filter", c.similar_filter); set("threshold", c.similar_threshold); set("maxSkip", c.similar_max_skip);
    set("cache", c.cache_enabled); set("cacheFrames", c.cache_maxframes); set("cacheInterval", c.cache_interval);
    for (const el of document.querySelectorAll("input[type=range]")) showRange(el);
    cond.sync(c, force);
  }

  // ---- presets: every control ------------------------------------------------------------------------------
  function presetBody() {
    const b = { ...promptBody(), strength: num("strength"), steps: num("steps"), guidance_scale: num("guidance"),
                delta: num("delta"), cfg: $("cfg").value, similar_filter: $("filter").checked,
                similar_threshold: num("threshold"), similar_max_skip: num("maxSkip"), cache_enabled: $("cache").checked,
                cache_maxframes: num("cacheFrames"), cache_interval: num("cacheInterval"), ...cond.presetFields() };
    if (seedValue() !== null) b.seed = seedValue();
    return b;
  }
  function showPresets(slots) {
    slots.forEach((p, i) => {
      const b = $(`preset${i + 1}`); b.classList.toggle("stored", !!p);
      b.title = p ? `${i + 1}: ${p.prompt_a || "(no prompt)"} · click to load, Shift+click to store` : `${i + 1}: empty · Shift+click to store`;
    });
  }
  function preset(n, store) {
    if (store) {
      post(`/api/presets/${n}`, presetBody(), "PUT", () => {
        say(`stored preset ${n}`, true);
        fetch("/api/presets").then((r) => r.json()).then((j) => showPresets(j.presets)).catch(() => {});
      });
    } else {
      post(`/api/presets/${n}/apply`, {}, "POST", (c) => { syncControls(c, true); say(`preset ${n}`, true); });
    }
  }
  for (let n = 1; n <= 9; n++) {
    const b = document.createElement("button");
    b.id = `preset${n}`; b.textContent = String(n); b.dataset.midi = "";
    b.addEventListener("click", (e) => preset(n, e.shiftKey));
    $("presets").append(b);
  }
  fetch("/api/presets").then((r) => r.json()).then((j) => showPresets(j.presets)).catch(() => {});

  // ---- keys -------------------------------------------------------------------------------------------------
  document.addEventListener("keydown", (e) => {
    const t = e.target.tagName;
    if (t === "TEXTAREA" || t === "INPUT" || t === "SELECT" || e.ctrlKey || e.metaKey || e.altKey) return;
    const digit = /^Digit([1-9])$/.exec(e.code);
    if (digit) { preset(Number(digit[1]), e.shiftKey); e.preventDefault(); return; }
    switch (e.code) {
      case "Space": togglePause(); break;
      case "KeyX": toggleFreeze(); break;
      case "KeyR": post("/api/seed", { random: true }); break;
      case "KeyS": snapshot(); break;
      case "KeyV": toggleRecord(); break;
      case "KeyC": setCompare(!document.body.classList.contains("compare")); break;
      case "KeyF": RTD.fullscreen($("stage")); break;
      case "KeyH": togglePanel(); break;
      default: return;
    }
    e.preventDefault();
  });

  const midi = new RtdMidi(say);

  // ---- the badge: an honest state, never "live" while frames are late ---------------------------------------
  // live: outputs arrive at the engine's own pace · slow: late, but the engine is working on a frame (busy_ms) ·
  // stalled: late and the engine is idle (or failing) · paused · waiting for input / for the first frame ·
  // connecting / disconnected.
  function badge() {
    if (!link.open) {
      const connecting = link.ws && link.ws.readyState === WebSocket.CONNECTING;
      return connecting ? ["connecting", "connecting"] : ["stalled", "disconnected"];
    }
    if (playback.paused) return ["paused", "paused"];
    const b = status && status.build;
    if (b && !b.done) return ["building", RTD.buildText(b)];  // until the engine's first frame is out
    if (!input.sent) return ["waiting", "waiting for input"];
    const now = RTD.nowMs(), s = view.stats, last = Math.max(s.lastShownAt, input.firstSentAt);
    const pace = Math.max(2000, 3 * (s.fps > 0 ? 1000 / s.fps : 0), 2 * s.processMs + 1000);
    const age = now - last, secs = (ms) => `${(ms / 1000).toFixed(0)} s`;
    if (age < pace) return s.shown ? ["live", `live ${s.fps.toFixed(1)} fps`] : ["starting", "waiting for the first frame"];
    if (status && status.busy_ms > 0) return ["slow", `slow · engine ${secs(status.busy_ms)} on ${s.shown ? "this" : "the first"} frame`];
    if (status && status.last_error && status.errors > 0) return ["error", "stalled · engine errors"];
    return ["stalled", `stalled · no output for ${secs(age)}`];
  }

  // ---- overlay, graph, rates and start ----------------------------------------------------------------------
  const badgeLog = [];  // each change of state with its first text (the console and the browser test read it)
  setInterval(() => {
    const [cls, text] = badge();
    if (!$("conn").classList.contains(cls)) { badgeLog.push(`${cls}: ${text}`); if (badgeLog.length > 50) badgeLog.shift(); }
    $("conn").className = `badge ${cls}`; $("conn").textContent = cls === "building" ? "building" : text;
    RTD.showBuild($("build"), $("buildBar"), cls === "building" ? status.build : null, text);
    const r = rates.rates;
    if (r.in !== undefined) $("rates").textContent = `in ${r.in.toFixed(0)}/s · out ${r.out.toFixed(1)}/s · skipped ${r.skipped.toFixed(0)}/s`;
    RTD.drawGraph($("graph"), view.history);
    if (view.stats.shown) overlay.textContent = RTD.overlayText(view, status, r.skipped);
  }, 250);
  startTimer();
  setCompare(params.get("compare") === "1" || (params.get("compare") === null && !!localStorage.getItem("rtd.compare")));
  const first = params.get("source") || localStorage.getItem("rtd.source") || "camera";
  useSource(first === "file" ? "pattern" : first);  // a file needs a click to choose it
  window.rtdApp = { view, link, input, midi, cond, useSource, post, requests, badge, badgeLog, get status() { return status; } };
})();
