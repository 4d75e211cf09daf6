// Single-key shortcuts on an application's admin page: every element with
// data-review-key="x" is clicked when x is pressed outside a form field.
// Served from this origin, so the portal's CSP (script-src 'self') allows it.
"use strict";
document.addEventListener("keydown", (event) => {
  if (event.altKey || event.ctrlKey || event.metaKey || event.isComposing) return;
  if (event.target.closest("input, textarea, select, [contenteditable]")) return;
  for (const element of document.querySelectorAll("[data-review-key]")) {
    if (element.dataset.reviewKey === event.key) {
      event.preventDefault();
      element.click();
      return;
    }
  }
});
