// rtdiffusion demo: the websocket protocol and frame display shared by the control and output pages.
// Binary frame layout (see demo/protocol.py): 32-byte little-endian header
//   0 magic "RTDF" | 4 u8 version 1 | 5 u8 format (1 RGB, 2 RGBA, 3 JPEG) | 6 u16 flags
//   8 u32 frame id | 12 f64 timestamp ms | 20 u16 width | 22 u16 height | 24 u32 process us | 28 u32 payload len
// At most one frame in flight per direction: send the next input after {"t":"ack"}; say {"t":"shown"} after
// drawing each output so the server may send the next one.
"use strict";

const RTD = (() => {
  const HEADER = 32;
  const FORMAT = { RGB: 1, RGBA: 2, JPEG: 3 };
  const MAGIC = [0x52, 0x54, 0x44, 0x46];
  const GRAPH_MS = 5000;

  function nowMs() { return performance.timeOrigin + performance.now(); }

  // The page's stream (rtdiffusion demo --streams N): ?stream=i in its own address goes on every request it makes.
  const STREAM = new URLSearchParams(location.search).get("stream");
  function withStream(url) {
    return STREAM === null ? url : `${url}${url.includes("?") ? "&" : "?"}stream=${encodeURIComponent(STREAM)}`;
  }

  function packFrame(format, id, ts, width, height, payload) {
    const buf = new ArrayBuffer(HEADER + payload.byteLength);
    const dv = new DataView(buf);
    MAGIC.forEach((b, i) => dv.setUint8(i, b));
    dv.setUint8(4, 1);
    dv.setUint8(5, format);
    dv.setUint16(6, 0, true);
    dv.setUint32(8, id >>> 0, true);
    dv.setFloat64(12, ts, true);
    dv.setUint16(20, width, true);
    dv.setUint16(22, height, true);
    dv.setUint32(24, 0, true);
    dv.setUint32(28, payload.byteLength, true);
    new Uint8Array(buf, HEADER).set(new Uint8Array(payload.buffer || payload, payload.byteOffset || 0, payload.byteLength));
    return buf;
  }

  function parseFrame(buf) {
    if (buf.byteLength < HEADER) throw new Error(`frame shorter than its ${HEADER}-byte header`);
    const dv = new DataView(buf);
    for (let i = 0; i < 4; i++) if (dv.getUint8(i) !== MAGIC[i]) throw new Error("frame magic is not RTDF");
    const len = dv.getUint32(28, true);
    return {
      format: dv.getUint8(5), id: dv.getUint32(8, true), ts: dv.getFloat64(12, true),
      width: dv.getUint16(20, true), height: dv.getUint16(22, true), processUs: dv.getUint32(24, true),
      payload: new Uint8Array(buf, HEADER, len),
    };
  }

  // Draws output frames on a canvas and keeps the numbers the overlay shows (also read by the browser test).
  class FrameView {
    constructor(canvas) {
      this.canvas = canvas;
      this.ctx = canvas.getContext("2d");
      this.stats = { shown: 0, lastId: -1, latencyMs: 0, maxLatencyMs: 0, processMs: 0, fps: 0, times: [],
                     lastShownAt: 0 };
      this.history = [];  // {t, gapMs, processMs} of each output shown in the last GRAPH_MS (the frame-time graph)
      this.onShown = null;  // called with each frame after it is drawn
    }
    async show(frame) {
      const { width, height } = frame;
      if (this.canvas.width !== width || this.canvas.height !== height) {
        this.canvas.width = width; this.canvas.height = height;
      }
      if (frame.format === FORMAT.JPEG) {
        const bitmap = await createImageBitmap(new Blob([frame.payload], { type: "image/jpeg" }));
        this.ctx.drawImage(bitmap, 0, 0);
        bitmap.close();
      } else if (frame.format === FORMAT.RGB) {
        const img = this.ctx.createImageData(width, height);
        const src = frame.payload, dst = img.data;
        for (let i = 0, j = 0; i < src.length; i += 3, j += 4) {
          dst[j] = src[i]; dst[j + 1] = src[i + 1]; dst[j + 2] = src[i + 2]; dst[j + 3] = 255;
        }
        this.ctx.putImageData(img, 0, 0);
      } else {
        throw new Error(`unknown output format ${frame.format}`);
      }
      const now = nowMs(), s = this.stats;
      s.shown += 1; s.lastId = frame.id; s.processMs = frame.processUs / 1000;
      if (frame.ts > 0) { s.latencyMs = now - frame.ts; s.maxLatencyMs = Math.max(s.maxLatencyMs, s.latencyMs); }
      const gap = s.lastShownAt ? now - s.lastShownAt : 0;
      s.lastShownAt = now;
      s.times.push(now); if (s.times.length > 30) s.times.shift();
      s.fps = s.times.length > 1 ? 1000 * (s.times.length - 1) / (s.times[s.times.length - 1] - s.times[0]) : 0;
      this.history.push({ t: now, gapMs: gap, processMs: s.processMs });
      while (this.history.length && this.history[0].t < now - GRAPH_MS) this.history.shift();
      if (this.onShown) this.onShown(frame);
    }
  }

  // One websocket with reconnect. handlers: {hello, ack, status, error, replaced, frame(parsed)}.
  class Link {
    constructor(role, handlers) {
      this.role = role; this.handlers = handlers; this.ws = null; this.retired = false;
      this.connect();
    }
    get open() { return this.ws && this.ws.readyState === WebSocket.OPEN; }
    connect() {
      const proto = location.protocol === "https:" ? "wss" : "ws";
      const ws = new WebSocket(withStream(`${proto}://${location.host}/ws?role=${this.role}`));
      ws.binaryType = "arraybuffer";
      ws.onmessage = (ev) => this.receive(ev.data);
      ws.onclose = () => {
        (this.handlers.closed || (() => {}))();
        if (!this.retired) setTimeout(() => this.connect(), 1000);
      };
      this.ws = ws;
    }
    async receive(data) {
      if (typeof data === "string") {
        const msg = JSON.parse(data);
        if (msg.t === "replaced") this.retired = true;
        const h = this.handlers[msg.t];
        if (h) h(msg);
        return;
      }
      let frame;
      try { frame = parseFrame(data); } catch (e) { console.error(e); return; }
      try {
        await this.handlers.frame(frame);
      } finally {
        this.sendJson({ t: "shown", id: frame.id });  // the server may now send the next output
      }
    }
    sendJson(obj) { if (this.open) this.ws.send(JSON.stringify(obj)); }
    sendBinary(buf) { if (this.open) this.ws.send(buf); }
  }

  function fullscreen(el) {
    if (document.fullscreenElement) document.exitFullscreen();
    else if (el.requestFullscreen) el.requestFullscreen().catch((e) => console.warn("fullscreen refused:", e));
  }

  // Per-second rates from two samples of growing counters: {name: per second}.
  class Rates {
    constructor() { this.prev = null; this.rates = {}; }
    sample(counters) {
      const now = nowMs();
      if (this.prev && now - this.prev.t >= 900) {
        const dt = (now - this.prev.t) / 1000;
        for (const k of Object.keys(counters)) this.rates[k] = Math.max(0, (counters[k] - (this.prev.c[k] || 0)) / dt);
        this.prev = { t: now, c: { ...counters } };
      } else if (!this.prev) this.prev = { t: now, c: { ...counters } };
      return this.rates;
    }
  }

  // "skipped" = frames replaced before the engine (or this page) got to them: the newest frame always wins, so a
  // camera faster than the engine skips frames by design. Shown per second, not as an ever-growing count.
  function overlayText(view, status, skippedPerS) {
    const s = view.stats;
    const lat = s.latencyMs ? `${s.latencyMs.toFixed(0)} ms` : "-";
    const skipped = skippedPerS === undefined ? "" : ` · skipped ${skippedPerS.toFixed(0)}/s (newest frame wins)`;
    return `${s.fps.toFixed(1)} fps · latency ${lat} · engine ${s.processMs.toFixed(0)} ms${skipped} · ` +
      `${status ? status.backend : "?"}`;
  }

  // The frame-time graph: one bar per output shown in the last 5 s (height = time since the previous one), the
  // engine's time per frame as a line; the scale (top of the canvas) is written in the corner.
  function drawGraph(canvas, history) {
    const ctx = canvas.getContext("2d"), w = canvas.width, h = canvas.height, now = nowMs();
    ctx.fillStyle = "#0b0b0b"; ctx.fillRect(0, 0, w, h);
    const top = Math.max(100, ...history.map((p) => Math.max(p.gapMs, p.processMs)));
    const x = (t) => ((t - (now - GRAPH_MS)) / GRAPH_MS) * w, y = (ms) => h - (ms / top) * (h - 2);
    ctx.fillStyle = "#4a8";
    for (const p of history) if (p.gapMs) ctx.fillRect(x(p.t) - 1, y(p.gapMs), 2, h - y(p.gapMs));
    ctx.strokeStyle = "#fc6"; ctx.beginPath();
    history.forEach((p, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, x(p.t), y(p.processMs)));
    ctx.stroke();
    ctx.fillStyle = "#999"; ctx.font = "9px monospace"; ctx.fillText(`${top.toFixed(0)} ms`, 2, 9);
  }

  // ---- the engine's build (rtdiffusion/progress.py StageEvent, + done): a stage line and a progress bar ----
  function buildText(b) {
    const left = b.estimate_s >= 120 ? `${(b.estimate_s / 60).toFixed(1)} min` : `${b.estimate_s.toFixed(0)} s`;
    const what = b.state === "start" ? b.stage : `${b.stage} done`;
    return `building · ${what} (${b.index}/${b.count}) · ${Math.round(b.fraction * 100)}% · ` +
      `${b.elapsed_s.toFixed(0)} s so far, about ${left} left (${b.source} estimate)`;
  }
  function showBuild(line, bar, b, text) {  // b: null once the build is over (both hidden)
    line.hidden = bar.hidden = !b;
    if (!b) return;
    line.textContent = text.replace(/^building · /, "");
    bar.value = b.fraction;
  }

  return { FORMAT, HEADER, nowMs, withStream, packFrame, parseFrame, FrameView, Link, Rates, fullscreen, overlayText, drawGraph,
           buildText, showBuild };
})();
