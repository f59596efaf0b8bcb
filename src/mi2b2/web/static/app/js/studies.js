// Tab 2, Search for Studies: the studies of the patients picked in Tab 1, or of
// pasted accession numbers. Expand a study to tick only some of its series, then
// "Move to repository" queues retrievals that the scheduler paces.

import { csv, element, post, saveFile, searchResults, textFileInput } from "./api.js";
import { FacetTable } from "./table.js";

const splitModalities = (text) => (text || "").split(/[\\,/ ]+/).filter(Boolean);

export function studiesTab(app) {
  const seriesPicks = new Map(); // study uid -> Set of series uids ticked; absent = the whole study
  const accessions = element("textarea", { rows: 4, spellcheck: "false", "aria-label": "accession numbers",
    placeholder: "accession numbers, one per line" });
  const upload = textFileInput(accessions, "upload accession numbers", app.fail);
  const replace = element("input", { type: "radio", name: "study-results", value: "replace", checked: true });
  const append = element("input", { type: "radio", name: "study-results", value: "append" });
  const searchButton = element("button", { type: "submit", text: "Search accessions" });
  const stats = element("div", { class: "stats", "aria-live": "polite" });
  const job = element("div", { class: "job", "aria-live": "polite" });
  const priority = element("input", { type: "number", min: -9, max: 9, value: 0, "aria-label": "priority", class: "short" });
  const move = element("button", { type: "button", text: "Move to repository", disabled: true, onclick: () => moveSelected() });
  const exportCsv = element("button", { type: "button", text: "Export selected to CSV", disabled: true,
    onclick: () => exportSelected() });

  const table = new FacetTable({
    name: "studies",
    key: (row) => row.study_uid,
    empty: "find studies from Tab 1's patients, or search by accession number",
    expand: (row) => seriesList(row),
    columns: [
      { key: "patient_id", label: "MRN", type: "text", facet: true },
      { key: "patient_name", label: "Name", type: "text" },
      { key: "study_date", label: "Date", type: "date", facet: true },
      { key: "modalities", label: "Modalities", type: "set", facet: true, values: (row) => splitModalities(row.modalities) },
      { key: "description", label: "Description", type: "text", facet: true },
      { key: "accession", label: "Accession", type: "text" },
      { key: "series_count", label: "Series", type: "number" },
      { key: "instance_count", label: "Images", type: "number", facet: true },
      { key: "institution_id", label: "Institution", type: "set", facet: true,
        value: (row) => app.pacsNodes.find((n) => n.institution === row.institution_id)?.institution_name || row.institution_id },
      { key: "department_id", label: "Department", type: "set", facet: true,
        value: (row) => app.pacsNodes.find((n) => n.institution === row.institution_id && n.department === row.department_id)
          ?.department_name || row.department_id },
      { key: "series_picked", label: "Series picked", type: "text",
        value: (row) => (seriesPicks.has(row.study_uid) ? `${seriesPicks.get(row.study_uid).size} of ${row.series_count ?? "?"}` : "all") },
    ],
    onSelect: (rows) => { move.disabled = rows.length === 0; exportCsv.disabled = rows.length === 0; },
  });

  function exportSelected() {
    // The CSV holds what this table shows. In a de-identified project only its lead or an admin (the
    // honest broker) may search, so only they reach this table; their searches are audited.
    saveFile(csv(table.columns, table.selectedRows()), "mi2b2-studies.csv");
  }

  async function seriesList(study) {
    const report = await post("/search/series", { project: app.projectId(), pacs: study.pacs_id, studies: [study.study_uid] });
    const picked = seriesPicks.get(study.study_uid);
    const boxes = report.series.map((series) => {
      const box = element("input", { type: "checkbox", value: series.series_uid, checked: picked ? picked.has(series.series_uid) : false,
        onchange: () => {
          const ticked = new Set(boxes.filter((b) => b.checked).map((b) => b.value));
          if (ticked.size) seriesPicks.set(study.study_uid, ticked);
          else seriesPicks.delete(study.study_uid);
          if (ticked.size) table.select([study.study_uid]);
          else table.refresh();
        } });
      return box;
    });
    const items = report.series.map((series, index) => element("li", {},
      element("label", {}, boxes[index],
        ` ${series.series_number || "–"} · ${series.modality || ""} · ${series.description || "(no description)"} · ${series.instance_count ?? "?"} images`)));
    return element("div", { class: "series-pick" },
      element("p", { class: "muted", text: "Tick series to move only those; tick none to move the whole study." }),
      element("ul", { class: "plain" }, ...items));
  }

  async function run(button, path, body) {
    if (!app.projectId() || !app.pacsId) { app.notify("choose a project and a PACS first", "error"); return; }
    const project = app.projectId();
    const answer = await app.run(button, () => post(path, { project, pacs: app.pacsId, ...body }));
    const report = await app.run(null, () => searchResults(answer, job, () => app.projectId() === project));
    if (!report || app.projectId() !== project) return; // the project changed meanwhile
    if (replace.checked) { seriesPicks.clear(); table.expanded.clear(); table.setRows(report.studies); }
    else table.appendRows(report.studies);
    showStats(report);
  }

  function showStats(report) {
    const groups = [
      [`${report.studies.length} studies found`, []],
      [`${report.refused.length} refused (not on the IRB list)`, report.refused],
      [`${report.not_permitted.length} accessions of patients not on the IRB list`, report.not_permitted],
      [`${report.not_found.length} not found`, report.not_found],
      [`${report.duplicates.length} duplicates`, report.duplicates],
      [`${report.invalid.length} invalid`, report.invalid.map((i) => `line ${i.line}: ${i.value} — ${i.reason}`)],
      [`${Object.keys(report.capped).length} patients capped by the project's studies-per-patient limit`,
        Object.entries(report.capped).map(([patient, left]) => `${patient}: ${left} left out`)],
    ];
    stats.replaceChildren(...groups.filter(([, values], index) => index === 0 || values.length).map(([label, values]) =>
      element("details", { class: "stat" }, element("summary", { text: label }),
        element("ul", {}, ...values.map((v) => element("li", { text: v }))))),
    ...report.warnings.map((w) => element("p", { class: "warning", text: w })));
  }

  async function moveSelected() {
    const byPacs = new Map();
    for (const row of table.selectedRows()) {
      if (!byPacs.has(row.pacs_id)) byPacs.set(row.pacs_id, []);
      byPacs.get(row.pacs_id).push({ study_uid: row.study_uid, series_uids: [...(seriesPicks.get(row.study_uid) || [])] });
    }
    const level = Number(priority.value || 0);
    await app.run(move, async () => {
      let created = 0;
      const notes = [];
      for (const [pacs, studies] of byPacs) {
        const report = await post("/requests", { project: app.projectId(), pacs, studies, priority: level });
        created += report.created.length;
        if (report.already_cached?.length) notes.push(`${report.already_cached.length} already in the repository`);
        if (report.already_queued?.length) notes.push(`${report.already_queued.length} already queued`);
        if (report.not_found?.length) notes.push(`${report.not_found.length} no longer in the PACS`);
        if (report.not_permitted?.length) notes.push(`${report.not_permitted.length} refused: patient not on the IRB list`);
      }
      app.notify(`${created} retrieval request${created === 1 ? "" : "s"} queued${notes.length ? "; " + notes.join(", ") : ""}. Follow them in the Request Log.`, "ok");
      table.clearSelection();
    });
  }

  app.onContext(() => { seriesPicks.clear(); table.expanded.clear(); table.setRows([]); stats.replaceChildren(); job.replaceChildren(); });

  const form = element("form", { class: "search-form", onsubmit: (event) => { event.preventDefault(); run(searchButton, "/search/accessions", { accessions: accessions.value }); } },
    element("label", { class: "stacked" }, "Accession numbers", accessions),
    element("div", { class: "row" }, element("label", {}, "or upload a list ", upload), searchButton,
      element("span", { class: "radio-group", role: "radiogroup", "aria-label": "results" },
        element("label", {}, replace, " replace results"), element("label", {}, append, " append to results"))));

  return {
    id: "studies",
    label: "2 · Search for Studies",
    element: element("section", { "aria-label": "Search for studies" },
      element("h2", { text: "Search for studies" }), form, job, stats,
      element("div", { class: "actions" }, move, element("label", {}, "priority ", priority), exportCsv),
      table.element),
    table,
    findForPatients(mrns) {
      if (!mrns.length) return;
      run(null, "/search/studies", { mrns: mrns.join("\n") });
    },
  };
}
