// The user stream (docs/websocket.md): one socket per device carrying every conversation of the
// user. It reconnects with backoff, and every connection resumes: it opens with ?resume=1, so the
// server holds live events until the client's resume frame has been answered, and what the client
// missed arrives first, in order.
import { api, ApiError } from "./api.js";

const PING_EVERY_MS = 25_000;   // daphne drops idle peers; this also finds a dead server for us
const PONG_WITHIN_MS = 10_000;
const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 15_000;
const RESUMED_WITHIN_MS = 15_000; // a resume never answered: start over on a new connection

export class UserStream {
  // handlers: onFrame(frame) for every frame; onState(state, detail) with state one of
  // "connecting", "online" (resumed, live), "offline" (waiting to retry), "unauthorized".
  constructor({ onFrame, onState }) {
    this.onFrame = onFrame;
    this.onState = onState;
    this.socket = null;
    this.live = false;
    this.stopped = true;
    this.attempt = 0;
    this.retryTimer = null;
    this.pingTimer = null;
    this.pongTimer = null;
    this.retryAt = 0;
    this.resumeTimer = null;
    window.addEventListener("online", () => this.retryNow());
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    this.dropSocket();
  }

  // Write a frame on a live connection; false when there is none (the caller keeps it for later).
  send(frame) {
    if (!this.live || this.socket?.readyState !== WebSocket.OPEN) return false;
    this.socket.send(JSON.stringify(frame));
    return true;
  }

  // After the ready frame: ask for what was missed. The stream is live once `resumed` answers.
  resume(cursors) {
    const socket = this.socket;
    if (!socket) return;
    socket.send(JSON.stringify({ type: "resume", cursors }));
    this.resumeTimer = setTimeout(() => { if (socket === this.socket && !this.live) socket.close(); }, RESUMED_WITHIN_MS);
  }

  retryNow() {
    if (this.stopped || this.socket) return;
    clearTimeout(this.retryTimer);
    this.connect();
  }

  async connect() {
    this.retryTimer = null;
    this.onState("connecting");
    let ticket;
    try {
      // A one-time ticket: browsers cannot put the token in a WebSocket handshake's headers.
      ticket = (await api("POST", "auth/ws-ticket/")).ticket;
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) {
        this.stopped = true;
        return this.onState("unauthorized");
      }
      return this.scheduleRetry();
    }
    if (this.stopped) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${location.host}/ws/chat/?resume=1&ticket=${encodeURIComponent(ticket)}`);
    this.socket = socket;
    socket.addEventListener("message", (event) => this.receive(socket, event));
    socket.addEventListener("close", () => this.closed(socket));
    socket.addEventListener("error", () => socket.close());
  }

  receive(socket, event) {
    if (socket !== this.socket) return;
    let frame;
    try { frame = JSON.parse(event.data); } catch { return; }
    this.armPing();
    if (frame.type === "pong") return;
    if (frame.type === "resumed") {
      clearTimeout(this.resumeTimer);
      this.live = true;
      this.attempt = 0;
      this.onFrame(frame);
      return this.onState("online");
    }
    this.onFrame(frame);
  }

  closed(socket) {
    if (socket !== this.socket) return;
    this.dropSocket();
    if (!this.stopped) this.scheduleRetry();
  }

  dropSocket() {
    const socket = this.socket;
    this.socket = null;
    this.live = false;
    clearTimeout(this.pingTimer);
    clearTimeout(this.pongTimer);
    clearTimeout(this.resumeTimer);
    if (socket && socket.readyState <= WebSocket.OPEN) socket.close();
  }

  // Exponential backoff with full jitter, so a restarted server is not hit by every client at once.
  scheduleRetry() {
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** this.attempt);
    const delay = this.attempt === 0 ? BACKOFF_FIRST_MS : Math.max(BACKOFF_FIRST_MS, Math.random() * ceiling);
    this.attempt += 1;
    this.retryAt = Date.now() + delay;
    this.onState("offline", { retryAt: this.retryAt });
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  armPing() {
    clearTimeout(this.pingTimer);
    clearTimeout(this.pongTimer);
    const socket = this.socket;
    this.pingTimer = setTimeout(() => {
      if (socket !== this.socket || socket.readyState !== WebSocket.OPEN) return;
      socket.send(JSON.stringify({ type: "ping" }));
      // Any frame re-arms; silence means the connection is dead even if the browser has not noticed.
      this.pongTimer = setTimeout(() => { if (socket === this.socket) socket.close(); this.closed(socket); }, PONG_WITHIN_MS);
    }, PING_EVERY_MS);
  }
}
