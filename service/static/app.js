// patchlife page: talks only to the public API (GET /v1/models, GET /v1/examples, POST /classify)
// and draws the lifespan heatmap itself from the per-patch lives /classify returns.
"use strict";

const $ = (id) => document.getElementById(id);
// Anchor colours of the viridis ramp, as in service/explain.py (and --viridis in style.css).
const ANCHORS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
const OVERLAY_ALPHA = 0.55;  // colour over photo, as the server's /explain PNG

const state = {
  model: null,     // GET /v1/models
  result: null,    // results[0] of the last /classify answer
  photo: null,     // ImageBitmap of the last image (null when the browser cannot decode it)
  blob: null, name: "",
  seq: 0,          // the newest request; older answers are dropped
  playTimer: null,
};

class ApiError extends Error {
  constructor(message, code, status, retryAfter) {
    super(message);
    this.code = code; this.status = status; this.retryAfter = retryAfter;
  }
}

/** fetch + JSON; an error answer becomes an ApiError carrying the API's own message and code. */
async function api(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new ApiError(`Could not reach the server (${err.message}). If the file is very large, ` +
      "the server may have refused it before reading it.", "network_error", 0);
  }
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
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
  $("model-line").textContent = `Model ${m.name} · ${m.backbone} · ${m.grid[0]}×${m.grid[1]} patches · ` +
    `${s.depth} blocks, pruning from block ${s.stage_starts[0]} · ${m.device}`;
  const rate = s.keep_rate;
  $("default-rate-value").textContent = rate ? `(${rate.toFixed(2)})` : `(${s.patch_counts.join("/")} patches)`;
  if (rate) { $("rate").value = rate; $("rate-out").textContent = Number($("rate").value).toFixed(2); }
  $("block").max = String(s.depth - 1);
  setStatus("");
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
    classify(await response.blob(), ex.file);
  } catch (err) { showError(err); }
}

// -- classify -------------------------------------------------------------------------------------
async function classify(blob, name) {
  if (!state.model) return;
  const seq = ++state.seq;
  state.blob = blob; state.name = name;
  setStatus(`Classifying ${name}…`);
  showError(null);
  const form = new FormData();
  form.append("file", blob, name);
  if (!$("default-rate").checked) form.append("keep_rate", $("rate").value);
  const photo = createImageBitmap(blob, { imageOrientation: "from-image" }).catch(() => null);
  const t0 = performance.now();
  let body;
  try {
    body = await api("/classify", { method: "POST", body: form });
  } catch (err) {
    if (seq !== state.seq) return;
    state.result = null;
    setStatus("");
    showError(err);
    showResult(false);
    return;
  }
  const roundTrip = performance.now() - t0;
  const bitmap = await photo;
  if (seq !== state.seq) return;
  state.result = body.results[0];
  state.photo = bitmap;
  const top = state.result.labels[0];
  setStatus(`${name}: ${top ? `${top.label} (${(100 * top.probability).toFixed(1)}%), ` : ""}` +
    `answered in ${roundTrip.toFixed(0)} ms` +
    (bitmap ? "" : " (this browser cannot display the image itself; the heatmap is drawn without it)"));
  renderAnswer(state.result, roundTrip);
  showResult(true);
  setupCanvas();
  drawHeatmap();
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
  const rows = [[`blocks 0–${model.K - 1}`, n, n, "all patches, before the life module"]];
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

  const t = r.timings_ms;
  $("timings").replaceChildren(...[["decode", t.decode], ["queue", t.queue], ["compute", t.compute],
    ["round trip (browser)", roundTrip]].flatMap(([k, v]) => [cell("dt", "", k), cell("dd", "", `${v.toFixed(1)} ms`)]));
}

function fmt(x) { return x >= 0.1 ? x.toFixed(2) : x.toPrecision(2); }

// -- the heatmap ----------------------------------------------------------------------------------
function colour(t) {
  t = Math.min(1, Math.max(0, Number.isFinite(t) ? t : 0)) * (ANCHORS.length - 1);
  const lo = Math.min(Math.floor(t), ANCHORS.length - 2), f = t - lo;
  return ANCHORS[lo].map((a, i) => Math.round(a * (1 - f) + ANCHORS[lo + 1][i] * f));
}

/** The part of a w x h photo the preprocessing keeps (timm's centre crop), as service/explain.py. */
function modelView(w, h) {
  const size = state.model.input_size.slice(-2), hIn = size[0], wIn = size[1];
  const pct = state.model.crop_pct || 0.875;
  const sh = Math.floor(hIn / pct), sw = Math.floor(wIn / pct);
  let cw, ch;
  if (sh === sw) {
    const f = sh / Math.min(w, h);
    cw = Math.min(w, wIn / f); ch = Math.min(h, hIn / f);
  } else {
    cw = w * wIn / sw; ch = h * hIn / sh;
  }
  return { x: (w - cw) / 2, y: (h - ch) / 2, w: cw, h: ch };
}

function setupCanvas() {
  const canvas = $("heatmap"), { rows, cols } = state.result.lifespans;
  const side = Math.round(448 * Math.min(2, window.devicePixelRatio || 1));
  const px = Math.max(1, Math.round(side / Math.max(rows, cols)));  // canvas pixels per patch
  if (canvas.width !== cols * px || canvas.height !== rows * px) {
    canvas.width = cols * px; canvas.height = rows * px;
  }
  const ticks = $("ticks"), K = model.K, L = model.L, step = Math.max(1, Math.ceil((L - K) / 6));
  const layers = [];
  for (let l = K; l < L; l += step) layers.push(l);
  layers.push(L);
  ticks.replaceChildren(...layers.map((l) => {
    const s = cell("span", "", String(l)); s.style.left = `${100 * (l - K) / (L - K)}%`; return s;
  }));
}

/** Start of the stage block ``l`` belongs to (0 before the life module). The model decides which
 * patches a stage runs at its first block: block l runs the patches with life > stageStart(l), so
 * the count shown is the budget's patch count for that stage. */
function stageStart(block) {
  let start = 0;
  for (const s of state.model.schedule.stage_starts) if (s <= block) start = s;
  return start;
}

/** The last block a patch of this life takes part in. */
function lastBlock(life) {
  const starts = state.model.schedule.stage_starts;
  let last = model.K - 1;
  starts.forEach((s, i) => { if (life > s) last = i + 1 < starts.length ? starts[i + 1] - 1 : model.L - 1; });
  return last;
}

function aliveCount(block) {
  const start = stageStart(block);
  return state.result.lifespans.values.flat().filter((life) => block < model.K || life > start).length;
}

function drawHeatmap() {
  if (!state.result) return;
  const canvas = $("heatmap"), ctx = canvas.getContext("2d");
  const { rows, cols, values } = state.result.lifespans;
  const block = Number($("block").value), K = model.K, L = model.L, start = stageStart(block);
  const cw = canvas.width / cols, ch = canvas.height / rows;
  ctx.fillStyle = "#808080";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (state.photo) {
    const v = modelView(state.photo.width, state.photo.height);
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(state.photo, v.x, v.y, v.w, v.h, 0, 0, canvas.width, canvas.height);
  }
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const life = values[r][c];
      if (block < K || life > start) {
        const [red, green, blue] = colour((life - K) / (L - K));
        ctx.fillStyle = `rgba(${red},${green},${blue},${OVERLAY_ALPHA})`;
      } else {
        ctx.fillStyle = "rgba(16,16,24,0.72)";
      }
      ctx.fillRect(Math.round(c * cw), Math.round(r * ch), Math.round((c + 1) * cw) - Math.round(c * cw),
        Math.round((r + 1) * ch) - Math.round(r * ch));
    }
  }
  if (cw >= 6) {  // patch borders
    ctx.strokeStyle = "rgba(255,255,255,0.25)"; ctx.lineWidth = 1;
    ctx.beginPath();
    for (let c = 1; c < cols; c++) { const x = Math.round(c * cw) + 0.5; ctx.moveTo(x, 0); ctx.lineTo(x, canvas.height); }
    for (let r = 1; r < rows; r++) { const y = Math.round(r * ch) + 0.5; ctx.moveTo(0, y); ctx.lineTo(canvas.width, y); }
    ctx.stroke();
  }
  const alive = aliveCount(block), n = rows * cols;
  const where = block < K ? "before the life module, every patch takes part" :
    `life > ${start}; ${n - alive} pruned so far`;
  const text = `Block ${block}: ${alive} of ${n} patches alive (${where})`;
  $("block-out").textContent = String(block);
  $("alive").textContent = text;
  $("alive").dataset.alive = String(alive);
  canvas.setAttribute("aria-label", `Lifespan heatmap of ${state.name}. ${text}.`);
}

function patchAt(event) {
  const canvas = $("heatmap"), rect = canvas.getBoundingClientRect(), { rows, cols } = state.result.lifespans;
  const c = Math.floor((event.clientX - rect.left) / rect.width * cols);
  const r = Math.floor((event.clientY - rect.top) / rect.height * rows);
  return r >= 0 && r < rows && c >= 0 && c < cols ? [r, c] : null;
}

function showPatch(event) {
  if (!state.result) return;
  const at = patchAt(event);
  if (!at) return;
  const life = state.result.lifespans.values[at[0]][at[1]];
  const last = lastBlock(life);
  const fate = last >= model.L - 1 ? "kept to the end" :
    last < model.K ? "pruned right after the life module" : `last takes part in block ${last}`;
  $("patch-info").textContent = `Patch row ${at[0] + 1}, column ${at[1] + 1}: life ${life.toFixed(2)} layers (${fate}).`;
}

function togglePlay() {
  const button = $("play"), slider = $("block");
  if (state.playTimer) {
    clearInterval(state.playTimer); state.playTimer = null;
    button.textContent = "Play"; button.setAttribute("aria-pressed", "false");
    return;
  }
  if (Number(slider.value) >= Number(slider.max)) slider.value = "0";
  button.textContent = "Pause"; button.setAttribute("aria-pressed", "true");
  drawHeatmap();
  state.playTimer = setInterval(() => {
    if (Number(slider.value) >= Number(slider.max)) { togglePlay(); return; }
    slider.value = String(Number(slider.value) + 1);
    drawHeatmap();
  }, 600);
}

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
  const rerun = () => { if (state.blob) classify(state.blob, state.name); };
  rate.addEventListener("input", () => { $("rate-out").textContent = Number(rate.value).toFixed(2); });
  rate.addEventListener("change", rerun);
  useDefault.addEventListener("change", () => { rate.disabled = useDefault.checked; rerun(); });
  $("block").addEventListener("input", drawHeatmap);
  $("play").addEventListener("click", togglePlay);
  $("heatmap").addEventListener("pointermove", showPatch);
  $("heatmap").addEventListener("pointerdown", showPatch);
}

async function main() {
  wire();
  $("rate").disabled = $("default-rate").checked;
  await loadModel();
  await loadExamples();
  document.body.dataset.ready = "true";
}

main();
