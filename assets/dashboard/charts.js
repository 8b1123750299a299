// Charts by step: uPlot line charts for the job page, and an SVG sparkline for table rows.

import uPlot from "./uPlot.esm.js";

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

// A line chart in `el` over steps; `series` is [{label, color: "--css-var", points}], points
// marking each value (for sparse series, such as evaluations). update(xs, ys)
// redraws with ys[i] the values of series i (null where a step has none).
export function lineChart(el, title, series) {
  const axis = { stroke: cssVar("--muted"), grid: { stroke: cssVar("--line") }, ticks: { stroke: cssVar("--line") } };
  const options = {
    title,
    width: Math.max(200, el.clientWidth),
    height: 220,
    scales: { x: { time: false } },
    axes: [{ ...axis, label: "step" }, { ...axis, size: 60 }],
    series: [
      { label: "step" },
      ...series.map((s) => ({ label: s.label, stroke: cssVar(s.color), width: 1.5, spanGaps: true, points: { show: Boolean(s.points) } })),
    ],
    legend: { live: true },
  };
  const plot = new uPlot(options, [[], ...series.map(() => [])], el);
  const resize = new ResizeObserver(() => plot.setSize({ width: Math.max(200, el.clientWidth), height: 220 }));
  resize.observe(el);
  return {
    update(xs, ys) {
      plot.setData([xs, ...ys]);
    },
    destroy() {
      resize.disconnect();
      plot.destroy();
    },
  };
}

// A tiny polyline of the last values (no axes), for a table cell.
export function sparkline(values, width = 80, height = 20) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("aria-hidden", "true");
  const finite = values.filter(Number.isFinite);
  if (finite.length < 2) return svg;
  const low = Math.min(...finite);
  const span = Math.max(...finite) - low || 1;
  const points = finite.map((v, i) => {
    const x = (i / (finite.length - 1)) * (width - 2) + 1;
    const y = height - 1 - ((v - low) / span) * (height - 2);
    return `${x.toFixed(1)},${y.toFixed(1)}`;
  });
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.join(" "));
  svg.append(line);
  return svg;
}
