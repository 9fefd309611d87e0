// DOM helpers shared by the console and the portal. No inline styles anywhere (the page's
// Content-Security-Policy has no 'unsafe-inline'): look is in style.css, chosen by class.

/** `h('tr', {class: 'x', 'data-test': 'y', onclick: fn}, child, [children], 'text')` */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  applyProps(el, props);
  append(el, children);
  return el;
}

const SVG_NS = 'http://www.w3.org/2000/svg';

/** The same for SVG elements; attributes are set as given (SVG attributes are fine under CSP). */
export function s(tag, props, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  applyProps(el, props);
  append(el, children);
  return el;
}

function applyProps(el, props) {
  if (!props) return;
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') {
      el.addEventListener(name.slice(2), value);
    } else if (name === 'class') {
      el.setAttribute('class', Array.isArray(value) ? value.filter(Boolean).join(' ') : value);
    } else if (name === 'text') {
      el.textContent = String(value);
    } else if (name === 'value' && 'value' in el) {
      el.value = value;
    } else if (name === 'checked' || name === 'disabled' || name === 'hidden' || name === 'selected') {
      el[name] = Boolean(value);
    } else {
      el.setAttribute(name, value === true ? '' : String(value));
    }
  }
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

/** Replaces an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** Shows an error (an Error or a string) in words in `el`, or hides `el` for null. */
export function showError(el, error) {
  if (!el) return;
  if (!error) {
    el.textContent = '';
    el.hidden = true;
    return;
  }
  el.textContent = typeof error === 'string' ? error : error.message || String(error);
  el.hidden = false;
}

/** A short-lived success note in `el`. */
export function showNote(el, text) {
  if (!el) return;
  el.textContent = text;
  el.hidden = !text;
}

export function pad(n) {
  return String(n).padStart(2, '0');
}

/** A timestamp as local time: `14:03:22` today, `2026-12-02 14:03:22` otherwise. */
export function fmtTime(value) {
  if (!value) return '';
  const d = value instanceof Date ? value : new Date(value);
  if (Number.isNaN(d.getTime())) return String(value);
  const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  const now = new Date();
  if (d.toDateString() === now.toDateString()) return time;
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}`;
}

/** "12 s ago", "3 min ago", ... */
export function ago(value) {
  const d = value instanceof Date ? value : new Date(value);
  const secs = Math.round((Date.now() - d.getTime()) / 1000);
  if (Number.isNaN(secs)) return '';
  if (secs < 0) return `in ${fmtDuration(-secs)}`;
  return `${fmtDuration(secs)} ago`;
}

export function fmtDuration(secs) {
  if (secs < 60) return `${secs} s`;
  if (secs < 3600) return `${Math.round(secs / 60)} min`;
  if (secs < 86400) return `${Math.round(secs / 360) / 10} h`;
  return `${Math.round(secs / 8640) / 10} d`;
}

/** JSON text, pretty-printed when it parses. */
export function prettyJson(value) {
  if (typeof value === 'string') {
    try {
      return JSON.stringify(JSON.parse(value), null, 2);
    } catch {
      return value;
    }
  }
  return JSON.stringify(value, null, 2);
}

/** A coloured label. `kind`: ok, fail, pending, muted, warn. */
export function badge(text, kind, test) {
  return h('span', { class: `badge badge-${kind || 'muted'}`, 'data-test': test }, text);
}

/** Comma- or whitespace-separated text as a list. */
export function splitList(text) {
  return String(text || '')
    .split(/[\s,]+/)
    .map((part) => part.trim())
    .filter(Boolean);
}

/**
 * Runs `task` now and then every `ms` after each run finishes (never two at once), until
 * stopped. A run's error goes to `onError` and polling goes on.
 */
export class Poller {
  constructor(ms, task, onError) {
    this.ms = ms;
    this.task = task;
    this.onError = onError || (() => {});
    this.timer = null;
    this.running = false;
    this.again = false;
    this.stopped = true;
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    this.schedule(0);
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.timer = null;
  }

  /** Runs now (or right after the run under way) rather than at the next tick. */
  now() {
    if (this.stopped) return;
    if (this.running) this.again = true;
    else this.schedule(0);
  }

  schedule(delay) {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.run(), delay);
  }

  async run() {
    if (this.running) {
      this.again = true;
      return;
    }
    // A hidden tab asks nothing: it looks again when it is shown.
    if (document.hidden) {
      if (!this.waitingToBeSeen) {
        this.waitingToBeSeen = true;
        document.addEventListener('visibilitychange', () => {
          this.waitingToBeSeen = false;
          this.now();
        }, { once: true });
      }
      return;
    }
    this.running = true;
    const started = performance.now();
    try {
      await this.task();
      this.onError(null);
    } catch (e) {
      if (!(e && e.name === 'AbortError')) this.onError(e);
    } finally {
      this.running = false;
    }
    if (this.stopped) return;
    const soon = this.again;
    this.again = false;
    // A poll that took long (an app with many endpoints asks two things of each) waits four
    // times as long before the next, up to 30 s, so one open page keeps its load on the
    // server below a fifth of what it could ask.
    const took = performance.now() - started;
    this.schedule(soon ? 0 : Math.max(this.ms, Math.min(4 * took, 30_000)));
  }
}

/** Copies text to the clipboard, saying so on the button. */
export async function copyText(button, text) {
  const label = button.textContent;
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = 'Copied';
  } catch {
    button.textContent = 'Copy failed: select it by hand';
  }
  setTimeout(() => {
    button.textContent = label;
  }, 1500);
}
