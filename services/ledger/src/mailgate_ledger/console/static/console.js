// mailgate console: the little JavaScript it needs (no build step).
// Forms with data-confirm ask before submitting (stop a campaign...).
document.addEventListener("submit", function (event) {
  var form = event.target;
  var question = form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
    return;
  }
  var button = form.querySelector("button[type=submit]");
  if (button) {
    window.setTimeout(function () { button.disabled = true; }, 0);
  }
});
