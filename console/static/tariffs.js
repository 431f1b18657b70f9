// The tariff form's sample month: ticking a service or changing a volume
// fetches the quote fragment again (/tariffs/quote, the same code as the
// "Show sample month" button, which still works without this script).
"use strict";

(() => {
  const form = document.getElementById("tariff-form");
  const url = form && form.dataset.quote;
  if (!url) return;
  let timer = 0;
  let asked = 0;
  const refresh = async () => {
    const query = new URLSearchParams();
    for (const [name, value] of new FormData(form)) {
      if (name !== "csrf" && typeof value === "string") query.append(name, value);
    }
    const ticket = ++asked;
    const answer = await fetch(`${url}?${query}`, { credentials: "same-origin", cache: "no-store" });
    if (ticket !== asked) return;            // a later change is already on its way
    if (answer.redirected) { window.location.reload(); return; }   // the session ended: log in again
    if (!answer.ok) return;
    const box = document.getElementById("quote-result");
    if (box) box.outerHTML = await answer.text();
  };
  const later = () => { window.clearTimeout(timer); timer = window.setTimeout(refresh, 250); };
  form.addEventListener("change", later);
  form.addEventListener("input", (event) => {
    if (event.target instanceof HTMLInputElement && event.target.type === "text") later();
  });
})();
