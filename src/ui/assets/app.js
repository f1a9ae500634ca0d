// The clinician's screen. Every change comes from the device as a server-sent event (the same
// state the buttons change), so this page only renders state and sends requests.
"use strict";

let S = null; // the device's last state
let tab = "screen";
let userPickedTab = false;

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
};
const thumb = (sha) => "/api/thumb/" + sha + ".jpg";
const pct = (p) => (p * 100).toFixed(1) + " %";

function showMessage(text) {
  const m = $("message");
  m.textContent = text || "";
  m.hidden = !text;
}

async function post(path, body) {
  setBusy(true);
  try {
    const r = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const j = await r.json().catch(() => ({ error: "the device sent no answer" }));
    if (!r.ok) {
      showMessage(j.error || "request failed (" + r.status + ")");
      return null;
    }
    showMessage(null);
    if (j && j.state) render(j);
    return j;
  } catch (e) {
    showMessage("the device does not answer: " + e);
    return null;
  } finally {
    setBusy(false);
  }
}

function setBusy(b) {
  document.body.classList.toggle("busy", b);
  for (const id of ["screen-capture", "enroll-capture", "enroll-retake", "enroll-next", "enroll-synth", "screen-synth"]) {
    $(id).disabled = b || !enabled(id);
  }
}

function enabled(id) {
  if (!S) return false;
  const anyShots = S.classes.some((c) => c.shots.length > 0);
  switch (id) {
    case "screen-capture": return S.state === "screen";
    case "screen-synth": return anyShots;
    case "enroll-capture": return S.state === "enroll" || S.state === "idle";
    case "enroll-retake": return S.state === "enroll" && lastShotOfCurrent() !== null;
    case "enroll-next": return S.state === "enroll";
    case "enroll-synth": return anyShots;
  }
  return true;
}

function lastShotOfCurrent() {
  if (!S || S.enroll_class === null) return null;
  const c = S.classes[S.enroll_class];
  return c && c.shots.length ? c.shots[c.shots.length - 1] : null;
}

function selectTab(t, byUser) {
  tab = t;
  if (byUser) userPickedTab = true;
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === t);
  for (const p of document.querySelectorAll(".page")) p.classList.toggle("active", p.id === t);
  if (t === "history") loadHistory();
  if (t === "device" || t === "export") loadDevice();
}

function render(s) {
  S = s;
  $("state").textContent = "board " + s.board + " · task " + s.task + " · " + stateText(s);
  if (s.message) showMessage(s.message);
  // follow the device: enrolling shows Enroll, screening shows Screen, unless a person chose a tab
  if (!userPickedTab) selectTab(s.state === "screen" ? "screen" : "enroll", false);
  renderScreen(s);
  renderEnroll(s);
  renderTask(s);
  setBusy(false);
}

function stateText(s) {
  if (s.state === "enroll") {
    const c = s.classes[s.enroll_class];
    return "enrolling " + c.name + " (" + c.shots.length + "/" + s.shots_per_class + ")";
  }
  return { idle: "waiting for enrollment", synthesize: "synthesizing", screen: "screening" }[s.state] || s.state;
}

function renderScreen(s) {
  const d = s.last_decision;
  const img = $("screen-img");
  if (d) {
    img.src = thumb(d.capture_sha256);
    img.hidden = false;
    $("screen-noimg").hidden = true;
    const v = $("verdict");
    v.textContent = d.verdict.toUpperCase();
    v.className = "verdict " + d.verdict;
    v.dataset.verdict = d.verdict;
    $("top-class").textContent = d.label;
    $("top-class").dataset.seq = d.seq;
    $("refer-reason").textContent = d.refer_reason || "";
    const bars = $("bars");
    bars.replaceChildren();
    const names = s.classes.map((c) => c.name);
    d.probabilities.forEach((p, i) => {
      const urgent = s.classes[i] && s.classes[i].urgent;
      const fill = el("span", { class: "fill" });
      fill.style.width = (p * 100).toFixed(1) + "%"; // CSSOM: allowed by the page's CSP
      bars.append(
        el("div", { class: "bar" + (i === d.top ? " top" : ""), "data-class": names[i] || "?", "data-p": p.toFixed(6) },
          el("span", { class: "name" + (urgent ? " urgent" : ""), text: names[i] || "?" }),
          el("span", { class: "track" }, fill),
          el("span", { class: "pct", text: pct(p) })));
    });
  }
  $("screen-help").textContent = s.state === "screen"
    ? "Hold the dermatoscope still on the lesion, then tap Capture (or press the capture button)."
    : "No classifier yet: enroll every class first (Enroll tab).";
}

function renderEnroll(s) {
  const lc = s.last_capture;
  const img = $("enroll-img");
  if (lc) {
    img.src = thumb(lc.capture_sha256);
    img.hidden = false;
    $("enroll-noimg").hidden = true;
    const g = $("gate");
    g.dataset.kind = lc.kind;
    g.textContent = lc.kind === "rejected" ? "Rejected by the quality gate: " + lc.reason + " — capture again."
      : lc.kind === "shot" ? "Accepted as a shot of " + lc.class + "." : "Last capture was classified (Screen).";
  }
  $("enroll-class").textContent = s.enroll_class !== null ? s.classes[s.enroll_class].name : "—";
  const counts = $("shot-counts");
  counts.replaceChildren();
  s.classes.forEach((c, i) => {
    counts.append(el("li", { class: i === s.enroll_class ? "current" : "" },
      el("button", { class: "small", text: "enroll", onclick: () => post("/api/enroll", { class: i }) }),
      " " + c.name + ": " + c.shots.length + " / " + s.shots_per_class + " shots"));
  });
  const adv = $("advice");
  adv.replaceChildren();
  if (!s.advice.length) adv.append(el("li", { text: "The support set looks complete and consistent." }));
  for (const a of s.advice) adv.append(el("li", { text: a }));
}

function renderTask(s) {
  $("task-name").textContent = "Task " + s.task + " — " + s.classes.length + " classes, " + s.shots_per_class + " shots each";
  const box = $("task-classes");
  // keep a form that is being typed into
  if (box.contains(document.activeElement) && document.activeElement.tagName !== "BUTTON") return;
  box.replaceChildren();
  s.classes.forEach((c, i) => {
    const form = el("form", { class: "card", "data-class": c.name, autocomplete: "off" });
    const name = el("input", { name: "name", maxlength: "64", required: "" });
    name.value = c.name;
    const desc = el("textarea", { name: "description", rows: "2", maxlength: "1000" });
    desc.value = c.description || "";
    const urgent = el("input", { type: "checkbox", name: "urgent" });
    urgent.checked = c.urgent;
    const shots = el("div", { class: "shots" });
    c.shots.forEach((sh, k) => {
      shots.append(el("div", { class: "shot" + (sh.outlier ? " outlier" : "") },
        el("img", { src: thumb(sh.capture_sha256), alt: "shot " + (k + 1) }),
        el("button", { class: "small", type: "button", text: "remove",
          onclick: () => post("/api/shot/remove", { class: i, capture_sha256: sh.capture_sha256 }) })));
    });
    form.append(
      el("h3", { text: (i + 1) + ". " + c.name + (c.urgent ? " (urgent)" : "") }),
      el("label", {}, "Name ", name),
      el("label", {}, "Clinical description ", desc),
      el("label", { class: "check" }, urgent, "urgent"),
      shots,
      el("button", { class: "big primary", type: "submit", text: "Save" }),
      " ",
      el("button", { class: "big", type: "button", text: "Enroll shots", onclick: () => { post("/api/enroll", { class: i }); selectTab("enroll", true); } }));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      post("/api/class/update", { class: i, name: name.value.trim(), description: desc.value.trim(), urgent: urgent.checked });
    });
    box.append(form);
  });
}

async function loadHistory() {
  const f = new FormData($("history-filter"));
  const q = new URLSearchParams(f).toString();
  const r = await fetch("/api/history?" + q);
  const j = await r.json();
  if (!r.ok) { showMessage(j.error); return; }
  $("history-total").textContent = j.total + " captures" + (j.total > j.rows.length ? " (newest " + j.rows.length + " shown)" : "") + " · audit chain head " + (j.audit_head || "-").slice(0, 16) + "…";
  fillSelect($("history-filter").elements["day"], j.days);
  if (S) fillSelect($("history-filter").elements["class"], S.classes.map((c) => c.name));
  const body = $("history-table").tBodies[0];
  body.replaceChildren();
  for (const row of j.rows) {
    const img = el("img", { src: thumb(row.capture_sha256), alt: "" });
    img.addEventListener("error", () => img.replaceWith(el("span", { text: "(no thumbnail)" })));
    const result = row.kind === "decision"
      ? row.verdict.toUpperCase() + " " + row.class + " " + pct(row.confidence)
      : (row.class || "") + " " + (row.detail || "");
    body.append(el("tr", { class: row.verdict || "" },
      el("td", { text: String(row.seq) }), el("td", { text: new Date(row.time_unix_ms).toISOString().slice(0, 19).replace("T", " ") }),
      el("td", {}, img), el("td", { text: row.kind }), el("td", { text: result })));
  }
}

function fillSelect(sel, values) {
  const cur = sel.value;
  const have = new Set([...sel.options].map((o) => o.value));
  for (const v of values) if (!have.has(v)) sel.append(el("option", { value: v, text: v }));
  sel.value = cur;
}

async function loadDevice() {
  const r = await fetch("/api/device");
  const d = await r.json();
  const t = $("device-table");
  t.replaceChildren();
  const gib = (b) => (b / 1073741824).toFixed(2) + " GiB";
  const rows = [
    ["Board", d.board], ["Time (UTC)", d.time_utc], ["sgps", d.sgps_version],
    ["Models", d.models_dir], ["Image encoder", d.image_encoder], ["Image encoder SHA-256", d.image_encoder_sha256],
    ["Text features", d.text_encoder], ["Synthesizer SHA-256", d.synthesizer_sha256],
    ["Classifier", S && S.classifier_id ? S.classifier_id : "none yet"],
    ["Storage", d.storage_dir],
    ["Free storage", d.storage_free_bytes !== undefined ? gib(d.storage_free_bytes) + " of " + gib(d.storage_total_bytes) : "unknown"],
    ["Export to", d.export_dir + (d.export_dir_present ? "" : " (not present: insert the USB stick)")],
  ];
  for (const [k, v] of rows) t.append(el("tr", {}, el("th", { text: k }), el("td", { text: String(v) })));
  $("export-dir").textContent = d.export_dir + (d.export_dir_present ? "" : " — not present: insert the USB stick");
}

// On-screen keyboard for the touch kiosk (a USB keyboard works too): opens when a text field is
// focused on a touch screen, or with the ⌨ button; keys type into the focused field.
let kbdTarget = null;
let kbdShift = false;
const KEYS = ["1234567890", "qwertyuiop", "asdfghjkl-", "zxcvbnm(),.;"];

function kbdOpen(open) {
  $("kbd").hidden = !open;
  document.body.classList.toggle("kbd-open", open);
  $("kbd-toggle").classList.toggle("active", open);
  if (open) kbdRender();
}

function kbdType(text) {
  const t = kbdTarget;
  if (!t || !document.body.contains(t)) return;
  const a = t.selectionStart ?? t.value.length, b = t.selectionEnd ?? t.value.length;
  if (text === "\b") {
    const from = a === b ? Math.max(0, a - 1) : a;
    t.value = t.value.slice(0, from) + t.value.slice(b);
    t.setSelectionRange(from, from);
  } else {
    if (t.maxLength > 0 && t.value.length - (b - a) + text.length > t.maxLength) return;
    t.value = t.value.slice(0, a) + text + t.value.slice(b);
    t.setSelectionRange(a + text.length, a + text.length);
  }
  t.focus();
}

function kbdRender() {
  const k = $("kbd");
  k.replaceChildren();
  const key = (label, fn, cls = "") => {
    const b = el("button", { type: "button", class: cls, "data-key": label, text: label });
    // mousedown: keep the focus in the text field
    b.addEventListener("mousedown", (e) => e.preventDefault());
    b.addEventListener("click", fn);
    return b;
  };
  for (const row of KEYS) {
    const r = el("div", { class: "krow" });
    for (const c of row) {
      const ch = kbdShift ? c.toUpperCase() : c;
      r.append(key(ch, () => { kbdType(ch); if (kbdShift) { kbdShift = false; kbdRender(); } }));
    }
    k.append(r);
  }
  const last = el("div", { class: "krow" });
  last.append(
    key("⇧", () => { kbdShift = !kbdShift; kbdRender(); }, "wide" + (kbdShift ? " on" : "")),
    key("space", () => kbdType(" "), "space"),
    key("⌫", () => kbdType("\b"), "wide"),
    key("done", () => kbdOpen(false), "wide"));
  k.append(last);
}

function connect() {
  const es = new EventSource("/api/events");
  es.onmessage = (ev) => { $("conn").textContent = ""; $("conn").className = ""; render(JSON.parse(ev.data)); };
  es.onerror = () => { $("conn").textContent = "· device not answering"; $("conn").className = "down"; };
}

document.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => selectTab(b.dataset.tab, true));
  $("screen-capture").addEventListener("click", () => post("/api/button", { button: "capture", press: "short" }));
  $("screen-synth").addEventListener("click", () => post("/api/button", { button: "next", press: "long" }));
  $("enroll-capture").addEventListener("click", () => post("/api/button", { button: "capture", press: "short" }));
  $("enroll-next").addEventListener("click", () => post("/api/button", { button: "next", press: "short" }));
  $("enroll-synth").addEventListener("click", async () => { if (await post("/api/button", { button: "next", press: "long" })) selectTab("screen", true); });
  $("enroll-retake").addEventListener("click", async () => {
    const sh = lastShotOfCurrent();
    if (sh && await post("/api/shot/remove", { class: S.enroll_class, capture_sha256: sh.capture_sha256, retake: true }))
      post("/api/button", { button: "capture", press: "short" });
  });
  $("add-class").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = ev.target;
    if (await post("/api/class", { name: f.name.value.trim(), description: f.description.value.trim(), urgent: f.urgent.checked })) {
      f.reset();
      selectTab("enroll", true);
    }
  });
  $("history-filter").addEventListener("change", loadHistory);
  for (const b of document.querySelectorAll("#export button")) b.addEventListener("click", async () => {
    const r = await post("/api/export", { scope: b.dataset.scope });
    if (r) $("export-result").textContent = "Written: " + r.html + " and " + r.csv + " (" + r.records + " records).";
  });
  $("kbd-toggle").addEventListener("click", () => kbdOpen($("kbd").hidden));
  document.addEventListener("focusin", (e) => {
    if (e.target.matches("input:not([type=checkbox]), textarea")) {
      kbdTarget = e.target;
      if (window.matchMedia("(pointer: coarse)").matches) kbdOpen(true);
    }
  });
  selectTab("screen", false);
  connect();
});
