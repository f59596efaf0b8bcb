// Tab 5, Request Log: every retrieval and forward of the project, updated live.
// The server announces changes over server-sent events; the tab then re-reads
// the list, so what is shown is always what the API says. The log is read a page
// at a time (newest first, keyset pages), filtered by state on the server, which
// also counts the requests per state: a project with 200,000 requests loads as
// fast as one with 20.

import { element, enc, get, post } from "./api.js";
import { FacetTable } from "./table.js";

const FINISHED = new Set(["completed", "incomplete", "failed", "canceled"]);
const STATES = ["scheduled", "processing", "completed", "incomplete", "failed", "canceled"];
const PAGE = 500;
// Each row says what its state allows (row.allowed, from the server's own rules); a call
// naming any other row is refused whole, so only those rows are sent.
const may = (action) => (row) => row.allowed[action];

function progressOf(row) {
  const expected = row.expected_instances || 0;
  const label = `${row.received}${expected ? ` / ${expected}` : ""} images${row.failed ? `, ${row.failed} failed` : ""}`;
  return element("span", { class: "progress-cell" },
    element("progress", { max: expected || 1, value: expected ? Math.min(row.received, expected) : (FINISHED.has(row.state) ? 1 : 0),
      "aria-label": label }),
    ` ${label}`);
}

export function requestsTab(app) {
  let events = null;
  let loading = null;
  let again = false;
  let wanted = PAGE; // rows the user has asked to see: the first page, plus each "Load older"
  const live = element("span", { class: "live muted", role: "status", text: "" });
  const stateFilter = element("select", { "aria-label": "show requests in state",
    onchange: () => { wanted = PAGE; app.run(stateFilter, load); } },
    element("option", { value: "", text: "all states" }),
    ...STATES.map((state) => element("option", { value: state, text: state })));
  const summary = element("span", { class: "muted request-summary", role: "status" });
  const older = element("button", { type: "button", text: "Load older", hidden: true,
    onclick: () => { wanted += PAGE; app.run(older, load); } });
  const refresh = element("button", { type: "button", text: "Refresh", onclick: () => app.run(refresh, load) });
  const cancel = element("button", { type: "button", text: "Cancel selected", disabled: true,
    onclick: () => change(cancel, "/requests/cancel", {}, "canceled", may("cancel")) });
  const retry = element("button", { type: "button", text: "Retry selected", disabled: true,
    onclick: () => change(retry, "/requests/retry", {}, "retried", may("retry")) });
  const priority = element("input", { type: "number", min: -9, max: 9, value: 0, class: "short", "aria-label": "new priority" });
  const setPriority = element("button", { type: "button", text: "Set priority", disabled: true,
    onclick: () => change(setPriority, "/requests/priority", { priority: Number(priority.value || 0) }, "changed",
      may("priority")) });

  const table = new FacetTable({
    name: "requests",
    key: (row) => String(row.id),
    empty: "no requests in this project yet",
    columns: [
      { key: "id", label: "#", type: "number" },
      { key: "kind", label: "Kind", type: "set", facet: true },
      { key: "state", label: "State", type: "set", facet: true },
      { key: "waiting_reason", label: "Waiting because", type: "text",
        value: (row) => (FINISHED.has(row.state) ? (row.last_error || "") : (row.waiting_reason || "")) },
      { key: "patient_id", label: "MRN", type: "text", facet: true },
      { key: "study", label: "Study", type: "text", value: (row) => row.accession || row.study_uid },
      { key: "where", label: "PACS / destination", type: "set", facet: true, value: (row) => row.destination_id || row.pacs_id },
      { key: "progress", label: "Progress", type: "number", value: (row) => row.received,
        render: progressOf, csv: (row) => `${row.received}/${row.expected_instances}` },
      { key: "bytes", label: "Received", type: "bytes", facet: true },
      { key: "priority", label: "Priority", type: "number", facet: true },
      { key: "user", label: "By", type: "set", facet: true },
      { key: "created_at", label: "Created", type: "date", facet: true },
      { key: "ended_at", label: "Ended", type: "date" },
    ],
    onSelect: (rows) => {
      cancel.disabled = !rows.some(may("cancel"));
      retry.disabled = !rows.some(may("retry"));
      setPriority.disabled = !rows.some(may("priority"));
    },
  });

  async function load() {
    if (!app.projectId()) return;
    if (loading) { again = true; return; } // one read at a time; a change meanwhile reads once more
    const project = app.projectId();
    const state = stateFilter.value;
    loading = readPages(project, state);
    try {
      const { rows, last } = await loading;
      if (app.projectId() === project && stateFilter.value === state) {
        table.setRows(rows);
        showCounts(last, rows.length);
        older.hidden = last.next_before === null;
      }
      // A long log is re-read at most every few seconds however often it changes.
      if (table.rows.length > 1000) await new Promise((resolve) => setTimeout(resolve, 3000));
    } finally {
      loading = null;
    }
    if (again) { again = false; await load(); }
  }

  // The newest `wanted` rows, a page at a time: each page starts below the last one's oldest id.
  async function readPages(project, state) {
    let rows = [];
    let before = null;
    let last = null;
    do {
      const query = new URLSearchParams({ limit: String(Math.min(PAGE, wanted - rows.length)) });
      if (state) query.append("state", state);
      if (before !== null) query.append("before", String(before));
      last = await get(`/projects/${enc(project)}/requests/page?${query}`);
      rows = rows.concat(last.rows);
      before = last.next_before;
    } while (before !== null && rows.length < wanted);
    return { rows, last };
  }

  function showCounts(page, shown) {
    const counts = page.state_counts;
    const all = STATES.reduce((sum, state) => sum + (counts[state] || 0), 0);
    for (const option of stateFilter.options) {
      option.textContent = option.value ? `${option.value} (${counts[option.value] || 0})` : `all states (${all})`;
    }
    summary.textContent = `showing ${shown} of ${page.total}`;
  }

  async function change(button, path, extra, verb, allowed) {
    const selected = table.selectedRows();
    const ids = selected.filter(allowed).map((r) => r.id);
    await app.run(button, async () => {
      const result = await post(path, { ids, ...extra });
      const changed = result[verb] || [];
      const skipped = selected.length - ids.length;
      app.notify(`${changed.length} request(s) ${verb}` +
        (skipped ? `; ${skipped} selected request(s) left as they were (their state does not allow it)` : ""), "ok");
      await load();
    });
    // app.run ends by enabling the button it ran; what the selected rows allow now decides instead.
    table.onSelect(table.selectedRows());
  }

  function listen() {
    stop();
    if (!app.projectId()) return;
    events = new EventSource(`/api/v1/projects/${enc(app.projectId())}/requests/events`);
    events.addEventListener("requests", () => load().catch(app.fail));
    events.addEventListener("open", () => { live.textContent = "● live"; live.className = "live ok"; });
    events.addEventListener("stop", (event) => { // e.g. taken off the project: the server says why
      stop();
      live.textContent = `live updates stopped: ${JSON.parse(event.data).error}`;
      live.className = "live error";
    });
    events.addEventListener("error", () => {
      if (events && events.readyState === EventSource.CLOSED) {
        live.textContent = "live updates stopped; use Refresh";
        live.className = "live error";
      } else {
        live.textContent = "reconnecting…";
        live.className = "live muted";
      }
    });
  }

  function stop() {
    if (events) events.close();
    events = null;
    live.textContent = "";
  }

  app.onContext(() => { table.setRows([]); wanted = PAGE; stateFilter.value = ""; if (!page.element.hidden) { listen(); load().catch(app.fail); } });

  const page = {
    id: "requests",
    label: "5 · Request Log",
    element: element("section", { "aria-label": "Request log" },
      element("h2", {}, "Request log ", live, refresh),
      element("div", { class: "actions" }, cancel, retry, element("label", {}, "priority ", priority), setPriority),
      element("div", { class: "actions" }, stateFilter, summary),
      table.element,
      older),
    table,
    show: async () => { listen(); await load(); },
    hide: stop,
  };
  return page;
}
