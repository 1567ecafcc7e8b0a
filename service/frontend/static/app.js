// patchlife page: talks only to the public API (GET /v1/models, GET /v1/examples, POST /classify);
// heatmap.js draws the lifespan heatmap from the per-patch lives /classify returns.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  model: null,     // GET /v1/models
  result: null,    // results[0] of the last /classify answer
  rank: [],        // each patch's rank by life in that answer (0: the longest)
  sent: null,      // what that request sent: {name, keepRate} (for the curl line)
  photo: null,     // ImageBitmap of the last image (null when the browser cannot decode it)
  blob: null, name: "", exampleUrl: null,
  seq: 0,          // the newest request; older answers are dropped
  playTimer: null,
};

class ApiError extends Error {
  constructor(message, code, status, retryAfter) {
    super(message);
    this.code = code; this.status = status; this.retryAfter = retryAfter;
  }
}

// -- the API key: a server with PATCHLIFE_API_KEY_* set answers 401 without it ------------------------
// Kept in this browser only (localStorage), sent as "Authorization: Bearer <key>" to this server.
const KEY_STORE = "patchlife.apiKey";

function storedKey() {
  try { return localStorage.getItem(KEY_STORE) || ""; } catch (_) { return ""; }
}

function withKey(options) {
  const key = storedKey();
  if (!key) return options;
  const o = { ...(options || {}) };
  o.headers = { ...(o.headers || {}), Authorization: `Bearer ${key}` };
  return o;
}

function showKeyBox(open) {
  $("key-box").open = open;
  $("key-state").textContent = storedKey() ? "a key is saved in this browser" : "no key saved";
}

function saveKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  try {
    if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
  } catch (_) { /* storage refused (private mode): nothing is kept */ }
  $("api-key").value = "";
  showKeyBox(false);
  showError(null);
  if (!state.model) start();  // the model's description needed the key
  else if (state.blob) classify(state.blob, state.name, state.exampleUrl);
}

function forgetKey() {
  try { localStorage.removeItem(KEY_STORE); } catch (_) { /* nothing was kept */ }
  $("api-key").value = "";
  showKeyBox(true);
}

/** fetch + JSON; an error answer becomes an ApiError carrying the API's own message and code. */
async function api(path, options) {
  let response;
  try {
    response = await fetch(path, withKey(options));
  } catch (err) {
    throw new ApiError(`Could not reach the server (${err.message}). If the file is very large, ` +
      "the server may have refused it before reading it.", "network_error", 0);
  }
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    if (response.status === 401) showKeyBox(true);
    const e = body && body.error;
    throw new ApiError(e && e.message ? e.message : `${response.status} ${response.statusText}`,
      e && e.code ? e.code : "http_error", response.status, response.headers.get("Retry-After"));
  }
  return body;
}

// -- model and examples ---------------------------------------------------------------------------
const model = {
  get K() { return state.model.schedule.stage_starts[0]; },
  get L() { return state.model.schedule.depth; },
};

async function loadModel() {
  for (;;) {
    try {
      state.model = await api("/v1/models");
      break;
    } catch (err) {
      if (err.status !== 503) { showError(err); return; }
      setStatus("The model is loading…");
      await new Promise((r) => setTimeout(r, 1000));
    }
  }
  const m = state.model, s = m.schedule;
  showAbout(m);
  const rate = s.keep_rate;
  $("default-rate-value").textContent = rate ? `(${rate.toFixed(2)})` : `(${s.patch_counts.join("/")} patches)`;
  showDefaultRate();
  $("block").max = String(s.depth - 1);
  setStatus("");
}

/** What the model recognises (its own description and classes) and what it is, under the title. */
function showAbout(m) {
  const s = m.schedule;
  const show = (id, text) => { $(id).textContent = text; $(id).hidden = !text; };
  show("model-description", m.description ? `What it recognises: ${m.description}` : "");
  const classes = m.classes || [];
  show("model-classes", classes.length ? `Its ${classes.length} classes: ` +
    (classes.length > 12 ? `${classes.slice(0, 12).join(", ")}, … (${classes.length - 12} more)` : classes.join(", ")) : "");
  $("model-facts").textContent = `Model ${m.name} · ${m.backbone} · ${m.grid[0]}×${m.grid[1]} patches · ` +
    `${s.depth} blocks, pruning from block ${s.stage_starts[0]} · ${m.device}`;
}

/** The disabled slider shows the model's own keep rate (when it has one). */
function showDefaultRate() {
  const rate = state.model && state.model.schedule.keep_rate;
  if (rate && $("default-rate").checked) $("rate").value = String(rate);
  $("rate-out").textContent = Number($("rate").value).toFixed(2);
}

async function loadExamples() {
  let list;
  try { list = (await api("/v1/examples")).examples; } catch (_) { return; }
  const ul = $("examples");
  ul.replaceChildren();
  for (const ex of list) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.file = ex.file;
    button.title = ex.note;
    const img = document.createElement("img");
    img.src = ex.url; img.alt = ""; img.width = 64; img.height = 64;
    const name = document.createElement("span"); name.textContent = ex.label || ex.file;
    const note = document.createElement("small"); note.textContent = ex.note;
    button.append(img, name, note);
    button.setAttribute("aria-label", `Example: ${ex.label || ex.file}${ex.note ? ", " + ex.note : ""}`);
    button.addEventListener("click", () => classifyExample(ex));
    const li = document.createElement("li"); li.append(button); ul.append(li);
  }
  $("examples-box").hidden = list.length === 0;
}

async function classifyExample(ex) {
  try {
    const response = await fetch(ex.url);
    if (!response.ok) throw new ApiError(`could not load the example ${ex.file} (${response.status})`, "example", response.status);
    classify(await response.blob(), ex.file, ex.url);
  } catch (err) { showError(err); }
}

// -- classify -------------------------------------------------------------------------------------
async function classify(blob, name, exampleUrl) {
  if (!state.model) return;
  const seq = ++state.seq;
  state.blob = blob; state.name = name; state.exampleUrl = exampleUrl || null;
  setStatus(`Classifying ${name}…`);
  showError(null);
  const form = new FormData();
  form.append("file", blob, name);
  const keepRate = $("default-rate").checked ? null : $("rate").value;
  if (keepRate !== null) form.append("keep_rate", keepRate);
  const photo = createImageBitmap(blob, { imageOrientation: "from-image" }).catch(() => null);
  const t0 = performance.now();
  let body;
  try {
    body = await api("/classify", { method: "POST", body: form });
  } catch (err) {
    if (seq !== state.seq) return;
    state.result = null;
    resetView();
    setStatus("");
    showError(err);
    showResult(false);
    return;
  }
  const roundTrip = performance.now() - t0;
  const bitmap = await photo;
  if (seq !== state.seq) return;
  state.result = body.results[0];
  state.rank = lifeRanks(state.result.lifespans.values);
  state.sent = { name, keepRate, example: state.exampleUrl };
  state.photo = bitmap;
  const top = state.result.labels[0];
  setStatus(`${name}: ${top ? `${top.label} (${(100 * top.probability).toFixed(1)}%), ` : ""}` +
    `answered in ${roundTrip.toFixed(0)} ms` +
    (bitmap ? "" : " (this browser cannot display the image itself; the heatmap is drawn without it)"));
  renderAnswer(state.result, roundTrip);
  showCurl();
  resetView();
  showResult(true);
  setupCanvas();
  drawHeatmap();
  scrollToResult();
}

/** On a one-column (narrow) layout the result is far below the input: bring it into view. */
function scrollToResult() {
  if (!window.matchMedia("(max-width: 859px)").matches) return;
  const still = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
  $("life").scrollIntoView({ behavior: still ? "auto" : "smooth", block: "start" });
}

function shellQuote(text) { return `'${String(text).replace(/'/g, "'\\''")}'`; }

/** The curl command that sends what the page just sent (for an example, fetching it first). */
function showCurl() {
  const { name, keepRate, example } = state.sent, origin = window.location.origin, lines = [];
  if (example) lines.push(`curl -s -o ${shellQuote(name)} ${shellQuote(origin + example)}`);
  const rate = keepRate === null ? "" : ` -F keep_rate=${keepRate}`;
  const key = storedKey() ? ' -H "Authorization: Bearer $PATCHLIFE_API_KEY_INFERENCE"' : "";
  lines.push(`curl -s${key} -F file=@${shellQuote(name)}${rate} ${shellQuote(origin + "/classify")} | python3 -m json.tool`);
  $("curl").textContent = lines.join("\n");
  $("copied").textContent = "";
}

async function copyCurl() {
  const text = $("curl").textContent;
  try {
    await navigator.clipboard.writeText(text);
    $("copied").textContent = "copied";
  } catch (_) {  // no clipboard access (plain http from another host): select it for Ctrl+C
    const range = document.createRange();
    range.selectNodeContents($("curl"));
    const sel = window.getSelection(); sel.removeAllRanges(); sel.addRange(range);
    $("copied").textContent = "selected: press Ctrl+C to copy";
  }
}

function showResult(shown) {
  $("answer").hidden = $("life-body").hidden = !shown;
  $("life-empty").hidden = shown;
}

function setStatus(text) { $("status").textContent = text; }

function showError(err) {
  const box = $("error");
  if (!err) { box.hidden = true; box.replaceChildren(); return; }
  const msg = document.createElement("span");
  msg.className = "message";
  msg.textContent = err.message;
  const code = document.createElement("span");
  code.className = "code";
  code.textContent = err.status ? `HTTP ${err.status} · ${err.code}` +
    (err.retryAfter ? ` · retry after ${err.retryAfter} s` : "") : err.code || "";
  box.replaceChildren(msg, code);
  box.hidden = false;
}

// -- the answer: labels, budget, timings -----------------------------------------------------------
function bar(fraction, cls, extra) {
  const track = document.createElement("span");
  track.className = "track";
  if (extra !== undefined) {
    const run = document.createElement("span");
    run.className = "fill run"; run.style.width = `${Math.min(100, extra * 100)}%`;
    track.append(run);
  }
  const fill = document.createElement("span");
  fill.className = `fill ${cls || ""}`; fill.style.width = `${Math.min(100, Math.max(0, fraction * 100))}%`;
  track.append(fill);
  return track;
}

function cell(tag, cls, text) {
  const el = document.createElement(tag);
  if (cls) el.className = cls;
  el.textContent = text;
  return el;
}

function renderAnswer(r, roundTrip) {
  const labels = $("labels");
  labels.replaceChildren(...r.labels.map((l) => {
    const li = document.createElement("li");
    const pct = (100 * l.probability).toFixed(1) + "%";
    li.append(cell("span", "name", l.label), bar(l.probability), cell("span", "pct", pct));
    li.setAttribute("aria-label", `${l.label}: ${pct}`);
    return li;
  }));

  const b = r.budget, n = r.lifespans.rows * r.lifespans.cols, starts = state.model.schedule.stage_starts;
  const dense = model.K > 1 ? `blocks 0–${model.K - 1}` : "block 0";
  const rows = [[dense, n, n, "all patches, before the life module"]];
  b.patch_counts.forEach((count, s) => {
    const first = starts.length === b.patch_counts.length ? starts[s] : null;
    const last = first === null ? null : (s + 1 < starts.length ? starts[s + 1] - 1 : model.L - 1);
    const what = first === null ? `stage ${s + 1}` : (first === last ? `block ${first}` : `blocks ${first}–${last}`);
    rows.push([what, count, b.counts_run[s], `${count} of ${n} patches kept, batch ran ${b.counts_run[s]}`]);
  });
  const budget = $("budget");
  budget.replaceChildren(...rows.map(([what, own, run, text]) => {
    const row = document.createElement("div"); row.className = "row";
    row.append(cell("span", "what", what), bar(own / n, "", run / n), cell("span", "val", text));
    return row;
  }));
  const g = document.createElement("div"); g.className = "row";
  g.append(cell("span", "what", "GFLOPs"), bar(b.fraction_of_dense, "gflops"),
    cell("span", "val", `${fmt(b.gflops)} of ${fmt(b.dense_gflops)} dense = ${(100 * b.fraction_of_dense).toFixed(1)}%` +
      ` (keep rate ${b.keep_rate.toFixed(2)})`));
  budget.append(g);
  if (b.scaled) {  // accuracy scaling ran it below the rate asked for: say so, plainly
    const note = cell("p", "scaled",
      `Scaled under load: run at keep rate ${b.keep_rate.toFixed(2)} instead of ${b.requested_keep_rate.toFixed(2)} ` +
      "to answer within the server's latency objective.");
    note.setAttribute("role", "note");
    budget.append(note);
  }

  const t = r.timings_ms;
  $("timings").replaceChildren(...[["decode", t.decode], ["queue", t.queue], ["compute", t.compute],
    ["round trip (browser)", roundTrip]].flatMap(([k, v]) => [cell("dt", "", k), cell("dd", "", `${v.toFixed(1)} ms`)]));
}

function fmt(x) { return x >= 0.1 ? x.toFixed(2) : x.toPrecision(2); }

// -- wiring ---------------------------------------------------------------------------------------
function wire() {
  $("file").addEventListener("change", (e) => {
    const f = e.target.files[0];
    if (f) classify(f, f.name);
  });
  const drop = $("drop");
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const f = e.dataTransfer && e.dataTransfer.files[0];
    if (f) classify(f, f.name);
  });
  // A file dropped next to the drop zone must not make the browser navigate away from the page.
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (e) => e.preventDefault());

  const rate = $("rate"), useDefault = $("default-rate");
  const rerun = () => { if (state.blob) classify(state.blob, state.name, state.exampleUrl); };
  rate.addEventListener("input", () => { $("rate-out").textContent = Number(rate.value).toFixed(2); });
  rate.addEventListener("change", rerun);
  useDefault.addEventListener("change", () => { rate.disabled = useDefault.checked; showDefaultRate(); rerun(); });
  $("block").addEventListener("input", drawHeatmap);
  $("play").addEventListener("click", togglePlay);
  $("heatmap").addEventListener("pointermove", showPatch);
  $("heatmap").addEventListener("pointerdown", showPatch);
  $("download").addEventListener("click", downloadHeatmap);
  $("copy-curl").addEventListener("click", copyCurl);
  $("key-form").addEventListener("submit", saveKey);
  $("forget-key").addEventListener("click", forgetKey);
  $("patch-info").textContent = PATCH_HINT;
}

async function start() {
  await loadModel();
  if (state.model) await loadExamples();
  document.body.dataset.ready = "true";
}

async function main() {
  wire();
  showKeyBox(false);
  $("rate").disabled = $("default-rate").checked;
  await start();
}

main();
