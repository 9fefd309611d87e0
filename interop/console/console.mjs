// Herald's web console (/console/) and app portal (/console/portal) in headless Chromium,
// driven with playwright-core against a Herald of its own (HERALD_BIN), a local webhook
// receiver that can be told to fail, and a Pusher presence client written here over `ws`.
//
// Each passed check prints `ok: <what>` (CI counts them); the first failure prints
// `FAIL: <what>` and exits 1. Screenshots of each view go to docs/screenshots/<name>.png.
//
//   node interop/console/console.mjs        (from the repository root, after `npm ci` here)
//   HERALD_BIN=target/release/herald CHROMIUM=/usr/bin/chromium node interop/console/console.mjs

import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';
import WebSocket from 'ws';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const PATIENCE = 30_000; // every wait
const WHOLE_RUN = 6 * 60_000; // the whole script
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SHOTS = path.join(ROOT, 'docs', 'screenshots');

function heraldBin() {
  const given = process.env.HERALD_BIN || 'target/debug/herald';
  if (path.isAbsolute(given)) return given;
  const fromCwd = path.resolve(given);
  return fs.existsSync(fromCwd) ? fromCwd : path.join(ROOT, given);
}

// ---------------------------------------------------------------------------------------------
// Bookkeeping

let passed = 0;
function ok(what) {
  passed += 1;
  console.log(`ok: ${what}`);
}

class CheckFailed extends Error {}
function fail(what) {
  throw new CheckFailed(what);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `probe` (sync or async) until it returns something truthy; fails after `patience`. */
async function until(what, probe, patience = PATIENCE) {
  const deadline = Date.now() + patience;
  let last;
  for (;;) {
    try {
      const value = await probe();
      if (value) return value;
      last = value;
    } catch (e) {
      last = e.message;
    }
    if (Date.now() > deadline) fail(`timed out after ${patience / 1000} s waiting for ${what} (last seen: ${JSON.stringify(last)})`);
    await sleep(100);
  }
}

/** A Playwright wait, with the check named when it times out. */
async function visible(page, selector, what) {
  try {
    await page.locator(selector).first().waitFor({ state: 'visible', timeout: PATIENCE });
  } catch (e) {
    fail(`${what}: ${selector} did not show within ${PATIENCE / 1000} s (${e.message.split('\n')[0]})`);
  }
  return page.locator(selector).first();
}

async function shot(page, name, fullPage = true) {
  fs.mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SHOTS, `${name}.png`), fullPage });
}

// ---------------------------------------------------------------------------------------------
// Herald, its API, the webhook receiver, a Pusher presence client

const cleanups = [];
let running = null; // the Herald under test, for its stderr when a check fails

async function startHerald(token) {
  const data = fs.mkdtempSync(path.join(os.tmpdir(), 'herald-console-'));
  cleanups.push(() => fs.rmSync(data, { recursive: true, force: true }));
  // Herald reads HERALD_* variables as configuration: pass only its own.
  const env = Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith('HERALD_')));
  env.HERALD_ADMIN_TOKEN = token;
  env.HERALD_DELIVERY__ALLOW_PRIVATE_TARGETS = 'true';
  const bin = heraldBin();
  if (!fs.existsSync(bin)) fail(`no Herald binary at ${bin} (set HERALD_BIN)`);
  const child = spawn(bin, ['serve', '--listen', '127.0.0.1:0', '--data', data], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (chunk) => {
    stderr = (stderr + chunk).slice(-8000);
  });
  const herald = { child, stderr: () => stderr, exited: null };
  running = herald;
  child.on('exit', (code, signal) => {
    herald.exited = { code, signal };
  });
  cleanups.push(async () => {
    if (herald.exited) return;
    child.kill('SIGTERM');
    const gone = await Promise.race([new Promise((resolve) => child.once('exit', () => resolve(true))), sleep(5000).then(() => false)]);
    if (!gone) child.kill('SIGKILL');
  });
  const lines = readline.createInterface({ input: child.stdout });
  const first = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new CheckFailed(`herald printed nothing within ${PATIENCE / 1000} s; stderr: ${stderr}`)), PATIENCE);
    lines.once('line', (line) => {
      clearTimeout(timer);
      resolve(line);
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new CheckFailed(`herald exited (${code}) before it listened; stderr: ${stderr}`));
    });
  });
  lines.on('line', () => {}); // keep draining
  const match = /^herald listening on (http:\/\/\S+)/.exec(first);
  if (!match) fail(`herald's first line is not its address: ${JSON.stringify(first)}`);
  herald.url = match[1];
  return herald;
}

function apiClient(base, token) {
  return async function call(method, route, body, as = token) {
    const response = await fetch(base + route, {
      method,
      headers: { authorization: `Bearer ${as}`, 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(10_000),
    });
    const text = await response.text();
    if (!response.ok) fail(`${method} ${route}: HTTP ${response.status}: ${text}`);
    return text ? JSON.parse(text) : null;
  };
}

async function startReceiver() {
  const receiver = { status: 200, hits: [] };
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => {
      const status = receiver.status;
      receiver.hits.push({ path: req.url, id: req.headers['webhook-id'], status, at: Date.now(), body: Buffer.concat(chunks).toString() });
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(status < 300 ? '{"received":true}' : '{"error":"the receiver was told to fail"}');
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  cleanups.push(() => new Promise((resolve) => server.close(resolve)));
  server.unref();
  receiver.url = `http://127.0.0.1:${server.address().port}`;
  return receiver;
}

/** A Pusher protocol 7 client joining a presence channel, signed with the app's secret. */
async function joinPresence(wsBase, pusher, channel, userId, userInfo) {
  const socket = new WebSocket(`${wsBase}/app/${pusher.key}?protocol=7&client=js&version=8.4.0`);
  cleanups.push(() => socket.terminate());
  const frames = [];
  socket.on('message', (raw) => {
    const frame = JSON.parse(raw.toString());
    if (frame.event === 'pusher:ping') socket.send(JSON.stringify({ event: 'pusher:pong', data: {} }));
    frames.push(frame);
  });
  const next = (what, predicate) =>
    until(what, () => frames.find(predicate));
  const established = await next(`${userId}'s pusher:connection_established`, (f) => f.event === 'pusher:connection_established');
  const socketId = JSON.parse(established.data).socket_id;
  const channelData = JSON.stringify({ user_id: userId, user_info: userInfo });
  const signature = crypto.createHmac('sha256', pusher.secret).update(`${socketId}:${channel}:${channelData}`).digest('hex');
  socket.send(JSON.stringify({ event: 'pusher:subscribe', data: { channel, auth: `${pusher.key}:${signature}`, channel_data: channelData } }));
  const answer = await next(`${userId}'s subscription to ${channel}`, (f) => f.channel === channel && (f.event === 'pusher_internal:subscription_succeeded' || f.event === 'pusher:subscription_error'));
  if (answer.event !== 'pusher_internal:subscription_succeeded') fail(`${userId} could not join ${channel}: ${JSON.stringify(answer)}`);
  return socket;
}

// ---------------------------------------------------------------------------------------------
// The checks

async function main() {
  const admin = crypto.randomBytes(24).toString('base64url').slice(0, 32);
  const herald = await startHerald(admin);
  const base = herald.url;
  const api = apiClient(base, admin);
  const receiver = await startReceiver();

  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
    timeout: PATIENCE,
  });
  cleanups.push(() => browser.close());

  // Script errors and CSP refusals on any page fail the run at the end.
  const problems = [];
  const watch = (page, name) => {
    page.setDefaultTimeout(PATIENCE);
    page.on('pageerror', (e) => problems.push(`${name}: ${e.message}`));
    page.on('console', (msg) => {
      const text = msg.text();
      if (msg.type() === 'error' && /Content Security Policy|Refused to|SyntaxError|TypeError|ReferenceError/.test(text)) problems.push(`${name}: ${text}`);
    });
  };

  const context = await browser.newContext({ viewport: { width: 1360, height: 900 } });
  const page = await context.newPage();
  watch(page, 'console');

  // Sign in: a wrong token is refused, the admin token is taken.
  await page.goto(`${base}/console/`);
  await visible(page, '[data-test=login-form]', 'the login form');
  await page.fill('[data-test=login-token]', 'not-the-token');
  await page.click('[data-test=login-submit]');
  const refusal = await visible(page, '[data-test=login-error]', 'the refusal of a wrong token');
  const refusalText = await refusal.textContent();
  if (!refusalText.includes('That token was refused')) fail(`a wrong token's refusal says ${JSON.stringify(refusalText)}`);
  await shot(page, 'login');
  ok('a wrong token is refused ("That token was refused")');

  await page.fill('[data-test=login-token]', admin);
  await page.click('[data-test=login-submit]');
  await visible(page, '[data-test=tabs]', 'the console after signing in');
  const kept = await page.evaluate(() => sessionStorage.getItem('herald.console.token'));
  if (kept !== admin) fail('the token is not kept in sessionStorage');
  ok('signing in with the admin token opens the console (token kept in sessionStorage)');

  // An app, created in the UI; its Pusher secret hidden until "Show".
  for (const [name, description] of [['order.paid', 'An order was paid'], ['order.refunded', 'An order was refunded']]) {
    await api('POST', '/api/v1/event-type', { name, description });
  }
  await page.click('[data-test=tab-apps]');
  await page.fill('[data-test=app-name]', 'Shop');
  await page.fill('[data-test=app-uid]', 'shop');
  await page.click('[data-test=app-create]');
  await visible(page, '[data-test=app-row]', 'the new app in the list');
  const appId = (await (await visible(page, '[data-test=app-id]', "the new app's credentials")).textContent()).trim();
  const shop = await api('GET', `/api/v1/app/${appId}`);
  if (shop.uid !== 'shop' || shop.name !== 'Shop') fail(`the app created in the UI is ${JSON.stringify(shop)}`);
  const hidden = await page.textContent('[data-test=pusher-secret]');
  if (hidden.includes(shop.pusher.secret)) fail('the Pusher secret shows before "Show" is clicked');
  await page.click('[data-test=show-secret]');
  await until('the Pusher secret after "Show"', async () => (await page.textContent('[data-test=pusher-secret]')).trim() === shop.pusher.secret);
  ok('an app is created from the Apps view; its Pusher secret shows only after "Show"');
  await page.click('[data-test=show-secret]');
  await shot(page, 'apps');

  // Another app with an endpoint, made through the API: the portal must never show it.
  const other = await api('POST', '/api/v1/app', { name: 'Other', uid: 'other' });
  const otherEndpoint = await api('POST', `/api/v1/app/${other.id}/endpoint`, { url: `${receiver.url}/hooks/other` });

  // An endpoint, added in the UI, for order.paid only.
  const hookUrl = `${receiver.url}/hooks/shop`;
  await page.click('[data-test=tab-endpoints]');
  await visible(page, '[data-test=endpoint-event-type][value="order.paid"]', 'the event type choices');
  await page.fill('[data-test=endpoint-url]', hookUrl);
  await page.fill('[data-test=endpoint-description]', 'The shop backend');
  await page.check('[data-test=endpoint-event-type][value="order.paid"]');
  await page.click('[data-test=endpoint-add]');
  const card = `[data-test=endpoint-card][data-url="${hookUrl}"]`;
  await visible(page, card, 'the new endpoint');
  const endpointId = await page.getAttribute(card, 'data-endpoint-id');
  const made = await api('GET', `/api/v1/app/${appId}/endpoint/${endpointId}`);
  if (JSON.stringify(made.eventTypes) !== '["order.paid"]' || made.description !== 'The shop backend') fail(`the endpoint added in the UI is ${JSON.stringify(made)}`);
  ok('an endpoint is added from the Endpoints view with its event types');

  // A message and its attempt appear in the log without a reload.
  await page.click('[data-test=tab-messages]');
  await visible(page, '[data-test=message-log]', 'the message log');
  await page.evaluate(() => {
    window.__sameDocument = true;
  });
  const first = await api('POST', `/api/v1/app/${appId}/msg`, { eventType: 'order.paid', payload: { order: 1, total: 1250 } });
  await visible(page, `[data-test=message-row][data-msg-id="${first.id}"] [data-test=message-attempt][data-status=success]`, 'the message with its successful attempt in the log');
  await until('the receiver to get the first message', () => receiver.hits.find((hit) => hit.id === first.id && hit.status === 200));
  if (!(await page.evaluate(() => window.__sameDocument === true))) fail('the page reloaded to show the message');
  ok('a published message and its attempt appear in the message log without reloading');

  await page.click(`[data-test=message-row][data-msg-id="${first.id}"]`);
  await visible(page, `[data-test=message-detail] [data-test=attempt-row][data-status=success][data-endpoint-id="${endpointId}"]`, "the message's attempt in its detail");
  const payloadShown = await page.textContent('[data-test=message-payload]');
  if (!payloadShown.includes('"total": 1250')) fail(`the message detail shows the payload as ${JSON.stringify(payloadShown)}`);
  await page.click(`[data-test=attempt-row][data-endpoint-id="${endpointId}"] summary`);
  const responseShown = await (await visible(page, '[data-test=attempt-response]', "the attempt's response")).textContent();
  if (!responseShown.includes('received')) fail(`the attempt's response body shows as ${JSON.stringify(responseShown)}`);
  ok("a message's detail shows its payload and its attempt with the response body");

  // The receiver fails: the endpoint's health shows it.
  receiver.status = 500;
  const second = await api('POST', `/api/v1/app/${appId}/msg`, { eventType: 'order.paid', payload: { order: 2, total: 990 } });
  await until('the receiver to fail the second message', () => receiver.hits.find((hit) => hit.id === second.id && hit.status === 500));
  await page.click('[data-test=tab-endpoints]');
  await until('the endpoint card to count a failed attempt and show the last error', async () => {
    const failed = Number(await page.textContent(`${card} [data-test=health-failed-attempts]`));
    const lastError = await page.textContent(`${card} [data-test=health-last-error]`);
    return failed >= 1 && lastError.includes('HTTP 500') ? { failed, lastError } : null;
  });
  const rate = await page.textContent(`${card} [data-test=health-success-rate]`);
  if (rate.trim() === '100 %') fail('the success rate still says 100 % after a failure');
  await visible(page, `${card} [data-test=endpoint-chart] rect.series-fail`, 'a failure in the endpoint plot');
  await visible(page, `${card} [data-test=endpoint-latency]`, "the endpoint's latency percentiles");
  await shot(page, 'endpoints');
  ok(`the endpoint's health shows the failure (success rate ${rate.trim()}, last error HTTP 500, plotted)`);

  // The receiver recovers; a resend from the message's detail reaches it.
  receiver.status = 200;
  await page.click('[data-test=tab-messages]');
  await page.click(`[data-test=message-row][data-msg-id="${second.id}"]`);
  await until('the detail of the second message', async () => (await page.textContent('[data-test=message-detail-id]')).trim() === second.id);
  const resendButton = await visible(page, `[data-test=resend][data-endpoint-id="${endpointId}"]`, 'the Resend button');
  const clickedAt = Date.now();
  await resendButton.click();
  await visible(page, '[data-test=resend-note]', 'the resend confirmation');
  await until('the receiver to get the resent message', () => receiver.hits.find((hit) => hit.id === second.id && hit.status === 200 && hit.at >= clickedAt));
  // Still on its retry schedule (its first attempt failed), the delivery's resend is that
  // schedule's next attempt, brought forward (logged as scheduled; see the README).
  await visible(page, `[data-test=message-detail] [data-test=attempt-row][data-status=success][data-endpoint-id="${endpointId}"]`, 'the resent attempt in the detail');
  await shot(page, 'message-detail');
  ok('Resend from the UI reaches the receiver and shows in the detail as a successful attempt');

  // Debug: publish to a channel and watch it arrive over the page's own WebSocket.
  await page.click('[data-test=tab-debug]');
  await until('the Debug WebSocket to connect', async () => (await page.getAttribute('[data-test=debug-socket-status]', 'data-state')) === 'connected');
  await page.fill('[data-test=debug-channel]', 'console-debug');
  await page.fill('[data-test=debug-event]', 'debug.ping');
  await page.fill('[data-test=debug-data]', '{"ping": 1}');
  await page.click('[data-test=debug-publish]');
  const arrival = await visible(page, '[data-test=debug-arrival][data-event="debug.ping"][data-channel="console-debug"]', 'the event arriving on the WebSocket');
  if (!(await arrival.textContent()).includes('"ping":1')) fail(`the arrival shows ${JSON.stringify(await arrival.textContent())}`);
  await visible(page, '[data-test=debug-latency]', 'the arrival latency');
  await shot(page, 'debug');
  ok("the Debug view publishes an event and shows it arriving over the page's Pusher WebSocket");

  // The live tail saw everything; pause holds events back.
  await page.click('[data-test=tab-tail]');
  await visible(page, `[data-test=tail-event][data-event="order.paid"][data-message-id="${second.id}"]`, 'the second message in the live tail');
  await visible(page, '[data-test=tail-event][data-event="debug.ping"][data-channels="console-debug"]', 'the debug event in the live tail');
  ok('the live tail shows the published events as they flow');
  await page.click('[data-test=tail-pause]');
  const held = await api('POST', `/api/v1/app/${appId}/msg`, { eventType: 'order.refunded', payload: { order: 1 } });
  await until('the paused tail to hold one event', async () => (await page.textContent('[data-test=tail-pause]')).includes('1 waiting'));
  if (await page.locator(`[data-test=tail-event][data-message-id="${held.id}"]`).count()) fail('a paused tail showed a new event');
  await page.click('[data-test=tail-pause]');
  await visible(page, `[data-test=tail-event][data-message-id="${held.id}"]`, 'the held event after resuming');
  await page.fill('[data-test=tail-event-type]', 'order.refunded');
  await page.click('[data-test=tail-apply]');
  await until('the filtered tail to be live', async () => (await page.getAttribute('[data-test=tail-status]', 'data-state')) === 'live');
  const unwanted = await api('POST', `/api/v1/app/${appId}/msg`, { eventType: 'order.paid', payload: { order: 3 } });
  const wanted = await api('POST', `/api/v1/app/${appId}/msg`, { eventType: 'order.refunded', payload: { order: 3 } });
  await visible(page, `[data-test=tail-event][data-message-id="${wanted.id}"]`, 'the filtered tail showing order.refunded');
  if (await page.locator(`[data-test=tail-event][data-message-id="${unwanted.id}"]`).count()) fail('the tail filtered on order.refunded showed order.paid');
  await shot(page, 'tail');
  ok('the live tail pauses (holding events back), resumes, and filters by event type');

  // The message log searches by event type, channel and time window.
  await page.click('[data-test=tab-messages]');
  const rowTypes = () => page.$$eval('[data-test=message-row]', (rows) => rows.map((row) => row.dataset.eventType));
  await page.fill('[data-test=filter-event-type]', 'order.refunded');
  await page.selectOption('[data-test=filter-window]', '300');
  await page.click('[data-test=filter-apply]');
  await until('the log filtered to order.refunded in the last 5 minutes', async () => {
    const types = await rowTypes();
    return types.length === 2 && types.every((type) => type === 'order.refunded');
  });
  await page.click('[data-test=filter-clear]');
  await page.fill('[data-test=filter-channel]', 'console-debug');
  await page.click('[data-test=filter-apply]');
  await until('the log filtered to the console-debug channel', async () => JSON.stringify(await rowTypes()) === '["debug.ping"]');
  await page.click('[data-test=filter-clear]');
  await until('the whole log again', async () => (await rowTypes()).length === 6);
  ok('the message log searches by event type, channel and time window');

  // Channels: a presence client joins; its members show and refresh live.
  const wsBase = base.replace(/^http/, 'ws');
  await joinPresence(wsBase, shop.pusher, 'presence-room', 'alice', { name: 'Alice' });
  await page.click('[data-test=tab-channels]');
  await visible(page, '[data-test=channel-row][data-channel="presence-room"]', 'the presence channel in the Channels view');
  await until('presence-room to count one user', async () => (await page.textContent('[data-test=channel-row][data-channel="presence-room"] [data-test=channel-users]')).trim() === '1');
  await page.click('[data-test=channel-row][data-channel="presence-room"]');
  await visible(page, '[data-test=member-row][data-user-id="alice"]', 'alice among the members');
  await joinPresence(wsBase, shop.pusher, 'presence-room', 'bob', { name: 'Bob' });
  await visible(page, '[data-test=member-row][data-user-id="bob"]', 'bob among the members without a click');
  await visible(page, '[data-test=channel-row][data-channel="console-debug"]', "the Debug view's own public channel");
  await shot(page, 'channels');
  ok('the Channels view lists live channels with counts, and presence members appear live');

  // Connections over time, from /metrics.
  await until('the connections plot to show Pusher connections', async () => {
    const caption = await page.textContent('[data-test=connections-chart]');
    const match = /pusher (\d+)/.exec(caption || '');
    return match && Number(match[1]) >= 2;
  });
  await visible(page, '[data-test=connections-svg] path.series-pusher', 'the Pusher line in the connections plot');
  ok('the connections-over-time plot is drawn from /metrics');

  // Sources: a request with a bad signature, and why it was refused.
  const source = await api('POST', `/api/v1/app/${appId}/ingest/source`, { kind: 'stripe', name: 'Stripe', secrets: ['whsec_c29tZXRoaW5nIHNlY3JldA'] });
  const forged = await fetch(`${base}${source.ingestPath}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'stripe-signature': `t=${Math.floor(Date.now() / 1000)},v1=${'ab'.repeat(32)}` },
    body: '{"id":"evt_1","type":"payment_intent.succeeded"}',
  });
  if (forged.status !== 401) fail(`a forged Stripe request answered ${forged.status}, not 401`);
  await page.click('[data-test=tab-sources]');
  await page.click(`[data-test=source-row][data-source-id="${source.id}"]`);
  const refused = await visible(page, '[data-test=source-request-row][data-outcome=invalid_signature]', 'the refused request in the source');
  const why = (await refused.locator('[data-test=source-request-detail]').textContent()).trim();
  if (!why) fail('the refused request shows no reason');
  await shot(page, 'sources');
  ok(`the Sources view shows a refused request and why: "${why}"`);

  // The app portal, in a fresh browser context: only that app's endpoints.
  const access = await api('POST', `/api/v1/auth/app-portal-access/${appId}`, {});
  const portalContext = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const portal = await portalContext.newPage();
  watch(portal, 'portal');
  await portal.goto(access.url);
  await visible(portal, `[data-test=endpoint-card][data-url="${hookUrl}"]`, "the app's endpoint in the portal");
  if (await portal.locator(`[data-test=endpoint-card][data-url="${otherEndpoint.url}"]`).count()) fail("the portal shows another app's endpoint");
  const address = await portal.evaluate(() => ({ hash: location.hash, kept: sessionStorage.getItem('herald.portal.token') }));
  if (address.hash !== '' || address.kept !== access.token) fail(`the portal left the key in the address bar or did not keep it: ${JSON.stringify(address)}`);
  ok("the portal link opens the app's endpoints only, and takes the key out of the address bar");
  const probe = await portal.evaluate(async (otherApp) => {
    const token = sessionStorage.getItem('herald.portal.token');
    const response = await fetch(`/api/v1/app/${otherApp}/endpoint`, { headers: { authorization: `Bearer ${token}` } });
    return response.status;
  }, other.id);
  if (probe !== 404) fail(`the portal's token read another app's endpoints with HTTP ${probe}, not 404`);
  ok("from inside the portal, another app's endpoint list answers 404");

  // The console with that app-scoped token: one app, no connections plot, refusals in words.
  const scoped = await portalContext.newPage();
  watch(scoped, 'console with an app token');
  await scoped.goto(`${base}/console/`);
  await scoped.fill('[data-test=login-token]', access.token);
  const metricsAnswer = scoped.waitForResponse((response) => new URL(response.url()).pathname === '/metrics', { timeout: PATIENCE });
  await scoped.click('[data-test=login-submit]');
  await visible(scoped, '[data-test=tabs]', 'the console signed in with an app token');
  const metricsStatus = (await metricsAnswer).status();
  if (metricsStatus !== 403) fail(`/metrics answered an app token with ${metricsStatus}, not 403`);
  await until('the connections plot to stay hidden', async () => !(await scoped.isVisible('[data-test=connections-panel]')));
  const scopedApps = await scoped.locator('[data-test=app-row]').count();
  if (scopedApps !== 1) fail(`the console with an app token lists ${scopedApps} apps, not 1`);
  await scoped.click('[data-test=tab-apps]');
  await scoped.fill('[data-test=app-name]', 'Not allowed');
  await scoped.click('[data-test=app-create]');
  const refusedCreate = (await (await visible(scoped, '[data-test=app-form-error]', 'the refusal to create an app')).textContent()).trim();
  if (!/limited to one application/.test(refusedCreate)) fail(`creating an app with an app token says ${JSON.stringify(refusedCreate)}`);
  await scoped.close();
  ok(`the console with an app token: one app, no connections plot (/metrics 403), and "${refusedCreate}"`);

  // In the portal: add an endpoint, send an example, see its delivery, disable it.
  const portalHook = `${receiver.url}/hooks/portal`;
  await portal.fill('[data-test=endpoint-url]', portalHook);
  await portal.check('[data-test=endpoint-event-type][value="order.refunded"]');
  await portal.click('[data-test=endpoint-add]');
  const portalCard = `[data-test=endpoint-card][data-url="${portalHook}"]`;
  await visible(portal, portalCard, 'the endpoint added in the portal');
  await portal.selectOption('[data-test=example-event-type]', 'order.refunded');
  await portal.click('[data-test=send-example]');
  const note = (await (await visible(portal, '[data-test=example-note]', 'the example sent')).textContent()).trim();
  const exampleId = (/msg_\w+/.exec(note) || [])[0];
  if (!exampleId) fail(`the example's note names no message: ${JSON.stringify(note)}`);
  await until('the receiver to get the example', () => receiver.hits.find((hit) => hit.id === exampleId && hit.path === '/hooks/portal'));
  await portal.click('[data-test=portal-tab-deliveries]');
  await visible(portal, `[data-test=message-row][data-msg-id="${exampleId}"] [data-test=message-attempt][data-status=success]`, "the example's delivery in the portal");
  await portal.click(`[data-test=message-row][data-msg-id="${exampleId}"]`);
  await visible(portal, '[data-test=message-detail] [data-test=attempt-row][data-status=success]', "the example's attempt in the portal");
  await shot(portal, 'portal-deliveries');
  await portal.click('[data-test=portal-tab-endpoints]');
  await portal.click(`${portalCard} [data-test=toggle-endpoint]`);
  await visible(portal, `${portalCard}[data-disabled=true]`, 'the endpoint disabled in the portal');
  const portalEndpointId = await portal.getAttribute(portalCard, 'data-endpoint-id');
  if (!(await api('GET', `/api/v1/app/${appId}/endpoint/${portalEndpointId}`)).disabled) fail('disabling in the portal did not disable the endpoint');
  await portal.click(`${portalCard} [data-test=toggle-endpoint]`);
  await visible(portal, `${portalCard}[data-disabled=false]`, 'the endpoint enabled again in the portal');
  await shot(portal, 'portal');
  ok('in the portal: add an endpoint with its event types, send an example, see its delivery, disable and enable it');
  await portalContext.close();

  // A link that expires after a second shows the expired message.
  const brief = await api('POST', `/api/v1/auth/app-portal-access/${appId}`, { expiry: 1 });
  const briefContext = await browser.newContext({ viewport: { width: 1024, height: 600 } });
  const expiredPage = await briefContext.newPage();
  watch(expiredPage, 'expired portal');
  await expiredPage.goto(brief.url);
  const expiredNotice = await visible(expiredPage, '[data-test=portal-expired]', 'the expired message');
  if (!(await expiredNotice.textContent()).includes('This link has expired or is invalid; ask for a new one.')) fail('the expired notice has other words');
  await shot(expiredPage, 'portal-expired');
  ok('a portal link made with expiry 1 shows "This link has expired or is invalid" once expired');

  // The API reference renders /openapi.json: every operation, grouped by tag.
  const reference = await briefContext.newPage();
  watch(reference, 'API reference');
  await reference.goto(`${base}/docs`);
  await visible(reference, '[data-test=reference] section.card', 'the API reference');
  const described = await until('the reference to list the operations', async () => {
    const count = await reference.locator('[data-test=reference] section.card').count();
    return count >= 60 ? count : 0;
  });
  const text = await reference.locator('[data-test=reference]').textContent();
  for (const route of ['/api/v1/app/{app_id}/msg', '/apps/{app_id}/events', '/api/v1/auth/app-portal-access/{app_id}']) {
    if (!text.includes(route)) fail(`the API reference does not show ${route}`);
  }
  await shot(reference, 'api-reference', false); // its first screen: the whole page is very long
  ok(`the API reference at /docs renders /openapi.json (${described} operations)`);
  await briefContext.close();

  // Logging out forgets the token.
  await page.click('[data-test=logout]');
  await visible(page, '[data-test=login-form]', 'the login form after logging out');
  if (await page.evaluate(() => sessionStorage.getItem('herald.console.token'))) fail('the token outlived the logout');
  ok('logging out returns to the login form and forgets the token');

  if (problems.length) fail(`the pages reported errors:\n  ${problems.join('\n  ')}`);
  ok('no script errors or Content-Security-Policy refusals on any page');
  if (herald.exited) fail(`herald exited during the run: ${JSON.stringify(herald.exited)}`);
}

async function cleanup() {
  for (const step of cleanups.reverse()) {
    try {
      await step();
    } catch {
      // best effort: the rest still runs
    }
  }
}

const watchdog = setTimeout(async () => {
  console.error(`FAIL: the run took longer than ${WHOLE_RUN / 60_000} minutes`);
  await cleanup();
  process.exit(1);
}, WHOLE_RUN);

try {
  await main();
  console.log(`console: all ${passed} checks passed`);
  clearTimeout(watchdog);
  await cleanup();
  process.exit(0);
} catch (e) {
  clearTimeout(watchdog);
  console.error(`FAIL: ${e instanceof CheckFailed ? e.message : e.stack || e}`);
  if (running && running.stderr()) console.error(`herald's last output:\n${running.stderr().slice(-3000)}`);
  await cleanup();
  process.exit(1);
}
