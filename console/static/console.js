// billcore console: confirmations and live updates. Pages work without it (but the login).
"use strict";
// <button data-confirm="Really?">: ask before its form is sent. One listener on the document,
// so a button that came with a live update (below) is covered too.
document.addEventListener("submit", function (event) {
  var button = event.submitter;
  if (button && button.hasAttribute("data-confirm") && !window.confirm(button.getAttribute("data-confirm"))) {
    event.preventDefault();
  }
});
document.addEventListener("DOMContentLoaded", function () {
  // <section id="…" data-live="/path/of/the/sse/route">: when the console says a topic changed, fetch
  // this page again with the operator's own session and swap the section in (events carry no data)
  document.querySelectorAll("[data-live]").forEach(function (region) {
    if (!region.id || !window.EventSource) return;
    var source = new EventSource(region.getAttribute("data-live"));
    var pending = false;
    var again = false;     // a change came while fetching: what we fetched may predate it, so fetch once more
    var refresh = async function () {
      if (pending) { again = true; return; }
      pending = true;
      try {
        var response = await fetch(window.location.href, { credentials: "same-origin", cache: "no-store" });
        if (!response.ok) return;
        var page = new DOMParser().parseFromString(await response.text(), "text/html");
        var fresh = page.getElementById(region.id);
        if (fresh) region.innerHTML = fresh.innerHTML;
        region.dispatchEvent(new CustomEvent("live:updated", { bubbles: true }));
      } finally {
        pending = false;
        if (again) { again = false; refresh(); }
      }
    };
    source.addEventListener("changed", refresh);
  });
});
