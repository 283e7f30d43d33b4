// report-worker dashboard: live refresh. Every page works without this script; with it,
// pages whose <main> has data-live="N" re-fetch themselves every N seconds and swap in
// the new <main>, unless the tab is hidden or the person is using a form on the page.
(function () {
  "use strict";
  var main = document.querySelector("main[data-live]");
  if (!main || !window.fetch || !window.DOMParser) return;
  var every = Math.max(1, parseInt(main.getAttribute("data-live"), 10) || 5) * 1000;
  var badge = document.querySelector(".live");
  if (badge) badge.hidden = false;
  var busy = false;

  function interacting() {
    var a = document.activeElement;
    var current = document.querySelector("main");
    return !!(a && current && current.contains(a) && /^(INPUT|SELECT|TEXTAREA)$/.test(a.tagName));
  }

  function refresh() {
    if (busy || document.hidden || interacting()) return;
    busy = true;
    fetch(location.href, { credentials: "same-origin", headers: { "X-Live-Refresh": "1" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (text) {
        if (!text) return;
        var next = new DOMParser().parseFromString(text, "text/html").querySelector("main");
        var current = document.querySelector("main");
        if (next && current && !interacting()) current.replaceWith(next);
        if (badge) badge.classList.remove("stale");
      })
      .catch(function () { if (badge) badge.classList.add("stale"); })
      .then(function () { busy = false; });
  }

  setInterval(refresh, every);
})();
