// Live updates for the router's status page. Every few seconds it fetches this same page (same
// filters, same page of peers) and replaces each element marked data-live whose content changed,
// so the server renders everything and focus stays where it was. When the router stops
// answering, the page keeps what it showed and says so; it pauses while the tab is hidden.
"use strict";
(() => {
  const every = 1000 * Number(document.currentScript.dataset.refresh || 2);
  const gone = document.getElementById("router-gone");
  let timer = null;
  let busy = false;

  async function refresh() {
    timer = null;
    busy = true;
    try {
      const answer = await fetch(location.href, { cache: "no-store", credentials: "same-origin" });
      if (!answer.ok) throw new Error(`it answered ${answer.status}`);
      const fresh = new DOMParser().parseFromString(await answer.text(), "text/html");
      for (const shown of document.querySelectorAll("[data-live][id]")) {
        const next = fresh.getElementById(shown.id);
        if (next && next.innerHTML !== shown.innerHTML) shown.innerHTML = next.innerHTML;
      }
      gone.hidden = true;
    } catch (error) {
      gone.querySelector(".detail").textContent = error.message;
      gone.hidden = false;
    }
    busy = false;
    schedule();
  }

  function schedule() {
    if (timer === null && !busy && !document.hidden) timer = setTimeout(refresh, every);
  }

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      clearTimeout(timer);
      timer = null;
    } else {
      schedule();
    }
  });
  document.documentElement.dataset.live = "on";  // for people and tests: updates are running
  schedule();
})();
