// NormProp Stream live dashboard: polls /dashboard/data and draws SVG charts. No libraries.
"use strict";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777",
                "#4b5563"];
const SVGNS = "http://www.w3.org/2000/svg";
let period = 1000;

function el(tag, attrs, parent, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVGNS, tag.slice(4))
                                   : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  if (parent) parent.appendChild(e);
  return e;
}

function fmt(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "-";
  if (Math.abs(v) >= 1e4) return v.toExponential(1);
  return Number(v).toFixed(digits === undefined ? 3 : digits).replace(/\.?0+$/, "") || "0";
}

// One line chart: times ts (s), lines [{name, values}], optional reference values.
function lineChart(card, ts, lines, opts) {
  opts = opts || {};
  const W = 400, H = 170, L = 42, R = 8, T = 8, B = 20;
  const svg = el("svg:svg", {viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none"});
  let points = 0, lo = Infinity, hi = -Infinity;
  for (const line of lines) for (const v of line.values) if (v !== null && v !== undefined) {
    lo = Math.min(lo, v); hi = Math.max(hi, v);
  }
  for (const v of opts.refs || []) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  if (opts.min !== undefined) lo = Math.min(lo, opts.min);
  if (opts.max !== undefined) hi = Math.max(hi, opts.max);
  const first = lines.length ? lines[0].values.filter(v => v !== null && v !== undefined).length : 0;
  svg.setAttribute("data-points", String(first));
  if (!ts.length || lo === Infinity) {
    card.appendChild(svg);
    el("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, svg, "no data yet");
    return svg;
  }
  if (hi - lo < 1e-9) { hi += 0.5; lo -= 0.5; }
  const pad = (hi - lo) * 0.05; lo -= pad; hi += pad;
  if (opts.min !== undefined) lo = Math.max(lo, opts.min);
  const t0 = ts[0], t1 = Math.max(ts[ts.length - 1], t0 + 1);
  const x = t => L + (t - t0) / (t1 - t0) * (W - L - R);
  const y = v => T + (hi - v) / (hi - lo) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const v = lo + (hi - lo) * i / 4;
    el("svg:line", {x1: L, x2: W - R, y1: y(v), y2: y(v), class: "gridline"}, svg);
    el("svg:text", {x: L - 4, y: y(v) + 3, "text-anchor": "end"}, svg, fmt(v, 2));
  }
  for (const v of opts.refs || []) el("svg:line", {x1: L, x2: W - R, y1: y(v), y2: y(v), class: "ref"}, svg);
  el("svg:text", {x: L, y: H - 5}, svg, `-${Math.round(t1 - t0)} s`);
  el("svg:text", {x: W - R, y: H - 5, "text-anchor": "end"}, svg, "now");
  lines.forEach((line, k) => {
    let d = "", pen = false;
    line.values.forEach((v, i) => {
      if (v === null || v === undefined) { pen = false; return; }
      d += `${pen ? "L" : "M"}${x(ts[i]).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true; points++;
    });
    if (d) el("svg:path", {d, class: "line", stroke: line.color || COLORS[k % COLORS.length],
                           "data-name": line.name}, svg);
  });
  card.appendChild(svg);
  const legend = el("div", {class: "legend"}, card);
  lines.forEach((line, k) => {
    const last = [...line.values].reverse().find(v => v !== null && v !== undefined);
    const item = el("span", {}, legend);
    el("i", {style: `background:${line.color || COLORS[k % COLORS.length]}`}, item);
    item.appendChild(document.createTextNode(`${line.name}: ${fmt(last)}`));
  });
  return svg;
}

// Horizontal bars: [{label, value}].
function barChart(card, bars, unit) {
  const W = 400, rowH = 18, L = 110, R = 50;
  const H = Math.max(40, bars.length * rowH + 8);
  const svg = el("svg:svg", {viewBox: `0 0 ${W} ${H}`, style: `height:${H}px`,
                             "data-points": String(bars.length)}, card);
  if (!bars.length) {
    el("svg:text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, svg, "none");
    return svg;
  }
  const max = Math.max(1, ...bars.map(b => b.value));
  bars.forEach((b, i) => {
    const yy = 4 + i * rowH;
    el("svg:text", {x: L - 6, y: yy + 12, "text-anchor": "end"}, svg, b.label);
    el("svg:rect", {x: L, y: yy + 2, height: rowH - 6, width: Math.max(1, (W - L - R) * b.value / max),
                    fill: COLORS[i % COLORS.length]}, svg);
    el("svg:text", {x: L + (W - L - R) * b.value / max + 4, y: yy + 12}, svg,
       `${fmt(b.value, 0)}${unit || ""}`);
  });
  return svg;
}

function card(grid, title, note, id) {
  const c = el("div", {class: "card", id}, grid);
  el("h3", {}, c, title);
  if (note) el("div", {class: "note"}, c, note);
  return c;
}

function badge(parent, label, value, cls, id) {
  const b = el("span", {class: "badge " + (cls || "")}, parent);
  b.appendChild(document.createTextNode(label + " "));
  const v = el("b", id ? {id} : {}, b, value);
  return v;
}

function renderModel(root, m, now) {
  const s = m.series || {};
  const ts = s.t || [];
  const sec = el("section", {class: "model", id: `model-${m.name}`, "data-model": m.name}, root);
  el("h2", {}, sec, `model ${m.name} (${m.task})`);
  const badges = el("div", {class: "badges"}, sec);
  badge(badges, "version", m.version === undefined ? "-" : String(m.version),
        m.pinned ? "pinned" : "", `version-${m.name}`);
  if (m.pinned) badge(badges, "pinned", "yes", "pinned");
  const age = m.created_at ? now - m.created_at : null;
  badge(badges, "snapshot age", age === null ? "-" : `${fmt(age, 1)} s`, "", `age-${m.name}`);
  badge(badges, "samples trained", m.samples_trained === undefined ? "-" : String(m.samples_trained),
        "", `samples-${m.name}`);
  if (m.served) {
    badge(badges, "labelled", String(m.served.labelled), "", `labelled-${m.name}`);
    badge(badges, "awaiting label", String(m.served.pending));
    badge(badges, "expired unlabelled", String(m.served.expired));
  }
  if (m.last_error) badge(badges, "last load error", m.last_error.slice(0, 80), "error");

  const grid = el("div", {class: "grid"}, sec);
  const cls = m.task === "classification";
  const acc = cls ? [
    {name: "test-then-train (window)", values: s.prequential_window_accuracy || []},
    {name: "test-then-train (total)", values: s.prequential_accuracy || []},
    {name: "served (window)", values: s.served_window_accuracy || []},
    {name: "served (total)", values: s.served_accuracy || []},
  ] : [
    {name: "test-then-train MAE (window)", values: s.prequential_window_mae || []},
    {name: "test-then-train MAE (total)", values: s.prequential_mae || []},
    {name: "served MAE (window)", values: s.served_window_mae || []},
    {name: "served MAE (total)", values: s.served_mae || []},
  ];
  lineChart(card(grid, cls ? "Accuracy" : "Mean absolute error",
                 "worker's test-then-train vs what users were served (delayed labels)",
                 `chart-accuracy-${m.name}`), ts, acc, cls ? {min: 0, max: 1} : {min: 0});
  lineChart(card(grid, "Samples/s trained", "between the last two snapshots",
                 `chart-rate-${m.name}`), ts,
            [{name: "samples/s", values: s.samples_per_second || []}], {min: 0});
  lineChart(card(grid, "Stream lag", "entries not yet delivered to the trainer",
                 `chart-lag-${m.name}`), ts, [{name: "lag", values: s.lag || []}], {min: 0});
  const mixCard = card(grid, "Batch-size mix", m.batch_mix ? "training steps per batch size "
      + "(worker histogram, since this page's API started)"
      : "mean samples per step between snapshots (set NP_DASHBOARD_WORKER_METRICS_URL for the "
      + "exact histogram)", `chart-batch-${m.name}`);
  if (m.batch_mix) barChart(mixCard, m.batch_mix.map(b => ({label: `<= ${b.le}`, value: b.steps})));
  else lineChart(mixCard, ts, [{name: "mean batch", values: s.mean_batch || []}], {min: 0});
  lineChart(card(grid, "Snapshot version served", "a pin can move it down",
                 `chart-version-${m.name}`), ts,
            [{name: "version", values: s.version || []}], {min: 0});
  lineChart(card(grid, "Snapshot age", "seconds since the served version was written",
                 `chart-age-${m.name}`), ts,
            [{name: "age (s)", values: s.snapshot_age || []}], {min: 0});
  const dead = Object.entries(m.dead_letters || {}).filter(([, v]) => v > 0)
    .map(([k, v]) => ({label: k, value: v}));
  barChart(card(grid, "Dead letters by reason", "malformed entries kept out of the model",
                `chart-dead-${m.name}`), dead);
  const layers = Object.entries(m.layers || {});
  lineChart(card(grid, "Per-layer input mean", "internal covariate shift (paper fig. 2): near 0",
                 `chart-layer-mean-${m.name}`), ts,
            layers.map(([n, d]) => ({name: n, values: d.mean})), {refs: [0]});
  lineChart(card(grid, "Per-layer input std", "internal covariate shift (paper fig. 2): near 1",
                 `chart-layer-std-${m.name}`), ts,
            layers.map(([n, d]) => ({name: n, values: d.std})), {refs: [1], min: 0});
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const r = await fetch("/dashboard/data", {cache: "no-store"});
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const data = await r.json();
    period = Math.max(250, 1000 * (data.sample_seconds || 1));
    document.getElementById("period").textContent = fmt(period / 1000, 2);
    const root = document.getElementById("models");
    const fresh = document.createElement("main");
    fresh.id = "models";
    for (const m of Object.values(data.models)) renderModel(fresh, m, data.now);
    root.replaceWith(fresh);
    status.textContent = `updated ${new Date(data.now * 1000).toLocaleTimeString()}`;
    status.className = "status";
    document.body.setAttribute("data-updates",
      String(Number(document.body.getAttribute("data-updates") || 0) + 1));
  } catch (e) {
    status.textContent = `API unreachable (${e.message}); retrying`;
    status.className = "status down";
  }
  setTimeout(poll, period);
}

poll();
