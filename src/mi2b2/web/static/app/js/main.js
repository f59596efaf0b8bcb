// The mi2b2 browser client: the paper's five tabs plus the admin and auditor
// pages. Plain JavaScript modules and standard web APIs, no build step, no
// third-party code: everything is served by mi2b2 itself, so it works offline.

import { ApiError, element, get, post } from "./api.js";
import { adminPage } from "./admin.js";
import { auditPage } from "./audit.js";
import { patientsTab } from "./patients.js";
import { repositoryTab } from "./repository.js";
import { requestsTab } from "./requests.js";
import { studiesTab } from "./studies.js";
import { viewTab } from "./view.js";
import { tokensPanel } from "./tokens.js";

const $ = (id) => document.getElementById(id);
const REMEMBERED = "mi2b2.context"; // project and PACS ids only: nothing about patients

const app = {
  user: null,
  projects: [],
  project: null,     // the chosen project's summary from GET /projects
  pacsNodes: [],
  pacsId: null,
  pages: new Map(),
  current: null,
  contextListeners: [],

  notify(message, kind = "info") {
    const line = element("div", { class: `message ${kind}`, role: kind === "error" ? "alert" : "status" },
      element("span", { text: message }),
      element("button", { type: "button", class: "link", text: "dismiss", "aria-label": "dismiss message",
        onclick: () => line.remove() }));
    $("messages").append(line);
    while ($("messages").children.length > 4) $("messages").firstChild.remove();
    if (kind !== "error") setTimeout(() => line.remove(), 8000);
  },

  fail(error) {
    if (error instanceof ApiError && error.status === 401) {
      showLogin("Your session has ended; log in again.");
      return;
    }
    app.notify(error.message || String(error), "error");
  },

  /** Run an action from a button: errors become messages, the button is busy meanwhile. */
  async run(button, action) {
    if (button) button.disabled = true;
    try {
      return await action();
    } catch (error) {
      app.fail(error);
      return undefined;
    } finally {
      if (button) button.disabled = false;
    }
  },

  onContext(listener) { app.contextListeners.push(listener); },
  projectId() { return app.project ? app.project.id : null; },
  go(id) { location.hash = id; },
};

// --- login ------------------------------------------------------------------------------------

function showLogin(reason = "") {
  // Nothing of the ended session stays in the page, not even behind Back: start() rebuilds it all.
  if (app.current && app.current.hide) app.current.hide();
  app.current = null;
  app.user = null;
  app.pages.clear();
  $("pages").replaceChildren();
  $("tabs").hidden = true;
  $("pickers").hidden = true;
  $("logout").hidden = true;
  $("tokens-button").hidden = true;
  $("my-tokens").hidden = true;
  $("who").textContent = "";
  showSignInMethods().catch(() => { /* the password form still works */ });
  const wasHidden = $("login").hidden;
  $("login").hidden = false;
  $("login-error").textContent = reason;
  if (wasHidden) $("login").elements.login.focus(); // not while someone is typing into it
}

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  $("login-error").textContent = "";
  try {
    await post("/auth/login", { login: form.elements.login.value, password: form.elements.password.value });
    form.elements.password.value = "";
    await start();
  } catch (error) {
    $("login-error").textContent = error.message;
  }
});

/** "Sign in with <provider>" when the site has single sign-on; the password form stays for break-glass accounts. */
async function showSignInMethods() {
  const methods = await get("/auth/methods");
  const link = $("sign-in-provider");
  link.hidden = !methods.provider;
  if (methods.provider) {
    link.textContent = `Sign in with ${methods.provider.name}`;
    link.href = methods.provider.url;
  }
  $("password-note").hidden = methods.password !== "break-glass";
}

$("logout").addEventListener("click", async () => {
  const answer = await app.run($("logout"), () => post("/auth/logout"));
  location.hash = "";
  // Signed in through the site's provider: end the session there too, which then sends the browser back here.
  if (answer && answer.provider_logout) location.assign(answer.provider_logout);
  else location.reload();
});

tokensPanel($("tokens-button"), $("my-tokens"), app);

// --- project and PACS pickers ----------------------------------------------------------------------

function remembered() {
  try { return JSON.parse(sessionStorage.getItem(REMEMBERED) || "{}"); } catch (_) { return {}; }
}

function fillProjects() {
  const select = $("project");
  select.replaceChildren();
  if (!app.projects.length) select.append(new Option("(you are in no project)", ""));
  for (const project of app.projects) {
    const label = `${project.id} — ${project.title || ""}${project.expired ? " (IRB expired)" : ""}`;
    select.append(new Option(label, project.id));
  }
  const wanted = remembered().project;
  if (app.projects.some((p) => p.id === wanted)) select.value = wanted;
  chooseProject(select.value, false);
}

function fillPacs() {
  const select = $("pacs");
  const allowed = new Set(app.project ? app.project.institutions : []);
  const nodes = app.pacsNodes.filter((n) => !allowed.size || allowed.has(n.institution));
  select.replaceChildren();
  const groups = new Map();
  for (const node of nodes) {
    if (!groups.has(node.institution)) {
      groups.set(node.institution, element("optgroup", { label: node.institution_name }));
      select.append(groups.get(node.institution));
    }
    groups.get(node.institution).append(new Option(`${node.department_name} — ${node.name}`, node.id));
  }
  if (!nodes.length) select.append(new Option("(no PACS for this project)", ""));
  const wanted = remembered().pacs;
  if (nodes.some((n) => n.id === wanted)) select.value = wanted;
  app.pacsId = select.value || null;
}

function chooseProject(id, announce = true) {
  app.project = app.projects.find((p) => p.id === id) || null;
  const irb = $("irb-state");
  irb.textContent = "";
  irb.className = "";
  if (app.project) {
    irb.textContent = app.project.expired
      ? `IRB ${app.project.irb} expired on ${app.project.expires}: searches and retrievals are refused`
      : `IRB ${app.project.irb}, until ${app.project.expires}`;
    irb.className = app.project.expired ? "error" : "muted";
  }
  fillPacs();
  remember();
  if (announce) for (const listener of app.contextListeners) listener();
}

function remember() {
  sessionStorage.setItem(REMEMBERED, JSON.stringify({ project: app.projectId(), pacs: app.pacsId }));
}

$("project").addEventListener("change", (event) => chooseProject(event.target.value));
$("pacs").addEventListener("change", (event) => {
  app.pacsId = event.target.value || null;
  remember();
  for (const listener of app.contextListeners) listener();
});

// --- pages and the tab bar ------------------------------------------------------------------------

function pagesFor(role) {
  const pages = [patientsTab, studiesTab, repositoryTab, viewTab, requestsTab];
  if (role === "admin") pages.push(adminPage);
  if (role === "admin" || role === "auditor") pages.push(auditPage);
  return pages;
}

function buildPages() {
  const nav = $("tabs");
  nav.replaceChildren();
  $("pages").replaceChildren();
  app.pages.clear();
  app.contextListeners = []; // the pages of an earlier login are gone: so are their listeners
  for (const make of pagesFor(app.user.role)) {
    const page = make(app);
    page.element.id = `page-${page.id}`;
    page.element.hidden = true;
    page.element.classList.add("page");
    page.link = element("a", { href: `#${page.id}`, id: `tab-${page.id}`, text: page.label,
      "aria-controls": page.element.id });
    nav.append(page.link);
    $("pages").append(page.element);
    app.pages.set(page.id, page);
  }
}

function route() {
  if (!app.user) return;
  const wanted = location.hash.slice(1) || "patients";
  const page = app.pages.get(wanted);
  if (!page) {
    const reason = wanted === "admin" ? "the admin page needs the admin role"
      : wanted === "audit" ? "the audit page needs the auditor or admin role" : `there is no page '${wanted}'`;
    app.notify(reason, "error");
    history.replaceState(null, "", "#patients");
    route();
    return;
  }
  for (const other of app.pages.values()) {
    other.element.hidden = other !== page;
    other.link.classList.toggle("active", other === page);
    if (other === page) other.link.setAttribute("aria-current", "page");
    else other.link.removeAttribute("aria-current");
  }
  const researcherPage = !["admin", "audit"].includes(page.id);
  $("pickers").hidden = !researcherPage;
  if (app.current && app.current !== page && app.current.hide) app.current.hide();
  app.current = page;
  if (page.show) Promise.resolve(page.show()).catch(app.fail);
}

window.addEventListener("hashchange", route);

// --- start ------------------------------------------------------------------------------------------

async function start() {
  try {
    app.user = await get("/auth/me");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) { showLogin(); return; }
    throw error;
  }
  [app.projects, app.pacsNodes] = await Promise.all([get("/projects"), get("/pacs")]);
  $("login").hidden = true;
  $("tabs").hidden = false;
  $("logout").hidden = false;
  $("tokens-button").hidden = false;
  $("who").textContent = `${app.user.display_name || app.user.login} (${app.user.role})`;
  buildPages();
  fillProjects();
  route();
}

start().catch(app.fail);
