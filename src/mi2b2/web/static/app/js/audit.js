// The auditor page: the audit trail with filters (sent in POST bodies, so a
// patient filter never lands in a URL), paged on the server, CSV export, and
// verification of the hash chain.

import { element, get, postRaw, saveFile } from "./api.js";
import { FacetTable } from "./table.js";

const PAGE = 500;

export function auditPage(app) {
  let offset = 0;
  const field = (name, label, type = "text") => element("label", {}, `${label} `, element("input", { name, type, autocomplete: "off" }));
  const search = element("button", { type: "submit", text: "Search" });
  const form = element("form", { class: "actions audit-filters", onsubmit: (event) => { event.preventDefault(); offset = 0; app.run(search, load); } },
    field("actor", "user"), field("project", "project"), field("action", "action (e.g. search/patients)"),
    field("patient", "patient MRN"), field("since", "since", "datetime-local"), field("until", "until", "datetime-local"), search);
  const more = element("span", { class: "pager" });
  const exportButton = element("button", { type: "button", text: "Export CSV (all matching)", onclick: () => app.run(exportButton, exportCsv) });
  const verdict = element("div", { class: "verdict", role: "status" });
  const verifyButton = element("button", { type: "button", text: "Verify the chain", onclick: () => app.run(verifyButton, verify) });

  const table = new FacetTable({
    name: "audit", key: (row) => String(row.seq), selectable: false, pageSize: 100, empty: "no audit events match",
    columns: [
      { key: "seq", label: "#", type: "number" },
      { key: "occurred_at", label: "When", type: "date", facet: true },
      { key: "actor", label: "User", type: "set", facet: true },
      { key: "action", label: "Action", type: "set", facet: true },
      { key: "outcome", label: "Outcome", type: "set", facet: true },
      { key: "project_id", label: "Project", type: "set", facet: true },
      { key: "pacs_id", label: "PACS", type: "set", facet: true },
      { key: "patient_id", label: "MRN", type: "text" },
      { key: "study_uid", label: "Study", type: "text" },
      { key: "detail", label: "Detail", type: "text",
        value: (row) => (typeof row.detail === "string" ? row.detail : JSON.stringify(row.detail ?? "")).replace(/^\{\}$/, "") },
    ],
  });

  function filters() {
    const value = (name) => form.elements[name].value.trim() || null;
    const moment = (name) => (value(name) ? new Date(value(name)).toISOString() : null);
    return { actor: value("actor"), project: value("project"), action: value("action"), patient: value("patient"),
      since: moment("since"), until: moment("until") };
  }

  async function load() {
    const response = await postRaw("/audit/search", { ...filters(), limit: PAGE, offset });
    const rows = await response.json();
    table.setRows(rows);
    const go = (to) => { offset = to; app.run(null, load); };
    more.replaceChildren(
      element("span", { text: `events ${offset + 1}–${offset + rows.length} ` }),
      element("button", { type: "button", text: "‹ earlier", disabled: offset === 0, onclick: () => go(Math.max(0, offset - PAGE)) }),
      element("button", { type: "button", text: "later ›", disabled: rows.length < PAGE, onclick: () => go(offset + PAGE) }));
  }

  async function exportCsv() {
    const response = await postRaw("/audit/export.csv", filters());
    saveFile(await response.blob(), "mi2b2-audit.csv");
  }

  async function verify() {
    const result = await get("/audit/verify");
    verdict.className = `verdict ${result.ok ? "ok" : "error"}`;
    verdict.textContent = result.ok
      ? `Chain verified: ${result.summary}.`
      : `Chain broken at event ${result.bad_seq ?? "(checkpoint file)"}: ${result.problem} (checked before it: ${result.summary}).`;
  }

  return {
    id: "audit",
    label: "Audit",
    element: element("section", { "aria-label": "Audit trail" },
      element("h2", { text: "Audit trail" }),
      element("div", { class: "actions" }, verifyButton, verdict),
      form, element("div", { class: "actions" }, exportButton, more), table.element),
    show: () => (table.rows.length ? null : load()),
  };
}
