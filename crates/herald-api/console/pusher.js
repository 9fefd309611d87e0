// A minimal Pusher Channels (protocol 7) client for the Debug view: one WebSocket to
// /app/{key}, public channels only (they need no auth), pings answered.

export class PusherSocket {
  /**
   * @param {string} key the app's Pusher key
   * @param {{onState?: (state: string, detail?: string) => void,
   *          onEvent?: (event: {channel: string, event: string, data: any, raw: string}) => void}} handlers
   */
  constructor(key, handlers = {}) {
    this.key = key;
    this.onState = handlers.onState || (() => {});
    this.onEvent = handlers.onEvent || (() => {});
    this.socket = null;
    this.socketId = null;
    this.subscribed = new Map(); // channel -> {promise, resolve, reject, done}
    this.ready = null;
    this.closed = false;
  }

  url() {
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    return `${scheme}://${location.host}/app/${encodeURIComponent(this.key)}?protocol=7&client=js&version=8.4.0`;
  }

  /** Opens the socket; resolves with the socket id once Herald says the connection is up. */
  connect() {
    if (this.ready) return this.ready;
    this.closed = false;
    this.ready = new Promise((resolve, reject) => {
      this.onState('connecting');
      let socket;
      try {
        socket = new WebSocket(this.url());
      } catch (e) {
        this.ready = null;
        reject(new Error(`could not open the WebSocket: ${e.message || e}`));
        return;
      }
      this.socket = socket;
      const timer = setTimeout(() => {
        reject(new Error('the WebSocket did not connect within 10 s'));
        socket.close();
      }, 10_000);
      socket.addEventListener('message', (message) => {
        let frame;
        try {
          frame = JSON.parse(message.data);
        } catch {
          return;
        }
        this.handle(frame, message.data, (socketId) => {
          clearTimeout(timer);
          resolve(socketId);
        });
      });
      socket.addEventListener('close', (event) => {
        clearTimeout(timer);
        const why = `closed (code ${event.code}${event.reason ? `: ${event.reason}` : ''})`;
        this.onState('closed', why);
        for (const sub of this.subscribed.values()) if (!sub.done) sub.reject(new Error(`the WebSocket ${why}`));
        this.subscribed.clear();
        this.socket = null;
        this.socketId = null;
        this.ready = null;
        reject(new Error(`the WebSocket ${why}`));
      });
      socket.addEventListener('error', () => {
        this.onState('error', 'the WebSocket failed');
      });
    });
    return this.ready;
  }

  handle(frame, raw, established) {
    let data = frame.data;
    if (typeof data === 'string') {
      try {
        data = JSON.parse(data);
      } catch {
        // the event's data is text
      }
    }
    switch (frame.event) {
      case 'pusher:connection_established':
        this.socketId = data && data.socket_id;
        this.onState('connected', this.socketId);
        established(this.socketId);
        return;
      case 'pusher:ping':
        this.send({ event: 'pusher:pong', data: {} });
        return;
      case 'pusher:pong':
        return;
      case 'pusher_internal:subscription_succeeded': {
        const sub = this.subscribed.get(frame.channel);
        if (sub && !sub.done) {
          sub.done = true;
          sub.resolve();
        }
        return;
      }
      case 'pusher:subscription_error': {
        const sub = this.subscribed.get(frame.channel);
        const why = (data && (data.error || data.message)) || 'refused';
        if (sub && !sub.done) {
          sub.done = true;
          this.subscribed.delete(frame.channel);
          sub.reject(new Error(`subscribing to ${frame.channel} was refused: ${why}`));
        }
        return;
      }
      case 'pusher:error':
        this.onState('error', (data && data.message) || 'pusher:error');
        return;
      default:
        if (frame.event && frame.channel) this.onEvent({ channel: frame.channel, event: frame.event, data, raw });
    }
  }

  send(frame) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(frame));
  }

  /** Subscribes to a public channel; resolves once Herald confirms. */
  async subscribe(channel) {
    await this.connect();
    const known = this.subscribed.get(channel);
    if (known) return known.promise;
    let resolve;
    let reject;
    const promise = new Promise((res, rej) => {
      resolve = res;
      reject = rej;
    });
    const sub = { promise, resolve, reject, done: false };
    this.subscribed.set(channel, sub);
    const timer = setTimeout(() => {
      if (!sub.done) {
        sub.done = true;
        this.subscribed.delete(channel);
        reject(new Error(`Herald did not confirm the subscription to ${channel} within 10 s`));
      }
    }, 10_000);
    promise.finally(() => clearTimeout(timer)).catch(() => {});
    this.send({ event: 'pusher:subscribe', data: { channel } });
    return promise;
  }

  channels() {
    return [...this.subscribed.entries()].filter(([, sub]) => sub.done).map(([name]) => name);
  }

  close() {
    this.closed = true;
    if (this.socket) this.socket.close(1000);
  }
}
