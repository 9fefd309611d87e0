// An app's endpoints with their health, an add form, disable/enable and a per-endpoint plot of
// deliveries and failures over time. Shared by the console and the app portal.

import { h, fill, showError, showNote, badge, fmtTime, ago, splitList, Poller, copyText } from './ui.js';
import { bucketize, percentiles, barChart, chartBlock } from './charts.js';

const ATTEMPTS_SEEN = 100;

/** An attempt's outcome, as the attempt log records it (status 0 is a success). */
export function attemptOk(attempt) {
  return attempt.status === 0;
}

/** "HTTP 500: <response>" or the transport error text for an attempt without a status. */
export function attemptSummary(attempt) {
  const response = (attempt.response || '').trim();
  const head = attempt.responseStatusCode > 0 ? `HTTP ${attempt.responseStatusCode}` : 'no response';
  const text = response.length > 200 ? `${response.slice(0, 200)}…` : response;
  return text ? `${head}: ${text}` : head;
}

export class EndpointsView {
  /**
   * @param {object} o
   * @param {import('./api.js').Api} o.api
   * @param {string} o.appId
   * @param {HTMLElement} o.root
   * @param {boolean} [o.readOnly] no add form, no disable/enable
   * @param {number} [o.pollMs]
   */
  constructor({ api, appId, root, readOnly = false, pollMs = 3000 }) {
    this.api = api;
    this.appId = appId;
    this.root = root;
    this.readOnly = readOnly;
    this.secrets = new Map(); // endpoint id -> secret, once shown
    this.actionErrors = new Map(); // endpoint id -> the last action's error, until the next one
    this.eventTypes = [];
    this.poller = new Poller(pollMs, () => this.refresh(), (e) => showError(this.error, e));
    this.build();
  }

  build() {
    this.error = h('p', { class: 'error', 'data-test': 'endpoints-error', role: 'alert', hidden: true });
    this.list = h('div', { class: 'cards', 'data-test': 'endpoint-list' }, h('p', { class: 'muted' }, 'Loading endpoints…'));
    this.form = this.readOnly ? null : this.buildForm();
    fill(this.root, this.form, this.error, h('h3', { class: 'section-title' }, 'Endpoints'), this.list);
  }

  buildForm() {
    this.typeBoxes = h('div', { class: 'checks', 'data-test': 'endpoint-event-type-choices' }, h('span', { class: 'muted' }, 'Loading event types…'));
    this.formError = h('p', { class: 'error wide', 'data-test': 'endpoint-form-error', role: 'alert', hidden: true });
    this.formNote = h('p', { class: 'note wide', 'data-test': 'endpoint-form-note', hidden: true });
    const form = h(
      'form',
      { class: 'card form form-grid', 'data-test': 'endpoint-form', onsubmit: (e) => this.submit(e) },
      h('h3', { class: 'wide' }, 'Add an endpoint'),
      h('label', null, 'URL', h('input', { name: 'url', type: 'url', required: true, placeholder: 'https://example.com/webhooks', 'data-test': 'endpoint-url', autocomplete: 'off' })),
      h('label', null, 'Description', h('input', { name: 'description', 'data-test': 'endpoint-description', autocomplete: 'off' })),
      h('fieldset', { class: 'wide' }, h('legend', null, 'Event types (none checked: every type)'), this.typeBoxes,
        h('label', null, 'Other event types (comma-separated)', h('input', { name: 'otherTypes', 'data-test': 'endpoint-event-types', autocomplete: 'off' }))),
      h('label', null, 'Channels (comma-separated; empty: every channel)', h('input', { name: 'channels', 'data-test': 'endpoint-channels', autocomplete: 'off' })),
      h('div', { class: 'actions align-end' }, h('button', { type: 'submit', class: 'primary', 'data-test': 'endpoint-add' }, 'Add endpoint')),
      this.formError,
      this.formNote,
    );
    return form;
  }

  async loadEventTypes() {
    try {
      const page = await this.api.listEventTypes();
      this.eventTypes = (page.data || []).filter((t) => !t.archived);
    } catch (e) {
      this.eventTypes = [];
      if (this.typeBoxes) fill(this.typeBoxes, h('span', { class: 'error' }, `Event types could not be read: ${e.message}`));
      return;
    }
    if (!this.typeBoxes) return;
    if (!this.eventTypes.length) {
      fill(this.typeBoxes, h('span', { class: 'muted' }, 'No event types in the catalogue yet: name them below.'));
      return;
    }
    fill(
      this.typeBoxes,
      this.eventTypes.map((t) =>
        h('label', { class: 'check', title: t.description || '' },
          h('input', { type: 'checkbox', name: 'eventType', value: t.name, 'data-test': 'endpoint-event-type' }),
          t.name),
      ),
    );
  }

  async submit(event) {
    event.preventDefault();
    const form = event.currentTarget;
    showError(this.formError, null);
    showNote(this.formNote, '');
    const checked = [...form.querySelectorAll('input[name=eventType]:checked')].map((box) => box.value);
    const eventTypes = [...new Set([...checked, ...splitList(form.otherTypes.value)])];
    const channels = splitList(form.channels.value);
    const body = { url: form.url.value.trim() };
    if (form.description.value.trim()) body.description = form.description.value.trim();
    if (eventTypes.length) body.eventTypes = eventTypes;
    if (channels.length) body.channels = channels;
    const button = form.querySelector('button[type=submit]');
    button.disabled = true;
    try {
      const created = await this.api.createEndpoint(this.appId, body);
      form.reset();
      showNote(this.formNote, `Added ${created.url} (${created.id}).`);
      this.poller.now();
    } catch (e) {
      showError(this.formError, e);
    } finally {
      button.disabled = false;
    }
  }

  start() {
    this.loadEventTypes();
    this.poller.start();
  }

  stop() {
    this.poller.stop();
  }

  async refresh() {
    const page = await this.api.listEndpoints(this.appId);
    const endpoints = page.data || [];
    const details = await Promise.all(
      endpoints.map(async (ep) => {
        const [stats, attempts] = await Promise.all([
          this.api.endpointStats(this.appId, ep.id).catch((e) => ({ error: e })),
          this.api.endpointAttempts(this.appId, ep.id, ATTEMPTS_SEEN).catch((e) => ({ error: e })),
        ]);
        return { ep, stats, attempts };
      }),
    );
    if (!endpoints.length) {
      fill(this.list, h('p', { class: 'muted', 'data-test': 'endpoints-empty' }, this.readOnly ? 'No endpoints yet.' : 'No endpoints yet: add one above.'));
      return;
    }
    fill(this.list, details.map((d) => this.card(d)));
  }

  card({ ep, stats, attempts }) {
    const items = attempts.error ? [] : attempts.data || [];
    const failed = items.filter((a) => !attemptOk(a));
    const lastError = failed[0];
    const rate = items.length ? Math.round((100 * (items.length - failed.length)) / items.length) : null;
    const filters = [
      ep.eventTypes && ep.eventTypes.length ? `event types: ${ep.eventTypes.join(', ')}` : 'every event type',
      ep.channels && ep.channels.length ? `channels: ${ep.channels.join(', ')}` : 'every channel',
    ];
    let reason = null;
    if (ep.disabled) {
      const last = items[0];
      reason = last && last.responseStatusCode === 410
        ? `Disabled: its last attempt (${fmtTime(last.timestamp)}) answered 410 Gone, which disables an endpoint at once.`
        : 'Disabled: it receives nothing until enabled (Herald does not record why; it disables an endpoint by itself after 410 Gone or 5 days of failures).';
    }
    const toggle = this.readOnly
      ? null
      : h('button', {
          type: 'button',
          'data-test': 'toggle-endpoint',
          class: ep.disabled ? 'primary' : '',
          onclick: (e) => this.toggle(ep, e.currentTarget),
        }, ep.disabled ? 'Enable' : 'Disable');
    const secret = this.secrets.get(ep.id);
    const secretView = h('span', { class: 'secret' },
      h('code', { 'data-test': 'endpoint-secret' }, secret || '••••••••••••'),
      secret
        ? h('button', { type: 'button', class: 'small', onclick: (e) => copyText(e.currentTarget, secret) }, 'Copy')
        : h('button', { type: 'button', class: 'small', 'data-test': 'endpoint-secret-show', onclick: () => this.showSecret(ep) }, 'Show'));
    const actionError = h('p', { class: 'error', role: 'alert', 'data-test': 'endpoint-action-error', hidden: !this.actionErrors.has(ep.id) },
      this.actionErrors.get(ep.id) || '');
    return h(
      'article',
      { class: ['card', 'endpoint', ep.disabled && 'is-disabled'], 'data-test': 'endpoint-card', 'data-endpoint-id': ep.id, 'data-url': ep.url, 'data-disabled': String(ep.disabled) },
      h('header', { class: 'card-head' },
        h('h4', { class: 'url', 'data-test': 'endpoint-url-text' }, ep.url),
        ep.disabled ? badge('disabled', 'fail', 'endpoint-state') : badge('enabled', 'ok', 'endpoint-state'),
        h('span', { class: 'spacer' }),
        toggle),
      reason ? h('p', { class: 'warn', 'data-test': 'endpoint-disabled-reason' }, reason) : null,
      h('p', { class: 'muted small' }, [ep.description, ep.id, ...filters].filter(Boolean).join(' · ')),
      h('p', { class: 'small' }, 'Signing secret: ', secretView),
      this.health(stats, items, failed, rate),
      lastError
        ? h('p', { class: 'last-error', 'data-test': 'health-last-error' },
            h('strong', null, 'Last error '), `${fmtTime(lastError.timestamp)} (${ago(lastError.timestamp)}): ${attemptSummary(lastError)}`)
        : h('p', { class: 'muted small', 'data-test': 'health-last-error' }, items.length ? 'No failed attempts among the recent ones.' : 'No attempts yet.'),
      this.plots(items),
      attempts.error ? h('p', { class: 'error' }, `Attempts could not be read: ${attempts.error.message}`) : null,
      actionError,
    );
  }

  health(stats, items, failed, rate) {
    const metric = (label, value, test, kind) =>
      h('div', { class: ['metric', kind && `metric-${kind}`] }, h('span', { class: 'metric-value', 'data-test': test }, value), h('span', { class: 'metric-label' }, label));
    if (stats.error) {
      return h('div', { class: 'health', 'data-test': 'endpoint-health' }, h('p', { class: 'error' }, `Stats could not be read: ${stats.error.message}`));
    }
    const rateKind = rate === null ? null : rate >= 95 ? 'ok' : rate >= 50 ? 'warn' : 'fail';
    return h(
      'div',
      { class: 'health', 'data-test': 'endpoint-health' },
      metric(`success rate (last ${items.length} attempts)`, rate === null ? '–' : `${rate} %`, 'health-success-rate', rateKind),
      metric('delivered', stats.success, 'health-delivered', 'ok'),
      metric('failed (retries exhausted)', stats.fail, 'health-failed', stats.fail ? 'fail' : null),
      metric('pending', stats.pending + stats.sending, 'health-pending', stats.pending + stats.sending ? 'warn' : null),
      metric('failed attempts (recent)', failed.length, 'health-failed-attempts', failed.length ? 'fail' : null),
    );
  }

  plots(items) {
    if (!items.length) return null;
    const buckets = bucketize(items, (a) => Date.parse(a.timestamp), (a) => (attemptOk(a) ? 'ok' : 'fail'), { count: 24, to: Date.now() });
    const chart = barChart({
      buckets,
      keys: [
        { key: 'ok', label: 'delivered', cls: 'series-ok' },
        { key: 'fail', label: 'failed', cls: 'series-fail' },
      ],
      test: 'endpoint-chart',
      title: 'attempts over time',
    });
    const durations = items.map((a) => a.responseDurationMs).filter((ms) => Number.isFinite(ms) && ms >= 0);
    const p = percentiles(durations);
    const latency = durations.length
      ? h('p', { class: 'latency', 'data-test': 'endpoint-latency' },
          h('strong', null, 'Latency '), `p50 ${p[50]} ms · p90 ${p[90]} ms · p99 ${p[99]} ms`, h('span', { class: 'muted' }, ` (last ${durations.length} attempts)`))
      : null;
    return h('div', { class: 'plots' }, chartBlock(chart, 'Attempts over time'), latency);
  }

  async toggle(ep, button) {
    const card = button.closest('[data-test=endpoint-card]');
    const errorEl = card && card.querySelector('[data-test=endpoint-action-error]');
    button.disabled = true;
    this.actionErrors.delete(ep.id);
    try {
      await this.api.patchEndpoint(this.appId, ep.id, { disabled: !ep.disabled });
    } catch (e) {
      const text = `Could not ${ep.disabled ? 'enable' : 'disable'} ${ep.url}: ${e.message}`;
      this.actionErrors.set(ep.id, text);
      showError(errorEl, text);
      button.disabled = false;
      return;
    }
    this.poller.now();
  }

  async showSecret(ep) {
    try {
      const { key } = await this.api.endpointSecret(this.appId, ep.id);
      this.secrets.set(ep.id, key);
      this.poller.now();
    } catch (e) {
      showError(this.error, `The secret of ${ep.url} could not be read: ${e.message}`);
    }
  }
}
