// The message log: messages searchable by event type, channel and time window, refreshed
// every ~2 s, each with its attempts; a message's payload, deliveries and attempts (request and
// response) with a Resend button per endpoint. Shared by the console and the app portal.

import { h, fill, showError, showNote, badge, fmtTime, ago, prettyJson, splitList, Poller } from './ui.js';
import { attemptOk } from './endpoints.js';

const WINDOWS = [
  ['', 'any time'],
  ['300', 'last 5 minutes'],
  ['3600', 'last hour'],
  ['86400', 'last 24 hours'],
  ['604800', 'last 7 days'],
  ['custom', 'between…'],
];

const TRIGGERS = ['scheduled', 'manual'];

function statusKind(statusText) {
  return { success: 'ok', fail: 'fail', pending: 'warn', sending: 'warn' }[statusText] || 'muted';
}

export class MessagesView {
  /**
   * @param {object} o
   * @param {import('./api.js').Api} o.api
   * @param {string} o.appId
   * @param {HTMLElement} o.root
   * @param {number} [o.pollMs]
   * @param {boolean} [o.readOnly] no Resend buttons
   */
  constructor({ api, appId, root, pollMs = 2000, readOnly = false }) {
    this.api = api;
    this.appId = appId;
    this.root = root;
    this.readOnly = readOnly;
    this.selected = null; // message id shown in the detail panel
    this.openAttempts = new Set();
    this.limit = 50;
    this.poller = new Poller(pollMs, () => this.refresh(), (e) => showError(this.error, e && `The message log could not be read: ${e.message}`));
    this.detailPoller = new Poller(pollMs, () => this.refreshDetail(), (e) => showError(this.detailError, e && `This message could not be read: ${e.message}`));
    this.build();
  }

  build() {
    this.types = h('datalist', { id: `event-types-${Math.random().toString(36).slice(2)}` });
    const form = h(
      'form',
      { class: 'filters', 'data-test': 'message-filter', onsubmit: (e) => { e.preventDefault(); this.poller.now(); } },
      h('label', null, 'Event type', h('input', { name: 'eventTypes', list: this.types.id, placeholder: 'any (or a,b)', 'data-test': 'filter-event-type', autocomplete: 'off' })),
      h('label', null, 'Channel', h('input', { name: 'channel', placeholder: 'any', 'data-test': 'filter-channel', autocomplete: 'off' })),
      h('label', null, 'When',
        h('select', { name: 'window', 'data-test': 'filter-window', onchange: () => this.windowChanged() },
          WINDOWS.map(([value, label]) => h('option', { value }, label)))),
      h('label', { class: 'custom-window', hidden: true }, 'After', h('input', { name: 'after', type: 'datetime-local', step: 1, 'data-test': 'filter-after' })),
      h('label', { class: 'custom-window', hidden: true }, 'Before', h('input', { name: 'before', type: 'datetime-local', step: 1, 'data-test': 'filter-before' })),
      h('div', { class: 'actions' },
        h('button', { type: 'submit', class: 'primary', 'data-test': 'filter-apply' }, 'Search'),
        h('button', { type: 'button', 'data-test': 'filter-clear', onclick: () => { this.form.reset(); this.windowChanged(); this.poller.now(); } }, 'Clear')),
      this.types,
    );
    this.form = form;
    this.error = h('p', { class: 'error', role: 'alert', 'data-test': 'messages-error', hidden: true });
    this.updated = h('p', { class: 'muted small', 'data-test': 'messages-updated' }, 'Loading…');
    this.body = h('tbody', { 'data-test': 'message-rows' });
    this.more = h('button', { type: 'button', class: 'small', hidden: true, 'data-test': 'messages-more', onclick: () => { this.limit = Math.min(250, this.limit + 50); this.poller.now(); } }, 'Show more');
    this.table = h('table', { class: 'table messages', 'data-test': 'message-log' },
      h('thead', null, h('tr', null, ['Time', 'Event type', 'Channels', 'Attempts', 'Message'].map((t) => h('th', null, t)))),
      this.body);
    this.detail = h('aside', { class: 'card detail', 'data-test': 'message-detail', hidden: true });
    this.detailError = h('p', { class: 'error', role: 'alert', 'data-test': 'message-detail-error', hidden: true });
    fill(this.root, form, this.error, h('div', { class: 'split' }, h('div', { class: 'split-main' }, this.updated, this.table, this.more), this.detail));
  }

  windowChanged() {
    const custom = this.form.window.value === 'custom';
    for (const el of this.form.querySelectorAll('.custom-window')) el.hidden = !custom;
  }

  query() {
    const f = this.form;
    const query = { limit: this.limit, with_content: 'false' };
    const types = splitList(f.eventTypes.value);
    if (types.length) query.event_types = types;
    if (f.channel.value.trim()) query.channel = f.channel.value.trim();
    const window = f.window.value;
    if (window === 'custom') {
      if (f.after.value) query.after = new Date(f.after.value).toISOString();
      if (f.before.value) query.before = new Date(f.before.value).toISOString();
    } else if (window) {
      query.after = new Date(Date.now() - Number(window) * 1000).toISOString();
    }
    // `after` alone reads from that time on (Svix's paging); the log shows the newest of the
    // window, so it is closed a day ahead (past any clock difference with the server).
    if (query.after && !query.before) query.before = new Date(Date.now() + 86_400_000).toISOString();
    return query;
  }

  start() {
    this.loadEventTypes();
    this.poller.start();
    if (this.selected) this.detailPoller.start();
  }

  stop() {
    this.poller.stop();
    this.detailPoller.stop();
  }

  async loadEventTypes() {
    try {
      const page = await this.api.listEventTypes();
      fill(this.types, (page.data || []).map((t) => h('option', { value: t.name })));
    } catch {
      // The datalist is a convenience; the filter works without it.
    }
  }

  /** Attempts of recent messages, by message id, from each endpoint's attempt log. */
  async recentAttempts() {
    const endpoints = (await this.api.listEndpoints(this.appId)).data || [];
    this.endpoints = new Map(endpoints.map((ep) => [ep.id, ep]));
    const pages = await Promise.all(endpoints.map((ep) => this.api.endpointAttempts(this.appId, ep.id, 100).catch(() => ({ data: [] }))));
    const byMessage = new Map();
    for (const page of pages) {
      for (const attempt of page.data || []) {
        if (!byMessage.has(attempt.msgId)) byMessage.set(attempt.msgId, []);
        byMessage.get(attempt.msgId).push(attempt);
      }
    }
    return byMessage;
  }

  async refresh() {
    const [page, attempts] = await Promise.all([this.api.listMessages(this.appId, this.query()), this.recentAttempts()]);
    const messages = page.data || [];
    this.more.hidden = page.done || this.limit >= 250;
    this.updated.textContent = `${messages.length} message${messages.length === 1 ? '' : 's'} · updated ${fmtTime(new Date())}, refreshed every 2 s`;
    if (!messages.length) {
      fill(this.body, h('tr', null, h('td', { colspan: 5, class: 'muted', 'data-test': 'messages-empty' }, 'No messages match.')));
      return;
    }
    fill(this.body, messages.map((msg) => this.row(msg, attempts.get(msg.id) || [])));
  }

  row(msg, attempts) {
    // Newest attempt per endpoint, with how many attempts that endpoint had.
    const perEndpoint = new Map();
    for (const a of attempts) {
      const seen = perEndpoint.get(a.endpointId);
      if (!seen) perEndpoint.set(a.endpointId, { latest: a, count: 1 });
      else {
        seen.count += 1;
        if (a.timestamp > seen.latest.timestamp) seen.latest = a;
      }
    }
    const cells = [...perEndpoint.values()].map(({ latest, count }) => {
      const ep = this.endpoints && this.endpoints.get(latest.endpointId);
      const code = latest.responseStatusCode > 0 ? latest.responseStatusCode : 'no response';
      const label = `${attemptOk(latest) ? '✓' : '✗'} ${code}${count > 1 ? ` ×${count}` : ''}`;
      const el = badge(label, attemptOk(latest) ? 'ok' : 'fail', 'message-attempt');
      el.title = `${ep ? ep.url : latest.endpointId}: ${count} attempt${count > 1 ? 's' : ''}, the latest ${latest.statusText} at ${fmtTime(latest.timestamp)}`;
      el.dataset.status = latest.statusText;
      return el;
    });
    return h(
      'tr',
      {
        class: ['clickable', msg.id === this.selected && 'selected'],
        'data-test': 'message-row',
        'data-msg-id': msg.id,
        'data-event-type': msg.eventType,
        tabindex: 0,
        onclick: () => this.open(msg.id),
        onkeydown: (e) => { if (e.key === 'Enter') this.open(msg.id); },
      },
      h('td', { title: msg.timestamp }, fmtTime(msg.timestamp)),
      h('td', null, h('code', null, msg.eventType)),
      h('td', null, (msg.channels || []).join(', ') || h('span', { class: 'muted' }, '–')),
      h('td', { 'data-test': 'message-attempts' }, cells.length ? cells : h('span', { class: 'muted' }, 'none yet')),
      h('td', null, h('code', { class: 'small' }, msg.id)),
    );
  }

  open(msgId) {
    this.selected = msgId;
    this.openAttempts.clear();
    for (const row of this.body.querySelectorAll('tr')) row.classList.toggle('selected', row.dataset.msgId === msgId);
    this.detail.hidden = false;
    fill(this.detail, h('p', { class: 'muted' }, 'Loading…'));
    this.detailPoller.stop();
    this.detailPoller.start();
  }

  close() {
    this.selected = null;
    this.detailPoller.stop();
    this.detail.hidden = true;
    for (const row of this.body.querySelectorAll('tr.selected')) row.classList.remove('selected');
  }

  async refreshDetail() {
    const msgId = this.selected;
    if (!msgId) return;
    const [msg, destinations, attempts] = await Promise.all([
      this.api.getMessage(this.appId, msgId),
      this.api.messageDestinations(this.appId, msgId),
      this.api.messageAttempts(this.appId, msgId),
    ]);
    if (msgId !== this.selected) return;
    this.renderDetail(msg, destinations.data || [], attempts.data || []);
  }

  renderDetail(msg, destinations, attempts) {
    const note = this.resendNote || h('p', { class: 'note', 'data-test': 'resend-note', hidden: true });
    this.resendNote = note;
    const payloadText = prettyJson(msg.payload);
    fill(
      this.detail,
      h('header', { class: 'card-head' },
        h('h3', null, h('code', null, msg.eventType)),
        h('span', { class: 'spacer' }),
        h('button', { type: 'button', class: 'small', 'data-test': 'message-detail-close', onclick: () => this.close() }, 'Close')),
      h('dl', { class: 'facts' },
        h('dt', null, 'Message'), h('dd', null, h('code', { 'data-test': 'message-detail-id' }, msg.id)),
        h('dt', null, 'Created'), h('dd', null, `${fmtTime(msg.timestamp)} (${ago(msg.timestamp)})`),
        msg.eventId ? [h('dt', null, 'Event id'), h('dd', null, h('code', null, msg.eventId))] : null,
        h('dt', null, 'Channels'), h('dd', null, (msg.channels || []).join(', ') || '–'),
        msg.tags && msg.tags.length ? [h('dt', null, 'Tags'), h('dd', null, msg.tags.join(', '))] : null),
      h('h4', null, 'Payload'),
      h('pre', { class: 'code', 'data-test': 'message-payload' }, payloadText),
      this.detailError,
      h('h4', null, 'Deliveries'),
      destinations.length
        ? h('ul', { class: 'plain' }, destinations.map((d) => this.destination(msg, d)))
        : h('p', { class: 'muted' }, 'No endpoint matched this message.'),
      note,
      h('h4', null, `Attempts (${attempts.length})`),
      attempts.length
        ? h('div', { class: 'attempts' }, attempts.map((a) => this.attempt(msg, a, payloadText)))
        : h('p', { class: 'muted' }, 'No attempts yet.'),
    );
  }

  destination(msg, d) {
    return h(
      'li',
      { class: 'destination', 'data-test': 'message-destination', 'data-endpoint-id': d.id, 'data-status': d.statusText },
      badge(d.statusText, statusKind(d.statusText)),
      ' ',
      h('span', { class: 'url' }, d.url),
      d.nextAttempt ? h('span', { class: 'muted small' }, ` · next attempt ${fmtTime(d.nextAttempt)} (${ago(d.nextAttempt)})`) : null,
      d.disabled ? h('span', { class: 'muted small' }, ' · endpoint disabled') : null,
      this.readOnly
        ? null
        : h('button', { type: 'button', class: 'small', 'data-test': 'resend', 'data-endpoint-id': d.id, onclick: (e) => this.resend(msg, d, e.currentTarget) }, 'Resend'),
    );
  }

  attempt(msg, a, payloadText) {
    const ep = this.endpoints && this.endpoints.get(a.endpointId);
    const trigger = TRIGGERS[a.triggerType] || String(a.triggerType);
    const details = h(
      'details',
      {
        class: ['attempt', attemptOk(a) ? 'attempt-ok' : 'attempt-fail'],
        'data-test': 'attempt-row',
        'data-attempt-id': a.id,
        'data-endpoint-id': a.endpointId,
        'data-status': a.statusText,
        'data-code': a.responseStatusCode,
        'data-trigger': trigger,
        open: this.openAttempts.has(a.id),
        ontoggle: (e) => {
          if (e.currentTarget.open) this.openAttempts.add(a.id);
          else this.openAttempts.delete(a.id);
        },
      },
      h('summary', null,
        badge(a.responseStatusCode > 0 ? String(a.responseStatusCode) : 'no response', attemptOk(a) ? 'ok' : 'fail', 'attempt-code'),
        ` ${fmtTime(a.timestamp)} · ${a.responseDurationMs} ms · ${trigger} · `,
        h('span', { class: 'url' }, a.url || (ep && ep.url) || a.endpointId)),
      h('div', { class: 'attempt-body' },
        h('h5', null, 'Request'),
        h('p', { class: 'small' }, h('code', null, `POST ${a.url}`), h('span', { class: 'muted' }, ' · body: the message payload (webhook-id, webhook-timestamp and webhook-signature headers added)')),
        h('pre', { class: 'code', 'data-test': 'attempt-request' }, payloadText),
        h('h5', null, `Response: ${a.responseStatusCode > 0 ? `HTTP ${a.responseStatusCode}` : 'none'} in ${a.responseDurationMs} ms`),
        h('pre', { class: 'code', 'data-test': 'attempt-response' }, a.response ? prettyJson(a.response) : '(empty)')),
    );
    return details;
  }

  async resend(msg, destination, button) {
    button.disabled = true;
    showError(this.detailError, null);
    try {
      await this.api.resend(this.appId, msg.id, destination.id);
      showNote(this.resendNote, `Resend to ${destination.url} queued at ${fmtTime(new Date())}.`);
      this.detailPoller.now();
      this.poller.now();
    } catch (e) {
      showError(this.detailError, `The resend to ${destination.url} was refused: ${e.message}`);
    } finally {
      button.disabled = false;
    }
  }
}
