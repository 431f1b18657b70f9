// The subscriber pages' little script (the pages work without it):
// a form with data-confirm asks before it is sent (block, disconnect),
// and the payment a message points at is scrolled into view.
"use strict";
document.addEventListener("submit", (event) => {
  const question = event.target.dataset ? event.target.dataset.confirm : undefined;
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});
document.addEventListener("DOMContentLoaded", () => {
  const marked = document.querySelector("#payment-list tr.hot");
  if (marked) {
    marked.scrollIntoView({ block: "center" });
  }
});
