// Helpers shared by the Node interop scripts: Herald's API, waiting for events, a local
// HTTP receiver that keeps raw requests, and a pusher-js client wired to a server SDK.
"use strict";
const { EventEmitter } = require("node:events");
const http = require("node:http");
const PusherClient = require("pusher-js");
const PusherServer = require("pusher");

// HERALD_URLS (comma-separated) names the nodes of a cluster: the API and the server SDK use
// the first and the last, and each pusher-js client the next node in turn, so clients that
// talk to each other sit on different nodes. HERALD_URL alone is one node.
const nodes = (process.env.HERALD_URLS || process.env.HERALD_URL).split(",").map((u) => new URL(u));
const base = nodes[0].origin;
const token = process.env.HERALD_TOKEN;
const where = nodes[0];
let nextNode = 0;

/** Calls Herald's management API as the operator; returns {status, body}. */
async function api(method, path, body) {
  const response = await fetch(`${base}${path}`, {
    method,
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  return { status: response.status, body: text ? JSON.parse(text) : null };
}

/** Resolves with the data of the next `event` on `emitter`, or fails after a timeout. */
function next(emitter, event, what, ms = 10000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
    const handler = (data) => {
      clearTimeout(timer);
      emitter.unbind(event, handler);
      resolve(data);
    };
    emitter.bind(event, handler);
  });
}

/** A local endpoint that keeps every request's headers and raw body. */
async function startReceiver(path = "/hooks") {
  const received = [];
  const arrivals = new EventEmitter();
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      received.push({ headers: req.headers, rawBody: Buffer.concat(chunks).toString("utf8") });
      res.writeHead(200).end();
      arrivals.emit("request");
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { url: `http://127.0.0.1:${server.address().port}${path}`, received, arrivals, server };
}

/** Resolves once `found()` returns something, checked on every arrival, or fails after `ms`. */
function arrival(receiver, found, what, ms = 15000) {
  return new Promise((resolve, reject) => {
    const check = () => {
      const value = found();
      if (value) {
        clearTimeout(timer);
        receiver.arrivals.off("request", check);
        resolve(value);
      }
    };
    const timer = setTimeout(() => {
      receiver.arrivals.off("request", check);
      reject(new Error(`timed out waiting for ${what}`));
    }, ms);
    receiver.arrivals.on("request", check);
    check();
  });
}

/** A pusher-js client whose private and presence auth is signed by `server` (the SDK). */
function connect(creds, server, user, { forgeAuth = false } = {}) {
  const node = nodes[nextNode++ % nodes.length];
  const client = new PusherClient(creds.key, {
    cluster: "herald",
    wsHost: node.hostname,
    wsPort: Number(node.port),
    forceTLS: false,
    enabledTransports: ["ws"],
    disableStats: true,
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) => {
        const presence = channelName.startsWith("presence-")
          ? { user_id: user, user_info: { name: user } }
          : undefined;
        const auth = server.authorizeChannel(socketId, channelName, presence);
        if (forgeAuth) auth.auth = `${creds.key}:${"0".repeat(64)}`;
        callback(null, auth);
      },
    },
    userAuthentication: {
      customHandler: ({ socketId }, callback) =>
        callback(null, server.authenticateUser(socketId, { id: user })),
    },
  });
  return next(client.connection, "connected", `${user} to connect`).then(() => client);
}

async function subscribed(client, name) {
  const channel = client.subscribe(name);
  await next(channel, "pusher:subscription_succeeded", `subscription to ${name}`);
  return channel;
}

/** The official server SDK, pointed at Herald with an app's credentials. */
function serverSdk(creds) {
  const node = nodes[nodes.length - 1];
  return new PusherServer({
    appId: creds.appId,
    key: creds.key,
    secret: creds.secret,
    host: node.hostname,
    port: node.port,
    useTLS: false,
  });
}

/** Runs `main` with a deadline; exits 0 on success, 1 naming the failure. */
function run(name, main, ms = 60000) {
  const deadline = setTimeout(() => {
    console.error(`FAIL: ${name} did not finish within ${ms / 1000} s`);
    process.exit(1);
  }, ms);
  main()
    .then(() => {
      clearTimeout(deadline);
      process.exit(0);
    })
    .catch((e) => {
      console.error(`FAIL: ${e.stack || e}`);
      process.exit(1);
    });
}

module.exports = { base, token, where, api, serverSdk, next, startReceiver, arrival, connect, subscribed, run };
