// The online sessions list, live: the console's event stream says only that a
// RADIUS session topic changed; the table is then fetched again with the
// operator's own session, so it shows what their own call answers.
"use strict";

(() => {
  const box = document.getElementById("online");
  if (!box || !window.EventSource) return;
  let busy = false;
  let again = false;
  const reload = async () => {
    if (busy) { again = true; return; }     // one fetch at a time; one more after it if events came
    busy = true;
    try {
      const answer = await fetch(box.dataset.fragment, { credentials: "same-origin" });
      if (answer.redirected) { window.location.reload(); return; }   // the session ended: log in again
      if (answer.ok) {
        box.innerHTML = await answer.text();
        box.dataset.loaded = String(Number(box.dataset.loaded || "0") + 1);
      }
    } finally {
      busy = false;
      if (again) { again = false; reload(); }
    }
  };
  const events = new EventSource(box.dataset.events);
  let opened = false;
  events.addEventListener("open", () => {
    if (opened) reload();                   // reconnected: events may have been missed
    opened = true;
    box.dataset.live = "on";
  });
  events.addEventListener("changed", reload);
  window.addEventListener("pagehide", () => events.close());
})();
