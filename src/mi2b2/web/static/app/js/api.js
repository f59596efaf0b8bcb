// Talking to the mi2b2 API, and the small formatting helpers every tab shares.
//
// Identifiers of patients travel in request bodies only (POST), so they never
// reach a URL that an access log or a proxy keeps.

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

const API = "/api/v1";
let pending = 0;

/** The header's "working…" sign: a PACS search for a long MRN list can take a while. */
function busy(change) {
  pending += change;
  const sign = document.getElementById("busy");
  if (sign) sign.hidden = pending === 0;
}

async function send(method, path, body) {
  const options = { method, credentials: "same-origin", cache: "no-store", headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  busy(+1);
  try {
    response = await fetch(API + path, options);
  } catch (_) {
    throw new ApiError(0, "the mi2b2 server cannot be reached; check that it is running and try again");
  } finally {
    busy(-1);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error) message = body.error;
  } catch (_) { /* the body was not JSON: keep the status line */ }
  if (response.status === 401) message = "your session has ended; log in again";
  return new ApiError(response.status, message);
}

export const get = async (path) => (await send("GET", path)).json();
export const post = async (path, body = {}) => (await send("POST", path, body)).json();
export const del = async (path) => (await send("DELETE", path)).json();
/** The raw response, for streamed downloads. */
export const postRaw = (path, body) => send("POST", path, body);

export const enc = encodeURIComponent;

// --- formatting ---------------------------------------------------------------------------------

export function bytes(value) {
  if (value === null || value === undefined || value === "") return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let n = Number(value);
  let unit = 0;
  while (Math.abs(n) >= 1000 && unit < units.length - 1) { n /= 1000; unit += 1; }
  return `${n.toFixed(unit && n < 10 ? 1 : 0)} ${units[unit]}`;
}

/** DICOM dates (YYYYMMDD) and ISO timestamps, shown as YYYY-MM-DD[ HH:MM]. */
export function when(value) {
  if (!value) return "";
  if (/^\d{8}$/.test(value)) return `${value.slice(0, 4)}-${value.slice(4, 6)}-${value.slice(6)}`;
  const match = /^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2})/.exec(value);
  return match ? `${match[1]} ${match[2]}` : String(value);
}

/** A date as YYYY-MM-DD for comparisons, whatever form it came in. */
export function isoDay(value) {
  const shown = when(value);
  return shown ? shown.slice(0, 10) : "";
}

export function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "text") node.textContent = value;
    else if (name in node && typeof value !== "string") node[name] = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

/** Offer text or a blob to the user as a file. */
export function saveFile(content, filename, type = "text/csv") {
  const blob = content instanceof Blob ? content : new Blob([content], { type });
  const url = URL.createObjectURL(blob);
  const link = element("a", { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

export function csv(columns, rows) {
  const quote = (value) => {
    const text = value === null || value === undefined ? "" : String(value);
    // A leading = + - @ would run as a formula in a spreadsheet.
    const safe = /^[=+\-@\t\r]/.test(text) ? `'${text}` : text;
    return /[",\n\r]/.test(safe) ? `"${safe.replaceAll('"', '""')}"` : safe;
  };
  const lines = [columns.map((c) => quote(c.label)).join(",")];
  for (const row of rows) lines.push(columns.map((c) => quote(c.csv ? c.csv(row) : row[c.key])).join(","));
  return lines.join("\r\n") + "\r\n";
}

/** A file chooser that puts a chosen text file (an MRN or accession list) into ``target``, read in the browser. */
export function textFileInput(target, label, onError) {
  return element("input", { type: "file", accept: ".txt,.csv,text/plain,text/csv", "aria-label": label,
    onchange: async (event) => {
      const file = event.target.files[0];
      if (file) target.value = await readTextFile(file).catch((error) => { onError(error); return target.value; });
      event.target.value = "";
    } });
}

function readTextFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(new Error(`could not read ${file.name}; choose a plain text or CSV file`));
    reader.readAsText(file);
  });
}

// --- search jobs ----------------------------------------------------------------------------------

const JOB_POLL_MS = 1000;

/**
 * A search over many identifiers runs as a job on the server (the answer is 202 with its
 * id). Show its progress in `holder`, with a cancel button, until it ends; then return its
 * results (what it found before a cancel, too). A small search's report passes straight
 * through. `stillWanted()` false (the user chose another project) stops following it.
 */
export async function searchResults(answer, holder, stillWanted) {
  if (!answer || answer.job_id === undefined) { holder.replaceChildren(); return answer; }
  const id = answer.job_id;
  const bar = element("progress", { max: answer.total, value: 0, "aria-label": `search job ${id} progress` });
  const text = element("span", { class: "job-text", text: `search job ${id}: queued, 0 of ${answer.total} searched` });
  const cancel = element("button", { type: "button", text: "Cancel search",
    onclick: async () => { cancel.disabled = true; await post(`/search/jobs/${id}/cancel`); } });
  holder.replaceChildren(element("div", { class: "search-job", "data-job": String(id), role: "status" }, text, " ", bar, " ", cancel));
  let status;
  for (;;) {
    status = await get(`/search/jobs/${id}`);
    bar.value = status.done;
    text.textContent = `search job ${id}: ${status.done} of ${status.total} searched`
      + (status.waiting_reason ? ` (waiting: ${status.waiting_reason})` : "");
    if (status.state !== "queued" && status.state !== "running") break;
    if (!stillWanted()) return null;
    await new Promise((resolve) => setTimeout(resolve, JOB_POLL_MS));
  }
  cancel.remove();
  text.textContent = status.state === "completed"
    ? `search job ${id}: done, ${status.total} searched`
    : `search job ${id} ${status.state} after ${status.done} of ${status.total}: ${status.error || ""}`;
  return stillWanted() ? get(`/search/jobs/${id}/results`) : null;
}
