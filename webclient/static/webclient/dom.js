// Building the page from data. Text goes in as text: `text` sets textContent, so nothing a user
// wrote is ever parsed as HTML.
export const $ = (selector) => document.querySelector(selector);

export function show(node, visible) {
  node.hidden = !visible;
}

// el("button", {type: "button", text: "Send", onclick, dataset: {...}, ariaLabel: "..."}, [children])
export function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "ariaLabel") node.setAttribute("aria-label", value);
    else if (key === "ariaHidden") node.setAttribute("aria-hidden", value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node[key] = value;
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

const sameDay = (a, b) => a.toDateString() === b.toDateString();

export function formatTime(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  return sameDay(date, new Date())
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleDateString([], { month: "short", day: "numeric" });
}
