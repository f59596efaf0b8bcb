// Downloads started in this browser: Tab 3 starts them, Tab 4 lists them with
// their progress. The ZIP arrives through fetch so its progress can be shown;
// what has arrived is folded into Blobs every 64 MB, which the browser may keep
// on disk; for many gigabytes `mi2b2 download` (resumable) is the better tool.

import { bytes, element, errorOf } from "./api.js";

const FOLD_BYTES = 64 * 1024 * 1024;
const entries = [];
const listeners = new Set();
let nextId = 1;

function changed() {
  for (const listener of listeners) listener(entries);
}

export function onDownloadsChange(listener) {
  listeners.add(listener);
  listener(entries);
}

function filenameOf(response, fallback) {
  const match = /filename="([^"]+)"/.exec(response.headers.get("Content-Disposition") || "");
  return match ? match[1] : fallback;
}

/** Download studies of a project as one ZIP; ``encryption`` is null, {passphrase} or {recipients}. */
export async function startDownload(projectId, studyUids, encryption, label) {
  const abort = new AbortController();
  const entry = { id: nextId++, label, received: 0, total: 0, state: "starting", error: "", cancel: () => abort.abort() };
  entries.unshift(entry);
  changed();
  try {
    const response = await fetch(`/api/v1/projects/${encodeURIComponent(projectId)}/download`, {
      method: "POST", credentials: "same-origin", cache: "no-store", signal: abort.signal,
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ study_uids: studyUids, encryption }),
    });
    if (!response.ok) throw await errorOf(response);
    entry.total = Number(response.headers.get("X-Mi2b2-Bytes") || 0); // image bytes: the ZIP is a little larger
    entry.state = "running";
    let parts = [];
    let held = 0;
    const reader = response.body.getReader();
    let lastShown = 0;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      parts.push(value);
      held += value.byteLength;
      if (held > FOLD_BYTES) { parts = [new Blob(parts)]; held = 0; } // a Blob may live on disk; chunks do not
      entry.received += value.byteLength;
      if (performance.now() - lastShown > 250) { lastShown = performance.now(); changed(); }
    }
    const name = filenameOf(response, "mi2b2-download.zip");
    const blob = new Blob(parts, { type: "application/zip" });
    const link = element("a", { href: URL.createObjectURL(blob), download: name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
    entry.state = "done";
    entry.filename = name;
  } catch (error) {
    entry.state = abort.signal.aborted ? "canceled" : "failed";
    entry.error = abort.signal.aborted ? "" : error.message;
  }
  changed();
  return entry;
}

/** The list Tab 4 shows. */
export function downloadsPanel() {
  const list = element("ul", { class: "downloads plain", "aria-live": "polite" });
  onDownloadsChange((items) => {
    if (!items.length) { list.replaceChildren(element("li", { class: "muted", text: "no downloads in this session" })); return; }
    list.replaceChildren(...items.map((entry) => {
      const progress = element("progress", { max: entry.total || 1, value: Math.min(entry.received, entry.total || 1),
        "aria-label": `progress of ${entry.label}` });
      const state = entry.state === "failed" ? `failed: ${entry.error}`
        : entry.state === "done" ? `saved as ${entry.filename}` : entry.state;
      return element("li", { class: `download ${entry.state}`, "data-state": entry.state },
        element("span", { text: entry.label }), progress,
        element("span", { text: ` ${bytes(entry.received)}${entry.total ? ` of ~${bytes(entry.total)}` : ""} · ${state} ` }),
        entry.state === "running" ? element("button", { type: "button", text: "cancel", onclick: entry.cancel }) : null);
    }));
  });
  return list;
}
