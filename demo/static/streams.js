// Several streams from one engine (rtdiffusion demo --streams N): the stream picker in the control page's bar,
// the projector link of this page's stream, and the stream in the window title. Does nothing on a one-stream server
// (no /api/streams there). The stream of a page is ?stream=i in its address (common.js puts it on every request).
"use strict";
(() => {
  const params = new URLSearchParams(location.search);
  const mine = Number(params.get("stream") || 0);
  const state = window.rtdStreams = { streams: null, stream: mine };
  let pick = null;

  function label(s) {
    const who = s.controller ? "performer connected" : "free";
    return `stream ${s.index} · ${who}${s.fps ? ` · ${s.fps.toFixed(1)} fps` : ""}`;
  }
  function build(streams) {
    document.title = `${document.title} · stream ${mine}`;
    const link = document.getElementById("outputLink");
    if (link) link.href = `/output?stream=${mine}`;
    const bar = document.getElementById("bar");
    if (!bar) return;
    pick = document.createElement("select");
    pick.id = "streamPick";
    pick.title = "the stream this page drives: its frames, settings and presets go to this stream only";
    streams.forEach((s) => pick.add(new Option(label(s), String(s.index))));
    pick.value = String(mine);
    pick.addEventListener("change", () => {
      params.set("stream", pick.value);
      location.search = params.toString();  // a new page for that stream
    });
    bar.querySelector(".brand").after(pick);
  }
  async function poll() {
    try {
      const r = await fetch("/api/streams", { cache: "no-store" });
      if (!r.ok) return;  // a one-stream server
      const j = await r.json();
      if (!state.streams) build(j.streams);
      state.streams = j.streams;
      if (pick) j.streams.forEach((s, i) => { pick.options[i].text = label(s); });
    } catch (e) { /* the server restarts: try again */ }
    setTimeout(poll, 2000);
  }
  poll();
})();
