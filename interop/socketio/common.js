// Helpers shared by the Socket.IO interop scripts: Herald's API, an app with Socket.IO rules,
// HS256 tokens minted with node:crypto, and official socket.io-client sockets that keep a log
// of everything they receive so checks can wait on it.
"use strict";
const assert = require("node:assert/strict");
const crypto = require("node:crypto");
const { EventEmitter } = require("node:events");
const { io } = require("socket.io-client");

// HERALD_URLS (comma-separated) names the nodes of a cluster; HERALD_URL alone is one node.
// The API is called on the first node; each socket says which node it connects to.
const configured = process.env.HERALD_URLS || process.env.HERALD_URL;
if (!configured) {
  console.error("FAIL: set HERALD_URL (or HERALD_URLS for a cluster) and HERALD_TOKEN");
  process.exit(2);
}
const nodes = configured
  .split(",")
  .map((u) => u.trim())
  .filter(Boolean)
  .map((u) => new URL(u));
const base = nodes[0].origin;
const token = process.env.HERALD_TOKEN;

/** Patience for any one thing the server should do. */
const PATIENCE = 10000;

/** A tag unique to this run, so names never collide with an earlier run on the same server. */
const tag = `${Date.now().toString(36)}${crypto.randomBytes(3).toString("hex")}`;

/** Calls Herald's management API as the operator; returns {status, body}. */
async function api(method, path, body) {
  let response;
  try {
    response = await fetch(`${base}${path}`, {
      method,
      headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(PATIENCE),
    });
  } catch (e) {
    throw new Error(`${method} ${base}${path}: cannot reach Herald (${(e.cause && (e.cause.code || e.cause.message)) || e.message})`);
  }
  const text = await response.text();
  let parsed = null;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch {
    parsed = text;
  }
  return { status: response.status, body: parsed };
}

/**
 * Creates an app with these Socket.IO rules (the `socketio` field) and, if given, history
 * rules; returns the app as the API shows it (`id`, `uid`, `pusher: {appId, key, secret}`).
 */
async function createApp(name, socketio, history) {
  const body = { name, uid: `${name.replace(/[^a-z0-9]+/gi, "-")}-${tag}`, socketio };
  if (history) body.history = history;
  const { status, body: app } = await api("POST", "/api/v1/app/", body);
  assert.equal(status, 201, `app created with Socket.IO rules: ${JSON.stringify(app)}`);
  assert.ok(app.pusher && app.pusher.secret, "the app output carries its Pusher credentials");
  return app;
}

const b64url = (value) => Buffer.from(value).toString("base64url");

/** A JWT (HS256) over `claims`, signed with `secret`. */
function jwt(secret, claims) {
  const signed = `${b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }))}.${b64url(JSON.stringify(claims))}`;
  return `${signed}.${crypto.createHmac("sha256", secret).update(signed).digest("base64url")}`;
}

/** A connection token for `app`: user `sub`, joining `rooms`, valid `ttl` seconds (negative: expired). */
function tokenFor(app, sub, rooms = [], { ttl = 600, secret = app.pusher.secret, info } = {}) {
  const claims = { sub, exp: Math.floor(Date.now() / 1000) + ttl, rooms };
  if (info) claims.info = info;
  return jwt(secret, claims);
}

/** Pusher channel auth, as a backend's authorizer computes it: key:HMAC(socket_id:channel). */
function pusherChannelAuth(creds, socketId, channel) {
  const signature = crypto.createHmac("sha256", creds.secret).update(`${socketId}:${channel}`).digest("hex");
  return { auth: `${creds.key}:${signature}` };
}

const brief = (value) => {
  const text = JSON.stringify(value, (k, v) =>
    v && v.type === "Buffer" && Array.isArray(v.data) ? `<${v.data.length} bytes>` : v,
  );
  return text && text.length > 300 ? `${text.slice(0, 300)}...` : text;
};

/**
 * An official socket.io-client socket and the log of what it received: every event as
 * {event, args}, plus `$connect`, `$connect_error` (args: [error]) and `$disconnect` (args:
 * [reason]). Relayed events arrive as (data, meta): one data argument, then meta last.
 */
class Client {
  constructor(name, url, options) {
    this.name = name;
    this.log = [];
    this.changed = new EventEmitter();
    this.changed.setMaxListeners(0);
    this.socket = io(url, options);
    const record = (event, args) => {
      this.log.push({ event, args });
      this.changed.emit("entry");
    };
    this.socket.onAny((event, ...args) => record(event, args));
    this.socket.on("connect", () => record("$connect", []));
    this.socket.on("connect_error", (e) => record("$connect_error", [e]));
    this.socket.on("disconnect", (reason) => record("$disconnect", [reason]));
  }

  /** Resolves with `found(log)` once it is truthy (checked on every entry), or fails after `ms`. */
  waitFor(what, found, ms = PATIENCE) {
    return new Promise((resolve, reject) => {
      const check = () => {
        let value;
        try {
          value = found(this.log);
        } catch (e) {
          finish();
          reject(e);
          return;
        }
        if (value) {
          finish();
          resolve(value);
        }
      };
      const timer = setTimeout(() => {
        finish();
        reject(new Error(`${this.name} timed out after ${ms / 1000} s waiting for ${what}; ${this.describe()}`));
      }, ms);
      const finish = () => {
        clearTimeout(timer);
        this.changed.off("entry", check);
      };
      this.changed.on("entry", check);
      check();
    });
  }

  /** The last few entries and every herald:error, for failure messages. */
  describe() {
    const show = ({ event, args }) =>
      `${event}(${args.map((a) => (a instanceof Error ? `Error: ${a.message}` : brief(a))).join(", ")})`;
    const errors = this.log.filter((e) => e.event === "herald:error").map(show);
    const last = this.log.slice(-6).map(show);
    return `${this.log.length} received, last: [${last.join("; ")}]${errors.length ? `, herald:error: [${errors.join("; ")}]` : ""}`;
  }

  /** Resolves once connected (counting connects after `since` entries), fails on connect_error. */
  connected(since = 0) {
    return this.waitFor("the namespace CONNECT", (log) => {
      const entries = log.slice(since);
      const failed = entries.find((e) => e.event === "$connect_error");
      if (failed) {
        const { message, description } = failed.args[0];
        const detail = typeof description === "number" ? ` (HTTP ${description})` : description && description.message ? ` (${description.message})` : "";
        throw new Error(`${this.name} could not connect: connect_error "${message}"${detail}`);
      }
      return entries.some((e) => e.event === "$connect");
    });
  }

  /** Resolves with the error of the next connect_error (after `since` entries); fails on connect. */
  refused(since = 0) {
    return this.waitFor("a connect_error", (log) => {
      const entries = log.slice(since);
      if (entries.some((e) => e.event === "$connect")) throw new Error(`${this.name} was let in`);
      const failed = entries.find((e) => e.event === "$connect_error");
      return failed && failed.args[0];
    });
  }

  /** Relayed events named `event`, as {data, meta}, optionally filtered. */
  events(event, keep = () => true) {
    return this.log
      .filter((e) => e.event === event)
      .map(({ args }) => ({ data: args[0], meta: args.length > 1 ? args[args.length - 1] : undefined, args }))
      .filter(keep);
  }

  /** Resolves with the first `count` events named `event` that `keep` accepts. */
  received(event, count, keep = () => true, what = `${count} '${event}' events`, ms = PATIENCE) {
    return this.waitFor(what, () => {
      const found = this.events(event, keep);
      return found.length >= count && found.slice(0, count);
    }, ms);
  }

  /** Resolves with herald:subscribed for `room` (counting entries after `since`). */
  subscribed(room, since = 0) {
    return this.waitFor(`herald:subscribed for ${room}`, (log) => {
      const entry = log.slice(since).find((e) => e.event === "herald:subscribed" && e.args[0] && e.args[0].room === room);
      return entry && entry.args[0];
    });
  }

  /** Emits with a plain acknowledgement callback; resolves with the server's reply. */
  ack(event, ...args) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`${this.name}: no acknowledgement for '${event}' within ${PATIENCE / 1000} s; ${this.describe()}`)),
        PATIENCE,
      );
      this.socket.emit(event, ...args, (reply) => {
        clearTimeout(timer);
        resolve(reply);
      });
    });
  }

  close() {
    this.socket.disconnect();
  }
}

/**
 * Opens a socket on namespace `/<namespace>` of `node` (a URL; the first node by default).
 * `auth` is sent as the handshake's auth ({token, positions}); `transports` defaults to
 * Socket.IO's own default (polling, then the upgrade to WebSocket).
 */
function open(name, namespace, { auth, transports, node = nodes[0], reconnection = true } = {}) {
  const options = {
    forceNew: true,
    timeout: 5000,
    reconnection,
    reconnectionDelay: 200,
    reconnectionDelayMax: 1000,
  };
  if (auth) options.auth = auth;
  if (transports) options.transports = transports;
  return new Client(name, `${new URL(node).origin}/${namespace}`, options);
}

/** Opens a socket and waits for it to connect (and for herald:subscribed on each of `rooms`). */
async function connect(name, namespace, options = {}, rooms = []) {
  const client = open(name, namespace, options);
  try {
    await client.connected();
    for (const room of rooms) await client.subscribed(room);
  } catch (e) {
    client.close();
    throw e;
  }
  return client;
}

let passed = 0;
const ok = (what) => {
  passed += 1;
  console.log(`ok: ${what}`);
};

/** Runs `main` with a deadline; exits 0 on success, 1 naming the failure. */
function run(name, main, ms = 120000) {
  const deadline = setTimeout(() => {
    console.error(`FAIL: ${name} did not finish within ${ms / 1000} s`);
    process.exit(1);
  }, ms);
  main()
    .then(() => {
      clearTimeout(deadline);
      console.log(`${name}: all ${passed} checks passed`);
      process.exit(0);
    })
    .catch((e) => {
      console.error(`FAIL: ${e.stack || e}`);
      process.exit(1);
    });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

module.exports = {
  nodes, base, tag, PATIENCE, api, createApp, jwt, tokenFor, pusherChannelAuth,
  Client, open, connect, ok, run, sleep,
};
