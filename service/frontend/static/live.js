// patchlife page, live strip: polls GET /metrics every 3 s and shows inference requests/s, the mean
// phase-B batch size and the queued images. Independent of app.js; hidden until /metrics answers.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const live = { last: null };

  function parseMetrics(text) {
    const out = [];
    for (const line of text.split("\n")) {
      const m = /^([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s+(\S+)/.exec(line);
      if (!m) continue;
      const labels = {};
      for (const l of (m[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
      out.push({ name: m[1], labels, value: Number(m[4]) });
    }
    return out;
  }

  function sum(samples, name, test) {
    return samples.filter((s) => s.name === name && (!test || test(s.labels))).reduce((a, s) => a + s.value, 0);
  }

  async function pollMetrics() {
    if (document.hidden) return;
    let text;
    try {
      let key = "";  // the API key the page keeps (app.js), for a server with PATCHLIFE_API_KEY_METRICS
      try { key = localStorage.getItem("patchlife.apiKey") || ""; } catch (_) { /* no storage */ }
      const response = await fetch("/metrics", key ? { headers: { Authorization: `Bearer ${key}` } } : undefined);
      if (!response.ok) return;
      text = await response.text();
    } catch (_) { return; }
    const s = parseMetrics(text), now = performance.now();
    const inference = (l) => l.route === "/classify" || l.route === "/explain";
    const snap = {
      t: now,
      requests: sum(s, "patchlife_http_request_duration_seconds_count", inference),
      batchSum: sum(s, "patchlife_batch_size_sum", (l) => l.phase === "tail"),
      batchCount: sum(s, "patchlife_batch_size_count", (l) => l.phase === "tail"),
    };
    const queue = sum(s, "patchlife_queue_depth", (l) => l.unit === "images");
    if (live.last) {
      const dt = (now - live.last.t) / 1000, dn = snap.batchCount - live.last.batchCount;
      $("live-rps").textContent = Math.max(0, (snap.requests - live.last.requests) / dt).toFixed(1);
      $("live-batch").textContent = dn > 0 ? ((snap.batchSum - live.last.batchSum) / dn).toFixed(1) : "-";
    }
    $("live-queue").textContent = String(queue);
    live.last = snap;
    $("live").hidden = false;
  }

  pollMetrics();
  setInterval(pollMetrics, 3000);
})();
