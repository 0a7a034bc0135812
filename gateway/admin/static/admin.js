// The admin dashboard's only script: live refresh, and revealing and copying an engine URL.
// Everything it inserts is either server-rendered (escaped) HTML or set with textContent.
"use strict";

function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

function startLiveRefresh(element) {
  const every = Number(element.dataset.every || 5000);
  let stopped = false;
  async function refresh() {
    if (stopped || document.hidden) return;
    try {
      const response = await fetch(element.dataset.live, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" }, redirect: "manual" });
      if (response.status === 200) {
        element.innerHTML = await response.text();
        element.dataset.refreshed = String(Date.now());
      } else if (response.type === "opaqueredirect" || response.status === 401) {
        stopped = true; // logged out: the next navigation shows the login page
      }
    } catch (error) {
      // the gateway is restarting: the next tick tries again
    }
  }
  setInterval(refresh, every);
}

async function revealUrl(button) {
  const cell = button.closest("td");
  const target = cell.querySelector('[data-testid="url"]');
  const copy = cell.querySelector('[data-action="copy"]');
  const response = await fetch(button.dataset.endpoint, { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrfToken() } });
  if (!response.ok) {
    target.textContent = "could not load the URL (" + response.status + ")";
    return;
  }
  const answer = await response.json();
  target.textContent = answer.url;
  target.classList.remove("masked");
  button.hidden = true;
  if (copy) copy.hidden = false;
}

async function copyUrl(button) {
  const text = button.closest("td").querySelector('[data-testid="url"]').textContent;
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch (error) {
    button.textContent = "Copy failed: select the URL";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-live]").forEach(startLiveRefresh);
  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    if (button.dataset.action === "reveal") revealUrl(button);
    if (button.dataset.action === "copy") copyUrl(button);
  });
});
