// The admin page: PACS nodes with C-ECHO and their governance state now,
// projects with their IRB, quota and allow-list, users and tokens, and
// reloading the site configuration.

import { del, element, enc, get, post, textFileInput, when } from "./api.js";
import { FacetTable } from "./table.js";

const rate = (count, limit) => `${count} / ${limit ?? "∞"}`;

export function adminPage(app) {
  let timer = null;
  let echoes = new Map();

  // --- PACS nodes and governance ----------------------------------------------------------------
  const echoButton = element("button", { type: "button", text: "C-ECHO all PACS", onclick: () => app.run(echoButton, () => loadPacs(true)) });
  const pacsTable = new FacetTable({
    name: "admin-pacs", key: (row) => row.id, selectable: false, empty: "no PACS configured",
    columns: [
      { key: "id", label: "PACS", type: "text" },
      { key: "institution_name", label: "Institution", type: "set", facet: true },
      { key: "department_name", label: "Department", type: "set", facet: true },
      { key: "ae_title", label: "AE title", type: "text" },
      { key: "echo", label: "C-ECHO", type: "set", facet: true, value: (row) => echoStatus(row.id), render: (row) => echoText(row.id) },
      { key: "window", label: "Window now", type: "text",
        value: (row) => (row.state ? `${row.state.limits.window}${row.state.limits.closed ? " (closed)" : ""}` : "") },
      { key: "active", label: "Active / cap", type: "text",
        value: (row) => (row.state ? `${row.state.active} / ${row.state.limits.max_concurrent}` : "") },
      { key: "minute", label: "Starts last minute / rate", type: "text",
        value: (row) => (row.state ? rate(row.state.starts_last_minute, row.state.limits.studies_per_minute) : "") },
      { key: "hour", label: "Starts last hour / rate", type: "text",
        value: (row) => (row.state ? rate(row.state.starts_last_hour, row.state.limits.studies_per_hour) : "") },
      { key: "queued", label: "Queued", type: "number", value: (row) => row.state?.queued },
    ],
  });

  function echoStatus(id) {
    const report = echoes.get(id);
    return !report ? "not checked" : report.reachable ? "ok" : "failed";
  }

  function echoText(id) {
    const report = echoes.get(id);
    if (!report) return "not checked";
    return report.reachable ? `ok (${Math.round(report.milliseconds)} ms)` : `failed: ${report.problem}`;
  }

  async function loadPacs(echo = false) {
    const [nodes, states] = await Promise.all([get(`/pacs${echo ? "?echo=true" : ""}`), get("/pacs/state")]);
    if (echo) echoes = new Map(nodes.filter((n) => n.echo).map((n) => [n.id, n.echo]));
    const byId = new Map(states.map((s) => [s.pacs_id, s]));
    pacsTable.setRows(nodes.map((node) => ({ ...node, state: byId.get(node.id) })));
  }

  // --- projects and allow-lists -----------------------------------------------------------------
  const projectTable = new FacetTable({
    name: "admin-projects", key: (row) => row.id, selectable: false, empty: "no projects configured",
    columns: [
      { key: "id", label: "Project", type: "text" },
      { key: "title", label: "Title", type: "text" },
      { key: "irb", label: "IRB", type: "text" },
      { key: "expires", label: "IRB expires", type: "date", facet: true },
      { key: "status", label: "Status", type: "set", facet: true,
        value: (row) => (!row.active ? "inactive" : row.expired ? "IRB expired" : "active") },
      { key: "members", label: "Members", type: "text", value: (row) => row.members.map((m) => `${m.login} (${m.role})`).join(", ") },
      { key: "quota_bytes", label: "Quota", type: "bytes" },
      { key: "used_bytes", label: "Used", type: "bytes", facet: true },
      { key: "in_flight_bytes", label: "In flight", type: "bytes" },
      { key: "allow_list_size", label: "Allowed MRNs", type: "number" },
    ],
  });
  const mrnProject = element("select", { "aria-label": "project whose allow-list to replace",
    onchange: () => showInstitutions() });
  // An MRN means nothing without its institution: a project that reaches several names the one listed.
  const mrnInstitution = element("select", { "aria-label": "institution whose allow-list to replace" });
  const mrnInstitutionLabel = element("label", {}, "institution ", mrnInstitution);
  let projectsById = new Map();
  const mrnText = element("textarea", { rows: 4, spellcheck: "false", "aria-label": "new allow-list, one MRN per line" });
  const mrnFile = textFileInput(mrnText, "upload an allow-list file", app.fail);
  const mrnButton = element("button", { type: "submit", text: "Replace allow-list" });
  const mrnForm = element("form", { class: "actions", onsubmit: (event) => { event.preventDefault(); uploadMrns(); } },
    element("label", {}, "project ", mrnProject), mrnInstitutionLabel,
    element("label", { class: "stacked" }, "MRNs (this replaces the institution's whole list)", mrnText),
    element("label", {}, "or a file ", mrnFile), mrnButton);

  async function loadProjects() {
    const projects = await get("/admin/projects");
    projectTable.setRows(projects);
    const chosen = mrnProject.value;
    mrnProject.replaceChildren(...projects.map((p) => new Option(p.id, p.id)));
    if (projects.some((p) => p.id === chosen)) mrnProject.value = chosen;
    projectsById = new Map(projects.map((p) => [p.id, p]));
    showInstitutions();
  }

  function showInstitutions() {
    const institutions = projectsById.get(mrnProject.value)?.institutions ?? [];
    const chosen = mrnInstitution.value;
    mrnInstitution.replaceChildren(...institutions.map((i) => new Option(i, i)));
    if (institutions.includes(chosen)) mrnInstitution.value = chosen;
    mrnInstitutionLabel.hidden = institutions.length < 2;
  }

  async function uploadMrns() {
    if (!mrnText.value.trim()) { app.notify("paste or upload the new allow-list first", "error"); return; }
    const several = !mrnInstitutionLabel.hidden;
    const where = several ? ` at ${mrnInstitution.value}` : "";
    if (!window.confirm(`Replace the whole allow-list of ${mrnProject.value}${where}?`)) return;
    await app.run(mrnButton, async () => {
      const body = { mrns: mrnText.value, institution: several ? mrnInstitution.value : null };
      const result = await post(`/admin/projects/${enc(mrnProject.value)}/mrns`, body);
      app.notify(`allow-list of ${mrnProject.value} now holds ${result.allow_list_size} MRNs`, "ok");
      mrnText.value = "";
      await loadProjects();
    });
  }

  // --- users and tokens -------------------------------------------------------------------------
  const userTable = new FacetTable({
    name: "admin-users", key: (row) => row.login, selectable: false, empty: "no users",
    columns: [
      { key: "login", label: "Login", type: "text" },
      { key: "display_name", label: "Name", type: "text" },
      { key: "role", label: "Role", type: "set", facet: true },
      { key: "email", label: "E-mail", type: "text" },
      { key: "disabled", label: "Status", type: "set", facet: true, value: (row) => (row.disabled ? "disabled" : "enabled") },
    ],
  });
  const tokenTable = new FacetTable({
    name: "admin-tokens", key: (row) => String(row.id), selectable: false, empty: "no tokens",
    columns: [
      { key: "id", label: "#", type: "number" },
      { key: "login", label: "User", type: "set", facet: true },
      { key: "kind", label: "Kind", type: "set", facet: true },
      { key: "name", label: "Name", type: "text" },
      { key: "created_at", label: "Created", type: "date" },
      { key: "expires_at", label: "Expires", type: "date" },
      { key: "last_used_at", label: "Last used", type: "date" },
      { key: "status", label: "Status", type: "set", facet: true, value: (row) => (row.revoked_at ? `revoked ${when(row.revoked_at)}` : "valid") },
      { key: "revoke", label: "", type: "text", csv: () => "",
        render: (row) => (row.revoked_at ? "" : element("button", { type: "button", class: "link", text: "revoke",
          onclick: (event) => app.run(event.target, async () => { await del(`/auth/tokens/${row.id}`); await loadUsers(); }) })) },
    ],
  });
  const newUser = element("form", { class: "actions", onsubmit: (event) => { event.preventDefault(); addUser(event.target); } },
    element("label", {}, "login ", element("input", { name: "login", required: true, autocomplete: "off" })),
    element("label", {}, "role ", element("select", { name: "role" }, new Option("researcher", "researcher"),
      new Option("auditor", "auditor"), new Option("admin", "admin"))),
    element("label", {}, "name ", element("input", { name: "display_name" })),
    element("label", {}, "e-mail ", element("input", { name: "email", type: "email" })),
    element("label", {}, "password ", element("input", { name: "password", type: "password", autocomplete: "new-password" })),
    element("button", { type: "submit", text: "Add user" }));

  async function loadUsers() {
    const [users, tokens] = await Promise.all([get("/admin/users"), get("/admin/tokens")]);
    userTable.setRows(users);
    tokenTable.setRows(tokens);
  }

  async function addUser(form) {
    const value = (name) => form.elements[name].value.trim();
    await app.run(form.querySelector("button"), async () => {
      await post("/admin/users", { login: value("login"), role: value("role"), display_name: value("display_name"),
        email: value("email") || null, password: form.elements.password.value || null });
      app.notify(`user ${value("login")} added`, "ok");
      form.reset();
      await loadUsers();
    });
  }

  // --- configuration ----------------------------------------------------------------------------
  const reloadResult = element("div", { class: "reload-result", "aria-live": "polite" });
  const reload = element("button", { type: "button", text: "Reload configuration", onclick: () => app.run(reload, async () => {
    const summary = await post("/admin/config/reload");
    const list = (label, items) => element("li", { text: `${label}: ${items.length ? items.join(", ") : "none"}` });
    reloadResult.replaceChildren(element("p", { class: "ok", text: `Configuration reloaded at ${new Date().toLocaleTimeString()}.` }),
      element("ul", {}, list("added", summary.added), list("changed", summary.changed), list("deactivated", summary.deactivated),
        list("allow-list sizes", Object.entries(summary.allow_list_sizes).map(([p, n]) => `${p} ${n}`))));
    await Promise.all([loadPacs(), loadProjects()]);
  }) });

  async function show() {
    await Promise.all([loadPacs(), loadProjects(), loadUsers()]);
    loadPacs(true).catch(app.fail); // C-ECHO may wait for a PACS that is down: the rest is shown meanwhile
    clearInterval(timer);
    timer = setInterval(() => { if (!page.element.hidden) loadPacs().catch(() => {}); }, 5000);
  }

  const page = {
    id: "admin",
    label: "Admin",
    element: element("section", { "aria-label": "Administration" },
      element("h2", { text: "Administration" }),
      element("section", { "aria-label": "configuration" }, element("h3", { text: "Configuration" }),
        element("p", { class: "muted", text: "Re-read the site file (PACS, windows, projects, members, allow-lists) without a restart." }),
        reload, reloadResult),
      element("section", { "aria-label": "PACS nodes" }, element("h3", {}, "PACS nodes and governance now ", echoButton), pacsTable.element),
      element("section", { "aria-label": "projects" }, element("h3", { text: "Projects" }), projectTable.element,
        element("h4", { text: "Replace a project's allow-list" }), mrnForm),
      element("section", { "aria-label": "users" }, element("h3", { text: "Users" }), userTable.element, newUser,
        element("h3", { text: "Tokens and sessions" }), tokenTable.element)),
    show,
    hide: () => clearInterval(timer),
  };
  return page;
}
