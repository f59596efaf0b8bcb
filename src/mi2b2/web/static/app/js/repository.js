// Tab 3, Image Repository: the project's cache with its quota, and what can be
// done with cached studies: download (plain or age-encrypted), forward, delete.

import { bytes, element, enc, get, post } from "./api.js";
import { startDownload } from "./downloads.js";
import { FacetTable } from "./table.js";

export function repositoryTab(app) {
  let usage = null;
  const bar = element("div", { class: "usage-bar", role: "img" });
  // A de-identified project's cache is listed under the pseudonyms its downloads use (the server decides).
  const deidNote = element("p", { class: "muted", "data-deidentified": "", hidden: true,
    text: "De-identified project: patients and studies are shown under the pseudonyms its downloads use, "
      + "dates shifted; the project's lead can re-identify one on the record (`mi2b2 reidentify`)." });
  const legend = element("p", { class: "usage-legend", "data-usage": "" });
  const refresh = element("button", { type: "button", text: "Refresh", onclick: () => app.run(refresh, load) });
  const remove = element("button", { type: "button", class: "danger", text: "Delete selected", disabled: true, onclick: () => deleteSelected() });

  const mode = element("select", { "aria-label": "download as", onchange: () => showEncryptionFields() },
    new Option("plain ZIP", "plain"), new Option("encrypted with a passphrase", "passphrase"),
    new Option("encrypted to public keys (age or SSH)", "recipients"));
  const passphrase = element("input", { type: "password", autocomplete: "new-password", "aria-label": "passphrase" });
  const passphraseAgain = element("input", { type: "password", autocomplete: "new-password", "aria-label": "passphrase again" });
  const recipients = element("textarea", { rows: 3, spellcheck: "false", "aria-label": "public keys, one per line",
    placeholder: "age1… or ssh-ed25519 … , one per line" });
  const passphraseFields = element("span", { hidden: true }, element("label", {}, "passphrase ", passphrase),
    element("label", {}, " again ", passphraseAgain));
  const recipientFields = element("label", { hidden: true, class: "stacked" }, "public keys", recipients);
  const download = element("button", { type: "button", text: "Download selected", disabled: true, onclick: () => downloadSelected() });

  const destination = element("select", { "aria-label": "forward destination" });
  const forward = element("button", { type: "button", text: "Forward selected", disabled: true, onclick: () => forwardSelected() });

  const table = new FacetTable({
    name: "repository",
    key: (row) => row.study_uid,
    empty: "nothing cached yet: move studies here from Tab 2",
    columns: [
      { key: "patient_id", label: "MRN", type: "text", facet: true },
      { key: "patient_name", label: "Name", type: "text" },
      { key: "study_date", label: "Date", type: "date", facet: true },
      { key: "modalities", label: "Modalities", type: "set", facet: true, values: (r) => (r.modalities || "").split(/[\\,/ ]+/).filter(Boolean) },
      { key: "description", label: "Description", type: "text", facet: true },
      { key: "instance_count", label: "Images", type: "number" },
      { key: "bytes", label: "Size", type: "bytes", facet: true },
      { key: "fetched_by", label: "Fetched by", type: "set", facet: true },
      { key: "fetched_at", label: "Fetched", type: "date" },
      { key: "last_downloaded_by", label: "Last downloaded by", type: "set", facet: true },
      { key: "last_downloaded_at", label: "Last downloaded", type: "date" },
      { key: "view", label: "", type: "text", csv: () => "",
        render: (row) => element("button", { type: "button", class: "link", text: "view",
          onclick: () => { app.pages.get("view").open(row.study_uid); app.go("view"); } }) },
    ],
    onSelect: (rows) => {
      for (const button of [remove, download, forward]) button.disabled = rows.length === 0;
      drawUsage(rows.reduce((sum, row) => sum + row.bytes, 0), rows.length);
    },
  });

  function showEncryptionFields() {
    passphraseFields.hidden = mode.value !== "passphrase";
    recipientFields.hidden = mode.value !== "recipients";
  }

  function drawUsage(selectedBytes = 0, selectedCount = 0) {
    if (!usage) return;
    const quota = Math.max(usage.quota_bytes, 1);
    const percent = (n) => `${Math.min(100, (100 * n) / quota).toFixed(2)}%`;
    const selected = Math.min(selectedBytes, usage.used_bytes);
    // Widths through the CSSOM: the page's Content-Security-Policy forbids inline style attributes.
    const segment = (name, size) => {
      const node = element("span", { class: name });
      node.style.width = percent(size);
      if (size > 0) node.style.minWidth = "3px"; // a few MB of a terabyte quota still shows
      return node;
    };
    bar.replaceChildren(segment("used", usage.used_bytes - selected), segment("selection", selected),
      segment("in-flight", usage.in_flight_bytes));
    const text = `Used ${bytes(usage.used_bytes)} of ${bytes(usage.quota_bytes)} · in flight ${bytes(usage.in_flight_bytes)}`
      + ` · free ${bytes(usage.free_bytes)} · ${usage.study_count} stud${usage.study_count === 1 ? "y" : "ies"}`
      + (selectedCount ? ` · selection ${bytes(selectedBytes)} in ${selectedCount} stud${selectedCount === 1 ? "y" : "ies"}` : "")
      + (usage.over_quota ? " · over quota: new retrievals wait until space is freed" : "");
    legend.textContent = text;
    legend.dataset.usage = String(usage.used_bytes);
    bar.setAttribute("aria-label", text);
  }

  async function load() {
    if (!app.projectId()) return;
    const project = app.projectId();
    const [cache, destinations] = await Promise.all([
      get(`/projects/${enc(project)}/cache`), get(`/projects/${enc(project)}/destinations`)]);
    if (app.projectId() !== project) return; // switched meanwhile: the new project's load draws
    usage = cache.usage;
    deidNote.hidden = app.project?.export !== "deidentified";
    table.setRows(cache.studies);
    const chosen = destination.value;
    destination.replaceChildren(...destinations.map((d) => new Option(`${d.name} (${d.ae_title})`, d.id)));
    if (!destinations.length) destination.append(new Option("(no destination for this project)", ""));
    if (destinations.some((d) => d.id === chosen)) destination.value = chosen;
  }

  async function deleteSelected() {
    const rows = table.selectedRows();
    const size = bytes(rows.reduce((sum, row) => sum + row.bytes, 0));
    if (!window.confirm(`Delete ${rows.length} stud${rows.length === 1 ? "y" : "ies"} (${size}) from the repository? They can be retrieved again later.`)) return;
    await app.run(remove, async () => {
      const report = await post(`/projects/${enc(app.projectId())}/cache/delete`, { study_uids: rows.map((r) => r.study_uid) });
      app.notify(`deleted ${report.deleted.length} stud${report.deleted.length === 1 ? "y" : "ies"}, ${bytes(report.bytes_freed)} freed`, "ok");
      await load();
    });
    resync();
  }

  // app.run ends by enabling the button it ran; what is selected now decides instead.
  function resync() { table.onSelect(table.selectedRows()); }

  function encryption() {
    if (mode.value === "passphrase") {
      if (passphrase.value.length < 8) throw new Error("choose a passphrase of at least 8 characters");
      if (passphrase.value !== passphraseAgain.value) throw new Error("the two passphrases differ; type them again");
      return { passphrase: passphrase.value };
    }
    if (mode.value === "recipients") {
      const keys = recipients.value.split("\n").map((k) => k.trim()).filter(Boolean);
      if (!keys.length) throw new Error("paste at least one public key (age1… or ssh-ed25519 …)");
      return { recipients: keys };
    }
    return null;
  }

  async function downloadSelected() {
    const rows = table.selectedRows();
    await app.run(download, async () => {
      const chosen = encryption();
      const label = `${rows.length} stud${rows.length === 1 ? "y" : "ies"} of ${app.projectId()}${chosen ? ", encrypted" : ""}`;
      app.notify(`download started: ${label}; its progress is in Tab 4`, "ok");
      const entry = await startDownload(app.projectId(), rows.map((r) => r.study_uid), chosen, label);
      if (entry.state === "failed") throw new Error(`download failed: ${entry.error}`);
      passphrase.value = "";
      passphraseAgain.value = "";
      await load();
    });
    resync();
  }

  async function forwardSelected() {
    if (!destination.value) { app.notify("this project has no forward destination; ask the site admin to configure one", "error"); return; }
    const rows = table.selectedRows();
    await app.run(forward, async () => {
      const report = await post(`/projects/${enc(app.projectId())}/forward`, {
        destination: destination.value, study_uids: rows.map((r) => r.study_uid) });
      const notes = [];
      if (report.already_queued.length) notes.push(`${report.already_queued.length} already on their way`);
      if (report.not_cached.length) notes.push(`${report.not_cached.length} no longer cached`);
      if (report.not_permitted.length) notes.push(`${report.not_permitted.length} refused: patient not on the IRB list`);
      app.notify(`${report.created.length} forward request(s) queued to ${destination.value}${notes.length ? "; " + notes.join(", ") : ""}. Follow them in the Request Log.`, "ok");
    });
    resync();
  }

  app.onContext(() => {
    usage = null;
    bar.replaceChildren();
    legend.textContent = "";
    table.setRows([]);
    if (!page.element.hidden) load().catch(app.fail);
  });

  const page = {
    id: "repository",
    label: "3 · Image Repository",
    element: element("section", { "aria-label": "Image repository" },
      element("h2", {}, "Image repository ", refresh),
      element("div", { class: "usage" }, bar, legend), deidNote,
      element("div", { class: "actions" }, remove),
      element("fieldset", { class: "actions" }, element("legend", { text: "Download selected" }),
        element("label", {}, "as ", mode), passphraseFields, recipientFields, download),
      element("fieldset", { class: "actions" }, element("legend", { text: "Forward selected" }),
        element("label", {}, "to ", destination), forward),
      table.element),
    table,
    show: load,
  };
  return page;
}
