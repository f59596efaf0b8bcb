// Tab 1, Search for Patients: paste or upload MRNs, see who the PACS knows,
// and what was refused (not on the IRB list), not found or given twice.

import { element, post, searchResults, textFileInput } from "./api.js";
import { FacetTable } from "./table.js";

export function patientsTab(app) {
  const mrns = element("textarea", { id: "mrn-input", rows: 8, spellcheck: "false",
    "aria-label": "MRNs, one per line (or separated by commas, semicolons or tabs)",
    placeholder: "one MRN per line, or separated by , ; or tabs" });
  const upload = textFileInput(mrns, "upload an MRN list", app.fail);
  const searchButton = element("button", { type: "submit", text: "Search patients" });
  const stats = element("div", { class: "stats", "aria-live": "polite" });
  const job = element("div", { class: "job", "aria-live": "polite" });
  const findStudies = element("button", { type: "button", text: "Find studies for selected patients", disabled: true,
    onclick: () => {
      const picked = table.selectedRows().map((row) => row.patient_id);
      app.pages.get("studies").findForPatients(picked);
      app.go("studies");
    } });

  const table = new FacetTable({
    name: "patients",
    key: (row) => row.patient_id,
    empty: "search for patients to see them here",
    columns: [
      { key: "patient_id", label: "MRN", type: "text", facet: true },
      { key: "patient_name", label: "Name", type: "text", facet: true },
      { key: "birth_date", label: "Birth date", type: "date", facet: true },
      { key: "sex", label: "Sex", type: "set", facet: true },
      { key: "study_count", label: "Studies", type: "number", facet: true },
    ],
    onSelect: (rows) => { findStudies.disabled = rows.length === 0; },
  });

  async function search(event) {
    event.preventDefault();
    if (!app.projectId() || !app.pacsId) { app.notify("choose a project and a PACS first", "error"); return; }
    if (!mrns.value.trim()) { app.notify("paste or upload at least one MRN", "error"); return; }
    const project = app.projectId();
    const answer = await app.run(searchButton, () =>
      post("/search/patients", { project, pacs: app.pacsId, mrns: mrns.value }));
    const report = await app.run(null, () => searchResults(answer, job, () => app.projectId() === project));
    if (!report || app.projectId() !== project) return; // the project changed meanwhile
    table.setRows(report.patients);
    table.select(report.patients.map((p) => p.patient_id));
    showStats(report);
  }

  function showStats(report) {
    const groups = [
      ["found", `${report.patients.length} found`, report.patients.map((p) => p.patient_id)],
      ["refused", `${report.refused.length} refused (not on the IRB list)`, report.refused],
      ["not-found", `${report.not_found.length} not found`, report.not_found],
      ["duplicates", `${report.duplicates.length} duplicates`, report.duplicates],
      ["invalid", `${report.invalid.length} invalid`, report.invalid.map((i) => `line ${i.line}: ${i.value} — ${i.reason}`)],
    ];
    stats.replaceChildren(...groups.map(([id, label, values]) => {
      const details = element("details", { class: `stat stat-${id}`, "data-stat": id },
        element("summary", { text: label }),
        values.length ? element("ul", {}, ...values.map((v) => element("li", { text: v }))) : element("p", { class: "muted", text: "none" }));
      return details;
    }), ...report.warnings.map((w) => element("p", { class: "warning", text: w })));
  }

  // Another project, another IRB: nothing found under the last one may stay on screen.
  app.onContext(() => { table.setRows([]); stats.replaceChildren(); job.replaceChildren(); });

  const form = element("form", { class: "search-form", onsubmit: search },
    element("label", { class: "stacked" }, "MRNs", mrns),
    element("div", { class: "row" }, element("label", {}, "or upload a list ", upload), searchButton));

  return {
    id: "patients",
    label: "1 · Search for Patients",
    element: element("section", { "aria-label": "Search for patients" },
      element("h2", { text: "Search for patients" }), form, job, stats,
      element("div", { class: "actions" }, findStudies), table.element),
    table,
  };
}
