// The twisted-socks5 live console: polls the JSON API every two seconds
// while the page is visible.  Everything from the server goes into the page
// as text (textContent), never as HTML.
"use strict";

(function () {
  const PERIOD = 2000;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const status = document.getElementById("status");
  const filter = document.getElementById("filter");
  let tunnels = [];
  let users = [];
  let sortKey = "id";
  let sortDown = false;
  let timer = null;

  function api(method, path) {
    const headers = { "X-Requested-With": "console" };
    if (method === "POST") {
      headers["X-CSRF-Token"] = csrf;
    }
    return fetch(path, { method: method, headers: headers, credentials: "same-origin" })
      .then(function (response) {
        if (response.status === 401) {
          window.location.assign("/login");
          throw new Error("logged out");
        }
        return response.json().then(function (body) {
          if (!response.ok) {
            throw new Error(body.error || response.statusText);
          }
          return body;
        });
      });
  }

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return (i ? n.toFixed(1) : String(Math.round(n))) + " " + units[i];
  }

  function seconds(s) {
    if (s < 60) return s.toFixed(0) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "\u2014" : String(text);
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  function button(label, title, action) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.title = title;
    b.addEventListener("click", function () {
      b.disabled = true;
      action().then(refresh, function (e) { report(e); b.disabled = false; });
    });
    return b;
  }

  function value(t, key) {
    if (key === "rate") return t.rate_up + t.rate_down;
    const v = t[key];
    return v === null || v === undefined ? "" : v;
  }

  function shown() {
    const needle = filter.value.trim().toLowerCase();
    const list = tunnels.filter(function (t) {
      return !needle
        || String(t.user || "").toLowerCase().includes(needle)
        || String(t.destination || "").toLowerCase().includes(needle);
    });
    list.sort(function (a, b) {
      const x = value(a, sortKey);
      const y = value(b, sortKey);
      const order = typeof x === "number" && typeof y === "number"
        ? x - y : String(x).localeCompare(String(y));
      return sortDown ? -order : order;
    });
    return list;
  }

  function drawTunnels() {
    const body = document.querySelector("#tunnels tbody");
    const rows = shown().map(function (t) {
      const row = document.createElement("tr");
      row.dataset.id = String(t.id);
      cell(row, t.id, "num");
      cell(row, t.client);
      cell(row, t.user, "wrap user");
      cell(row, t.protocol);
      cell(row, t.command);
      cell(row, t.destination, "wrap destination");
      cell(row, t.route);
      cell(row, t.state);
      cell(row, bytes(t.bytes_up), "num");
      cell(row, bytes(t.bytes_down), "num");
      cell(row, bytes(t.rate_up) + "/s \u2191 " + bytes(t.rate_down) + "/s \u2193", "num");
      cell(row, seconds(t.age), "num");
      const td = cell(row, "");
      td.appendChild(button("Close", "close this tunnel", function () {
        return api("POST", "/api/tunnels/" + t.id + "/close");
      }));
      return row;
    });
    body.replaceChildren.apply(body, rows);
    document.getElementById("count").textContent =
      "(" + rows.length + (rows.length !== tunnels.length ? " of " + tunnels.length : "") + ")";
    document.querySelectorAll("#tunnels th[data-key]").forEach(function (th) {
      th.classList.toggle("sorted", th.dataset.key === sortKey);
      th.classList.toggle("down", th.dataset.key === sortKey && sortDown);
    });
  }

  function drawUsers() {
    const body = document.querySelector("#users tbody");
    const rows = users.map(function (u) {
      const row = document.createElement("tr");
      cell(row, u.user === null ? "(no login)" : u.user, "wrap user");
      cell(row, u.tunnels, "num");
      cell(row, bytes(u.bytes_up), "num");
      cell(row, bytes(u.bytes_down), "num");
      cell(row, u.limits ? JSON.stringify(u.limits) : null, "wrap");
      const td = cell(row, "");
      if (u.user !== null) {
        td.appendChild(button("Close all", "close every tunnel of this user", function () {
          return api("POST", "/api/users/" + encodeURIComponent(u.user) + "/close");
        }));
      }
      return row;
    });
    body.replaceChildren.apply(body, rows);
  }

  function report(error) {
    status.textContent = "Error: " + error.message;
    status.className = "error";
  }

  function refresh() {
    return Promise.all([api("GET", "/api/tunnels"), api("GET", "/api/users")])
      .then(function (answers) {
        tunnels = answers[0];
        users = answers[1];
        drawTunnels();
        drawUsers();
        status.textContent = "Updated " + new Date().toLocaleTimeString();
        status.className = "";
      }, report);
  }

  function schedule() {
    clearTimeout(timer);
    timer = null;
    if (!document.hidden) {
      timer = setTimeout(function () { refresh().then(schedule); }, PERIOD);
    }
  }

  document.querySelectorAll("#tunnels th[data-key]").forEach(function (th) {
    th.addEventListener("click", function () {
      sortDown = sortKey === th.dataset.key ? !sortDown : false;
      sortKey = th.dataset.key;
      drawTunnels();
    });
  });
  filter.addEventListener("input", drawTunnels);
  document.getElementById("reload").addEventListener("click", function () {
    api("POST", "/api/reload").then(function () {
      status.textContent = "Configuration reloaded (failures, if any, are in the log)";
      status.className = "";
    }, report);
  });
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) refresh().then(schedule);
    else schedule();
  });
  refresh().then(schedule);
})();
