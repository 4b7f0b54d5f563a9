/* cohortseg QC page: static, no network. Rows come from the JSON blob #qc-data and are rendered
 * with a virtualised list (only the rows in view exist in the DOM), so 50,000 rows stay fluid.
 * Ratings live in localStorage under "cohortseg-qc:v1:<page_id>" until exported as TSV. */
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("qc-data").textContent);
  var F = {}; DATA.fields.forEach(function (f, i) { F[f] = i; });
  var METRICS = DATA.metrics || [];
  var MAXM = DATA.max_metrics || 6;
  var STORE_KEY = "cohortseg-qc:v1:" + DATA.page_id;
  var PREF_KEY = "cohortseg-qc:prefs";
  var RATINGS = ["pass", "fail", "artifact"];
  var $ = function (id) { return document.getElementById(id); };
  var list = $("list"), spacer = $("spacer");
  var ROW_H = parseInt(getComputedStyle(document.documentElement).getPropertyValue("--row-h"), 10) || 96;

  // ---------------------------------------------------------------- rows
  var rows = DATA.rows.map(function (r, i) {
    var o = { i: i, p: r[F.participant_id] || "", s: r[F.session_id] || "", pl: r[F.pipeline] || "",
              st: r[F.status] || "", fl: r[F.qc_flags] || "", th: r[F.thumb] || "", im: r[F.img] || "",
              err: r[F.error] || "", m: r[F.metrics] || [] };
    o.key = o.p + "\t" + o.s + "\t" + o.pl;
    o.flags = o.fl ? o.fl.split(";").filter(Boolean) : [];
    o.text = [o.p, o.s, o.pl, o.st, o.fl, o.err].join(" ").toLowerCase();
    return o;
  });
  var byKey = {}; rows.forEach(function (o) { byKey[o.key] = o; });

  // ---------------------------------------------------------------- storage
  var ratings = {}, storageOk = true;
  function loadRatings() {
    try { ratings = JSON.parse(localStorage.getItem(STORE_KEY) || "{}") || {}; }
    catch (e) { ratings = {}; storageOk = false; warn("Browser storage unavailable: export your ratings before closing the page."); }
  }
  function saveRatings() {
    try { localStorage.setItem(STORE_KEY, JSON.stringify(ratings)); }
    catch (e) { storageOk = false; warn("Could not save ratings in browser storage (" + e.name + "): export them now (key e)."); }
  }
  var prefs = {};
  try { prefs = JSON.parse(localStorage.getItem(PREF_KEY) || "{}") || {}; } catch (e) { prefs = {}; }
  function savePrefs() { try { localStorage.setItem(PREF_KEY, JSON.stringify(prefs)); } catch (e) { /* ignore */ } }
  function warn(msg) { var w = $("warn"); w.textContent = msg; w.hidden = false; }
  function ratingOf(o) { var r = ratings[o.key]; return r ? r.r : ""; }

  // ---------------------------------------------------------------- controls
  function fillSelect(sel, values) {
    values.forEach(function (v) { var op = document.createElement("option"); op.value = v; op.textContent = v; sel.appendChild(op); });
  }
  function uniq(a) { var s = {}, out = []; a.forEach(function (v) { if (v !== "" && !s[v]) { s[v] = 1; out.push(v); } }); return out.sort(); }
  fillSelect($("f-pipeline"), uniq(rows.map(function (o) { return o.pl; })));
  // the status vocabulary (DATA.statuses: status -> meaning) documents itself in the filter; other
  // values found in the rows follow
  var STATUSES = DATA.statuses || {};
  var stSel = $("f-status");
  Object.keys(STATUSES).concat(uniq(rows.map(function (o) { return o.st; })).filter(function (v) { return !(v in STATUSES); }))
    .forEach(function (v) {
      var op = document.createElement("option"); op.value = v;
      op.textContent = STATUSES[v] ? v + ": " + STATUSES[v] : v; op.title = op.textContent; stSel.appendChild(op);
    });
  var sortSel = $("sort");
  [["", "input order"], ["p", "participant"], ["pl", "pipeline"], ["st", "status"], ["nf", "number of flags"], ["r", "rating"]]
    .concat(METRICS.map(function (m, j) { return ["m" + j, m]; }))
    .forEach(function (kv) { var op = document.createElement("option"); op.value = kv[0]; op.textContent = "sort: " + kv[1]; sortSel.appendChild(op); });
  $("rater").value = prefs.rater || "";
  $("advance").checked = prefs.advance !== false;
  $("help-key").textContent = STORE_KEY;
  if (DATA.index) { $("index-link").href = DATA.index; $("index-link").hidden = false; }  // one of several pages

  // ---------------------------------------------------------------- filter + sort
  var view = [], cur = -1;
  function metricValue(o, j) { for (var t = 0; t < o.m.length; t += 2) { if (o.m[t] === j) { return o.m[t + 1]; } } return null; }
  var lastFilterMs = null;
  function applyFilter(keepKey) {
    var t0 = performance.now();
    var q = $("q").value.toLowerCase().split(/\s+/).filter(Boolean);
    var inc = q.filter(function (t) { return t[0] !== "-" || t.length === 1; });
    var exc = q.filter(function (t) { return t[0] === "-" && t.length > 1; }).map(function (t) { return t.slice(1); });
    var fp = $("f-pipeline").value, fs = $("f-status").value, fr = $("f-rating").value, ff = $("f-flagged").checked;
    view = [];
    for (var i = 0; i < rows.length; i++) {
      var o = rows[i], ok = true, k;
      if (fp && o.pl !== fp) { continue; }
      if (fs && o.st !== fs) { continue; }
      if (ff && !o.flags.length) { continue; }
      if (fr) { var r = ratingOf(o); if (fr === "unrated" ? r : fr === "rated" ? !r : r !== fr) { continue; } }
      for (k = 0; k < inc.length && ok; k++) { if (o.text.indexOf(inc[k]) < 0) { ok = false; } }
      for (k = 0; k < exc.length && ok; k++) { if (o.text.indexOf(exc[k]) >= 0) { ok = false; } }
      if (ok) { view.push(i); }
    }
    var s = sortSel.value, desc = $("sort-desc").checked ? -1 : 1;
    if (s) {
      var keyf;
      if (s === "nf") { keyf = function (o) { return o.flags.length; }; }
      else if (s === "r") { keyf = function (o) { return ratingOf(o); }; }
      else if (s[0] === "m") { var j = parseInt(s.slice(1), 10); keyf = function (o) { return metricValue(o, j); }; }
      else { keyf = function (o) { return o[s]; }; }
      view.sort(function (a, b) {
        var x = keyf(rows[a]), y = keyf(rows[b]);
        if (x === null || x === "") { return (y === null || y === "") ? a - b : 1; }   // missing last
        if (y === null || y === "") { return -1; }
        if (x < y) { return -desc; } if (x > y) { return desc; } return a - b;
      });
    }
    spacer.style.height = (view.length * ROW_H) + "px";
    cur = -1;
    if (keepKey && byKey[keepKey]) { cur = view.indexOf(byKey[keepKey].i); }
    clearRendered();
    render();
    counts();
    lastFilterMs = performance.now() - t0;
  }

  // ---------------------------------------------------------------- virtualised rendering
  var rendered = new Map();   // view position -> element
  function clearRendered() { rendered.forEach(function (el) { el.remove(); }); rendered.clear(); }
  function el(tag, cls, text) { var e = document.createElement(tag); if (cls) { e.className = cls; } if (text !== undefined) { e.textContent = text; } return e; }
  function fmt(v) {
    if (typeof v !== "number") { return String(v); }
    var a = Math.abs(v);
    if (a >= 1e4 && a < 1e12) { return Math.round(v).toLocaleString("en-US"); }
    return (a !== 0 && (a >= 1e12 || a < 1e-3)) ? v.toExponential(3) : String(+v.toPrecision(6));
  }
  function buildRow(pos) {
    var o = rows[view[pos]];
    var d = el("div", "row"); d.setAttribute("role", "row"); d.dataset.pos = pos; d.dataset.key = o.key;
    d.style.top = (pos * ROW_H) + "px";
    var th = el("div", "thumb");
    var src = o.th || o.im;
    if (src) {
      var img = new Image(); img.loading = "lazy"; img.decoding = "async"; img.alt = o.p + " " + o.pl; img.src = src;
      img.onerror = function () { th.textContent = ""; th.appendChild(el("span", "none", "image missing")); };
      th.appendChild(img);
    } else { th.appendChild(el("span", "none", "no snapshot")); }
    th.title = "open full size (Enter)";
    th.addEventListener("click", function (ev) { ev.stopPropagation(); select(pos); openViewer(); });
    d.appendChild(th);
    d.appendChild(el("div", "cell pid", o.p));
    d.appendChild(el("div", "cell", o.s));
    d.appendChild(el("div", "cell", o.pl));
    var st = el("div", "st " + ({ ok: "ok", no_input: "none", refused: "refused" }[o.st] || (o.st ? "bad" : "")), o.st || "-");
    st.title = o.err || STATUSES[o.st] || "";
    d.appendChild(st);
    var mc = el("div", "metrics");
    for (var t = 0, shown = 0; t < o.m.length && shown < MAXM; t += 2, shown++) {
      var name = METRICS[o.m[t]];
      var k = el("span", "", name); k.title = name; mc.appendChild(k); mc.appendChild(el("span", "", fmt(o.m[t + 1])));
    }
    d.appendChild(mc);
    var fc = el("div", "flags"); o.flags.forEach(function (f) { fc.appendChild(el("span", "flag", f)); }); d.appendChild(fc);
    var rc = el("div", "rate");
    RATINGS.forEach(function (r) {
      var b = el("button", r, r);
      b.type = "button"; b.title = r + " (" + r[0] + ")"; b.tabIndex = -1;
      b.addEventListener("click", function (ev) { ev.stopPropagation(); select(pos, true); rate(ratingOf(o) === r ? "" : r, false); });
      rc.appendChild(b);
    });
    d.appendChild(rc);
    d.addEventListener("click", function () { select(pos); list.focus({ preventScroll: true }); });
    d.addEventListener("dblclick", function () { select(pos); openViewer(); });
    paintRow(d, o, pos);
    return d;
  }
  function paintRow(d, o, pos) {
    var r = ratingOf(o);
    d.className = "row" + (pos === cur ? " sel" : "") + (r ? " r-" + r : "");
    var bs = d.querySelectorAll(".rate button");
    for (var b = 0; b < bs.length; b++) { bs[b].classList.toggle("on", bs[b].classList.contains(r)); }
  }
  var pending = false;
  function render() {
    pending = false;
    var top = list.scrollTop, h = list.clientHeight || 800, over = 6;
    var first = Math.max(0, Math.floor(top / ROW_H) - over);
    var last = Math.min(view.length - 1, Math.ceil((top + h) / ROW_H) + over);
    rendered.forEach(function (d, pos) { if (pos < first || pos > last) { d.remove(); rendered.delete(pos); } });
    for (var pos = first; pos <= last; pos++) {
      if (!rendered.has(pos)) { var d = buildRow(pos); spacer.appendChild(d); rendered.set(pos, d); }
    }
    var msg = spacer.querySelector(".empty");
    if (!view.length && !msg) { spacer.appendChild(el("div", "empty", "no rows match the filters")); }
    else if (view.length && msg) { msg.remove(); }
  }
  list.addEventListener("scroll", function () { if (!pending) { pending = true; requestAnimationFrame(render); } });
  window.addEventListener("resize", function () { render(); });

  function repaint(pos) { var d = rendered.get(pos); if (d) { paintRow(d, rows[view[pos]], pos); } }
  function select(pos, noScroll) {
    if (!view.length) { return; }
    pos = Math.max(0, Math.min(view.length - 1, pos));
    var old = cur; cur = pos;
    if (old >= 0) { repaint(old); }
    if (!noScroll) { ensureVisible(pos); }
    render(); repaint(pos);
    if (!$("viewer").hidden) { showViewer(); }
  }
  function ensureVisible(pos) {
    var y = pos * ROW_H, h = list.clientHeight;
    if (y < list.scrollTop) { list.scrollTop = y; }
    else if (y + ROW_H > list.scrollTop + h) { list.scrollTop = y + ROW_H - h; }
  }

  // ---------------------------------------------------------------- ratings
  function rate(r, advance) {
    if (cur < 0) { select(0); }
    if (cur < 0) { return; }
    var o = rows[view[cur]];
    if (r) { ratings[o.key] = { r: r, t: Date.now(), by: ($("rater").value || "").trim() }; }
    else { delete ratings[o.key]; }
    saveRatings(); repaint(cur); counts();
    if (!$("viewer").hidden) { showViewer(); }
    if (advance && $("advance").checked && cur < view.length - 1) { select(cur + 1); }
  }
  function counts() {
    var c = { pass: 0, fail: 0, artifact: 0 }, n = 0;
    for (var k in ratings) { if (Object.prototype.hasOwnProperty.call(ratings, k) && c[ratings[k].r] !== undefined) { c[ratings[k].r]++; n++; } }
    $("counts").textContent = "showing " + view.length.toLocaleString() + " of " + rows.length.toLocaleString() + " rows \u00b7 rated " + n.toLocaleString() +
      " (pass " + c.pass + " \u00b7 fail " + c.fail + " \u00b7 artifact " + c.artifact + ")" + (storageOk ? "" : " \u00b7 NOT SAVED");
  }
  function clean(s) { return String(s).replace(/[\t\r\n]+/g, " "); }
  function exportTsv() {
    var lines = ["participant_id\tsession_id\tpipeline\trating\trater\ttimestamp"];
    var keys = Object.keys(ratings).sort(function (a, b) {
      var x = byKey[a] ? byKey[a].i : 1e12, y = byKey[b] ? byKey[b].i : 1e12; return x - y || (a < b ? -1 : a > b ? 1 : 0);
    });
    keys.forEach(function (k) {
      var r = ratings[k], parts = k.split("\t");
      if (parts.length !== 3 || RATINGS.indexOf(r.r) < 0) { return; }
      lines.push([parts[0], parts[1], parts[2], r.r, r.by || "", new Date(r.t).toISOString()].map(clean).join("\t"));
    });
    var blob = new Blob([lines.join("\n") + "\n"], { type: "text/tab-separated-values" });
    var a = document.createElement("a");
    a.href = URL.createObjectURL(blob); a.download = "qc_ratings.tsv";
    document.body.appendChild(a); a.click();
    setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  }
  function importTsv(text) {
    var ls = text.split(/\r?\n/).filter(function (l) { return l.trim(); });
    if (!ls.length) { return; }
    var head = ls[0].split("\t").map(function (h) { return h.trim().toLowerCase(); });
    var ix = {}; head.forEach(function (h, i) { ix[h] = i; });
    if (ix.participant_id === undefined || ix.pipeline === undefined || ix.rating === undefined) { warn("Import: not a qc_ratings.tsv (needs participant_id, pipeline, rating columns)."); return; }
    var n = 0;
    ls.slice(1).forEach(function (l) {
      var c = l.split("\t"), r = (c[ix.rating] || "").trim().toLowerCase();
      var key = (c[ix.participant_id] || "").trim() + "\t" + (ix.session_id !== undefined ? (c[ix.session_id] || "").trim() : "") + "\t" + (c[ix.pipeline] || "").trim();
      var t = ix.timestamp !== undefined ? Date.parse(c[ix.timestamp]) : NaN; if (isNaN(t)) { t = 0; }
      var old = ratings[key];
      if (old && old.t > t) { return; }
      if (r === "unrated") { delete ratings[key]; n++; }
      else if (RATINGS.indexOf(r) >= 0) { ratings[key] = { r: r, t: t, by: ix.rater !== undefined ? (c[ix.rater] || "").trim() : "" }; n++; }
    });
    saveRatings(); rendered.forEach(function (d, pos) { repaint(pos); }); counts();
    warn("Imported " + n + " rating(s).");
  }

  // ---------------------------------------------------------------- viewer
  function openViewer() { if (cur < 0) { select(0); } if (cur < 0) { return; } $("viewer").hidden = false; showViewer(); }
  function closeViewer() { $("viewer").hidden = true; list.focus({ preventScroll: true }); }
  function showViewer() {
    var o = rows[view[cur]], r = ratingOf(o) || "unrated";
    var img = $("v-img");
    if (o.im || o.th) { img.hidden = false; $("v-none").hidden = true; var src = o.im || o.th; if (img.getAttribute("src") !== src) { img.src = src; } }
    else { img.hidden = true; img.removeAttribute("src"); $("v-none").hidden = false; }
    var cap = $("v-caption"); cap.textContent = "";
    cap.appendChild(el("b", "", o.p + (o.s ? " / " + o.s : "") + " / " + o.pl));
    cap.appendChild(document.createTextNode("  " + o.st + "  (" + (cur + 1) + "/" + view.length + ")  "));
    cap.appendChild(el("span", "badge " + r, r));
    var vm = $("v-metrics"); vm.textContent = "";
    for (var t = 0; t < o.m.length; t += 2) { vm.appendChild(el("span", "", METRICS[o.m[t]] + " ")); vm.appendChild(el("b", "", fmt(o.m[t + 1]))); vm.appendChild(document.createTextNode("   ")); }
    if (o.fl) { vm.appendChild(el("span", "", "  flags: " + o.fl)); }
    if (o.err) { vm.appendChild(el("span", "", "  error: " + o.err)); }
  }
  $("v-close").addEventListener("click", closeViewer);
  $("viewer").addEventListener("click", function (ev) { if (ev.target.id === "viewer" || ev.target.classList.contains("vbody")) { closeViewer(); } });
  $("help-btn").addEventListener("click", function () { $("help").hidden = !$("help").hidden; });
  $("help").addEventListener("click", function () { $("help").hidden = true; });

  // ---------------------------------------------------------------- keyboard
  var page = function () { return Math.max(1, Math.floor(list.clientHeight / ROW_H) - 1); };
  document.addEventListener("keydown", function (ev) {
    var t = ev.target, typing = t && (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA") && t.type !== "checkbox";
    if (typing) {
      if (ev.key === "Escape" || (ev.key === "Enter" && t.id === "q")) {
        var enter = ev.key === "Enter"; t.blur(); list.focus({ preventScroll: true });
        if (enter && cur < 0 && view.length) { select(0); }
        ev.preventDefault();
      }
      return;
    }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) { return; }
    var k = ev.key, done = true;
    if (k === "j" || k === "ArrowDown" || (!$("viewer").hidden && k === "ArrowRight")) { select(cur < 0 ? 0 : cur + 1); }
    else if (k === "k" || k === "ArrowUp" || (!$("viewer").hidden && k === "ArrowLeft")) { select(cur < 0 ? 0 : cur - 1); }
    else if (k === "PageDown") { select(Math.max(cur, 0) + page()); }
    else if (k === "PageUp") { select(Math.max(cur, 0) - page()); }
    else if (k === "Home" || k === "g") { select(0); }
    else if (k === "End" || k === "G") { select(view.length - 1); }
    else if (k === "Enter" || k === "o") { openViewer(); }
    else if (k === "Escape") { if (!$("help").hidden) { $("help").hidden = true; } else if (!$("viewer").hidden) { closeViewer(); } else { done = false; } }
    else if (k === "p") { rate("pass", true); }
    else if (k === "f") { rate("fail", true); }
    else if (k === "a") { rate("artifact", true); }
    else if (k === "u" || k === "0" || k === "Delete" || k === "Backspace") { rate("", false); }
    else if (k === "e") { exportTsv(); }
    else if (k === "/") { $("q").focus(); $("q").select(); }
    else if (k === "?") { $("help").hidden = !$("help").hidden; }
    else { done = false; }
    if (done) { ev.preventDefault(); }
  });

  // ---------------------------------------------------------------- wiring
  var deb = null;
  $("q").addEventListener("input", function () { clearTimeout(deb); deb = setTimeout(function () { applyFilter(cur >= 0 ? rows[view[cur]].key : null); }, 120); });
  ["f-pipeline", "f-status", "f-rating", "f-flagged", "sort", "sort-desc"].forEach(function (id) {
    $(id).addEventListener("change", function () { applyFilter(cur >= 0 ? rows[view[cur]].key : null); list.focus({ preventScroll: true }); });
  });
  $("rater").addEventListener("change", function () { prefs.rater = $("rater").value.trim(); savePrefs(); });
  $("advance").addEventListener("change", function () { prefs.advance = $("advance").checked; savePrefs(); });
  $("export").addEventListener("click", exportTsv);
  $("import").addEventListener("change", function (ev) {
    var f = ev.target.files && ev.target.files[0]; if (!f) { return; }
    var rd = new FileReader(); rd.onload = function () { importTsv(String(rd.result)); }; rd.readAsText(f); ev.target.value = "";
  });
  window.addEventListener("storage", function (ev) { if (ev.key === STORE_KEY) { loadRatings(); rendered.forEach(function (d, pos) { repaint(pos); }); counts(); } });

  loadRatings();
  applyFilter(null);
  list.focus({ preventScroll: true });
  window.cohortsegQC = { rows: rows, view: function () { return view; }, current: function () { return cur; }, ratings: function () { return ratings; }, storageKey: STORE_KEY,
                       get lastFilterMs() { return lastFilterMs; } };
  document.body.dataset.ready = "1";
})();
