// The app portal: what an app's own customers see from a link made with
// POST /api/v1/auth/app-portal-access/{app}. The link's `#key=` is a token scoped to the one
// app; it is kept in this tab (sessionStorage) and taken out of the address bar at once.

import { Api } from './api.js';
import { h, fill, showError, showNote, fmtTime } from './ui.js';
import { EndpointsView } from './endpoints.js';
import { MessagesView } from './messages.js';

const TOKEN_KEY = 'herald.portal.token';
const $ = (id) => document.getElementById(id);

const portal = {
  api: null,
  app: null,
  endpoints: null,
  messages: null,
  tab: 'endpoints',
  ended: false,
};

/** The token from `#key=...`, moved into sessionStorage and out of the address bar. */
function takeToken() {
  const fragment = location.hash.replace(/^#/, '');
  const key = new URLSearchParams(fragment).get('key');
  if (key) {
    sessionStorage.setItem(TOKEN_KEY, key);
    history.replaceState(null, '', location.pathname + location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

function expired() {
  if (portal.ended) return;
  portal.ended = true;
  if (portal.endpoints) portal.endpoints.stop();
  if (portal.messages) portal.messages.stop();
  sessionStorage.removeItem(TOKEN_KEY);
  $('portal').hidden = true;
  $('portal-loading').hidden = true;
  $('portal-expired').hidden = false;
}

function showTab(tab) {
  portal.tab = tab;
  for (const button of document.querySelectorAll('[data-tab]')) {
    const on = button.dataset.tab === tab;
    button.classList.toggle('active', on);
    button.setAttribute('aria-selected', String(on));
  }
  for (const view of document.querySelectorAll('.view')) view.hidden = view.dataset.view !== tab;
  if (tab === 'endpoints') {
    portal.messages.stop();
    portal.endpoints.start();
  } else {
    portal.endpoints.stop();
    portal.messages.start();
  }
}

/** An example payload for an event type: its schema's first example, if it has one. */
function examplePayload(eventType) {
  const schemas = eventType && eventType.schemas;
  if (schemas && typeof schemas === 'object') {
    for (const schema of Object.values(schemas)) {
      const examples = schema && (schema.examples || (schema.example !== undefined ? [schema.example] : null));
      if (Array.isArray(examples) && examples.length && examples[0] && typeof examples[0] === 'object' && !Array.isArray(examples[0])) {
        return examples[0];
      }
    }
  }
  return { type: eventType ? eventType.name : 'example', example: true, sentAt: new Date().toISOString() };
}

async function loadExampleTypes() {
  const select = $('example-form').eventType;
  try {
    const page = await portal.api.listEventTypes();
    const types = (page.data || []).filter((t) => !t.archived);
    portal.eventTypes = new Map(types.map((t) => [t.name, t]));
    if (!types.length) {
      fill(select, h('option', { value: '' }, 'no event types in the catalogue'));
      select.disabled = true;
      return;
    }
    fill(select, types.map((t) => h('option', { value: t.name }, t.description ? `${t.name}: ${t.description}` : t.name)));
  } catch (e) {
    showError($('example-error'), `The event types could not be read: ${e.message}`);
  }
}

$('example-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  const name = form.eventType.value;
  showError($('example-error'), null);
  showNote($('example-note'), '');
  if (!name) return;
  const button = form.querySelector('button[type=submit]');
  button.disabled = true;
  try {
    const msg = await portal.api.createMessage(portal.app.id, { eventType: name, payload: examplePayload(portal.eventTypes.get(name)) });
    showNote($('example-note'), `Sent ${msg.id} (${name}) at ${fmtTime(msg.timestamp)}: see its attempts under Deliveries.`);
    portal.endpoints.poller.now();
  } catch (e) {
    showError($('example-error'), `The example was not sent: ${e.message}`);
  } finally {
    button.disabled = false;
  }
});

for (const button of document.querySelectorAll('[data-tab]')) {
  button.addEventListener('click', () => showTab(button.dataset.tab));
}

async function start() {
  const token = takeToken();
  if (!token) {
    expired();
    return;
  }
  portal.api = new Api(token, () => expired());
  let page;
  try {
    page = await portal.api.listApps();
  } catch (e) {
    if (e.status === 401) return; // expired() has run
    $('portal-loading').hidden = true;
    showError($('portal-error'), `The portal could not load: ${e.message}`);
    return;
  }
  const app = (page.data || [])[0];
  if (!app) {
    expired();
    return;
  }
  portal.app = app;
  document.title = `Webhooks: ${app.name}`;
  $('portal-app').textContent = app.name;
  $('portal-loading').hidden = true;
  $('portal').hidden = false;
  portal.endpoints = new EndpointsView({ api: portal.api, appId: app.id, root: $('portal-endpoints') });
  portal.messages = new MessagesView({ api: portal.api, appId: app.id, root: $('portal-messages') });
  loadExampleTypes();
  showTab('endpoints');
}

start();
