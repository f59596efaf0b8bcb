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

  app.onContext(() => { shownProject = null; if (!page.element.hidden) show(); });

  const page = {
    id: "view",
    label: "4 · View Images",
    element: element("section", { "aria-label": "View images", class: "view-page" },
      frame,
      element("details", { class: "downloads-box", open: true },
        element("summary", { text: "Downloads in this session" }), downloadsPanel())),
    show: () => show(),
    open: (studyUid) => show(studyUid),
  };
  return page;
}
