// billcore virtual office: the only script. Pages work without it.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  // hovering a bar of the traffic chart lights up that day's table row
  var table = document.getElementById("traffic-table");
  document.querySelectorAll("svg.chart rect[data-day]").forEach(function (bar) {
    bar.addEventListener("mouseenter", function () {
      if (!table) return;
      table.querySelectorAll("tr.hot").forEach(function (r) { r.classList.remove("hot"); });
      var row = table.querySelector('tr[data-day="' + bar.getAttribute("data-day") + '"]');
      if (row) row.classList.add("hot");
    });
  });
  // ask before switching the internet off
  document.querySelectorAll("button[data-confirm]").forEach(function (button) {
    button.form.addEventListener("submit", function (event) {
      if (!window.confirm(button.getAttribute("data-confirm"))) event.preventDefault();
    });
  });
});
