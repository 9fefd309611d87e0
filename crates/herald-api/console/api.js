// Herald's management API from the browser: bearer-token requests, errors in words, Svix-shaped
// lists, the live tail (Server-Sent Events read with fetch, since EventSource cannot send an
// Authorization header) and the Prometheus text of /metrics.

/** An API answer that was not a success, with the server's own words in `message`. */
export class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
  }
}

/** Herald's error bodies in words: `{code, detail}`, or 422 `{detail: [{loc, msg}]}`. */
export function describeError(status, body, text) {
  if (body && typeof body.detail === 'string' && body.detail) return body.detail;
  if (body && Array.isArray(body.detail)) {
    return body.detail
      .map((item) => {
        const where = (item.loc || []).filter((part) => part !== 'body' && part !== 'query').join('.');
        return where ? `${where}: ${item.msg}` : String(item.msg);
      })
      .join('; ');
  }
  if (text && text.length < 300) return `HTTP ${status}: ${text.trim()}`;
  return `HTTP ${status}`;
}

function queryString(query) {
  if (!query) return '';
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query)) {
    if (value === undefined || value === null || value === '') continue;
    if (Array.isArray(value)) {
      if (value.length) params.set(name, value.join(','));
    } else {
      params.set(name, String(value));
    }
  }
  const text = params.toString();
  return text ? `?${text}` : '';
}

const enc = encodeURIComponent;

export class Api {
  /**
   * @param {string} token the bearer token
   * @param {(error: ApiError) => void} [onUnauthorized] called on every 401
   */
  constructor(token, onUnauthorized) {
    this.token = token;
    this.onUnauthorized = onUnauthorized || (() => {});
  }

  async request(method, path, { query, body, signal } = {}) {
    const headers = { authorization: `Bearer ${this.token}` };
    const init = { method, headers, signal, cache: 'no-store' };
    if (body !== undefined) {
      headers['content-type'] = 'application/json';
      init.body = typeof body === 'string' ? body : JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path + queryString(query), init);
    } catch (e) {
      if (e && e.name === 'AbortError') throw e;
      throw new ApiError(0, 'network', `Herald did not answer (${e && e.message ? e.message : e})`);
    }
    const text = await response.text();
    let parsed = null;
    if (text) {
      try {
        parsed = JSON.parse(text);
      } catch {
        parsed = null;
      }
    }
    if (!response.ok) {
      const error = new ApiError(
        response.status,
        (parsed && parsed.code) || (response.status === 422 ? 'validation' : 'http_error'),
        describeError(response.status, parsed, text),
      );
      if (response.status === 401) this.onUnauthorized(error);
      throw error;
    }
    return parsed === null ? text : parsed;
  }

  get(path, query, signal) {
    return this.request('GET', path, { query, signal });
  }

  post(path, body, query) {
    return this.request('POST', path, { body: body === undefined ? {} : body, query });
  }

  patch(path, body) {
    return this.request('PATCH', path, { body });
  }

  // Every page of a list, following Svix's iterator: an app may have 1,000 endpoints, and the
  // console shows whole lists. Bounded at `maxPages` of 250 (`done` false when cut short).
  async listAll(path, maxPages = 40) {
    const data = [];
    let iterator = null;
    for (let n = 0; n < maxPages; n += 1) {
      const page = await this.get(path, iterator ? { limit: 250, iterator } : { limit: 250 });
      data.push(...(page.data || []));
      if (page.done || !page.iterator) return { data, done: true };
      iterator = page.iterator;
    }
    return { data, done: false };
  }

  // Resources.
  listApps() {
    return this.listAll('/api/v1/app');
  }
  getApp(app) {
    return this.get(`/api/v1/app/${enc(app)}`);
  }
  createApp(body) {
    return this.post('/api/v1/app', body);
  }
  listEventTypes() {
    return this.listAll('/api/v1/event-type');
  }
  listEndpoints(app) {
    return this.listAll(`/api/v1/app/${enc(app)}/endpoint`);
  }
  createEndpoint(app, body) {
    return this.post(`/api/v1/app/${enc(app)}/endpoint`, body);
  }
  patchEndpoint(app, ep, body) {
    return this.patch(`/api/v1/app/${enc(app)}/endpoint/${enc(ep)}`, body);
  }
  endpointStats(app, ep) {
    return this.get(`/api/v1/app/${enc(app)}/endpoint/${enc(ep)}/stats`);
  }
  endpointSecret(app, ep) {
    return this.get(`/api/v1/app/${enc(app)}/endpoint/${enc(ep)}/secret`);
  }
  endpointAttempts(app, ep, limit = 250) {
    return this.get(`/api/v1/app/${enc(app)}/attempt/endpoint/${enc(ep)}`, { limit });
  }
  listMessages(app, filter = {}) {
    return this.get(`/api/v1/app/${enc(app)}/msg`, filter);
  }
  getMessage(app, msg) {
    return this.get(`/api/v1/app/${enc(app)}/msg/${enc(msg)}`);
  }
  createMessage(app, body) {
    return this.post(`/api/v1/app/${enc(app)}/msg`, body);
  }
  messageAttempts(app, msg) {
    return this.get(`/api/v1/app/${enc(app)}/attempt/msg/${enc(msg)}`, { limit: 250 });
  }
  messageDestinations(app, msg) {
    return this.get(`/api/v1/app/${enc(app)}/msg/${enc(msg)}/endpoint`, { limit: 250 });
  }
  resend(app, msg, ep) {
    return this.post(`/api/v1/app/${enc(app)}/msg/${enc(msg)}/endpoint/${enc(ep)}/resend`);
  }
  listSources(app) {
    return this.listAll(`/api/v1/app/${enc(app)}/ingest/source`);
  }
  sourceRequests(app, source) {
    return this.get(`/api/v1/app/${enc(app)}/ingest/source/${enc(source)}/request`);
  }
  sourceEvents(app, source) {
    return this.get(`/api/v1/app/${enc(app)}/ingest/source/${enc(source)}/event`, { limit: 20 });
  }
  listChannels(app) {
    return this.get(`/api/v1/app/${enc(app)}/channel`, { limit: 250 });
  }
  channelMembers(app, channel) {
    return this.get(`/api/v1/app/${enc(app)}/channel/${enc(channel)}/member`, { limit: 250 });
  }
  portalAccess(app, body) {
    return this.post(`/api/v1/auth/app-portal-access/${enc(app)}`, body);
  }

  /** The Prometheus text of /metrics (an environment-wide token only; 403 otherwise). */
  async metrics(signal) {
    const text = await this.request('GET', '/metrics', { signal });
    return typeof text === 'string' ? text : JSON.stringify(text);
  }

  /**
   * Reads the app's live tail until `signal` aborts or the server ends the stream.
   * `onEvent(name, data)` gets each event (`publication`, `lagged`) with its data parsed.
   * Resolves when the stream ends; rejects with an ApiError if it could not be opened.
   */
  async tail(app, { eventTypes, channels } = {}, onEvent, onOpen, signal) {
    const query = queryString({ event_types: eventTypes, channels });
    let response;
    try {
      response = await fetch(`/api/v1/app/${enc(app)}/tail${query}`, {
        headers: { authorization: `Bearer ${this.token}`, accept: 'text/event-stream' },
        cache: 'no-store',
        signal,
      });
    } catch (e) {
      if (e && e.name === 'AbortError') return;
      throw new ApiError(0, 'network', `Herald did not answer (${e && e.message ? e.message : e})`);
    }
    if (!response.ok) {
      const text = await response.text();
      let parsed = null;
      try {
        parsed = JSON.parse(text);
      } catch {
        parsed = null;
      }
      const error = new ApiError(response.status, (parsed && parsed.code) || 'http_error', describeError(response.status, parsed, text));
      if (response.status === 401) this.onUnauthorized(error);
      throw error;
    }
    if (onOpen) onOpen();
    const reader = response.body.getReader();
    const parser = new SseParser((name, data) => {
      let value = data;
      try {
        value = JSON.parse(data);
      } catch {
        value = data;
      }
      onEvent(name, value);
    });
    const decoder = new TextDecoder();
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        parser.push(decoder.decode(value, { stream: true }));
      }
    } catch (e) {
      if (e && e.name === 'AbortError') return;
      throw new ApiError(0, 'network', `the live tail was cut (${e && e.message ? e.message : e})`);
    } finally {
      try {
        reader.releaseLock();
      } catch {
        // already released
      }
    }
  }
}

/** A Server-Sent Events parser: feed it text as it comes; it calls back per complete event. */
export class SseParser {
  constructor(dispatch) {
    this.dispatch = dispatch;
    this.buffer = '';
    this.event = '';
    this.data = [];
  }

  push(text) {
    this.buffer += text;
    for (;;) {
      const match = /\r\n|\r|\n/.exec(this.buffer);
      if (!match) break;
      // A lone \r at the very end may be the first half of \r\n: wait for more.
      if (match[0] === '\r' && match.index === this.buffer.length - 1) break;
      const line = this.buffer.slice(0, match.index);
      this.buffer = this.buffer.slice(match.index + match[0].length);
      this.line(line);
    }
  }

  line(line) {
    if (line === '') {
      if (this.data.length) this.dispatch(this.event || 'message', this.data.join('\n'));
      this.event = '';
      this.data = [];
      return;
    }
    if (line.startsWith(':')) return; // a comment: keep-alive
    const colon = line.indexOf(':');
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') this.event = value;
    else if (field === 'data') this.data.push(value);
  }
}

/** `herald_transport_connections{transport="..."} n` samples from Prometheus text. */
export function parseTransportConnections(text) {
  const out = {};
  const pattern = /^herald_transport_connections\{([^}]*)\}\s+([0-9.eE+-]+)/gm;
  let match;
  while ((match = pattern.exec(text))) {
    const transport = /transport="([^"]*)"/.exec(match[1]);
    if (transport) out[transport[1]] = Number(match[2]);
  }
  return out;
}
