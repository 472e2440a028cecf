// The REST API (docs/api.md), with the per-device token kept in localStorage.
const BASE = "/api/v1/";
const TOKEN_KEY = "chat.token";

export class ApiError extends Error {
  constructor(status, body) {
    super(describe(status, body));
    this.status = status;
    this.body = body;
  }
}

// A person-readable sentence out of DRF's error shapes ({detail}, {field: [..]}, [..]).
function describe(status, body) {
  if (status === 0) return "The server cannot be reached.";
  if (body && typeof body === "object") {
    if (typeof body.detail === "string") return body.detail;
    const parts = [];
    for (const [field, value] of Object.entries(body)) {
      const text = Array.isArray(value) ? value.join(" ") : String(value);
      parts.push(field === "non_field_errors" ? text : `${field}: ${text}`);
    }
    if (parts.length) return parts.join(" ");
  }
  return `The server answered ${status}.`;
}

export const token = {
  get: () => localStorage.getItem(TOKEN_KEY),
  set: (value) => localStorage.setItem(TOKEN_KEY, value),
  clear: () => localStorage.removeItem(TOKEN_KEY),
};

// fetch() against the API: JSON in, JSON out; an ApiError for every non-2xx (status 0: no network).
export async function api(method, path, { body, headers = {}, raw = false } = {}) {
  const init = { method, headers: { Accept: "application/json", ...headers }, credentials: "omit" };
  const key = token.get();
  if (key) init.headers.Authorization = `Token ${key}`;
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path.startsWith("/") ? path : BASE + path, init);
  } catch {
    throw new ApiError(0, null);
  }
  if (raw && response.ok) return response;
  const text = await response.text();
  let parsed = null;
  if (text) {
    try { parsed = JSON.parse(text); } catch { parsed = null; }
  }
  if (!response.ok) throw new ApiError(response.status, parsed);
  return parsed;
}

// Every page of a cursor- or page-paginated list, up to `maxPages`.
export async function allPages(path, maxPages = 20) {
  const items = [];
  let next = path;
  for (let page = 0; next && page < maxPages; page++) {
    const body = await api("GET", next);
    if (Array.isArray(body)) return body;
    items.push(...body.results);
    next = body.next ? new URL(body.next).pathname + new URL(body.next).search : null;
  }
  return items;
}
