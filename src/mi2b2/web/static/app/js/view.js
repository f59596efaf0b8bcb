// Tab 4, View Images: the patient > study > series > image tree and the viewer
// (the same page `mi2b2 view` serves, embedded), and this session's downloads.

import { element } from "./api.js";
import { downloadsPanel } from "./downloads.js";

export function viewTab(app) {
  const frame = element("iframe", { class: "viewer-frame", title: "image viewer" });
  let shownProject = null; // switching tabs keeps the viewer as it was, unless the project changed

  function show(studyUid = null) {
    const project = app.projectId();
    if (!project) return;
    const params = new URLSearchParams({ project, embedded: "1" });
    if (studyUid) params.set("study", studyUid);
    if (!studyUid && shownProject === project) return;
    shownProject = project;
    frame.src = `/viewer/?${params}`;
  }

  // A PACS change does not concern the viewer; a project change does.
  app.onContext(() => { if (app.projectId() !== shownProject && !page.element.hidden) show(); });
  const refresh = element("button", { type: "button", text: "Refresh the tree",
    title: "show studies retrieved since the viewer opened", onclick: () => { shownProject = null; show(); } });

  const page = {
    id: "view",
    label: "4 · View Images",
    element: element("section", { "aria-label": "View images", class: "view-page" },
      element("div", { class: "actions" }, refresh), frame,
      element("details", { class: "downloads-box", open: true },
        element("summary", { text: "Downloads in this session" }), downloadsPanel())),
    show: () => show(),
    open: (studyUid) => show(studyUid),
  };
  return page;
}
