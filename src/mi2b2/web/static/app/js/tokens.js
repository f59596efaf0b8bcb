// The signed-in user's own API tokens: create one (its secret shown once), list them, revoke one.

import { del, element, get, post, when } from "./api.js";

export function tokensPanel(button, panel, app) {
  const $ = (id) => document.getElementById(id);

  async function load() {
    const tokens = await get("/auth/tokens");
    $("token-list").replaceChildren(...tokens.map((token) => element("li", {},
      element("span", { text: `${token.name}: ${token.revoked_at ? "revoked" : `valid until ${when(token.expires_at)}`}` }),
      token.revoked_at ? null : element("button", { type: "button", class: "link", text: "revoke",
        "aria-label": `revoke token ${token.name}`,
        onclick: (event) => app.run(event.target, async () => { await del(`/auth/tokens/${token.id}`); await load(); }) }))));
  }

  button.addEventListener("click", () => {
    panel.hidden = !panel.hidden;
    $("token-secret").hidden = true;
    if (!panel.hidden) load().catch(app.fail);
  });

  $("new-token").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.target;
    app.run(form.querySelector("button"), async () => {
      const issued = await post("/auth/tokens", { name: form.elements.name.value, days: Number(form.elements.days.value) });
      $("token-value").textContent = issued.token;
      $("token-secret").hidden = false;
      form.reset();
      await load();
    });
  });
}
