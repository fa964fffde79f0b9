// Live view of one sec-online worker. Polls /dashboard/data/ on the same worker and redraws;
// it loads nothing from any other address.
"use strict";

const REFRESH_MS = 1500;
const SVG_NS = "http://www.w3.org/2000/svg";
const CHART = { width: 640, height: 220, left: 52, right: 96, top: 10, bottom: 28 };
const LEVEL_COLORS = ["#d1495b", "#edae49", "#00798c", "#30638e", "#6a4c93", "#8ac926"];
const UNRATED_COLOR = "#9aa3ad";

function levelColor(level) {
  if (level === "unrated") {
    return UNRATED_COLOR;
  }
  return LEVEL_COLORS[Number(level) % LEVEL_COLORS.length];
}

// Level keys in display order: unrated first, then levels by number.
function sortedLevels(keys) {
  return [...keys].sort((a, b) => {
    if (a === b) return 0;
    if (a === "unrated") return -1;
    if (b === "unrated") return 1;
    return Number(a) - Number(b);
  });
}

function formatInteger(value) {
  return Number(value).toLocaleString("en-US");
}

function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  if (seconds < 7200) return `${(seconds / 60).toFixed(1)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function setText(id, text) {
  document.getElementById(id).textContent = text;
}

function svgElement(name, attributes, text) {
  const element = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attributes)) {
    element.setAttribute(key, value);
  }
  if (text !== undefined) element.textContent = text;
  return element;
}

// Draw line series [{name, color, points: [[x, y], ...]}] into an SVG with axes and a legend.
// The y axis starts at 0 when fromZero is true, else at the smallest value.
function drawLines(svg, series, formatX, fromZero) {
  svg.replaceChildren();
  const points = series.flatMap((s) => s.points);
  if (points.length === 0) {
    svg.append(svgElement("text", { x: CHART.left, y: CHART.height / 2 }, "no data yet"));
    return;
  }
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const xMin = Math.min(...xs);
  const xMax = Math.max(...xs);
  const yMin = fromZero ? Math.min(0, ...ys) : Math.min(...ys);
  const yMax = Math.max(...ys);

  const plotWidth = CHART.width - CHART.left - CHART.right;
  const plotHeight = CHART.height - CHART.top - CHART.bottom;
  const scaleX = (x) => CHART.left + (xMax === xMin ? 0.5 : (x - xMin) / (xMax - xMin)) * plotWidth;
  const scaleY = (y) =>
    CHART.top + plotHeight - (yMax === yMin ? 0.5 : (y - yMin) / (yMax - yMin)) * plotHeight;
  const bottom = CHART.top + plotHeight;

  svg.append(svgElement("line", { x1: CHART.left, y1: bottom, x2: CHART.left + plotWidth, y2: bottom, stroke: "#aab" }));
  svg.append(svgElement("line", { x1: CHART.left, y1: CHART.top, x2: CHART.left, y2: bottom, stroke: "#aab" }));
  svg.append(svgElement("text", { x: CHART.left - 4, y: CHART.top + 8, "text-anchor": "end" }, yMax.toPrecision(3)));
  svg.append(svgElement("text", { x: CHART.left - 4, y: bottom, "text-anchor": "end" }, yMin.toPrecision(3)));
  svg.append(svgElement("text", { x: CHART.left, y: bottom + 16 }, formatX(xMin)));
  svg.append(svgElement("text", { x: CHART.left + plotWidth, y: bottom + 16, "text-anchor": "end" }, formatX(xMax)));

  series.forEach((s, index) => {
    if (s.points.length === 0) return;
    const path = s.points.map((p) => `${scaleX(p[0]).toFixed(1)},${scaleY(p[1]).toFixed(1)}`).join(" ");
    svg.append(svgElement("polyline", { points: path, fill: "none", stroke: s.color, "stroke-width": 1.8 }));
    if (s.points.length === 1) {
      const [x, y] = s.points[0];
      svg.append(svgElement("circle", { cx: scaleX(x), cy: scaleY(y), r: 3, fill: s.color }));
    }
    const legendY = CHART.top + 12 + index * 15;
    svg.append(svgElement("rect", { x: CHART.width - CHART.right + 10, y: legendY - 8, width: 10, height: 10, fill: s.color }));
    svg.append(svgElement("text", { x: CHART.width - CHART.right + 24, y: legendY }, s.name));
  });
}

// Event times are Unix ms, shown in UTC.
function formatEventDay(ms) {
  return `${new Date(ms).toISOString().slice(0, 16).replace("T", " ")} UTC`;
}

function drawLevels(data) {
  const keys = new Set(Object.keys(data.users_per_level));
  data.level_timeline.forEach((point) => Object.keys(point.levels).forEach((k) => keys.add(k)));
  const series = sortedLevels(keys).map((level) => ({
    name: level === "unrated" ? "unrated" : `level ${level}`,
    color: levelColor(level),
    points: data.level_timeline.map((p) => [p.event_ms, p.levels[level] || 0]),
  }));
  drawLines(document.getElementById("levels-chart"), series, formatEventDay, true);
  const body = document.querySelector("#levels-table tbody");
  body.replaceChildren();
  for (const level of sortedLevels(keys)) {
    const row = body.insertRow();
    row.dataset.level = level;
    row.insertCell().textContent = level;
    row.insertCell().textContent = formatInteger(data.users_per_level[level] || 0);
    row.insertCell().textContent = lowestScore(level, data.boundaries);
  }
}

// Lowest retention score of a level: 0 for level 0, else the boundary below it.
function lowestScore(level, boundaries) {
  if (level === "unrated") return "-";
  if (level === "0") return "0";
  return boundaries[Number(level) - 1].toFixed(4);
}

function drawLoss(data) {
  const series = [{
    name: "loss",
    color: "#30638e",
    points: data.loss_timeline.map((p) => [p.step, p.loss]),
  }];
  drawLines(document.getElementById("loss-chart"), series, (step) => `step ${step}`, false);
}

function drawBars(containerId, selection) {
  const container = document.getElementById(containerId);
  container.replaceChildren();
  const levels = sortedLevels(Object.keys(selection.counts));
  if (levels.length === 0) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "none yet";
    container.append(empty);
    return;
  }
  for (const level of levels) {
    const share = selection.shares[level];
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.dataset.level = level;
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = `level ${level}`;
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${(share * 20).toFixed(2)}rem`;
    fill.style.background = levelColor(level);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${(share * 100).toFixed(1)}% (${formatInteger(selection.counts[level])})`;
    bar.append(label, fill, value);
    container.append(bar);
  }
}

function drawLag(data) {
  const body = document.querySelector("#lag-table tbody");
  body.replaceChildren();
  for (const row of data.consumer_lag) {
    const tr = body.insertRow();
    for (const value of [row.topic, row.partition, row.position, row.end_offset, row.lag]) {
      tr.insertCell().textContent = value === null ? "-" : String(value);
    }
  }
}

function render(data) {
  setText("consumed-impressions", formatInteger(data.consumed.impressions || 0));
  setText("consumed-returns", formatInteger(data.consumed.returns || 0));
  setText("samples-emitted", formatInteger(data.samples_emitted));
  setText("dead-letters", formatInteger(data.dead_letters_total));
  const duplicates = Object.values(data.duplicates).reduce((a, b) => a + b, 0);
  setText("duplicates", formatInteger(duplicates));
  setText("lag-total", formatInteger(data.consumer_lag_total));
  setText("policy-version", String(data.policy.version));
  setText("policy-age", formatSeconds(data.policy.age_seconds));
  setText("trainer-steps", data.trainer.active ? formatInteger(data.trainer.steps) : "not training here");
  setText("trainer-loss", data.trainer.last_loss === null ? "-" : data.trainer.last_loss.toFixed(4));
  setText("trainer-rate", data.trainer.samples_per_second.toFixed(1));
  setText("last-event", data.last_event_ms ? formatEventDay(data.last_event_ms) : "-");
  setText("selection-users-total", formatInteger(data.selection.recent_users.total));
  setText("selection-users-version", String(data.selection.recent_users.version));
  setText("selection-served-total", formatInteger(data.selection.recommendations.total));
  drawLevels(data);
  drawLoss(data);
  drawBars("selection-users", data.selection.recent_users);
  drawBars("selection-served", data.selection.recommendations);
  drawLag(data);
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const response = await fetch("data/", { cache: "no-store" });
    if (!response.ok) {
      throw new Error(`GET data/ returned HTTP ${response.status}`);
    }
    render(await response.json());
    setText("refreshed", new Date().toLocaleTimeString("en-GB"));
    status.textContent = "";
    status.classList.remove("error");
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
  } catch (error) {
    status.textContent = `refresh failed: ${error.message}; retrying`;
    status.classList.add("error");
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
