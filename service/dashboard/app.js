// odeforge dashboard: a single page over the /v1 API (no framework, no CDN; charts drawn on <canvas>).
// Views by URL hash: #/ (runs), #/run/<id>, #/submit, #/compare?ids=a,b.
// The API key lives in sessionStorage only and travels as "Authorization: Bearer" (never in a URL).
"use strict";

const KEY_STORE = "odeforge.apiKey";
const COLORS = ["#2358c4", "#d9480f", "#2b8a3e", "#862e9c", "#c92a2a", "#0b7285", "#e67700", "#495057"];
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
// figures beyond "training" each model family offers (node_engine/families: Family.plots)
const FAMILY_PLOTS = {
  cnf: ["density", "samples"], planar: ["density", "samples"],
  node: ["trajectories", "vector_field"], latent_ode: ["trajectories", "vector_field"], rnn: ["trajectories", "vector_field"],
};
// units of the families' test metrics (node_engine/families: eval_metrics); NLLs in nats per sample
const UNITS = { test_nll: "nats", test_bits_per_dim: "bits", test_accuracy: "fraction", test_interp_mse: "data units²", test_extrap_mse: "data units²" };
const PRESETS = {
  "Demo CNF on two moons (odeforge demo)": {
    name: "demo cnf", tags: ["demo"],
    model: { type: "cnf", hidden_dims: [32, 32], nonlinearity: "tanh" },
    dataset: { name: "moons", n_samples: 4000 },
    solver: { method: "dopri5", rtol: 1e-4, atol: 1e-4, adjoint: true },
    training: { iterations: 200, batch_size: 256, lr: 1e-2, eval_every: 50, checkpoint_every: 50 },
  },
  "ODE-Net on digits (Chen et al. 2018, sec. 3)": {
    name: "odenet digits", tags: ["paper"],
    model: { type: "odenet", channels: 16 },
    dataset: { name: "digits" },
    solver: { method: "dopri5", rtol: 1e-3, atol: 1e-3, adjoint: true },
    training: { iterations: 300, batch_size: 128, lr: 1e-3, eval_every: 50, checkpoint_every: 100 },
  },
  "Time series: neural ODE on Lotka-Volterra": {
    name: "lotka-volterra node", tags: ["timeseries"],
    model: { type: "node", hidden_dims: [64, 64] },
    dataset: { name: "lotka_volterra", n_samples: 200 },
    solver: { method: "dopri5", rtol: 1e-4, atol: 1e-5, adjoint: true },
    training: { iterations: 300, batch_size: 32, lr: 1e-2, eval_every: 50, checkpoint_every: 100 },
  },
};

// what a trained model of each type answers (node_engine/families: Family.serves) and the run page's query for it
const QUERIES = {
  cnf: "density", planar: "density", node: "forecast", latent_ode: "forecast", rnn: "forecast",
  odenet: "predict", rknet: "predict", resnet: "predict", mlp: "predict",
};
// built-in forecast examples: six observations of each generated system's noiseless trajectory (scipy
// DOP853, rtol 1e-10, from node_engine/datasets/timeseries.py's fields) and the span to forecast over
const SERIES_EXAMPLES = {
  lotka_volterra: { t: [0, 1, 2, 3, 4, 5], y: [[1.5, 1.0], [0.6787, 1.0416], [0.4288, 0.6448], [0.4353, 0.3605], [0.5837, 0.2182], [0.8875, 0.1651]], until: 15 },
  damped_oscillator: { t: [0, 1.333, 2.667, 4, 5.333, 6.667], y: [[1.5, 0], [0.4458, -1.2802], [-0.9606, -0.5413], [-0.7475, 0.7514], [0.4191, 0.733], [0.7499, -0.2657]], until: 20 },
  van_der_pol: { t: [0, 1, 2, 3, 4, 5], y: [[2, 0], [1.5081, -0.7802], [0.3233, -1.833], [-1.8661, -1.0211], [-1.7418, 0.6247], [-0.8371, 1.3071]], until: 15 },
  spirals: { t: [0, 0.094, 0.283, 0.566, 0.906, 1.132], y: [[8.445, 2.362], [7.802, 2.49], [7.487, 3.267], [6.746, 3.78], [5.215, 4.333], [4.366, 4.329]], until: 1.849 },
};
// scikit-learn's first 8x8 digit (a "0"; grey levels 0..16 as the digits data set stores them)
const DIGIT_ZERO = [[0, 0, 5, 13, 9, 1, 0, 0], [0, 0, 13, 15, 10, 15, 5, 0], [0, 3, 15, 2, 0, 11, 8, 0], [0, 4, 12, 0, 0, 8, 8, 0],
  [0, 5, 8, 0, 0, 9, 8, 0], [0, 4, 11, 0, 1, 12, 7, 0], [0, 2, 14, 5, 10, 12, 0, 0], [0, 0, 6, 13, 10, 0, 0, 0]];

// ---- API access --------------------------------------------------------------------------------
const apiKey = () => sessionStorage.getItem(KEY_STORE);
function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && (body.detail || body.title)) || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

async function api(path, { method = "GET", body, raw = false } = {}) {
  const init = { method, headers: authHeaders(body !== undefined ? { "Content-Type": "application/json" } : {}) };
  if (body !== undefined) init.body = typeof body === "string" ? body : JSON.stringify(body);
  const resp = await fetch(path, init);
  if (resp.status === 401) askKey("This server needs an API key.");
  if (!resp.ok) {
    let problem = null;
    try { problem = await resp.json(); } catch (_) { /* not JSON */ }
    throw new ApiError(resp.status, problem);
  }
  if (raw) return resp;
  return resp.status === 204 ? null : resp.json();
}

// Server-Sent Events over fetch(): EventSource cannot send the Authorization header.
// Parses the stream by the WHATWG rules; calls onEvent({id, event, data}); resolves when it ends.
async function streamEvents(path, onEvent, signal) {
  const resp = await fetch(path, { headers: authHeaders({ Accept: "text/event-stream" }), signal });
  if (!resp.ok) throw new ApiError(resp.status, await resp.json().catch(() => null));
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", fields = {}, data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, nl).replace(/\r$/, "");
      buffer = buffer.slice(nl + 1);
      if (line === "") {
        if (data.length) onEvent({ ...fields, data: JSON.parse(data.join("\n")) });
        fields = {}; data = [];
      } else if (!line.startsWith(":")) {
        const i = line.indexOf(":");
        const name = i < 0 ? line : line.slice(0, i);
        let val = i < 0 ? "" : line.slice(i + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (name === "data") data.push(val); else fields[name] = val;
      }
    }
  }
}

// Downloads and images need the key too: fetch them as blobs (a plain <a href> sends no header).
async function blobUrl(path) {
  const resp = await api(path, { raw: true });
  return URL.createObjectURL(await resp.blob());
}

// ---- small helpers -------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}
const fmt = (v) => v !== null && typeof v === "object" ? JSON.stringify(v) : typeof v === "number" ? (Number.isInteger(v) ? String(v) : (Math.abs(v) >= 1e4 || Math.abs(v) < 1e-3 ? v.toExponential(3) : v.toPrecision(4))) : String(v);
function toast(text) {
  const t = document.getElementById("toast");
  t.textContent = text; t.style.display = "block";
  clearTimeout(toast.timer); toast.timer = setTimeout(() => { t.style.display = "none"; }, 4000);
}
function problemBox(err) {
  const box = el("div", { class: "problems", id: "problems" }, el("strong", {}, `${err.status || ""} ${err.body.title || "Error"}: `), err.message);
  if (Array.isArray(err.body.errors) && err.body.errors.length) {
    box.append(el("ul", {}, err.body.errors.map((e) => el("li", { class: "problem" }, el("code", {}, e.field), ": ", e.reason))));
  }
  return box;
}
// the list's "latest metrics": the loss, then the test metrics (the family's names)
function latest(metrics) {
  const keys = Object.keys(metrics).filter((k) => k === "loss" || k.startsWith("test_"));
  return keys.slice(0, 3).map((k) => `${k} ${fmt(metrics[k])}`).join(", ");
}
function statusBadge(s) { return el("span", { class: `status ${s}` }, s); }
function dataName(spec) { return (spec.dataset && (spec.dataset.name || spec.dataset.id)) || "?"; }

// ---- line charts on <canvas> ---------------------------------------------------------------------
// series: [{label, color, points: [[x, y], ...]}]; axes drawn with "nice" ticks and labels.
function niceTicks(lo, hi, n = 5) {
  if (!(hi > lo)) { hi = lo + 1; lo -= 1; }
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || 10 * mag;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(+v.toPrecision(12));
  // as many decimals as the step needs (0.25 -> 2, 0.5 -> 1, 20 -> 0); exponents beyond 1e5 / below 1e-4
  const decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9) + (String(+(step / mag).toPrecision(3)).includes(".") ? 1 : 0));
  ticks.label = (t) => (Math.abs(t) >= 1e5 || (t !== 0 && Math.abs(t) < 1e-4) ? t.toExponential(1) : t.toFixed(decimals));
  return ticks;
}

function drawChart(canvas, series, { title, xlabel, ylabel }) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 480, h = canvas.clientHeight || 260;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const m = { l: 70, r: 14, t: 30, b: 42 };
  const pts = series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  g.fillStyle = "#1d2330"; g.font = "600 13px system-ui, sans-serif"; g.textAlign = "left"; g.textBaseline = "top";
  g.fillText(title, m.l, 4);
  canvas.dataset.points = String(pts.length);  // read by the browser tests: how many points are drawn
  g.font = "12px system-ui, sans-serif";
  if (!pts.length) {
    g.fillStyle = "#5b6475"; g.textAlign = "center"; g.textBaseline = "middle";
    g.fillText("no data yet", w / 2, h / 2);
    return;
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const X = (x) => m.l + (x - x0) / (x1 - x0) * (w - m.l - m.r);
  const Y = (y) => h - m.b - (y - y0) / (y1 - y0) * (h - m.t - m.b);
  // grid, ticks and tick labels
  g.strokeStyle = "#e6e8ee"; g.lineWidth = 1; g.fillStyle = "#5b6475";
  g.textAlign = "right"; g.textBaseline = "middle";
  const yt = niceTicks(y0, y1);
  for (const t of yt) {
    if (t < y0 || t > y1) continue;
    g.beginPath(); g.moveTo(m.l, Y(t)); g.lineTo(w - m.r, Y(t)); g.stroke();
    g.fillText(yt.label(t), m.l - 6, Y(t));
  }
  g.textAlign = "center"; g.textBaseline = "top";
  const xt = niceTicks(x0, x1);
  for (const t of xt) {
    if (t < x0 || t > x1) continue;
    g.beginPath(); g.moveTo(X(t), m.t); g.lineTo(X(t), h - m.b); g.stroke();
    g.fillText(xt.label(t), X(t), h - m.b + 4);
  }
  g.strokeStyle = "#5b6475"; g.beginPath(); g.moveTo(m.l, m.t); g.lineTo(m.l, h - m.b); g.lineTo(w - m.r, h - m.b); g.stroke();
  // axis labels
  g.fillStyle = "#1d2330"; g.font = "12px system-ui, sans-serif";
  g.fillText(xlabel, (m.l + w - m.r) / 2, h - 18);
  g.save(); g.translate(12, (m.t + h - m.b) / 2); g.rotate(-Math.PI / 2); g.textBaseline = "middle"; g.fillText(ylabel, 0, 0); g.restore();
  // lines (a lone point as a dot) and the legend (on the title's row, right-aligned: it never hides a line)
  let legendX = w - m.r;
  series.forEach((s, i) => {
    const color = s.color || COLORS[i % COLORS.length];
    const p = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    g.strokeStyle = color; g.fillStyle = color; g.lineWidth = 1.6;
    if (s.lines !== false) {
      g.beginPath();
      p.forEach(([x, y], j) => (j ? g.lineTo(X(x), Y(y)) : g.moveTo(X(x), Y(y))));
      g.stroke();
    }
    const r = s.radius || 2.5;
    if (p.length === 1 || s.dots || s.lines === false) p.forEach(([x, y]) => { g.beginPath(); g.arc(X(x), Y(y), r, 0, 7); g.fill(); });
    if (!s.label) return;  // unlabelled (e.g. posterior draws): no legend entry
    g.textAlign = "right"; g.textBaseline = "top";
    g.fillText(s.label, legendX, 6);
    legendX -= g.measureText(s.label).width + 10;
    g.fillRect(legendX + 2, 11, 6, 3);
    legendX -= 6;
  });
}

// ---- views ---------------------------------------------------------------------------------------
const view = () => document.getElementById("view");
let teardown = () => {};  // stops the current view's timers and streams

async function renderList() {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const status = el("select", { id: "filter-status" },
    ["", "queued", "running", "succeeded", "failed", "cancelled"].map((s) => el("option", { value: s, selected: s === (params.get("status") || "") }, s || "any")));
  const tag = el("input", { id: "filter-tag", placeholder: "exact tag", value: params.get("tag") || "" });
  const name = el("input", { id: "filter-name", placeholder: "part of the name", value: params.get("name") || "" });
  const compare = el("button", { id: "compare-selected", type: "button" }, "Compare selected");
  const body = el("tbody", { id: "runs" });
  view().replaceChildren(
    el("h1", {}, "Runs"),
    el("div", { class: "filters" },
      el("label", {}, "Status", status), el("label", {}, "Tag", tag), el("label", {}, "Name contains", name), compare),
    el("table", {}, el("thead", {}, el("tr", {}, ["", "Name", "Status", "Model", "Data set", "Tags", "Progress", "Latest metrics", "Created"].map((h) => el("th", {}, h)))), body),
    el("p", { class: "muted", id: "list-note" }));
  const selected = new Set();
  compare.addEventListener("click", () => {
    if (selected.size < 2) return toast("Select two or more runs to compare.");
    location.hash = `#/compare?ids=${[...selected].join(",")}`;
  });
  let timer = null, stopped = false;
  async function load() {
    const q = new URLSearchParams({ limit: "100" });
    if (status.value) q.set("status", status.value);
    if (tag.value.trim()) q.set("tag", tag.value.trim());
    if (name.value.trim()) q.set("name", name.value.trim());
    try {
      const page = await api(`v1/jobs?${q}`);
      if (stopped) return;
      body.replaceChildren(...page.jobs.map((j) => el("tr", { "data-job": j.id },
        el("td", {}, el("input", { type: "checkbox", class: "select", checked: selected.has(j.id),
          onchange: (e) => (e.target.checked ? selected.add(j.id) : selected.delete(j.id)) })),
        el("td", {}, el("a", { href: `#/run/${j.id}`, class: "run-link" }, j.name || j.id.slice(0, 8))),
        el("td", {}, statusBadge(j.status)),
        el("td", {}, j.spec.model.type),
        el("td", {}, dataName(j.spec)),
        el("td", {}, j.tags.map((t) => el("span", { class: "tag" }, t))),
        el("td", {}, el("progress", { value: j.progress, max: 1 }), ` ${j.step}/${j.total_steps ?? "?"}`),
        el("td", {}, latest(j.metrics)),
        el("td", {}, new Date(j.created_at).toLocaleString()))));
      document.getElementById("list-note").textContent = page.jobs.length ? `${page.jobs.length} run(s); refreshed every 3 s` : "No runs match.";
    } catch (err) {
      if (!stopped) document.getElementById("list-note").replaceChildren(problemBox(err));
    }
    if (!stopped) timer = setTimeout(load, 3000);
  }
  const reload = () => { clearTimeout(timer); load(); };
  status.addEventListener("change", reload);
  tag.addEventListener("input", reload);
  name.addEventListener("input", reload);
  load();
  teardown = () => { stopped = true; clearTimeout(timer); };
}

function chartBox(id, title, xlabel, ylabel) {
  const canvas = el("canvas", { id });
  const box = el("div", { class: "chart" }, canvas);
  return { box, canvas, title, xlabel, ylabel, draw(series) { drawChart(canvas, series, { title, xlabel, ylabel }); } };
}

async function renderRun(id) {
  const controller = new AbortController();
  let stopped = false;
  teardown = () => { stopped = true; controller.abort(); if (observer) observer.disconnect(); };
  let job, observer = null;
  try { job = await api(`v1/jobs/${id}`); } catch (err) { view().replaceChildren(problemBox(err)); return; }
  const metricRows = [], evalRows = [];
  const charts = {
    loss: chartBox("chart-loss", "Training loss", "iteration (step)", "loss (training objective)"),
    test: chartBox("chart-test", "Test metrics (held-out split)", "iteration (step)", "value (unit in the legend)"),
    nfe: chartBox("chart-nfe", "Function evaluations per step", "iteration (step)", "NFE (dynamics calls)"),
    step: chartBox("chart-step", "Solver step size", "iteration (step)", "mean accepted step size (t units)"),
  };
  const head = el("div");
  const info = el("dl", { class: "meta" });
  const checkpoints = el("ul", { id: "checkpoints" });
  const figures = el("div", { class: "figures", id: "figures" }, el("span", { class: "muted" }, "drawn when the run has ended"));
  const actions = el("div", {},
    el("button", { id: "cancel", type: "button", onclick: async () => {
      try { await api(`v1/jobs/${id}/cancel`, { method: "POST" }); toast("Cancel requested."); } catch (err) { toast(err.message); }
    } }, "Cancel"), " ",
    el("button", { id: "delete", class: "danger", type: "button", onclick: async () => {
      if (!confirm("Delete this run, its metrics and its checkpoints?")) return;
      try { await api(`v1/jobs/${id}`, { method: "DELETE" }); location.hash = "#/"; } catch (err) { toast(err.message); }
    } }, "Delete"));
  view().replaceChildren(head, actions,
    el("h2", {}, "Curves (live)"), el("div", { class: "charts" }, Object.values(charts).map((c) => c.box)),
    el("h2", { id: "query-heading" }, "Query the trained model"), queryPanel(job),
    el("h2", {}, "Run"), info,
    el("h2", {}, "Checkpoints"), checkpoints,
    el("h2", {}, "Figures"), figures,
    el("h2", {}, "Spec"), el("pre", { id: "spec" }, JSON.stringify(job.spec, null, 2)));

  function showJob(j) {
    head.replaceChildren(el("h1", {}, j.name || j.id, " ", statusBadge(j.status)));
    head.querySelector(".status").id = "run-status";
    info.replaceChildren(
      ...[["id", j.id], ["model", j.spec.model.type], ["data set", dataName(j.spec)], ["tags", j.tags.join(", ") || "none"],
        ["progress", `${j.step}/${j.total_steps ?? "?"} (${Math.round(j.progress * 100)}%)`],
        ["created", new Date(j.created_at).toLocaleString()],
        ...Object.entries(j.metrics).filter(([, v]) => typeof v !== "object").map(([k, v]) => [k, fmt(v)])].flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
    if (j.error) info.append(el("dt", { class: "error" }, "error"), el("dd", { class: "error", id: "run-error" }, `${j.error.type || ""}: ${j.error.detail}`));
    document.getElementById("cancel").disabled = TERMINAL.has(j.status);
  }
  let figuresShown = false;
  async function showArtifacts() {
    try {
      const list = await api(`v1/jobs/${id}/checkpoints`);
      checkpoints.replaceChildren(...(list.checkpoints.length ? list.checkpoints.map((c) => el("li", {},
        el("a", { href: "#", class: "download", onclick: async (e) => {
          e.preventDefault();
          const a = el("a", { href: await blobUrl(`v1/jobs/${id}/checkpoints/${c.name}`), download: c.name });
          a.click();
        } }, c.name), ` (${(c.size_bytes / 1024).toFixed(1)} KiB)`)) : [el("li", { class: "muted" }, "none yet")]));
    } catch (err) { checkpoints.replaceChildren(problemBox(err)); }
    showFigures();
  }
  // the figures (rendered by the server, seconds each) once the run has ended and the section is on screen;
  // once only (the history replay reports the end several times)
  let figuresVisible = false;
  observer = new IntersectionObserver((entries) => {
    figuresVisible = entries.some((e) => e.isIntersecting);
    showFigures();
  });
  observer.observe(figures);
  function showFigures() {
    if (!TERMINAL.has(job.status) || !figuresVisible || figuresShown || stopped) return;
    figuresShown = true;
    const names = ["training", ...(FAMILY_PLOTS[job.spec.model.type] || [])];
    figures.replaceChildren(...names.map((n) => {
      const fig = el("figure", {}, el("figcaption", {}, n), el("span", { class: "muted" }, "rendering…"));
      blobUrl(`v1/jobs/${id}/plots/${n}.png`).then((url) => fig.lastChild.replaceWith(el("img", { src: url, alt: `${n} figure` })),
        (err) => fig.lastChild.replaceWith(el("span", { class: "muted" }, err.message)));
      return fig;
    }));
  }
  function redraw() {
    const series = (rows, key) => rows.filter((r) => typeof r[key] === "number").map((r) => [r.step, r[key]]);
    charts.loss.draw([{ label: "loss", points: series(metricRows, "loss") }]);
    // the family's evaluation metrics: every number of an evaluation row but its step and NFE counts
    const testKeys = [...new Set(evalRows.flatMap((r) => Object.keys(r).filter((k) => typeof r[k] === "number" && k !== "step" && k !== "epoch" && !k.includes("nfe"))))];
    charts.test.draw(testKeys.map((k, i) => ({ label: UNITS[k] ? `${k} (${UNITS[k]})` : k, color: COLORS[(i + 1) % COLORS.length], dots: true, points: series(evalRows, k) })));
    charts.nfe.draw([{ label: "NFE forward", points: series(metricRows, "nfe_forward") },
      { label: "NFE backward", color: COLORS[1], points: series(metricRows, "nfe_backward") }]);
    const stepKey = ["step_size", "mean_step_size", "dt"].find((k) => metricRows.some((r) => typeof r[k] === "number"));
    charts.step.box.style.display = stepKey ? "" : "none";
    if (stepKey) charts.step.draw([{ label: stepKey, points: series(metricRows, stepKey) }]);
  }
  showJob(job); redraw(); showArtifacts();
  let pending = false;
  const scheduleRedraw = () => { if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; redraw(); }); } };

  // the event log from its start: the history first, then live events; reconnect after the last id
  let lastId = 0;
  while (!stopped) {
    try {
      await streamEvents(`v1/jobs/${id}/events?last_event_id=${lastId}`, (ev) => {
        lastId = Number(ev.id) || lastId;
        if (ev.event === "metric") { metricRows.push(ev.data); scheduleRedraw(); }
        else if (ev.event === "evaluation") { evalRows.push(ev.data); scheduleRedraw(); }
        else if (ev.event === "status" && ev.data.status === "running" && ev.data.attempt > 1) {
          metricRows.length = 0; evalRows.length = 0;  // a retried attempt logs its steps again
        } else if (ev.event === "status" || ev.event === "checkpoint" || ev.event === "result") {
          api(`v1/jobs/${id}`).then((j) => { job = j; showJob(j); if (ev.event !== "status" || TERMINAL.has(j.status)) showArtifacts(); }, () => {});
        }
      }, controller.signal);
      if (stopped) return;
      job = await api(`v1/jobs/${id}`);
      showJob(job); showArtifacts();
      if (TERMINAL.has(job.status)) return;
    } catch (err) {
      if (stopped) return;
      if (err.status === 404) { view().replaceChildren(problemBox(err)); return; }
    }
    await new Promise((r) => setTimeout(r, 2000));  // the stream dropped: resume after lastId
  }
}

// the job-spec schema from /openapi.json (fetched once; null where it cannot be had: the server still checks)
let specSchema = null;
async function loadSpecSchema() {
  if (!specSchema) {
    specSchema = api("openapi.json").then((doc) => {
      const ref = doc.paths["/v1/jobs"].post.requestBody.content["application/json"].schema;
      return { root: doc, schema: ref };
    }).catch((err) => { specSchema = null; throw err; });
  }
  return specSchema;
}

function renderSubmit() {
  const editor = el("textarea", { id: "spec-editor", spellcheck: "false" });
  const preset = el("select", { id: "preset" }, Object.keys(PRESETS).map((k) => el("option", { value: k }, k)));
  const out = el("div", { id: "submit-result" });
  const checks = el("div", { id: "spec-check", class: "spec-check muted" }, "Loading the schema…");
  let schema = null;
  // the edited spec against the schema: null (not JSON; shown), [] (conforms) or its problems (shown)
  function clientCheck() {
    let spec;
    try { spec = JSON.parse(editor.value); } catch (err) {
      checks.className = "spec-check bad";
      checks.replaceChildren(el("strong", {}, "Not JSON: "), err.message);
      return { problems: [{ path: "body", reason: err.message }] };
    }
    if (!schema) return { spec, problems: [] };
    const problems = SchemaCheck.validate(schema.schema, spec, schema.root);
    checks.className = `spec-check ${problems.length ? "bad" : "good"}`;
    checks.replaceChildren(problems.length
      ? el("div", {}, el("strong", {}, `${problems.length} problem(s) against the API schema (nothing sent):`),
        el("ul", {}, problems.map((p) => el("li", { class: "problem" }, el("code", {}, p.path), ": ", p.reason))))
      : el("span", { id: "spec-ok" }, "✓ conforms to the API schema (the server checks the rest: data set names, sizes)"));
    return { spec, problems };
  }
  let timer = null;
  editor.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(clientCheck, 250); });
  const load = () => { editor.value = JSON.stringify(PRESETS[preset.value], null, 2); clientCheck(); };
  preset.addEventListener("change", load);
  load();
  loadSpecSchema().then((s) => { schema = s; clientCheck(); },
    () => { checks.className = "spec-check muted"; checks.textContent = "The API schema could not be loaded: the server checks the spec."; });
  const submit = el("button", { id: "submit", class: "primary", type: "button", onclick: async () => {
    out.replaceChildren();
    const { spec, problems } = clientCheck();
    if (problems.length) return;  // shown next to the editor; nothing is sent
    try {
      const job = await api("v1/jobs", { method: "POST", body: spec });
      location.hash = `#/run/${job.id}`;
    } catch (err) { out.replaceChildren(problemBox(err)); }  // the server's reasons (it has the last word)
  } }, "Submit job");
  view().replaceChildren(el("h1", {}, "Submit a job"),
    el("p", { class: "muted" }, "Edit the JSON job spec (the schema: ", el("a", { href: "docs#/jobs/submit_job_v1_jobs_post" }, "API docs"),
      "). It is checked against the API's schema as you type; the server validates it again and names each problem's field."),
    el("div", { class: "filters" }, el("label", {}, "Preset", preset), submit), out,
    el("div", { class: "editor-grid" }, editor, checks));
  teardown = () => clearTimeout(timer);
}

// ---- the run page's model query (the newest checkpoint, through the /v1 inference endpoints) -------
function queryPanel(job) {
  const kind = QUERIES[job.spec.model.type];
  if (!kind) return el("p", { class: "muted" }, "This model family answers no queries.");
  return { density: densityQuery, forecast: forecastQuery, predict: predictQuery }[kind](job);
}

// a JSON textarea's value, or a problem shown in ``out`` (then null)
function readJson(input, out, what) {
  try { return JSON.parse(input.value); } catch (err) {
    out.replaceChildren(problemBox({ status: "", message: `${what} is not JSON: ${err.message}`, body: { title: "Invalid JSON" } }));
    return null;
  }
}
const numCell = (v, attrs = {}) => el("td", { class: "num", ...attrs }, v === null || v === undefined ? "—" : fmt(v));

function densityQuery(job) {
  const id = job.id;
  const points = el("textarea", { id: "query-points", spellcheck: "false" }, JSON.stringify([[0, 0], [1, 0.5], [-1, 0.5], [0.5, -0.3], [3, 3]]));
  const n = el("input", { id: "query-n", type: "number", min: 1, max: 100000, value: 1000, size: 7 });
  const out = el("div", { id: "query-result", class: "query-out" });
  async function logDensity() {
    const pts = readJson(points, out, "points");
    if (!pts) return;
    out.replaceChildren(el("span", { class: "muted" }, "solving…"));
    try {
      const ans = await api(`v1/jobs/${id}/log-density`, { method: "POST", body: { points: pts } });
      const why = Object.fromEntries(ans.failed.map((f) => [f.index, f.reason]));
      out.replaceChildren(el("div", {},
        el("table", { id: "query-table" }, el("thead", {}, el("tr", {}, ["#", "point (data units)", "log p(x) (nats)", "p(x)"].map((h) => el("th", {}, h)))),
          el("tbody", {}, pts.map((p, i) => el("tr", {}, numCell(i), el("td", {}, JSON.stringify(p)),
            numCell(ans.log_density[i], { "data-value": ans.log_density[i] ?? "" }),
            ans.log_density[i] === null ? el("td", { class: "error" }, why[i] || "no finite value") : numCell(Math.exp(ans.log_density[i])))))),
        el("p", { class: "muted" }, `checkpoint ${ans.checkpoint}; ${ans.nfe} vector-field evaluations`)));
    } catch (err) { out.replaceChildren(problemBox(err)); }
  }
  async function samples() {
    out.replaceChildren(el("span", { class: "muted" }, "sampling…"));
    try {
      const ans = await api(`v1/jobs/${id}/samples`, { method: "POST", body: { n: Number(n.value), seed: 0 } });
      const chart = chartBox("query-chart", `${ans.samples.length} samples (seed 0)`, "x₁ (data units)", "x₂ (data units)");
      out.replaceChildren(chart.box, el("p", { class: "muted" },
        ans.samples[0] && ans.samples[0].length > 2 ? `the first two of ${ans.samples[0].length} coordinates; ` : "", `checkpoint ${ans.checkpoint}`));
      chart.draw([{ label: "sample", lines: false, radius: 1.4, points: ans.samples.map((p) => [p[0], p.length > 1 ? p[1] : 0]) }]);
    } catch (err) { out.replaceChildren(problemBox(err)); }
  }
  return el("div", { class: "query", id: "query" },
    el("label", {}, "Points, (N, D) JSON in data coordinates (POST /v1/jobs/{id}/log-density)", points),
    el("div", { class: "filters" },
      el("button", { id: "query-run", class: "primary", type: "button", onclick: logDensity }, "Log density"),
      el("label", {}, "Samples", n),
      el("button", { id: "query-samples", type: "button", onclick: samples }, "Draw samples")),
    out);
}

function forecastQuery(job) {
  const id = job.id;
  const body = el("textarea", { id: "query-body", spellcheck: "false", rows: 8 });
  const out = el("div", { id: "query-result", class: "query-out" });
  function example() {
    const ex = SERIES_EXAMPLES[dataName(job.spec)] || SERIES_EXAMPLES.lotka_volterra;
    const t = Array.from({ length: 61 }, (_, i) => +(ex.until * i / 60).toPrecision(6));
    const req = { series: [{ t: ex.t, y: ex.y }], t, ...(job.spec.model.type === "latent_ode" ? { samples: 3 } : {}) };
    body.value = `{\n${Object.entries(req).map(([k, v]) => `  ${JSON.stringify(k)}: ${JSON.stringify(v)}`).join(",\n")}\n}`;  // a key a line
  }
  async function forecast() {
    const req = readJson(body, out, "the request");
    if (!req) return;
    out.replaceChildren(el("span", { class: "muted" }, "solving…"));
    try {
      const ans = await api(`v1/jobs/${id}/forecast`, { method: "POST", body: req });
      const f = ans.forecasts[0], obs = (req.series || [])[0] || { t: [], y: [] };
      const dims = f.mean[0] ? f.mean[0].length : 0;
      const chart = chartBox("query-chart", "Forecast, series 0", "t (time units of the data set)", "value (data units)");
      const series = [];
      for (let d = 0; d < dims; d++) {
        const color = COLORS[d % COLORS.length];
        for (const draw of f.samples || []) series.push({ label: "", color: `${color}55`, points: f.t.map((t, i) => [t, draw[i][d]]) });
        series.push({ label: `y${d + 1} mean`, color, points: f.t.map((t, i) => [t, f.mean[i][d]]) });
        series.push({ label: `y${d + 1} observed`, color, lines: false, radius: 3.5,
          points: obs.t.map((t, i) => [t, obs.y[i] ? obs.y[i][d] : null]).filter(([, v]) => typeof v === "number") });
      }
      out.replaceChildren(chart.box, el("div", { class: "scroll" },
        el("table", { id: "query-table" },
          el("thead", {}, el("tr", {}, el("th", {}, "series"), el("th", {}, "t"), Array.from({ length: dims }, (_, d) => el("th", {}, `mean y${d + 1}`)))),
          el("tbody", {}, ans.forecasts.flatMap((fc, s) => fc.t.map((t, i) => el("tr", {}, numCell(s), numCell(t),
            fc.mean[i].map((v) => numCell(v, { "data-value": v })))))))),
        el("p", { class: "muted" }, `checkpoint ${ans.checkpoint}; ${ans.nfe} vector-field evaluations`));
      chart.draw(series);
    } catch (err) { out.replaceChildren(problemBox(err)); }
  }
  example();
  return el("div", { class: "query", id: "query" },
    el("label", {}, "Request: observed series (t, y; null = missing) and the times t to forecast at (POST /v1/jobs/{id}/forecast)", body),
    el("div", { class: "filters" },
      el("button", { id: "query-run", class: "primary", type: "button", onclick: forecast }, "Forecast"),
      el("button", { id: "query-example", type: "button", onclick: example }, "Built-in example")),
    out);
}

function predictQuery(job) {
  const id = job.id;
  const digits = dataName(job.spec) === "digits";
  const inputs = el("textarea", { id: "query-inputs", spellcheck: "false" }, digits ? `[[\n${DIGIT_ZERO.map((r) => `  ${JSON.stringify(r)}`).join(",\n")}\n]]` : "");
  const out = el("div", { id: "query-result", class: "query-out" });
  async function predict() {
    const x = readJson(inputs, out, "inputs");
    if (!x) return;
    try {
      const ans = await api(`v1/jobs/${id}/predict`, { method: "POST", body: { inputs: x } });
      out.replaceChildren(el("table", { id: "query-table" },
        el("thead", {}, el("tr", {}, ["#", "class", "probability", "all probabilities"].map((h) => el("th", {}, h)))),
        el("tbody", {}, ans.probabilities.map((p, i) => {
          const best = p.indexOf(Math.max(...p));
          return el("tr", {}, numCell(i), numCell(best), numCell(p[best], { "data-value": p[best] }), el("td", {}, p.map((v) => v.toFixed(3)).join(" ")));
        }))));
    } catch (err) { out.replaceChildren(problemBox(err)); }
  }
  return el("div", { class: "query", id: "query" },
    el("label", {}, `Images, N x H x W JSON in the training data's pixel units${digits ? " (digits: 0..16; an 8x8 “0” to start)" : ""} (POST /v1/jobs/{id}/predict)`, inputs),
    el("div", { class: "filters" }, el("button", { id: "query-run", class: "primary", type: "button", onclick: predict }, "Predict")),
    out);
}

function flatten(obj, prefix = "", out = {}) {
  for (const [k, v] of Object.entries(obj || {})) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (v && typeof v === "object" && !Array.isArray(v)) flatten(v, key, out); else out[key] = JSON.stringify(v);
  }
  return out;
}

async function allMetrics(id) {
  const rows = [];
  let token = null;
  do {
    const page = await api(`v1/jobs/${id}/metrics?limit=10000${token ? `&page_token=${encodeURIComponent(token)}` : ""}`);
    rows.push(...page.history); token = page.next_page_token;
  } while (token);
  return rows;
}

async function renderCompare() {
  teardown = () => {};
  const ids = (new URLSearchParams(location.hash.split("?")[1] || "").get("ids") || "").split(",").filter(Boolean);
  if (ids.length < 2) {
    view().replaceChildren(el("h1", {}, "Compare runs"), el("p", {}, "Tick two or more runs in the ", el("a", { href: "#/" }, "run list"), " and press “Compare selected”."));
    return;
  }
  let jobs, histories;
  try {
    jobs = await Promise.all(ids.map((id) => api(`v1/jobs/${id}`)));
    histories = await Promise.all(ids.map(allMetrics));
  } catch (err) { view().replaceChildren(problemBox(err)); return; }
  const label = (j) => j.name || j.id.slice(0, 8);
  const loss = chartBox("compare-loss", "Training loss", "iteration (step)", "loss (training objective)");
  const nfe = chartBox("compare-nfe", "Forward function evaluations", "iteration (step)", "NFE forward (dynamics calls)");
  const flat = jobs.map((j) => flatten(j.spec));
  const keys = [...new Set(flat.flatMap(Object.keys))].sort();
  const differing = keys.filter((k) => new Set(flat.map((f) => f[k] ?? "—")).size > 1);
  const table = el("table", { class: "diff", id: "spec-diff" },
    el("thead", {}, el("tr", {}, el("th", {}, "spec field"), jobs.map((j) => el("th", {}, el("a", { href: `#/run/${j.id}` }, label(j)))))),
    el("tbody", {}, (differing.length ? differing : []).map((k) => el("tr", {}, el("td", {}, el("code", {}, k)),
      flat.map((f) => el("td", { class: "differs" }, f[k] ?? "—"))))));
  const summary = el("table", { id: "compare-runs" },
    el("thead", {}, el("tr", {}, ["Run", "Status", "Model", "Data set", "Step", "Latest metrics"].map((h) => el("th", {}, h)))),
    el("tbody", {}, jobs.map((j) => el("tr", {}, el("td", {}, label(j)), el("td", {}, statusBadge(j.status)), el("td", {}, j.spec.model.type),
      el("td", {}, dataName(j.spec)), el("td", { class: "num" }, j.step),
      el("td", {}, latest(j.metrics))))));
  view().replaceChildren(el("h1", {}, `Compare ${jobs.length} runs`), summary,
    el("h2", {}, "Curves"), el("div", { class: "charts" }, loss.box, nfe.box),
    el("h2", {}, "Spec differences"), differing.length ? table : el("p", { class: "muted" }, "The specs are identical."));
  const series = (key) => jobs.map((j, i) => ({ label: label(j), points: histories[i].filter((r) => typeof r[key] === "number").map((r) => [r.step, r[key]]) }));
  loss.draw(series("loss"));
  nfe.draw(series("nfe_forward"));
}

// ---- API key prompt and routing ------------------------------------------------------------------
function askKey(reason) {
  const dialog = document.getElementById("key-dialog");
  if (dialog.open) return;
  if (reason) toast(reason);
  document.getElementById("key-input").value = "";
  dialog.showModal();
}

function route() {
  teardown();
  const hash = location.hash.replace(/^#/, "") || "/";
  const path = hash.split("?")[0];
  if (path.startsWith("/run/")) return renderRun(decodeURIComponent(path.slice(5)));
  if (path === "/submit") return renderSubmit();
  if (path === "/compare") return renderCompare();
  return renderList();
}

document.getElementById("key-button").addEventListener("click", () => askKey());
document.getElementById("key-dialog").addEventListener("close", () => {
  const dialog = document.getElementById("key-dialog");
  const value = document.getElementById("key-input").value.trim();
  if (dialog.returnValue === "save" && value) sessionStorage.setItem(KEY_STORE, value);
  if (dialog.returnValue === "clear") sessionStorage.removeItem(KEY_STORE);
  route();
});
window.addEventListener("hashchange", route);
route();
