// The web client: sign-up and log-in, the conversation list, one conversation at a time.
// Plain ES modules served as static files: nothing to build, nothing fetched from elsewhere.
// User content is only ever put in the page as text (textContent), never parsed as HTML.
import { api, allPages, ApiError, token } from "./api.js";
import { UserStream } from "./stream.js";
import { Outbox } from "./outbox.js";
import { $, el, formatTime, show } from "./dom.js";

const PAGE = 50;
const TYPING_SHOWN_MS = 4000;
const TYPING_SENT_EVERY_MS = 2000;
const MAX_RESUME = 1000;

const state = {
  me: null,
  conversations: new Map(), // id -> conversation (see conversationFrom)
  usernames: new Map(),     // user id -> username, from participant lists
  openId: null,
  stream: null,
  outbox: null,
  lastTypingSent: 0,
  online: false,
};

// ------------------------------------------------------------------ sign-up, log-in, log-out

let signingUp = false;

function showAuth(message = "") {
  show($("#app-view"), false);
  show($("#auth-view"), true);
  $("#auth-error").textContent = message;
  $("#auth-username").focus();
}

function setAuthMode(signup) {
  signingUp = signup;
  $("#auth-title").textContent = signup ? "Create an account" : "Log in";
  $("#auth-submit").textContent = signup ? "Create account" : "Log in";
  $("#auth-switch").textContent = signup ? "Have an account? Log in" : "New here? Create an account";
  $("#auth-password").autocomplete = signup ? "new-password" : "current-password";
  $("#auth-error").textContent = "";
}

async function submitAuth(event) {
  event.preventDefault();
  const username = $("#auth-username").value.trim();
  const password = $("#auth-password").value;
  if (!username || !password) {
    $("#auth-error").textContent = "Enter a username and a password.";
    return;
  }
  $("#auth-submit").disabled = true;
  try {
    if (signingUp) await api("POST", "auth/register/", { body: { username, password } });
    const answer = await api("POST", "auth/token/", { body: { username, password } });
    token.set(answer.token);
    $("#auth-password").value = "";
    await startApp();
  } catch (error) {
    $("#auth-error").textContent = error.message;
  } finally {
    $("#auth-submit").disabled = false;
  }
}

async function logout() {
  try { await api("POST", "auth/logout/"); } catch { /* the token is forgotten either way */ }
  endSession();
  showAuth("You are logged out.");
}

function endSession() {
  state.stream?.stop();
  state.outbox?.clear();
  token.clear();
  state.me = null;
  state.conversations.clear();
  state.openId = null;
  $("#conversation-list").replaceChildren();
  closeConversationPane();
  show($("#offline-banner"), false);
}

// ------------------------------------------------------------------ start-up

async function startApp() {
  try {
    state.me = await api("GET", "users/me/");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      token.clear();
      return showAuth();
    }
    return showAuth(error.message);
  }
  state.usernames.set(state.me.id, state.me.username);
  $("#me-name").textContent = state.me.username;
  show($("#auth-view"), false);
  show($("#app-view"), true);
  state.outbox = new Outbox({
    userId: state.me.id,
    write: (frame) => state.stream.send(frame),
    changed: (item) => renderPending(item),
  });
  await loadConversations();
  state.stream = new UserStream({ onFrame: handleFrame, onState: streamState });
  state.stream.start();
  showConversationFromHash();
}

async function loadConversations() {
  const list = await allPages("conversations/");
  for (const data of list) upsertConversation(data);
  renderList();
}

function conversationFrom(data) {
  return {
    id: data.id,
    kind: data.kind,
    title: data.title,
    lastSeq: data.last_seq,
    lastChange: data.last_change ?? 0,
    lastReadSeq: data.last_read_seq ?? data.last_seq,
    lastActivity: data.last_activity_at || data.created_at,
    participants: null, // Map user id -> {username, role, lastReadSeq}, loaded on demand
    messages: new Map(), // seq -> message
    loaded: false,       // the newest page was read; messages are contiguous from oldestSeq up
    oldestSeq: null,
    hasOlder: false,
    typing: new Map(),   // user id -> timer
    online: new Set(),
  };
}

function upsertConversation(data) {
  const known = state.conversations.get(data.id);
  if (!known) {
    const conversation = conversationFrom(data);
    state.conversations.set(data.id, conversation);
    if (conversation.kind === "direct") loadParticipants(conversation).then(renderList, () => {});
    return conversation;
  }
  // The same conversation seen again (a fresh list, a join): numbers never move backwards.
  if (data.kind && known.kind !== data.kind) {
    known.kind = data.kind;
    if (known.kind === "direct" && !known.participants) loadParticipants(known).then(renderList, () => {});
  }
  known.title = data.title;
  known.lastSeq = Math.max(known.lastSeq, data.last_seq ?? 0);
  if (data.last_read_seq !== undefined) known.lastReadSeq = Math.max(known.lastReadSeq, data.last_read_seq);
  if (data.last_activity_at && data.last_activity_at > known.lastActivity) known.lastActivity = data.last_activity_at;
  return known;
}

async function loadParticipants(conversation) {
  const people = await api("GET", `conversations/${conversation.id}/participants/`);
  conversation.participants = new Map();
  for (const person of people) {
    state.usernames.set(person.user_id, person.username);
    conversation.participants.set(person.user_id, { username: person.username, role: person.role, lastReadSeq: person.last_read_seq });
  }
}

// ------------------------------------------------------------------ the stream

function streamState(status) {
  state.online = status === "online";
  const banner = $("#offline-banner");
  if (status === "unauthorized") {
    endSession();
    return showAuth("Your session has ended; log in again.");
  }
  if (status === "online") {
    show(banner, false);
    state.outbox.flush();
    markRead();
    return;
  }
  if (status === "offline") {
    banner.textContent = "Offline: reconnecting… Messages you write are sent when the connection is back.";
    show(banner, true);
  }
}

function handleFrame(frame) {
  const conversation = frame.conversation_id ? state.conversations.get(frame.conversation_id) : null;
  switch (frame.type) {
    case "ready": return onReady(frame);
    case "resumed": return onResumed(frame);
    case "message.new": return conversation && applyMessage(conversation, frame.message);
    case "message.ack": return onAck(frame);
    case "message.updated":
    case "message.deleted":
    case "reaction.added":
    case "reaction.removed":
      return conversation && applyChange(conversation, frame);
    case "typing": return conversation && onTyping(conversation, frame.user_id);
    case "read": return conversation && onRead(conversation, frame);
    case "presence": return conversation && onPresence(conversation, frame);
    case "conversation.joined": return onJoined(frame);
    case "conversation.updated": return onUpdated(frame);
    case "conversation.left": return onLeft(frame.conversation_id, frame.reason);
    case "error": return onError(frame);
    default: return undefined; // a newer server's frame this client does not know yet
  }
}

// Every connection resumes from where this client stands in each conversation it knows: the
// highest seq and change it has seen. The server sends what came after, in order, then `resumed`.
async function onReady(frame) {
  const carried = frame.conversations || {};
  for (const id of [...state.conversations.keys()]) {
    if (!(id in carried) && !frame.truncated) dropConversation(id, "You are no longer in this conversation.");
  }
  const unknown = Object.keys(carried).filter((id) => !state.conversations.has(id));
  for (const id of unknown) {
    // Joined while this client was away: its numbers start where it stands now.
    const standing = carried[id];
    // Its kind, title and read marker come with the list read below.
    upsertConversation({ id, kind: null, title: "", last_seq: standing.last_seq, last_change: standing.last_change, last_read_seq: 0 });
  }
  if (unknown.length) {
    // Titles, kinds and unread counts of the new ones (and fresh counts for all).
    loadConversations().catch(() => {});
  }
  // At most MAX_RESUME conversations per resume frame (the server's CHAT_MAX_RESUME_CONVERSATIONS
  // default): the most recently active; any others start from where ready put them.
  const cursors = {};
  const resumable = [...state.conversations.values()].filter((c) => c.id in carried)
    .sort((a, b) => (a.lastActivity < b.lastActivity ? 1 : -1));
  for (const conversation of resumable.slice(0, MAX_RESUME)) {
    cursors[conversation.id] = { seq: conversation.lastSeq, change: conversation.lastChange };
  }
  for (const conversation of resumable.slice(MAX_RESUME)) {
    conversation.lastSeq = Math.max(conversation.lastSeq, carried[conversation.id].last_seq);
    conversation.lastChange = Math.max(conversation.lastChange, carried[conversation.id].last_change);
    conversation.messages.clear();
    conversation.loaded = false;
  }
  state.stream.resume(cursors);
}

function onResumed(frame) {
  for (const [id, outcome] of Object.entries(frame.conversations || {})) {
    const conversation = state.conversations.get(id);
    if (!conversation) continue;
    if (outcome.forbidden) {
      dropConversation(id, "You are no longer in this conversation.");
    } else if (!outcome.recovered) {
      // Too much was missed to replay: start over from REST for this one.
      conversation.messages.clear();
      conversation.loaded = false;
      loadConversations().catch(() => {});
      if (state.openId === id) openConversation(id);
    }
  }
  renderList();
}

function onJoined(frame) {
  const data = { ...frame.conversation, last_seq: frame.last_seq, last_change: frame.last_change };
  const known = state.conversations.has(data.id);
  const conversation = upsertConversation(data);
  if (!known) {
    // A new participant starts with the history before their arrival marked read.
    conversation.lastSeq = frame.last_seq;
    conversation.lastChange = frame.last_change;
    conversation.lastReadSeq = frame.last_seq;
  }
  renderList();
}

function onUpdated(frame) {
  const conversation = state.conversations.get(frame.conversation.id);
  if (!conversation) return;
  conversation.title = frame.conversation.title;
  renderList();
  if (state.openId === conversation.id) renderHeader(conversation);
}

function onLeft(id, reason) {
  const conversation = state.conversations.get(id);
  if (!conversation) return;
  const name = conversationName(conversation);
  const why = { removed: "You were removed from", banned: "You were banned from", left: "You left" }[reason] || "You are no longer in";
  dropConversation(id, `${why} “${name}”.`);
}

function dropConversation(id, notice) {
  const conversation = state.conversations.get(id);
  if (!conversation) return;
  state.conversations.delete(id);
  state.outbox.failConversation(id, "You are no longer in this conversation.");
  if (state.openId === id) {
    closeConversationPane();
    $("#empty-state").textContent = notice;
    history.replaceState(null, "", location.pathname);
  }
  renderList();
}

function onError(frame) {
  if (frame.client_message_id && state.outbox.has(frame.client_message_id)) {
    // Field errors ({"content": ["…"]}) read as their sentences.
    const reasons = frame.fields ? Object.values(frame.fields).flat().join(" ") : "";
    state.outbox.refused(frame.client_message_id, frame.code, reasons || frame.detail);
  }
}

function onAck(frame) {
  state.outbox.acknowledged(frame.client_message_id);
  const conversation = state.conversations.get(frame.conversation_id);
  if (conversation) applyMessage(conversation, frame.message);
}

// ------------------------------------------------------------------ messages and changes

function applyMessage(conversation, message) {
  const isNew = !conversation.messages.has(message.seq) && message.seq > conversation.lastSeq;
  const gap = conversation.loaded && message.seq > conversation.lastSeq + 1;
  if (message.seq > conversation.lastSeq) {
    conversation.lastSeq = message.seq;
    if (message.sent_at > conversation.lastActivity) conversation.lastActivity = message.sent_at;
  }
  if (message.sender_id === state.me.id) {
    // A send moves the sender's own read marker to it.
    conversation.lastReadSeq = Math.max(conversation.lastReadSeq, message.seq);
    const clientId = message.metadata && message.metadata.client_message_id;
    if (clientId) state.outbox.acknowledged(clientId);
  }
  conversation.messages.set(message.seq, message);
  if (state.openId === conversation.id && conversation.loaded) {
    renderMessage(conversation, message);
    if (gap) fillGaps(conversation).catch(() => {});
    if (isNew) {
      stopTyping(conversation, message.sender_id);
      markRead();
    }
  }
  renderList();
}

function applyChange(conversation, frame) {
  conversation.lastChange = Math.max(conversation.lastChange, frame.change || 0);
  const seq = frame.message ? frame.message.seq : frame.seq;
  const current = conversation.messages.get(seq);
  if (frame.type === "message.updated") {
    conversation.messages.set(seq, frame.message);
  } else if (current && frame.type === "message.deleted") {
    conversation.messages.set(seq, { ...current, deleted: true, content: "", metadata: {}, attachments: [] });
  } else if (current && frame.type.startsWith("reaction.")) {
    const reactions = { ...(current.reactions || {}) };
    const mine = frame.user_id === state.me.id;
    const entry = { ...(reactions[frame.emoji] || { count: 0, me: false }) };
    entry.count += frame.type === "reaction.added" ? 1 : -1;
    if (mine) entry.me = frame.type === "reaction.added";
    if (entry.count > 0) reactions[frame.emoji] = entry;
    else delete reactions[frame.emoji];
    conversation.messages.set(seq, { ...current, reactions });
  }
  if (state.openId === conversation.id && conversation.messages.has(seq)) renderMessage(conversation, conversation.messages.get(seq));
}

// Messages shown are contiguous by seq: whatever a page or the stream left out in between is read.
async function fillGaps(conversation) {
  const seqs = [...conversation.messages.keys()].filter((s) => s >= conversation.oldestSeq).sort((a, b) => a - b);
  for (let i = 1; i < seqs.length; i++) {
    let after = seqs[i - 1];
    while (after + 1 < seqs[i]) {
      const page = await api("GET", `conversations/${conversation.id}/messages/?after_seq=${after}&before_seq=${seqs[i]}&limit=200`);
      if (!page.results.length) break;
      for (const message of page.results) {
        if (!conversation.messages.has(message.seq)) applyMessage(conversation, message);
      }
      after = page.results[page.results.length - 1].seq;
    }
  }
}

// ------------------------------------------------------------------ typing, reads, presence

function onTyping(conversation, userId) {
  clearTimeout(conversation.typing.get(userId));
  conversation.typing.set(userId, setTimeout(() => stopTyping(conversation, userId), TYPING_SHOWN_MS));
  if (state.openId === conversation.id) renderTyping(conversation);
}

function stopTyping(conversation, userId) {
  if (!conversation.typing.has(userId)) return;
  clearTimeout(conversation.typing.get(userId));
  conversation.typing.delete(userId);
  if (state.openId === conversation.id) renderTyping(conversation);
}

function onRead(conversation, frame) {
  if (frame.user_id === state.me.id) {
    conversation.lastReadSeq = Math.max(conversation.lastReadSeq, frame.seq);
    return renderList();
  }
  const person = conversation.participants?.get(frame.user_id);
  if (person) person.lastReadSeq = Math.max(person.lastReadSeq, frame.seq);
  if (state.openId === conversation.id) renderReadMarks(conversation);
}

function onPresence(conversation, frame) {
  if (frame.online) conversation.online.add(frame.user_id);
  else conversation.online.delete(frame.user_id);
  if (state.openId === conversation.id) renderPeople(conversation);
}

function markRead() {
  const conversation = state.conversations.get(state.openId);
  if (!conversation || !conversation.loaded || document.visibilityState !== "visible") return;
  if (conversation.lastSeq > conversation.lastReadSeq) {
    if (state.stream.send({ type: "read", conversation_id: conversation.id, seq: conversation.lastSeq })) {
      conversation.lastReadSeq = conversation.lastSeq;
      renderList();
    }
  }
}

// ------------------------------------------------------------------ the conversation list

function conversationName(conversation) {
  if (!conversation.kind) return "…";
  if (conversation.kind === "group") return conversation.title || "Untitled group";
  const other = conversation.participants && [...conversation.participants.entries()].find(([id]) => id !== state.me.id);
  return other ? other[1].username : "Direct conversation";
}

function unread(conversation) {
  return Math.max(0, conversation.lastSeq - conversation.lastReadSeq);
}

// Rows are updated in place and moved only when the order changes, so a keyboard user's focus on
// a row survives the list's live updates.
function renderList() {
  const list = $("#conversation-list");
  const rows = new Map([...list.children].map((row) => [row.dataset.id, row]));
  const sorted = [...state.conversations.values()].sort((a, b) => (a.lastActivity < b.lastActivity ? 1 : -1));
  const wanted = sorted.map((conversation) => {
    const count = unread(conversation);
    let row = rows.get(conversation.id);
    if (!row) {
      row = el("li", { dataset: { id: conversation.id } }, [
        el("a", { href: `#c/${conversation.id}`, className: "conversation-link" }, [
          el("span", { className: "name" }), el("time", { className: "activity" }), el("span", { className: "unread" }),
        ]),
      ]);
    }
    const link = row.firstElementChild;
    const name = conversationName(conversation);
    link.querySelector(".name").textContent = name;
    const time = link.querySelector(".activity");
    time.dateTime = conversation.lastActivity || "";
    time.textContent = formatTime(conversation.lastActivity);
    const badge = link.querySelector(".unread");
    badge.textContent = count ? String(count) : "";
    show(badge, count > 0);
    link.setAttribute("aria-label", count ? `${name}, ${count} unread` : name);
    if (conversation.id === state.openId) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
    return row;
  });
  const current = [...list.children];
  if (current.length !== wanted.length || current.some((row, i) => row !== wanted[i])) list.replaceChildren(...wanted);
}

// ------------------------------------------------------------------ one conversation

function showConversationFromHash() {
  const match = location.hash.match(/^#c\/([0-9a-f-]{36})$/);
  if (match && state.conversations.has(match[1])) openConversation(match[1]);
  // Other fragments (the skip link's #composer-input) are in-page jumps, not navigation.
  else if (!location.hash || location.hash === "#") closeConversationPane();
}

async function openConversation(id) {
  const conversation = state.conversations.get(id);
  if (!conversation) return;
  state.openId = id;
  document.body.classList.add("showing-conversation");
  show($("#empty-state"), false);
  show($("#conversation-pane"), true);
  $("#messages").replaceChildren();
  $("#typing").textContent = "";
  $("#conversation-status").textContent = "";
  renderHeader(conversation);
  renderList();
  renderPendingFor(id);
  try {
    if (!conversation.participants || conversation.kind === "group") await loadParticipants(conversation);
    if (state.openId !== id) return;
    renderHeader(conversation);
    renderPeople(conversation);
    if (!conversation.loaded) await loadNewest(conversation);
    if (state.openId !== id) return;
    // One announcement for the page, not one per message, for screen readers.
    $("#messages").setAttribute("aria-busy", "true");
    for (const seq of [...conversation.messages.keys()].filter((s) => s >= conversation.oldestSeq).sort((a, b) => a - b)) {
      renderMessage(conversation, conversation.messages.get(seq));
    }
    $("#messages").setAttribute("aria-busy", "false");
    show($("#older"), conversation.hasOlder);
    scrollToEnd();
    markRead();
  } catch (error) {
    $("#conversation-status").textContent = error.message;
  }
}

async function loadNewest(conversation) {
  const page = await api("GET", `conversations/${conversation.id}/messages/?limit=${PAGE}`);
  for (const message of page.results) conversation.messages.set(message.seq, message);
  conversation.oldestSeq = page.results.length ? page.results[0].seq : conversation.lastSeq + 1;
  conversation.hasOlder = page.has_more;
  conversation.loaded = true;
  for (const message of page.results) {
    if (message.seq > conversation.lastSeq) conversation.lastSeq = message.seq;
  }
  await fillGaps(conversation);
}

async function loadOlder() {
  const conversation = state.conversations.get(state.openId);
  if (!conversation || !conversation.hasOlder) return;
  const timeline = $("#timeline");
  const fromBottom = timeline.scrollHeight - timeline.scrollTop;
  $("#older").disabled = true;
  try {
    const page = await api("GET", `conversations/${conversation.id}/messages/?before_seq=${conversation.oldestSeq}&limit=${PAGE}`);
    if (page.results.length) conversation.oldestSeq = page.results[0].seq;
    for (const message of page.results) {
      if (!conversation.messages.has(message.seq)) conversation.messages.set(message.seq, message);
      renderMessage(conversation, conversation.messages.get(message.seq));
    }
    conversation.hasOlder = page.has_more && page.results.length > 0;
    show($("#older"), conversation.hasOlder);
    timeline.scrollTop = timeline.scrollHeight - fromBottom; // keep the reader's place
  } catch (error) {
    $("#conversation-status").textContent = error.message;
  } finally {
    $("#older").disabled = false;
  }
}

function closeConversationPane() {
  state.openId = null;
  document.body.classList.remove("showing-conversation");
  show($("#conversation-pane"), false);
  show($("#empty-state"), true);
  $("#empty-state").textContent = "Pick a conversation, or start one.";
}

function renderHeader(conversation) {
  $("#conversation-title").textContent = conversationName(conversation);
  const group = conversation.kind === "group";
  show($("#add-person"), group && canManage(conversation));
  show($("#leave"), group);
}

function myRole(conversation) {
  return conversation.participants?.get(state.me.id)?.role;
}

function canManage(conversation) {
  return ["owner", "admin"].includes(myRole(conversation));
}

function renderPeople(conversation) {
  if (!conversation.participants) return;
  const role = myRole(conversation);
  $("#people-list").replaceChildren(
    ...[...conversation.participants.entries()].map(([userId, person]) => {
      const mayRemove = conversation.kind === "group" && userId !== state.me.id &&
        (role === "owner" || (role === "admin" && person.role === "member"));
      const online = conversation.online.has(userId);
      return el("li", { dataset: { userId } }, [
        el("span", { className: online ? "dot online" : "dot", title: online ? "online" : "", ariaHidden: "true" }),
        el("span", { className: "person", text: person.username }),
        el("span", { className: "role", text: person.role + (online ? ", online" : "") }),
        mayRemove ? el("button", { type: "button", className: "quiet small", text: "Remove",
          ariaLabel: `Remove ${person.username}`, onclick: () => removePerson(conversation, userId) }) : null,
      ]);
    }),
  );
  renderHeader(conversation);
}

function senderName(userId) {
  return state.usernames.get(userId) || "someone";
}

function messageElement(conversation, message) {
  const mine = message.sender_id === state.me.id;
  const item = el("li", { className: mine ? "message mine" : "message", dataset: { seq: String(message.seq) } });
  item.append(el("div", { className: "meta" }, [
    el("span", { className: "sender", text: senderName(message.sender_id) }),
    el("time", { dateTime: message.sent_at, text: formatTime(message.sent_at) }),
    message.edited_at && !message.deleted ? el("span", { className: "edited", text: "(edited)" }) : null,
  ]));
  if (message.reply_to) {
    const quoted = conversation.messages.get(message.reply_to);
    item.append(el("p", { className: "reply-to", text: quoted ? `↪ ${senderName(quoted.sender_id)}: ${excerpt(quoted)}` : `↪ reply to message ${message.reply_to}` }));
  }
  if (message.deleted) {
    item.append(el("p", { className: "body deleted", text: "This message was deleted." }));
    return item;
  }
  if (message.content_omitted) {
    item.append(el("button", { type: "button", className: "quiet", text: "Show this long message",
      onclick: () => loadFullMessage(conversation, message.seq) }));
  } else if (message.content) {
    item.append(el("p", { className: "body", text: message.content }));
  }
  if (Array.isArray(message.attachments) && message.attachments.length) item.append(attachmentList(message.attachments));
  if (message.reactions && Object.keys(message.reactions).length) {
    item.append(el("div", { className: "reactions" }, Object.entries(message.reactions).map(([emoji, r]) =>
      el("span", { className: r.me ? "reaction me" : "reaction", text: `${emoji} ${r.count}`, ariaLabel: `${emoji}: ${r.count}${r.me ? ", including you" : ""}` }))));
  }
  const actions = el("div", { className: "actions" });
  if (mine) {
    actions.append(
      el("span", { className: "read-mark" }),
      el("button", { type: "button", className: "quiet small", text: "Edit", ariaLabel: `Edit message ${message.seq}`, onclick: () => editMessage(conversation, message.seq) }),
      el("button", { type: "button", className: "quiet small", text: "Delete", ariaLabel: `Delete message ${message.seq}`, onclick: () => deleteMessage(conversation, message.seq) }),
    );
  } else {
    actions.append(el("button", { type: "button", className: "quiet small", text: "Report", ariaLabel: `Report message ${message.seq}`, onclick: () => reportMessage(conversation, message.seq) }));
  }
  item.append(actions);
  return item;
}

function excerpt(message) {
  if (message.deleted) return "deleted message";
  const text = message.content || "";
  return text.length > 80 ? text.slice(0, 80) + "…" : text;
}

// Attachment descriptors ({attachment_id, name, content_type, size, ...}): the bytes need the
// token, so they are fetched and shown from memory (blob: URLs), never linked to directly.
function attachmentList(attachments) {
  return el("ul", { className: "attachments" }, attachments.map((attachment) => {
    const item = el("li");
    const name = attachment.name || "attachment";
    const download = el("button", { type: "button", className: "quiet small", text: `Download ${name}`,
      onclick: async () => {
        const url = await attachmentUrl(attachment);
        const link = el("a", { href: url, download: name });
        document.body.append(link);
        link.click();
        link.remove();
      } });
    if ((attachment.content_type || "").startsWith("image/")) {
      const image = el("img", { alt: name, className: "preview", width: attachment.width || undefined, height: attachment.height || undefined });
      attachmentUrl(attachment, true).then((url) => { image.src = url; }, () => { image.alt = `${name} (could not be loaded)`; });
      item.append(image);
    }
    item.append(download);
    return item;
  }));
}

async function attachmentUrl(attachment, thumbnail = false) {
  // Only this origin's path of the URL the server gave: the request carries the token.
  const given = thumbnail && attachment.thumbnail_url ? attachment.thumbnail_url : attachment.url;
  const path = given ? new URL(given, location.href).pathname : `/api/v1/attachments/${encodeURIComponent(attachment.attachment_id)}/`;
  const response = await api("GET", path, { raw: true });
  return URL.createObjectURL(await response.blob());
}

function renderMessage(conversation, message) {
  if (message.seq < conversation.oldestSeq) return;
  const list = $("#messages");
  const fresh = messageElement(conversation, message);
  const existing = list.querySelector(`li[data-seq="${message.seq}"]`);
  if (existing) {
    existing.replaceWith(fresh);
  } else {
    // In seq order, whatever order pages and frames arrive in.
    const atEnd = nearEnd();
    let after = list.lastElementChild;
    while (after && Number(after.dataset.seq) > message.seq) after = after.previousElementSibling;
    list.insertBefore(fresh, after ? after.nextElementSibling : list.firstElementChild);
    if (atEnd) scrollToEnd();
  }
  renderReadMarks(conversation);
}

// Own messages say who has read them (the others' read markers).
function renderReadMarks(conversation) {
  if (!conversation.participants) return;
  const others = [...conversation.participants.entries()].filter(([id]) => id !== state.me.id).map(([, p]) => p);
  for (const mark of $("#messages").querySelectorAll("li.mine .read-mark")) {
    const seq = Number(mark.closest("li").dataset.seq);
    const readers = others.filter((p) => p.lastReadSeq >= seq).map((p) => p.username);
    mark.textContent = readers.length === 0 ? "Sent" : others.length === 1 ? "Read" : `Read by ${readers.join(", ")}`;
  }
}

function renderTyping(conversation) {
  const names = [...conversation.typing.keys()].map(senderName);
  $("#typing").textContent = names.length === 0 ? "" : names.length === 1 ? `${names[0]} is typing…` : `${names.join(", ")} are typing…`;
}

function nearEnd() {
  const timeline = $("#timeline");
  return timeline.scrollHeight - timeline.scrollTop - timeline.clientHeight < 80;
}

function scrollToEnd() {
  const timeline = $("#timeline");
  timeline.scrollTop = timeline.scrollHeight;
}

async function loadFullMessage(conversation, seq) {
  try {
    const message = await api("GET", `conversations/${conversation.id}/messages/${seq}/`);
    conversation.messages.set(seq, message);
    renderMessage(conversation, message);
  } catch (error) {
    $("#conversation-status").textContent = error.message;
  }
}

// ------------------------------------------------------------------ sending

function renderPending(item) {
  const list = $("#pending");
  const existing = list.querySelector(`li[data-client-id="${CSS.escape(item.clientId)}"]`);
  if (item.done || item.conversationId !== state.openId) {
    existing?.remove();
    return;
  }
  const status = item.failed ? `Not sent: ${item.failed}` : "Sending…";
  const row = el("li", { className: item.failed ? "message mine pending failed" : "message mine pending", dataset: { clientId: item.clientId } }, [
    el("p", { className: "body", text: item.content }),
    el("div", { className: "actions" }, [
      el("span", { className: "status", text: status }),
      item.failed ? el("button", { type: "button", className: "quiet small", text: "Retry", onclick: () => state.outbox.retry(item.clientId) }) : null,
      item.failed ? el("button", { type: "button", className: "quiet small", text: "Discard", onclick: () => state.outbox.discard(item.clientId) }) : null,
    ]),
  ]);
  if (existing) existing.replaceWith(row);
  else {
    list.append(row);
    scrollToEnd();
  }
}

function renderPendingFor(conversationId) {
  $("#pending").replaceChildren();
  for (const item of state.outbox.forConversation(conversationId)) renderPending(item);
}

function submitMessage(event) {
  event.preventDefault();
  const input = $("#composer-input");
  const content = input.value;
  if (!content.trim() || !state.openId) return;
  state.outbox.add(state.openId, content);
  input.value = "";
  input.focus();
}

function composerKey(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("#composer").requestSubmit();
  }
}

function composerInput() {
  const now = Date.now();
  if (state.openId && now - state.lastTypingSent > TYPING_SENT_EVERY_MS) {
    if (state.stream.send({ type: "typing", conversation_id: state.openId })) state.lastTypingSent = now;
  }
}

// ------------------------------------------------------------------ edit, delete, report

function ask({ title, label, value = "", ok = "OK" }) {
  const dialog = $("#dialog");
  $("#dialog-title").textContent = title;
  $("#dialog-label").textContent = label;
  $("#dialog-input").value = value;
  $("#dialog-ok").textContent = ok;
  $("#dialog-error").textContent = "";
  show($("#dialog-label"), Boolean(label));
  show($("#dialog-input"), Boolean(label));
  return new Promise((resolve) => {
    const done = (answer) => {
      $("#dialog-form").onsubmit = null;
      $("#dialog-cancel").onclick = null;
      dialog.onclose = null;
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    $("#dialog-form").onsubmit = (event) => { event.preventDefault(); done(label ? $("#dialog-input").value : true); };
    $("#dialog-cancel").onclick = () => done(null);
    dialog.onclose = () => done(null);
    dialog.showModal();
    (label ? $("#dialog-input") : $("#dialog-ok")).focus();
  });
}

async function editMessage(conversation, seq) {
  const message = conversation.messages.get(seq);
  const content = await ask({ title: "Edit message", label: "New text", value: message.content, ok: "Save" });
  if (content === null || content === message.content) return;
  try {
    const edited = await api("PATCH", `conversations/${conversation.id}/messages/${seq}/`, { body: { content } });
    applyChange(conversation, { type: "message.updated", message: edited, change: 0 });
  } catch (error) {
    $("#conversation-status").textContent = error.message;
  }
}

async function deleteMessage(conversation, seq) {
  if (!(await ask({ title: "Delete this message for everyone?", label: "", ok: "Delete" }))) return;
  try {
    const tombstone = await api("DELETE", `conversations/${conversation.id}/messages/${seq}/`);
    applyChange(conversation, { type: "message.updated", message: tombstone, change: 0 });
  } catch (error) {
    $("#conversation-status").textContent = error.message;
  }
}

async function reportMessage(conversation, seq) {
  const reason = await ask({ title: "Report this message to the moderators", label: "Why?", ok: "Report" });
  if (!reason) return;
  try {
    await api("POST", `conversations/${conversation.id}/messages/${seq}/report/`, { body: { reason } });
    $("#conversation-status").textContent = "Thank you: the moderators will look at it.";
  } catch (error) {
    $("#conversation-status").textContent = error.message;
  }
}

// ------------------------------------------------------------------ conversations and people

async function userIdFor(username) {
  const wanted = username.trim().toLowerCase();
  if (wanted.length < 2) throw new Error(`“${username}”: type at least 2 characters of a username.`);
  const page = await api("GET", `users/?search=${encodeURIComponent(wanted)}`);
  const found = (page.results || page).find((user) => user.username.toLowerCase() === wanted);
  if (!found) throw new Error(`No user named “${username.trim()}”.`);
  return found.id;
}

async function createConversation(event) {
  event.preventDefault();
  const kind = $("#new-kind").value;
  const names = $("#new-people").value.split(",").map((name) => name.trim()).filter(Boolean);
  $("#new-error").textContent = "";
  try {
    if (!names.length) throw new Error("Name at least one person.");
    if (kind === "direct" && names.length !== 1) throw new Error("A direct conversation is with exactly one person.");
    const ids = await Promise.all(names.map(userIdFor));
    const body = { kind, participant_ids: ids };
    if (kind === "group") body.title = $("#new-title").value.trim();
    const created = await api("POST", "conversations/", { body });
    const conversation = upsertConversation({ ...created, last_read_seq: created.last_seq });
    if (!conversation.participants) await loadParticipants(conversation);
    $("#new-people").value = "";
    $("#new-title").value = "";
    $("#new-details").open = false;
    renderList();
    location.hash = `#c/${created.id}`;
  } catch (error) {
    $("#new-error").textContent = error.message;
  }
}

async function addPerson(event) {
  event.preventDefault();
  const conversation = state.conversations.get(state.openId);
  $("#conversation-status").textContent = "";
  try {
    const userId = await userIdFor($("#add-person-name").value);
    await api("POST", `conversations/${conversation.id}/participants/`, { body: { user_id: userId } });
    $("#add-person-name").value = "";
    await loadParticipants(conversation);
    renderPeople(conversation);
  } catch (error) {
    $("#conversation-status").textContent = error.message;
  }
}

async function removePerson(conversation, userId) {
  $("#conversation-status").textContent = "";
  try {
    await api("DELETE", `conversations/${conversation.id}/participants/${userId}/`);
    conversation.participants.delete(userId);
    renderPeople(conversation);
  } catch (error) {
    $("#conversation-status").textContent = error.message;
  }
}

async function leaveConversation() {
  const conversation = state.conversations.get(state.openId);
  if (!conversation || !(await ask({ title: `Leave “${conversationName(conversation)}”?`, label: "", ok: "Leave" }))) return;
  try {
    await api("DELETE", `conversations/${conversation.id}/participants/${state.me.id}/`);
    onLeft(conversation.id, "left");
  } catch (error) {
    $("#conversation-status").textContent = error.message;
  }
}

function togglePeople() {
  const button = $("#toggle-people");
  const open = button.getAttribute("aria-expanded") !== "true";
  button.setAttribute("aria-expanded", String(open));
  show($("#people"), open);
}

// ------------------------------------------------------------------ wiring

function wire() {
  $("#auth-form").addEventListener("submit", submitAuth);
  $("#auth-switch").addEventListener("click", () => setAuthMode(!signingUp));
  $("#logout").addEventListener("click", logout);
  $("#new-conversation").addEventListener("submit", createConversation);
  $("#new-kind").addEventListener("change", () => document.body.classList.toggle("new-group", $("#new-kind").value === "group"));
  $("#composer").addEventListener("submit", submitMessage);
  $("#composer-input").addEventListener("keydown", composerKey);
  $("#composer-input").addEventListener("input", composerInput);
  $("#older").addEventListener("click", loadOlder);
  $("#timeline").addEventListener("scroll", () => { if ($("#timeline").scrollTop < 40 && !$("#older").hidden && !$("#older").disabled) loadOlder(); });
  $("#toggle-people").addEventListener("click", togglePeople);
  $("#add-person").addEventListener("submit", addPerson);
  $("#leave").addEventListener("click", leaveConversation);
  $("#back").addEventListener("click", () => { location.hash = ""; });
  window.addEventListener("hashchange", showConversationFromHash);
  document.addEventListener("visibilitychange", markRead);
}

wire();
if (token.get()) startApp();
else showAuth();
