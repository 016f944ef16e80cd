// keyward settings page: small improvements on top of plain HTML forms.
// Every action works without this script; it only
// runs "Test key" without reloading the page (the result appears in the card's live region).
// Same-origin only; no inline code (the page's Content-Security-Policy forbids it).
"use strict";

document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("form[data-enhance='test']").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.fetch || !window.URLSearchParams) {
        return;
      }
      event.preventDefault();
      var button = form.querySelector("button[type='submit']");
      var region = document.getElementById(form.getAttribute("data-result"));
      if (button) {
        button.disabled = true;
        button.setAttribute("aria-busy", "true");
      }
      if (region) {
        region.textContent = "";
        var waiting = document.createElement("p");
        waiting.className = "msg pending";
        waiting.textContent = "Testing the key with one minimal request…";
        region.appendChild(waiting);
      }
      fetch(form.action, {
        method: "POST",
        credentials: "same-origin",
        headers: {
          "Content-Type": "application/x-www-form-urlencoded",
          "X-Keyward-Fetch": "1",
        },
        body: new URLSearchParams(new FormData(form)).toString(),
      })
        .then(function (res) {
          var type = res.headers.get("content-type") || "";
          if (!res.ok || type.indexOf("application/json") !== 0) {
            throw new Error("not a test result");
          }
          return res.json();
        })
        .then(function (answer) {
          // The server renders and escapes both fragments.
          if (region) {
            region.innerHTML = answer.html;
          }
          var lastTest = document.getElementById(form.getAttribute("data-last-test"));
          if (lastTest && answer.last_test) {
            lastTest.innerHTML = answer.last_test;
          }
          if (button) {
            button.disabled = false;
            button.removeAttribute("aria-busy");
          }
        })
        .catch(function () {
          // Fall back to the plain form: the page reloads with the result.
          form.submit();
        });
    });
  });

});
