// patchlife page, the lifespan heatmap: drawn from the per-patch lives /classify returns, block by
// block. Counts come from the answer's budget (the one source of truth): a stage runs the patches
// with the longest lives, as many as the budget kept (at least one), as the model does; its batch
// may run a few more (its bucket). Uses `state`, `model` and `$` from app.js.
"use strict";

// Anchor colours of the viridis ramp, as in service/frontend/explain.py (and --viridis in style.css).
const ANCHORS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
const OVERLAY_ALPHA = 0.55;  // colour over photo, as the server's /explain PNG
const PATCH_HINT = "Colour: how many layers a patch lives. From the life module on, each stage runs " +
  "the patches with the longest lives, as many as the budget kept; patches only its batch ran are " +
  "half-dimmed, the others dimmed. " +
  "Point at a patch to read its life.";

function colour(t) {
  t = Math.min(1, Math.max(0, Number.isFinite(t) ? t : 0)) * (ANCHORS.length - 1);
  const lo = Math.min(Math.floor(t), ANCHORS.length - 2), f = t - lo;
  return ANCHORS[lo].map((a, i) => Math.round(a * (1 - f) + ANCHORS[lo + 1][i] * f));
}

/** The part of a w x h photo the preprocessing keeps (timm's centre crop), as service/frontend/explain.py. */
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

// -- counts ---------------------------------------------------------------------------------------
/** Rank of every patch (row-major index -> 0 for the longest life), as the model sorts them. */
function lifeRanks(values) {
  const flat = values.flat(), order = flat.map((_, i) => i);
  order.sort((a, b) => flat[b] - flat[a] || a - b);
  const rank = new Array(flat.length);
  order.forEach((patch, r) => { rank[patch] = r; });
  return rank;
}

/** The pruning stage block ``block`` belongs to: -1 before the life module. */
function stageOf(block) {
  const starts = state.model.schedule.stage_starts, stages = state.result.budget.patch_counts.length;
  let stage = -1;
  starts.forEach((s, i) => { if (s <= block && i < stages) stage = i; });
  return stage;
}

/** {kept, ran, n} at a block: every patch before the life module, else the budget's counts. */
function countsAt(block) {
  const { rows, cols } = state.result.lifespans, n = rows * cols, s = stageOf(block), b = state.result.budget;
  return s < 0 ? { kept: n, ran: n, n, stage: s } : { kept: b.patch_counts[s], ran: b.counts_run[s], n, stage: s };
}

/** The last block a patch (by its rank) takes part in, counting the image's own budget. */
function lastBlock(rank) {
  const starts = state.model.schedule.stage_starts, counts = state.result.budget.patch_counts;
  let last = model.K - 1;
  counts.forEach((count, s) => {
    if (rank < count) last = s + 1 < counts.length && s + 1 < starts.length ? starts[s + 1] - 1 : model.L - 1;
  });
  return last;
}

function blockText(block, c) {
  if (c.stage < 0) return `Block ${block}: all ${c.n} patches (before the life module, every patch takes part)`;
  const start = state.model.schedule.stage_starts[c.stage];
  const living = state.result.lifespans.values.flat().filter((life) => life > start).length;
  let text = `Block ${block}: ${c.kept} of ${c.n} patches kept (stage ${c.stage + 1}`;
  text += living < c.kept ? `; ${living} live past block ${start}, the rest is the minimum of one per stage)` : ")";
  if (c.ran > c.kept) text += `; its batch ran ${c.ran}`;
  return text;
}

// -- drawing --------------------------------------------------------------------------------------
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

function patchFill(life, rank, c) {
  const [red, green, blue] = colour((life - model.K) / (model.L - model.K));
  if (rank < c.kept) return `rgba(${red},${green},${blue},${OVERLAY_ALPHA})`;
  if (rank < c.ran) return `rgba(${Math.round(red / 3)},${Math.round(green / 3)},${Math.round(blue / 3)},0.62)`;
  return "rgba(16,16,24,0.72)";
}

function drawHeatmap() {
  if (!state.result) return;
  const canvas = $("heatmap"), ctx = canvas.getContext("2d");
  const { rows, cols, values } = state.result.lifespans;
  const block = Number($("block").value), c = countsAt(block);
  const cw = canvas.width / cols, ch = canvas.height / rows;
  ctx.fillStyle = "#808080";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (state.photo) {
    const v = modelView(state.photo.width, state.photo.height);
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(state.photo, v.x, v.y, v.w, v.h, 0, 0, canvas.width, canvas.height);
  }
  for (let r = 0; r < rows; r++) {
    for (let col = 0; col < cols; col++) {
      ctx.fillStyle = patchFill(values[r][col], state.rank[r * cols + col], c);
      ctx.fillRect(Math.round(col * cw), Math.round(r * ch), Math.round((col + 1) * cw) - Math.round(col * cw),
        Math.round((r + 1) * ch) - Math.round(r * ch));
    }
  }
  if (cw >= 6) {  // patch borders
    ctx.strokeStyle = "rgba(255,255,255,0.25)"; ctx.lineWidth = 1;
    ctx.beginPath();
    for (let x = 1; x < cols; x++) { const px = Math.round(x * cw) + 0.5; ctx.moveTo(px, 0); ctx.lineTo(px, canvas.height); }
    for (let y = 1; y < rows; y++) { const py = Math.round(y * ch) + 0.5; ctx.moveTo(0, py); ctx.lineTo(canvas.width, py); }
    ctx.stroke();
  }
  const text = blockText(block, c);
  $("block-out").textContent = String(block);
  $("alive").textContent = text;
  $("alive").dataset.alive = String(c.kept);
  $("alive").dataset.ran = String(c.ran);
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
  const last = lastBlock(state.rank[at[0] * state.result.lifespans.cols + at[1]]);
  const fate = last >= model.L - 1 ? "kept to the end" :
    last < model.K ? "pruned right after the life module" : `last takes part in block ${last}`;
  $("patch-info").textContent = `Patch row ${at[0] + 1}, column ${at[1] + 1}: life ${life.toFixed(2)} layers (${fate}).`;
}

/** A new image: the block slider back to block 0, Play stopped, the hover text back to the hint. */
function resetView() {
  if (state.playTimer) togglePlay();
  $("block").value = "0";
  $("patch-info").textContent = PATCH_HINT;
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

/** Save the heatmap as shown (this block) as a PNG. */
function downloadHeatmap() {
  if (!state.result) return;
  $("heatmap").toBlob((blob) => {
    if (!blob) return;
    const a = document.createElement("a"), base = state.name.replace(/\.[^.]*$/, "") || "image";
    a.href = URL.createObjectURL(blob);
    a.download = `${base}-lifespans-block${$("block").value}.png`;
    document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
  }, "image/png");
}
