// The pixstream console's script: sortable tables, the search box, the
// overview's chart and its refresh (a fetch every 5 s: no connection is held
// between refreshes, and none on the server's side while a page is open).
"use strict";

(function () {
  const SERIES = [["inserted", 1], ["delivered", 2], ["confirmed", 3]];

  function age(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const s = Math.floor(seconds);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function svg(tag, attributes) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
    return node;
  }

  // points: [[seconds ago, inserted/s, delivered/s, confirmed/s], ...], oldest first.
  function drawChart(chart, points) {
    const width = 600, height = 180, left = 40, bottom = 20, top = 8;
    chart.replaceChildren();
    let max = 1;
    for (const point of points) for (const [, i] of SERIES) max = Math.max(max, point[i]);
    const x = (n) => left + (points.length < 2 ? 0 : (n * (width - left - 8)) / (points.length - 1));
    const y = (v) => height - bottom - (v / max) * (height - bottom - top);
    chart.append(svg("line", {x1: left, y1: y(0), x2: width - 8, y2: y(0), class: "axis"}));
    for (const value of [max / 2, max]) {
      chart.append(svg("line", {x1: left, y1: y(value), x2: width - 8, y2: y(value), class: "axis"}));
      const label = svg("text", {x: 2, y: y(value) + 3});
      label.textContent = value >= 10 ? Math.round(value) : value.toFixed(1);
      chart.append(label);
    }
    if (points.length) {
      const first = svg("text", {x: left, y: height - 5});
      first.textContent = "-" + points[0][0] + " s";
      const last = svg("text", {x: width - 40, y: height - 5});
      last.textContent = "now";
      chart.append(first, last);
    }
    for (const [name, i] of SERIES) {
      const path = points.map((point, n) => x(n).toFixed(1) + "," + y(point[i]).toFixed(1)).join(" ");
      chart.append(svg("polyline", {
        points: path, fill: "none", "stroke-width": 2, stroke: "var(--" + name + ")", "data-series": name,
      }));
    }
  }

  function renderHosts(hosts) {
    const body = document.querySelector("#hosts tbody");
    if (!body) return;
    body.replaceChildren();
    for (const host of hosts) {
      const row = document.createElement("tr");
      const cells = [
        [host.name, ""],
        [host.alive ? "alive" : "silent", host.alive ? "ok" : "bad"],
        [host.listener, host.listener === "listening" ? "ok" : "bad"],
        [String(host.processes), ""],
        [age(host.silent_for) + " ago", ""],
      ];
      for (const [text, css] of cells) {
        const cell = document.createElement("td");
        cell.textContent = text;
        if (css) cell.className = css;
        row.append(cell);
      }
      body.append(row);
    }
  }

  async function refresh(section, chart) {
    try {
      const response = await fetch(section.dataset.source, {headers: {Accept: "application/json"}});
      if (!response.ok) throw new Error("HTTP " + response.status);
      const data = await response.json();
      for (const field of section.querySelectorAll("[data-field]")) {
        const value = data[field.dataset.field];
        field.textContent = field.dataset.format === "age" ? age(value)
          : field.dataset.format === "rate" ? Number(value).toFixed(2) : String(value);
      }
      drawChart(chart, data.series);
      renderHosts(data.hosts);
      document.getElementById("refreshed").textContent =
        "refreshed at " + new Date().toLocaleTimeString() + ", every 5 s";
    } catch (error) {
      // A failed refresh is shown, not thrown: the next one may succeed.
      document.getElementById("refreshed").textContent = "refresh failed (" + error.message + "); retrying";
    }
  }

  function sortable(table) {
    const headers = Array.from(table.tHead.rows[0].cells);
    headers.forEach((header, column) => {
      header.addEventListener("click", () => {
        const descending = header.getAttribute("aria-sort") === "ascending";
        headers.forEach((h) => h.removeAttribute("aria-sort"));
        header.setAttribute("aria-sort", descending ? "descending" : "ascending");
        const numeric = header.dataset.type === "number";
        const body = table.tBodies[0];
        const rows = Array.from(body.rows).filter((row) => row.cells.length === headers.length);
        const key = (row) => {
          const value = row.cells[column].dataset.value;
          return numeric ? Number(value) : value;
        };
        rows.sort((a, b) => {
          const order = key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0;
          return descending ? -order : order;
        });
        body.append(...rows);
      });
    });
  }

  function filter(input, table) {
    input.addEventListener("input", () => {
      const wanted = input.value.trim();
      for (const row of table.tBodies[0].rows) {
        const ispb = row.cells[0].dataset.value || "";
        row.hidden = wanted !== "" && !ispb.includes(wanted);
      }
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    for (const table of document.querySelectorAll("table.sortable")) sortable(table);
    const search = document.getElementById("search");
    const institutions = document.getElementById("institutions");
    if (search && institutions) filter(search, institutions);
    const chart = document.getElementById("chart");
    const section = document.getElementById("overview");
    if (chart && section) {
      drawChart(chart, JSON.parse(chart.dataset.series));
      setInterval(() => refresh(section, chart), 5000);
    }
  });
})();
