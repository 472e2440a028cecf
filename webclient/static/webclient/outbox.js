// Messages on their way out. Each send has its own idempotency key (client_message_id), kept for
// every retry of that send, so however often it goes out (a reconnect, a shed send, an ack lost
// with its connection) the server stores it once and answers with the one message. A send stays
// here, shown as pending, until its ack (or its own message.new) arrives. The outbox is kept in
// localStorage, so sends waiting for the network survive a reload of the page.
const RESEND_AFTER_MS = 10_000;  // no ack by then: send again (same key)
const RETRYABLE = new Set(["unavailable", "rate_limited"]);

export class Outbox {
  constructor({ userId, write, changed }) {
    this.key = `chat.outbox.${userId}`;
    this.write = write;
    this.changed = changed;
    this.items = new Map();
    this.timers = new Map();
    try {
      for (const item of JSON.parse(localStorage.getItem(this.key) || "[]")) this.items.set(item.clientId, item);
    } catch { /* a damaged outbox is dropped */ }
  }

  add(conversationId, content) {
    const clientId = crypto.randomUUID();
    const item = { clientId, conversationId, content, failed: null, done: false, attempts: 0 };
    this.items.set(clientId, item);
    this.save();
    this.changed(item);
    this.transmit(item);
    return item;
  }

  has(clientId) { return this.items.has(clientId); }

  forConversation(conversationId) {
    return [...this.items.values()].filter((item) => item.conversationId === conversationId);
  }

  // The connection is live again: everything still pending goes out, in the order it was written.
  flush() {
    for (const item of this.items.values()) if (!item.failed) this.transmit(item);
  }

  transmit(item) {
    clearTimeout(this.timers.get(item.clientId));
    const sent = this.write({
      type: "message.send",
      conversation_id: item.conversationId,
      client_message_id: item.clientId,
      content: item.content,
      message_type: "text",
      // The key travels with the message too, so this user's other devices, and this one when
      // the message.new overtakes its ack, know the message is this send.
      metadata: { client_message_id: item.clientId },
    });
    if (sent) {
      item.attempts += 1;
      this.timers.set(item.clientId, setTimeout(() => this.items.has(item.clientId) && this.transmit(item), RESEND_AFTER_MS));
    }
  }

  acknowledged(clientId) {
    const item = this.items.get(clientId);
    if (!item) return;
    this.forget(item);
  }

  // An error frame for this send: a busy server is tried again later (same key); a refusal is shown.
  refused(clientId, code, detail) {
    const item = this.items.get(clientId);
    if (!item) return;
    clearTimeout(this.timers.get(clientId));
    if (RETRYABLE.has(code)) {
      const delay = Math.min(30_000, 1000 * 2 ** Math.min(item.attempts, 5));
      this.timers.set(clientId, setTimeout(() => this.items.has(clientId) && this.transmit(item), delay));
      return;
    }
    item.failed = detail || code;
    this.save();
    this.changed(item);
  }

  retry(clientId) {
    const item = this.items.get(clientId);
    if (!item) return;
    item.failed = null;
    this.save();
    this.changed(item);
    this.transmit(item);
  }

  discard(clientId) {
    const item = this.items.get(clientId);
    if (item) this.forget(item);
  }

  failConversation(conversationId, reason) {
    for (const item of this.forConversation(conversationId)) {
      clearTimeout(this.timers.get(item.clientId));
      item.failed = reason;
      this.changed(item);
    }
    this.save();
  }

  clear() {
    for (const timer of this.timers.values()) clearTimeout(timer);
    this.items.clear();
    localStorage.removeItem(this.key);
  }

  forget(item) {
    clearTimeout(this.timers.get(item.clientId));
    this.timers.delete(item.clientId);
    this.items.delete(item.clientId);
    item.done = true;
    this.save();
    this.changed(item);
  }

  save() {
    localStorage.setItem(this.key, JSON.stringify([...this.items.values()]));
  }
}
