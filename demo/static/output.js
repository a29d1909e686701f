// The projector page: output only. F or double-click: full screen. I: show or hide the info line.
"use strict";
(() => {
  const canvas = document.getElementById("out");
  const overlay = document.getElementById("overlay");
  const view = new RTD.FrameView(canvas);
  let status = null;
  const rates = new RTD.Rates();
  const link = new RTD.Link("view", {
    hello: () => { overlay.textContent = "connected · waiting for the control page"; },
    status: (msg) => { status = msg; rates.sample({ skipped: msg.dropped_out || 0 }); },
    error: (msg) => console.warn("server:", msg.message),
    frame: (frame) => view.show(frame),
    closed: () => { overlay.textContent = "disconnected · retrying"; },
  });
  setInterval(() => { if (view.stats.shown) overlay.textContent = RTD.overlayText(view, status, rates.rates.skipped); }, 250);
  document.addEventListener("keydown", (e) => {
    if (e.code === "KeyF") RTD.fullscreen(document.documentElement);
    if (e.code === "KeyI") overlay.classList.toggle("hidden");
  });
  canvas.addEventListener("dblclick", () => RTD.fullscreen(document.documentElement));
  let idle;
  document.addEventListener("mousemove", () => {
    document.body.classList.remove("idle"); clearTimeout(idle);
    idle = setTimeout(() => document.body.classList.add("idle"), 2000);
  });
  window.rtdOutput = { view, link };  // for the browser test and the console
})();
