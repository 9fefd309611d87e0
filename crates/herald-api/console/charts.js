// Small inline-SVG charts: stacked bars of counts over time and lines of samples over time.
// Sizes are in the viewBox; CSS scales the SVG to its box and colours it by class.

import { h, s, fmtTime } from './ui.js';

/**
 * Counts `items` into `count` equal time buckets between `from` and `to` (ms since the epoch;
 * by default the items' own span, at least a minute). `keyOf(item)` names the stack it counts in.
 */
export function bucketize(items, timeOf, keyOf, { count = 24, from, to } = {}) {
  const times = items.map(timeOf).filter((t) => Number.isFinite(t));
  const end = to ?? (times.length ? Math.max(...times) : Date.now());
  let start = from ?? (times.length ? Math.min(...times) : end - 60_000);
  if (end - start < 60_000) start = end - 60_000;
  const width = (end - start) / count;
  const buckets = Array.from({ length: count }, (_, i) => ({
    start: start + i * width,
    end: start + (i + 1) * width,
    counts: {},
  }));
  for (const item of items) {
    const t = timeOf(item);
    if (!Number.isFinite(t) || t < start || t > end) continue;
    const index = Math.min(count - 1, Math.floor((t - start) / width));
    const key = keyOf(item);
    buckets[index].counts[key] = (buckets[index].counts[key] || 0) + 1;
  }
  return buckets;
}

/** Nearest-rank percentiles of `values` (numbers), e.g. `{50: 12, 90: 40, 99: 80}`. */
export function percentiles(values, ranks = [50, 90, 99]) {
  const sorted = values.filter((v) => Number.isFinite(v)).sort((a, b) => a - b);
  const out = {};
  for (const rank of ranks) {
    if (!sorted.length) {
      out[rank] = null;
      continue;
    }
    const index = Math.max(0, Math.ceil((rank / 100) * sorted.length) - 1);
    out[rank] = sorted[Math.min(index, sorted.length - 1)];
  }
  return out;
}

const W = 480;
const H = 140;
const PAD = { left: 34, right: 8, top: 10, bottom: 22 };

/** A round top for a count axis whose middle line is a whole number too. */
function niceMax(value) {
  if (value <= 2) return 2;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 4, 6, 10]) {
    if (step * power >= value) return step * power;
  }
  return 10 * power;
}

function frame(svg, maxY, from, to, yLabel) {
  const plotH = H - PAD.top - PAD.bottom;
  for (const fraction of [0, 0.5, 1]) {
    const y = PAD.top + plotH * (1 - fraction);
    svg.appendChild(s('line', { class: 'chart-grid', x1: PAD.left, x2: W - PAD.right, y1: y, y2: y }));
    const value = maxY * fraction;
    svg.appendChild(
      s('text', { class: 'chart-label', x: PAD.left - 4, y: y + 3, 'text-anchor': 'end' }, Number.isInteger(value) ? value : value.toFixed(1)),
    );
  }
  svg.appendChild(s('text', { class: 'chart-label', x: PAD.left, y: H - 6, 'text-anchor': 'start' }, fmtTime(new Date(from))));
  svg.appendChild(s('text', { class: 'chart-label', x: W - PAD.right, y: H - 6, 'text-anchor': 'end' }, fmtTime(new Date(to))));
  if (yLabel) svg.appendChild(s('text', { class: 'chart-label', x: W / 2, y: H - 6, 'text-anchor': 'middle' }, yLabel));
}

function legend(keys) {
  return keys.map((k) => ({ label: k.label, cls: k.cls }));
}

/**
 * Stacked bars: `buckets` from `bucketize`, `keys` `[{key, label, cls}]` bottom to top.
 * Returns `{svg, legend}`.
 */
export function barChart({ buckets, keys, test, title }) {
  const svg = s('svg', { class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img', 'data-test': test, 'aria-label': title || 'chart' });
  const totals = buckets.map((b) => keys.reduce((sum, k) => sum + (b.counts[k.key] || 0), 0));
  const maxY = niceMax(Math.max(0, ...totals));
  const from = buckets.length ? buckets[0].start : Date.now() - 60_000;
  const to = buckets.length ? buckets[buckets.length - 1].end : Date.now();
  frame(svg, maxY, from, to);
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  const slot = plotW / Math.max(1, buckets.length);
  buckets.forEach((bucket, i) => {
    let base = 0;
    for (const k of keys) {
      const n = bucket.counts[k.key] || 0;
      if (!n) continue;
      const y0 = PAD.top + plotH * (1 - base / maxY);
      const y1 = PAD.top + plotH * (1 - (base + n) / maxY);
      svg.appendChild(
        s(
          'rect',
          {
            class: `chart-bar ${k.cls}`,
            x: (PAD.left + i * slot + slot * 0.12).toFixed(1),
            width: Math.max(1, slot * 0.76).toFixed(1),
            y: y1.toFixed(1),
            height: Math.max(0.5, y0 - y1).toFixed(1),
          },
          s('title', null, `${fmtTime(new Date(bucket.start))}–${fmtTime(new Date(bucket.end))}: ${n} ${k.label}`),
        ),
      );
      base += n;
    }
  });
  return { svg, legend: legend(keys) };
}

/**
 * Lines: `series` `[{label, cls, points: [[t, v], ...]}]` over the last `spanMs` (or the
 * points' span). Returns `{svg, legend}`.
 */
export function lineChart({ series, test, title, spanMs }) {
  const svg = s('svg', { class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img', 'data-test': test, 'aria-label': title || 'chart' });
  const all = series.flatMap((line) => line.points);
  const to = all.length ? Math.max(...all.map((p) => p[0])) : Date.now();
  let from = all.length ? Math.min(...all.map((p) => p[0])) : to - 60_000;
  if (spanMs) from = Math.min(from, to - spanMs);
  if (to - from < 10_000) from = to - 10_000;
  const maxY = niceMax(Math.max(0, ...all.map((p) => p[1])));
  frame(svg, maxY, from, to);
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  const x = (t) => PAD.left + (plotW * (t - from)) / (to - from);
  const y = (v) => PAD.top + plotH * (1 - v / maxY);
  for (const line of series) {
    if (!line.points.length) continue;
    const d = line.points.map((p, i) => `${i ? 'L' : 'M'}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(' ');
    svg.appendChild(s('path', { class: `chart-line ${line.cls}`, d, 'data-series': line.label }));
    const last = line.points[line.points.length - 1];
    svg.appendChild(
      s('circle', { class: `chart-dot ${line.cls}`, cx: x(last[0]).toFixed(1), cy: y(last[1]).toFixed(1), r: 2.5 }, s('title', null, `${line.label}: ${last[1]}`)),
    );
  }
  return { svg, legend: series.map((line) => ({ label: line.label, cls: line.cls })) };
}

/** A chart with its legend below, as one block. */
export function chartBlock({ svg, legend: items }, caption) {
  return h(
    'figure',
    { class: 'chart-block' },
    svg,
    h(
      'figcaption',
      { class: 'chart-legend' },
      caption ? h('span', { class: 'chart-caption' }, caption) : null,
      items.map((item) => h('span', { class: 'legend-item' }, h('span', { class: `legend-swatch ${item.cls}` }), item.label)),
    ),
  );
}
