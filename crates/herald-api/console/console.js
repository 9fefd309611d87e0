// Herald's operator console: sign in with an API token, pick an app, and look after its
// endpoints, messages, ingest sources, live channels, live tail and test events.

import { Api, parseTransportConnections } from './api.js';
import { h, fill, showError, showNote, badge, fmtTime, ago, prettyJson, splitList, Poller, copyText } from './ui.js';
import { lineChart, chartBlock } from './charts.js';
import { EndpointsView } from './endpoints.js';
import { MessagesView } from './messages.js';
import { PusherSocket } from './pusher.js';

const TOKEN_KEY = 'herald.console.token';
const APP_KEY = 'herald.console.app';
const TAB_KEY = 'herald.console.tab';
const TABS = ['apps', 'endpoints', 'messages', 'sources', 'channels', 'tail', 'debug'];

const $ = (id) => document.getElementById(id);

const state = {
  api: null,
  apps: [],
  appId: null,
  app: null, // the selected app, as GET /api/v1/app/{app} answers
  tab: 'apps',
  endpoints: null,
  messages: null,
  secretShown: false,
  loggingOut: false,
};

// ---------------------------------------------------------------------------------------------
// Signing in and out

function unauthorized(error) {
  if (!state.api || state.loggingOut) return;
  logout(`That token was refused: ${error.message}`);
}

async function signIn(token) {
  const api = new Api(token, () => {});
  let page;
  try {
    page = await api.listApps();
  } catch (e) {
    if (e.status === 401) throw new Error(`That token was refused (${e.message}).`);
    throw e;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  api.onUnauthorized = unauthorized;
  state.api = api;
  state.loggingOut = false;
  state.apps = page.data || [];
  $('login').hidden = true;
  $('workspace').hidden = false;
  $('session').hidden = false;
  metrics.start();
  renderApps();
  const remembered = sessionStorage.getItem(APP_KEY);
  const first = state.apps.find((a) => a.id === remembered) || state.apps[0];
  if (first) await selectApp(first.id);
  else renderNoApp();
  showTab(sessionStorage.getItem(TAB_KEY) || (first ? 'endpoints' : 'apps'));
}

function logout(message) {
  state.loggingOut = true;
  stopAppViews();
  metrics.stop();
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(APP_KEY);
  sessionStorage.removeItem(TAB_KEY);
  state.api = null;
  state.apps = [];
  state.appId = null;
  state.app = null;
  $('workspace').hidden = true;
  $('session').hidden = true;
  $('login').hidden = false;
  $('login-form').reset();
  showError($('login-error'), message || null);
  $('login-token').focus();
}

$('login-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const button = event.currentTarget.querySelector('button[type=submit]');
  const token = $('login-token').value.trim();
  showError($('login-error'), null);
  button.disabled = true;
  try {
    await signIn(token);
  } catch (e) {
    showError($('login-error'), e);
  } finally {
    button.disabled = false;
  }
});

$('logout').addEventListener('click', () => logout());

// ---------------------------------------------------------------------------------------------
// Tabs

for (const button of document.querySelectorAll('[data-tab]')) {
  button.addEventListener('click', () => showTab(button.dataset.tab));
}

function showTab(tab) {
  if (!TABS.includes(tab)) tab = 'apps';
  state.tab = tab;
  sessionStorage.setItem(TAB_KEY, tab);
  for (const button of document.querySelectorAll('[data-tab]')) {
    const on = button.dataset.tab === tab;
    button.classList.toggle('active', on);
    button.setAttribute('aria-selected', String(on));
  }
  for (const view of document.querySelectorAll('.view')) view.hidden = view.dataset.view !== tab;
  // Only the visible view polls.
  const views = { endpoints: state.endpoints, messages: state.messages };
  for (const [name, view] of Object.entries(views)) {
    if (!view) continue;
    if (name === tab) view.start();
    else view.stop();
  }
  if (tab === 'sources' && state.appId) sources.poller.start();
  else sources.poller.stop();
  if (tab === 'channels' && state.appId) channels.poller.start();
  else channels.poller.stop();
  if (tab === 'debug') debug.show();
}

// ---------------------------------------------------------------------------------------------
// Apps

function renderApps() {
  const picker = $('app-picker');
  fill(picker, state.apps.map((app) => h('option', { value: app.id, selected: app.id === state.appId }, app.uid ? `${app.name} (${app.uid})` : app.name)));
  picker.disabled = !state.apps.length;
  if (!state.apps.length) {
    fill($('app-rows'), h('tr', null, h('td', { colspan: 5, class: 'muted' }, 'No apps yet: create one below.')));
    return;
  }
  fill(
    $('app-rows'),
    state.apps.map((app) =>
      h('tr', { 'data-test': 'app-row', 'data-app-id': app.id, class: app.id === state.appId ? 'selected' : '' },
        h('td', null, app.name),
        h('td', null, h('code', { class: 'small' }, app.id)),
        h('td', null, app.uid || h('span', { class: 'muted' }, '–')),
        h('td', { title: app.createdAt }, fmtTime(app.createdAt)),
        h('td', null, app.id === state.appId
          ? badge('selected', 'ok')
          : h('button', { type: 'button', class: 'small', 'data-test': 'app-select', onclick: () => selectApp(app.id) }, 'Open'))),
    ),
  );
}

async function reloadApps() {
  const page = await state.api.listApps();
  state.apps = page.data || [];
  renderApps();
}

$('app-picker').addEventListener('change', (event) => selectApp(event.currentTarget.value));

$('app-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  showError($('app-form-error'), null);
  const body = { name: form.name.value.trim() };
  if (form.uid.value.trim()) body.uid = form.uid.value.trim();
  try {
    const app = await state.api.createApp(body);
    form.reset();
    await reloadApps();
    await selectApp(app.id);
  } catch (e) {
    showError($('app-form-error'), `The app was not created: ${e.message}`);
  }
});

function renderNoApp() {
  for (const id of ['view-endpoints', 'view-messages']) {
    fill($(id), h('p', { class: 'muted', 'data-test': 'no-app' }, 'No app yet: create one in the Apps tab.'));
  }
  fill($('app-credentials'), h('p', { class: 'muted' }, 'Create an app to see its credentials.'));
}

function stopAppViews() {
  if (state.endpoints) state.endpoints.stop();
  if (state.messages) state.messages.stop();
  state.endpoints = null;
  state.messages = null;
  sources.reset();
  channels.reset();
  tail.stop();
  debug.reset();
}

async function selectApp(appId) {
  showError($('workspace-error'), null);
  let app;
  try {
    app = await state.api.getApp(appId);
  } catch (e) {
    showError($('workspace-error'), `The app ${appId} could not be opened: ${e.message}`);
    return;
  }
  stopAppViews();
  state.appId = app.id;
  state.app = app;
  state.secretShown = false;
  sessionStorage.setItem(APP_KEY, app.id);
  renderApps();
  renderCredentials();
  fill($('view-endpoints'), h('h2', null, `Endpoints of ${app.name}`), h('div', { id: 'endpoints-root' }));
  state.endpoints = new EndpointsView({ api: state.api, appId: app.id, root: $('endpoints-root') });
  fill($('view-messages'), h('h2', null, `Messages of ${app.name}`), h('div', { id: 'messages-root' }));
  state.messages = new MessagesView({ api: state.api, appId: app.id, root: $('messages-root') });
  tail.start();
  showTab(state.tab);
}

function renderCredentials() {
  const app = state.app;
  const pusher = app.pusher || {};
  const secret = state.secretShown ? pusher.secret : '••••••••••••••••';
  const wsUrl = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/app/${pusher.key}`;
  const linkError = h('p', { class: 'error', role: 'alert', 'data-test': 'portal-link-error', hidden: true });
  const linkOut = h('div', { class: 'portal-link', 'data-test': 'portal-link-out' });
  const portalForm = h(
    'form',
    {
      class: 'form',
      'data-test': 'portal-link-form',
      onsubmit: async (event) => {
        event.preventDefault();
        const form = event.currentTarget;
        showError(linkError, null);
        const body = {};
        const expiry = Number(form.expiry.value);
        if (form.expiry.value && Number.isFinite(expiry)) body.expiry = expiry;
        try {
          const access = await state.api.portalAccess(app.id, body);
          fill(linkOut,
            h('a', { href: access.url, target: '_blank', rel: 'noopener', 'data-test': 'portal-link' }, access.url),
            h('button', { type: 'button', class: 'small', onclick: (e) => copyText(e.currentTarget, access.url) }, 'Copy'));
        } catch (e) {
          showError(linkError, `No portal link: ${e.message}`);
        }
      },
    },
    h('label', { class: 'inline' }, 'Valid for (seconds) ', h('input', { name: 'expiry', type: 'number', min: 1, value: 3600, 'data-test': 'portal-expiry' })),
    h('div', { class: 'actions' }, h('button', { type: 'submit', 'data-test': 'portal-link-create' }, 'Make a portal link')),
  );
  fill(
    $('app-credentials'),
    h('h3', null, app.name),
    h('dl', { class: 'facts' },
      h('dt', null, 'Id'), h('dd', null, h('code', { 'data-test': 'app-id' }, app.id)),
      h('dt', null, 'Uid'), h('dd', null, app.uid || '–'),
      h('dt', null, 'Created'), h('dd', null, `${fmtTime(app.createdAt)} (${ago(app.createdAt)})`)),
    h('h4', null, 'Pusher credentials'),
    h('dl', { class: 'facts' },
      h('dt', null, 'App id'), h('dd', null, h('code', { 'data-test': 'pusher-app-id' }, pusher.appId)),
      h('dt', null, 'Key'), h('dd', null, h('code', { 'data-test': 'pusher-key' }, pusher.key)),
      h('dt', null, 'Secret'), h('dd', null,
        h('code', { 'data-test': 'pusher-secret' }, secret),
        ' ',
        h('button', {
          type: 'button',
          class: 'small',
          'data-test': 'show-secret',
          onclick: () => { state.secretShown = !state.secretShown; renderCredentials(); },
        }, state.secretShown ? 'Hide' : 'Show'),
        state.secretShown ? h('button', { type: 'button', class: 'small', onclick: (e) => copyText(e.currentTarget, pusher.secret) }, 'Copy') : null),
      h('dt', null, 'WebSocket'), h('dd', null, h('code', { class: 'small' }, wsUrl))),
    h('h4', null, 'App portal'),
    h('p', { class: 'muted small' }, "A link for this app's own customers: their endpoints and deliveries, nothing else. It expires."),
    portalForm,
    linkOut,
    linkError,
  );
}

// ---------------------------------------------------------------------------------------------
// Sources

const sources = {
  selected: null,
  poller: new Poller(3000, () => sources.refresh(), (e) => showError($('sources-error'), e && `The sources could not be read: ${e.message}`)),

  reset() {
    this.poller.stop();
    this.selected = null;
    $('source-detail').hidden = true;
    fill($('source-rows'));
  },

  async refresh() {
    const page = await state.api.listSources(state.appId);
    const list = page.data || [];
    if (!list.length) {
      fill($('source-rows'), h('tr', null, h('td', { colspan: 4, class: 'muted', 'data-test': 'sources-empty' }, 'No ingest sources (create them with POST /api/v1/app/{app}/ingest/source).')));
    } else {
      fill($('source-rows'), list.map((src) =>
        h('tr', {
          class: ['clickable', src.id === this.selected && 'selected'],
          'data-test': 'source-row',
          'data-source-id': src.id,
          tabindex: 0,
          onclick: () => this.open(src.id),
          onkeydown: (e) => { if (e.key === 'Enter') this.open(src.id); },
        },
          h('td', null, src.name || h('span', { class: 'muted' }, src.id)),
          h('td', null, badge(src.kind, 'muted')),
          h('td', null, h('code', { class: 'small' }, `${location.origin}${src.ingestPath}`)),
          h('td', { class: 'small' }, `${(src.eventType || []).join(', ')}${src.channels && src.channels.length ? ` → ${src.channels.join(', ')}` : ''}`))));
    }
    const current = list.find((src) => src.id === this.selected);
    if (current) await this.renderDetail(current);
    else if (this.selected) {
      this.selected = null;
      $('source-detail').hidden = true;
    }
  },

  open(id) {
    this.selected = id;
    $('source-detail').hidden = false;
    fill($('source-detail'), h('p', { class: 'muted' }, 'Loading…'));
    this.poller.now();
  },

  async renderDetail(src) {
    const [requests, events] = await Promise.all([
      state.api.sourceRequests(state.appId, src.id).catch((e) => ({ error: e })),
      state.api.sourceEvents(state.appId, src.id).catch((e) => ({ error: e })),
    ]);
    if (src.id !== this.selected) return;
    const outcomeKind = (outcome) => ({ accepted: 'ok', duplicate: 'muted', challenge: 'muted', rate_limited: 'warn' })[outcome] || 'fail';
    fill(
      $('source-detail'),
      h('header', { class: 'card-head' }, h('h3', null, src.name || src.id), h('span', { class: 'spacer' }),
        h('button', { type: 'button', class: 'small', onclick: () => { this.selected = null; $('source-detail').hidden = true; } }, 'Close')),
      h('dl', { class: 'facts' },
        h('dt', null, 'Kind'), h('dd', null, src.kind),
        h('dt', null, 'Ingest URL'), h('dd', null, h('code', { class: 'small' }, `${location.origin}${src.ingestPath}`)),
        h('dt', null, 'Event type'), h('dd', null, (src.eventType || []).join(', ')),
        h('dt', null, 'Channels'), h('dd', null, (src.channels || []).join(', ') || src.defaultChannel || '–'),
        h('dt', null, 'Secrets'), h('dd', null, String(src.secretCount)),
        h('dt', null, 'Tolerance'), h('dd', null, `${src.toleranceSecs} s`)),
      h('h4', null, 'Recent requests'),
      requests.error
        ? h('p', { class: 'error', 'data-test': 'source-requests-error' }, `The recent requests could not be read: ${requests.error.message}`)
        : (requests.data || []).length
          ? h('table', { class: 'table' },
              h('thead', null, h('tr', null, ['Received', 'Outcome', 'Status', 'Why'].map((t) => h('th', null, t)))),
              h('tbody', null, requests.data.map((r) =>
                h('tr', { 'data-test': 'source-request-row', 'data-outcome': r.outcome },
                  h('td', { title: r.receivedAt }, fmtTime(r.receivedAt)),
                  h('td', null, badge(r.outcome, outcomeKind(r.outcome))),
                  h('td', null, String(r.status)),
                  h('td', { class: 'small', 'data-test': 'source-request-detail' }, r.detail || '')))))
          : h('p', { class: 'muted' }, 'No requests since this node started.'),
      h('h4', null, 'Recent events'),
      events.error
        ? h('p', { class: 'error' }, `The events could not be read: ${events.error.message}`)
        : (events.data || []).length
          ? h('ul', { class: 'plain small' }, events.data.map((ev) =>
              h('li', { 'data-test': 'source-event' }, `${fmtTime(ev.receivedAt)} `, h('code', null, ev.eventType), ` → ${(ev.channels || []).join(', ') || 'no channel'} · `, h('code', null, ev.msgId))))
          : h('p', { class: 'muted' }, 'No events accepted yet.'),
    );
  },
};

// ---------------------------------------------------------------------------------------------
// Channels

const channels = {
  selected: null,
  poller: new Poller(2000, () => channels.refresh(), (e) => showError($('channels-error'), e && `The channels could not be read: ${e.message}`)),

  reset() {
    this.poller.stop();
    this.selected = null;
    $('channel-detail').hidden = true;
    fill($('channel-rows'));
  },

  async refresh() {
    const page = await state.api.listChannels(state.appId);
    const list = page.data || [];
    const shown = page.done === false ? `The first ${list.length} occupied channels (by name)` : `${list.length} occupied channel${list.length === 1 ? '' : 's'}`;
    $('channels-updated').textContent = `${shown} across the cluster · updated ${fmtTime(new Date())}, refreshed every 2 s.`;
    if (!list.length) {
      fill($('channel-rows'), h('tr', null, h('td', { colspan: 3, class: 'muted', 'data-test': 'channels-empty' }, 'No occupied channels.')));
    } else {
      fill($('channel-rows'), list.map((ch) => {
        const presence = ch.name.startsWith('presence-');
        return h('tr', {
          class: [presence && 'clickable', ch.name === this.selected && 'selected'],
          'data-test': 'channel-row',
          'data-channel': ch.name,
          tabindex: presence ? 0 : null,
          title: presence ? 'Show its members' : 'Members are known for presence channels only',
          onclick: presence ? () => this.open(ch.name) : null,
          onkeydown: presence ? (e) => { if (e.key === 'Enter') this.open(ch.name); } : null,
        },
          h('td', null, h('code', null, ch.name)),
          h('td', { 'data-test': 'channel-subscriptions' }, String(ch.subscriptionCount ?? '–')),
          h('td', { 'data-test': 'channel-users' }, ch.userCount === undefined || ch.userCount === null ? h('span', { class: 'muted' }, '–') : String(ch.userCount)));
      }));
    }
    // Past the first page, a channel not listed may still be occupied.
    if (this.selected) await this.renderMembers(page.done === false || list.some((ch) => ch.name === this.selected));
  },

  open(name) {
    this.selected = name;
    $('channel-detail').hidden = false;
    fill($('channel-detail'), h('p', { class: 'muted' }, 'Loading members…'));
    this.poller.now();
  },

  async renderMembers(occupied) {
    const name = this.selected;
    let members;
    let more = false;
    let error = null;
    try {
      const page = await state.api.channelMembers(state.appId, name);
      members = page.data || [];
      more = page.done === false;
    } catch (e) {
      error = e;
    }
    if (name !== this.selected) return;
    fill(
      $('channel-detail'),
      h('header', { class: 'card-head' }, h('h3', null, h('code', null, name)), h('span', { class: 'spacer' }),
        h('button', { type: 'button', class: 'small', onclick: () => { this.selected = null; $('channel-detail').hidden = true; } }, 'Close')),
      occupied ? null : h('p', { class: 'warn' }, 'This channel is no longer occupied.'),
      error
        ? h('p', { class: 'error', 'data-test': 'members-error' }, `The members could not be read: ${error.message}`)
        : members.length
          ? h('table', { class: 'table', 'data-test': 'member-list' },
              h('thead', null, h('tr', null, h('th', null, 'User id'), h('th', null, 'Info'))),
              h('tbody', null, members.map((m) =>
                h('tr', { 'data-test': 'member-row', 'data-user-id': m.id },
                  h('td', null, h('code', null, m.id)),
                  h('td', null, m.info === null || m.info === undefined ? h('span', { class: 'muted' }, '–') : h('code', { class: 'small' }, JSON.stringify(m.info)))))))
          : h('p', { class: 'muted', 'data-test': 'members-empty' }, 'No members.'),
      more ? h('p', { class: 'muted small', 'data-test': 'members-more' }, `The first ${members.length} members (by id) are shown.`) : null,
      h('p', { class: 'muted small' }, `Members refreshed every 2 s · ${fmtTime(new Date())}`),
    );
  },
};

// ---------------------------------------------------------------------------------------------
// Live tail

const MAX_TAIL_ROWS = 200;

const tail = {
  abort: null,
  paused: false,
  waiting: [],
  filters: {},
  generation: 0,

  status(text, kind) {
    const el = $('tail-status');
    el.textContent = text;
    el.className = `status ${kind ? `status-${kind}` : ''}`;
    el.dataset.state = kind || '';
  },

  start() {
    this.stop();
    const appId = state.appId;
    const generation = ++this.generation;
    const controller = new AbortController();
    this.abort = controller;
    this.paused = false;
    this.waiting = [];
    this.renderPause();
    showError($('tail-error'), null);
    const run = async () => {
      let delay = 1000;
      while (!controller.signal.aborted) {
        this.status('Connecting…', 'connecting');
        try {
          await state.api.tail(appId, this.filters, (name, data) => this.event(name, data), () => {
            delay = 1000;
            showError($('tail-error'), null);
            this.status(this.paused ? this.pausedText() : 'Live: events appear as they are published.', this.paused ? 'paused' : 'live');
          }, controller.signal);
          if (controller.signal.aborted) return;
          this.status('The stream ended; reconnecting…', 'connecting');
        } catch (e) {
          if (controller.signal.aborted || generation !== this.generation) return;
          showError($('tail-error'), `The live tail failed: ${e.message}`);
          if (e.status === 401 || e.status === 403 || e.status === 404) {
            this.status('Not connected.', 'error');
            return;
          }
          this.status(`Disconnected; retrying in ${Math.round(delay / 1000)} s.`, 'error');
        }
        await new Promise((resolve) => setTimeout(resolve, delay));
        delay = Math.min(delay * 2, 30_000);
      }
    };
    run();
  },

  stop() {
    this.generation += 1;
    if (this.abort) this.abort.abort();
    this.abort = null;
    this.status('Not connected.', '');
  },

  pausedText() {
    return `Paused: ${this.waiting.length} event${this.waiting.length === 1 ? '' : 's'} waiting.`;
  },

  event(name, data) {
    const item = { name, data, at: new Date() };
    if (this.paused) {
      this.waiting.push(item);
      this.status(this.pausedText(), 'paused');
      this.renderPause();
      return;
    }
    this.render([item]);
  },

  render(items) {
    const list = $('tail-events');
    for (const { name, data, at } of items) {
      let row;
      if (name === 'publication' && data && typeof data === 'object') {
        const text = data.data === undefined
          ? `(${data.dataOmittedBytes} bytes of data: too large for the live tail; the message log has it)`
          : typeof data.data === 'string' ? data.data : JSON.stringify(data.data);
        row = h('li', {
          class: 'feed-item',
          'data-test': 'tail-event',
          'data-event': data.event,
          'data-source': data.source,
          'data-channels': (data.channels || []).join(','),
          'data-message-id': data.messageId || '',
        },
          h('span', { class: 'feed-time', title: data.timestamp }, fmtTime(data.timestamp || at)),
          badge(data.source, 'muted'),
          h('code', { class: 'feed-event' }, data.event),
          h('span', { class: 'feed-channels' }, (data.channels || []).length ? `on ${data.channels.join(', ')}` : 'no channel'),
          data.messageId ? h('code', { class: 'small muted' }, data.messageId) : null,
          h('pre', { class: 'code compact' }, text.length > 600 ? `${text.slice(0, 600)}…` : text));
      } else if (name === 'lagged') {
        const skipped = data && data.skipped;
        row = h('li', { class: 'feed-item warn', 'data-test': 'tail-lagged' }, `${fmtTime(at)}: ${skipped} events skipped: this page could not keep up.`);
      } else {
        row = h('li', { class: 'feed-item' }, `${fmtTime(at)} ${name}: ${prettyJson(data)}`);
      }
      list.prepend(row);
    }
    while (list.children.length > MAX_TAIL_ROWS) list.lastElementChild.remove();
  },

  togglePause() {
    this.paused = !this.paused;
    if (!this.paused) {
      const items = this.waiting;
      this.waiting = [];
      this.render(items);
      this.status(this.abort ? 'Live: events appear as they are published.' : 'Not connected.', this.abort ? 'live' : '');
    } else {
      this.status(this.pausedText(), 'paused');
    }
    this.renderPause();
  },

  renderPause() {
    const button = $('tail-pause');
    button.textContent = this.paused ? `Resume (${this.waiting.length} waiting)` : 'Pause';
    button.classList.toggle('primary', this.paused);
    button.dataset.paused = String(this.paused);
  },
};

$('tail-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  const eventTypes = splitList(form.eventTypes.value);
  const channelList = splitList(form.channels.value);
  tail.filters = { eventTypes: eventTypes.length ? eventTypes : undefined, channels: channelList.length ? channelList : undefined };
  if (state.appId) tail.start();
});
$('tail-pause').addEventListener('click', () => tail.togglePause());
$('tail-clear').addEventListener('click', () => fill($('tail-events')));

// ---------------------------------------------------------------------------------------------
// Debug: publish a test event and watch it arrive over the Pusher WebSocket

const debug = {
  socket: null,
  sent: [], // {channel, event, msgId, at}

  reset() {
    if (this.socket) this.socket.close();
    this.socket = null;
    this.sent = [];
    fill($('debug-arrivals'));
    $('debug-socket').textContent = 'Not connected.';
    $('debug-subscriptions').textContent = '';
    showError($('debug-error'), null);
    showNote($('debug-note'), '');
  },

  ensureSocket() {
    if (this.socket) return this.socket;
    const key = state.app && state.app.pusher && state.app.pusher.key;
    if (!key) throw new Error('this app has no Pusher key');
    const socket = new PusherSocket(key, {
      onState: (what, detail) => {
        // A socket closed by `reset` says so after its successor is open: only the current
        // socket speaks for the page.
        if (this.socket !== socket) return;
        const el = $('debug-socket');
        el.dataset.state = what;
        el.className = `status status-${what === 'connected' ? 'live' : what === 'connecting' ? 'connecting' : 'error'}`;
        el.textContent = what === 'connected' ? `Connected, socket id ${detail}.` : `${what[0].toUpperCase()}${what.slice(1)}${detail ? `: ${detail}` : ''}.`;
        if (what === 'closed') this.socket = null;
      },
      onEvent: (event) => this.arrived(event),
    });
    this.socket = socket;
    return this.socket;
  },

  async show() {
    if (!state.app) return;
    try {
      await this.ensureSocket().connect();
    } catch (e) {
      showError($('debug-error'), `The WebSocket did not connect: ${e.message}`);
    }
  },

  arrived({ channel, event, data }) {
    const now = performance.now();
    const match = this.sent.find((s) => s.channel === channel && s.event === event && !s.arrived);
    let latency = null;
    if (match) {
      match.arrived = true;
      latency = Math.round(now - match.at);
      match.latency = latency;
      showNote($('debug-note'), `${match.msgId || 'The event'} arrived on ${channel} over the WebSocket ${latency} ms after it was sent.`);
    }
    const text = typeof data === 'string' ? data : JSON.stringify(data);
    $('debug-arrivals').prepend(
      h('li', { class: 'feed-item', 'data-test': 'debug-arrival', 'data-event': event, 'data-channel': channel },
        h('span', { class: 'feed-time' }, fmtTime(new Date())),
        h('code', { class: 'feed-event' }, event),
        h('span', { class: 'feed-channels' }, `on ${channel}`),
        latency !== null ? badge(`${latency} ms`, 'ok', 'debug-latency') : null,
        h('pre', { class: 'code compact' }, text)),
    );
    while ($('debug-arrivals').children.length > 100) $('debug-arrivals').lastElementChild.remove();
  },
};

$('debug-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  const button = form.querySelector('button[type=submit]');
  showError($('debug-error'), null);
  showNote($('debug-note'), '');
  const channel = form.channel.value.trim();
  const eventName = form.event.value.trim();
  let payload;
  try {
    payload = JSON.parse(form.data.value);
  } catch (e) {
    showError($('debug-error'), `The data is not JSON: ${e.message}`);
    return;
  }
  if (!payload || typeof payload !== 'object' || Array.isArray(payload)) {
    showError($('debug-error'), 'The data must be a JSON object (a message payload is an object).');
    return;
  }
  button.disabled = true;
  const sent = { channel, event: eventName, at: 0, msgId: null, arrived: false };
  try {
    try {
      await debug.ensureSocket().subscribe(channel);
      $('debug-subscriptions').textContent = `Subscribed to ${debug.socket.channels().join(', ')}.`;
    } catch (e) {
      showError($('debug-error'), `Not subscribed to ${channel}, so the event cannot be watched arriving: ${e.message}`);
    }
    sent.at = performance.now();
    debug.sent.push(sent);
    if (debug.sent.length > 50) debug.sent.shift();
    const msg = await state.api.createMessage(state.appId, { eventType: eventName, payload, channels: [channel] });
    sent.msgId = msg.id;
    showNote($('debug-note'), sent.arrived
      ? `Published ${msg.id}; it arrived on ${channel} over the WebSocket ${sent.latency} ms after it was sent (before the API had answered).`
      : `Published ${msg.id} at ${fmtTime(msg.timestamp)}; waiting for it on the WebSocket…`);
  } catch (e) {
    debug.sent = debug.sent.filter((s) => s !== sent);
    showError($('debug-error'), `Not published: ${e.message}`);
  } finally {
    button.disabled = false;
  }
});

// ---------------------------------------------------------------------------------------------
// Connections over time, from /metrics (an environment-wide token only)

const SAMPLES = 120;

const metrics = {
  samples: [], // {t, values: {transport: n}}
  poller: null,

  start() {
    this.samples = [];
    $('connections').hidden = true;
    this.poller = new Poller(3000, () => this.sample(), (e) => this.failed(e));
    this.poller.start();
  },

  stop() {
    if (this.poller) this.poller.stop();
    this.poller = null;
  },

  failed(error) {
    if (!error) {
      showError($('connections-error'), null);
      return;
    }
    if (error.status === 403) {
      // An app's token may not read the node's metrics: no plot, and no complaint either.
      $('connections').hidden = true;
      this.stop();
      return;
    }
    $('connections').hidden = false;
    showError($('connections-error'), `/metrics could not be read: ${error.message}`);
  },

  async sample() {
    const text = await state.api.metrics();
    const values = parseTransportConnections(text);
    this.samples.push({ t: Date.now(), values });
    if (this.samples.length > SAMPLES) this.samples.shift();
    $('connections').hidden = false;
    const transports = [...new Set(this.samples.flatMap((s) => Object.keys(s.values)))].sort();
    const series = transports.map((transport) => ({
      label: transport,
      cls: `series-${transport}`,
      points: this.samples.filter((s) => transport in s.values).map((s) => [s.t, s.values[transport]]),
    }));
    const latest = transports.map((t) => `${t} ${values[t] ?? 0}`).join(' · ');
    fill($('connections-chart'), chartBlock(lineChart({ series, test: 'connections-svg', title: 'connections over time', spanMs: 60_000 }), latest ? `now: ${latest}` : 'no transports reported'));
  },
};

// ---------------------------------------------------------------------------------------------
// Start: a token kept from earlier in this tab signs in again.

const kept = sessionStorage.getItem(TOKEN_KEY);
if (kept) {
  signIn(kept).catch((e) => logout(e.message));
} else {
  $('login-token').focus();
}
