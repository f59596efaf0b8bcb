// The mi2b2 viewer page: plain JavaScript, standard web APIs, no build step.
//
// One page, two homes. Served by mi2b2 at /viewer/, it talks to
// /api/v1/projects/<project>/viewer/ with the browser session (it shows a
// login form when there is none). Served by `mi2b2 view` at /<token>/, it
// talks to api/ next to itself, about a local download.
//
// Patient identifiers only ever travel in response bodies: every URL this page
// builds names a project, a study/series/SOP UID or a frame, nothing else.
"use strict";

(() => {
  const server = location.pathname.startsWith("/viewer/");
  const params = new URLSearchParams(location.search);
  const embedded = params.has("embedded");
  const $ = (id) => document.getElementById(id);
  const state = {
    api: server ? null : "api/",
    presets: [],
    stack: [],          // instances of the open series, in order
    position: 0,        // index into stack
    frame: 0,           // 0-based frame within the instance; -1 = the last one (known once its tags arrive)
    window: null,       // {center, width} chosen by the user; null = the image's own
    shown: null,        // {center, width} the last image was rendered with
    tags: new Map(),    // sop uid -> tags response
    loading: false,
    again: false,       // the state changed while a frame was loading: load once more
    objectUrl: null,
    activeSeries: null,
  };

  // --- talking to the server -----------------------------------------------------------------

  class HttpError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function call(url, options = {}) {
    const response = await fetch(url, { credentials: "same-origin", cache: "no-store", ...options });
    if (!response.ok) {
      let message = response.statusText;
      try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
      throw new HttpError(response.status, message);
    }
    return response;
  }

  const json = async (url, options) => (await call(url, options)).json();
  const uid = (value) => encodeURIComponent(value);

  function status(text, error = false) {
    $("status").textContent = text;
    $("status").className = error ? "error" : "";
  }

  function failed(error) {
    if (error instanceof HttpError && error.status === 401 && server) {
      showLogin();
      return;
    }
    status(error.message || String(error), true);
  }

  // --- login and project (server mode) ---------------------------------------------------------

  function showLogin() {
    $("main").hidden = true;
    $("login").hidden = false;
    $("login").elements.login.focus();
  }

  $("login").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    $("login-error").textContent = "";
    try {
      await json("/api/v1/auth/login", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ login: form.elements.login.value, password: form.elements.password.value }),
      });
      form.elements.password.value = "";
      form.hidden = true;
      await start();
    } catch (error) {
      $("login-error").textContent = error.message;
    }
  });

  async function chooseProject() {
    const projects = await json("/api/v1/projects");
    const select = $("project");
    select.replaceChildren();
    for (const project of projects) {
      const option = new Option(`${project.id} — ${project.title || ""}`, project.id);
      select.append(option);
    }
    if (!projects.length) throw new Error("you are not a member of any project");
    const wanted = new URLSearchParams(location.search).get("project");
    if (wanted && projects.some((p) => p.id === wanted)) select.value = wanted;
    // Inside the client's Tab 4 the client's own picker chooses the project.
    $("project-box").hidden = embedded;
    return select.value;
  }

  $("project").addEventListener("change", () => {
    const url = new URL(location.href);
    url.searchParams.set("project", $("project").value);
    history.replaceState(null, "", url);
    openProject($("project").value).catch(failed);
  });

  // --- the tree ------------------------------------------------------------------------------------

  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  function date(value) {
    return /^\d{8}$/.test(value || "") ? `${value.slice(0, 4)}-${value.slice(4, 6)}-${value.slice(6)}` : (value || "");
  }

  async function openProject(project) {
    state.api = `/api/v1/projects/${uid(project)}/viewer/`;
    // Nothing of the last project's patient may stay on screen, nor be stepped through by the keys.
    Object.assign(state, { stack: [], position: 0, frame: 0, window: null, shown: null, activeSeries: null,
      series: null, tags: new Map() });
    setImage(null);
    for (const id of ["overlay-top", "overlay-bottom", "message"]) $(id).textContent = "";
    $("tag-table").tBodies[0].replaceChildren();
    await loadTree();
  }

  async function loadTree() {
    status("loading…");
    const tree = await json(state.api + "tree");
    state.presets = tree.presets || [];
    fillPresets();
    const root = $("tree");
    root.replaceChildren();
    if (!tree.patients.length) root.append(element("p", "no studies here yet", "muted"));
    for (const patient of tree.patients) {
      const node = element("details");
      node.append(element("summary", `${patient.patient_name || "(no name)"} · ${patient.patient_id}`));
      for (const study of patient.studies) node.append(studyNode(study));
      root.append(node);
      if (tree.patients.length === 1) {
        node.open = true;  // one patient, one study: show it at once
        const studies = node.querySelectorAll(":scope > details");
        if (studies.length === 1) studies[0].open = true;
      }
    }
    openWanted(params.get("study"));
    const count = tree.patients.reduce((n, p) => n + p.studies.length, 0);
    status(`${tree.patients.length} patient${tree.patients.length === 1 ? "" : "s"}, ${count} stud${count === 1 ? "y" : "ies"}`
      + (tree.skipped_files ? ` (${tree.skipped_files} files that are not DICOM instances left out)` : ""));
  }

  /** Open the study named in the URL (the client's "view" button) and so its first series. */
  function openWanted(studyUid) {
    const node = [...$("tree").querySelectorAll("details[data-study]")].find((n) => n.dataset.study === studyUid);
    if (!node) return;
    node.parentElement.open = true;
    node.open = true;
    node.scrollIntoView({ block: "nearest" });
  }

  function studyNode(study) {
    const node = element("details");
    node.dataset.study = study.study_uid;
    const label = [date(study.study_date), study.modalities, study.description || study.accession].filter(Boolean).join(" · ");
    const summary = element("summary", label || study.study_uid);
    summary.title = `${study.series_count} series, ${study.instance_count} images\n${study.study_uid}`;
    node.append(summary);
    node.addEventListener("toggle", () => {
      if (node.open && !node.dataset.loaded) {
        node.dataset.loaded = "1";
        loadStudy(study.study_uid, node).catch((error) => { delete node.dataset.loaded; failed(error); });
      }
    });
    return node;
  }

  async function loadStudy(studyUid, node) {
    const study = await json(state.api + "studies/" + uid(studyUid));
    for (const series of study.series) {
      const text = `${series.series_number ?? "–"} ${series.modality || ""} ${series.description || ""}`.trim();
      const link = element("a", `${text} (${series.instance_count})`, "series");
      link.href = "#";
      link.title = series.series_uid;
      link.addEventListener("click", (event) => { event.preventDefault(); openSeries(series, link); });
      node.append(link);
    }
    if (study.series.length) {
      const first = node.querySelector(".series");
      if (!state.activeSeries && first) first.click();
    }
  }

  function openSeries(series, link) {
    if (state.activeSeries) state.activeSeries.classList.remove("active");
    state.activeSeries = link;
    link.classList.add("active");
    state.stack = series.instances;
    state.series = series;
    state.position = 0;
    state.frame = 0;
    state.window = null;
    $("preset").value = "";
    $("stage").focus();
    show();
  }

  // --- presets and the window fields ---------------------------------------------------------------

  function fillPresets() {
    const select = $("preset");
    select.replaceChildren(new Option("from the image", ""));
    for (const preset of state.presets) {
      select.append(new Option(`${preset.label} (C ${preset.center} / W ${preset.width})`, preset.key));
    }
  }

  $("preset").addEventListener("change", () => {
    const preset = state.presets.find((p) => p.key === $("preset").value);
    state.window = preset ? { center: preset.center, width: preset.width } : null;
    show();
  });

  $("reset").addEventListener("click", () => { state.window = null; $("preset").value = ""; show(); });

  for (const id of ["center", "width"]) {
    $(id).addEventListener("change", () => {
      const center = parseFloat($("center").value);
      const width = parseFloat($("width").value);
      if (Number.isFinite(center) && Number.isFinite(width) && width > 0) {
        state.window = { center, width };
        $("preset").value = "";
        show();
      }
    });
  }

  // --- showing an image ----------------------------------------------------------------------------

  async function tagsOf(sop) {
    if (!state.tags.has(sop)) state.tags.set(sop, await json(state.api + `instances/${uid(sop)}/tags`));
    return state.tags.get(sop);
  }

  // One request at a time; whatever changed meanwhile is fetched when it ends,
  // so dragging asks for the latest window, not for every step of the drag.
  async function show() {
    if (state.loading) { state.again = true; return; }
    state.loading = true;
    try {
      do {
        state.again = false;
        await showOnce();
      } while (state.again);
    } catch (error) {
      $("message").textContent = error.message || String(error);
      if (error instanceof HttpError && error.status === 401 && server) showLogin();
    } finally {
      state.loading = false;
    }
  }

  async function showOnce() {
    const instance = state.stack[state.position];
    if (!instance) return;
    const tags = await tagsOf(instance.sop_uid);
    const frames = tags.image.frames || 1;
    if (state.frame < 0 || state.frame >= frames) state.frame = state.frame < 0 ? frames - 1 : 0;
    showTags(tags);
    $("message").textContent = "";
    if (!tags.image.has_pixels) {
      setImage(null);
      $("message").textContent = `no image in this instance (${tags.image.sop_class || tags.image.sop_class_uid}); its tags are on the right`;
      overlay(instance, tags, frames);
      return;
    }
    const params = new URLSearchParams();
    if (state.window) {
      params.set("center", String(state.window.center));
      params.set("width", String(state.window.width));
    }
    const query = params.toString() ? `?${params}` : "";
    const response = await call(state.api + `instances/${uid(instance.sop_uid)}/frames/${state.frame + 1}.png${query}`);
    const center = response.headers.get("X-Window-Center");
    const width = response.headers.get("X-Window-Width");
    state.shown = center !== null && width !== null ? { center: parseFloat(center), width: parseFloat(width) } : null;
    setImage(await response.blob());
    $("center").value = state.shown ? round(state.shown.center) : "";
    $("width").value = state.shown ? round(state.shown.width) : "";
    $("center").disabled = $("width").disabled = $("preset").disabled = !state.shown;
    overlay(instance, tags, frames);
  }

  function setImage(blob) {
    const image = $("image");
    if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = blob ? URL.createObjectURL(blob) : null;
    if (state.objectUrl) image.src = state.objectUrl; else image.removeAttribute("src");
  }

  function round(value) { return Math.round(value * 100) / 100; }

  function overlay(instance, tags, frames) {
    const series = state.series || {};
    const lines = [
      `${series.series_number ?? ""} ${series.description || ""}`.trim(),
      `image ${state.position + 1} / ${state.stack.length}` + (instance.instance_number != null ? `  (#${instance.instance_number})` : ""),
    ];
    if (frames > 1) lines.push(`frame ${state.frame + 1} / ${frames}`);
    $("overlay-top").textContent = lines.join("\n");
    const size = tags.image.columns && tags.image.rows ? `${tags.image.columns} × ${tags.image.rows}` : "";
    $("overlay-bottom").textContent = [
      state.shown ? `C ${round(state.shown.center)}  W ${round(state.shown.width)}` : "",
      [size, tags.image.photometric, tags.image.transfer_syntax].filter(Boolean).join(" · "),
    ].filter(Boolean).join("\n");
  }

  function showTags(tags) {
    const body = $("tag-table").tBodies[0];
    body.replaceChildren();
    const row = (name, value, className) => {
      const tr = element("tr", undefined, className);
      tr.append(element("td", name), element("td", value == null ? "" : String(value)));
      body.append(tr);
    };
    const image = tags.image;
    row("image", "", "section");
    row("frames", image.frames);
    row("size", image.columns && image.rows ? `${image.columns} × ${image.rows}` : "");
    row("pixels", [image.photometric, image.bits_stored && `${image.bits_stored} of ${image.bits_allocated} bits`,
      image.signed ? "signed" : ""].filter(Boolean).join(", "));
    row("transfer syntax", image.transfer_syntax ? `${image.transfer_syntax} (${image.transfer_syntax_uid})` : image.transfer_syntax_uid);
    row("SOP class", image.sop_class || image.sop_class_uid);
    row("tags", "", "section");
    for (const tag of tags.tags) {
      const tr = element("tr");
      const name = element("td", tag.name);
      name.title = `${tag.tag} ${tag.keyword}`;
      tr.append(name, element("td", tag.value));
      body.append(tr);
    }
  }

  // --- moving through the series -------------------------------------------------------------------

  function step(delta) {
    if (!state.stack.length) return;
    const sop = state.stack[state.position].sop_uid;
    const frames = state.tags.has(sop) ? (state.tags.get(sop).image.frames || 1) : 1;
    let { position, frame } = state;
    for (let n = 0; n < Math.abs(delta); n++) {
      if (delta > 0) {
        if (frame + 1 < frames) frame++;
        else if (position + 1 < state.stack.length) { position++; frame = 0; }
      } else if (frame > 0) frame--;
      else if (position > 0) { position--; frame = -1; }
    }
    if (position === state.position && frame === state.frame) return;
    state.position = position;
    state.frame = frame;
    show();
  }

  $("stage").addEventListener("wheel", (event) => {
    event.preventDefault();
    step(event.deltaY > 0 ? 1 : -1);
  }, { passive: false });

  $("stage").addEventListener("keydown", (event) => {
    const moves = { ArrowDown: 1, ArrowRight: 1, ArrowUp: -1, ArrowLeft: -1, PageDown: 10, PageUp: -10 };
    if (event.key in moves) {
      event.preventDefault();
      step(moves[event.key]);
    } else if (event.key === "Home" || event.key === "End") {
      event.preventDefault();
      state.position = event.key === "Home" ? 0 : Math.max(state.stack.length - 1, 0);
      state.frame = event.key === "Home" ? 0 : -1;
      show();
    }
  });

  // --- window by dragging: horizontal = width, vertical = centre -------------------------------------

  let drag = null;
  $("stage").addEventListener("pointerdown", (event) => {
    if (event.button !== 0 || !state.shown) return;
    $("stage").setPointerCapture(event.pointerId);
    drag = { x: event.clientX, y: event.clientY, start: { ...state.shown } };
  });
  $("stage").addEventListener("pointermove", (event) => {
    if (!drag) return;
    // Sensitivity follows the width, so a narrow brain window and a wide lung one both move smoothly.
    const scale = Math.max(drag.start.width, 1) / 300;
    state.window = {
      center: drag.start.center + (event.clientY - drag.y) * scale,
      width: Math.max(1, drag.start.width + (event.clientX - drag.x) * scale),
    };
    $("preset").value = "";
    show();
  });
  const endDrag = () => { drag = null; };
  $("stage").addEventListener("pointerup", endDrag);
  $("stage").addEventListener("pointercancel", endDrag);

  // --- start ---------------------------------------------------------------------------------------

  async function start() {
    $("login").hidden = true;
    $("main").hidden = false;
    if (server) {
      $("source").textContent = "";
      await openProject(await chooseProject());
    } else {
      $("source").textContent = "local download";
      await loadTree();
    }
  }

  start().catch(failed);
})();
