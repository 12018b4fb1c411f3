// The demo page: send one image to POST /classify?include=restored and show what the guard says.
// Plain browser JavaScript, no build step; every value shown comes from the service's own responses.
"use strict";

const $ = (id) => document.getElementById(id);
let objectUrl = null;
let lastUpload = null; // [blob, filename], retried once an API key is given

function fmt(value) {
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return String(value);
  return Math.abs(value) >= 0.001 || value === 0 ? value.toPrecision(3) : value.toExponential(2);
}

// A score or threshold in [0, 1] that sits next to 1 (the fused verdict's usually do) as 1 - x, so that a score
// of 1 and a threshold of 0.99996 do not both read "1.00".
function fmtUnit(value) {
  if (typeof value === "number" && value > 0.999 && value < 1) return `1 − ${(1 - value).toExponential(1)}`;
  return fmt(value);
}

function pct(p) {
  return `${(100 * p).toFixed(p > 0.999 && p < 1 ? 2 : 1)}%`;
}

async function watchReady() {
  let state = "down", detail = "service unreachable";
  try {
    const response = await fetch("/v2/health/ready");
    const body = await response.json();
    state = body.status;
    detail = body.detail || body.status;
  } catch (err) { /* unreachable: keep "down" */ }
  const pill = $("status");
  pill.dataset.state = state;
  pill.textContent = state === "ready" ? "ready" : detail;
  if (state !== "ready") setTimeout(watchReady, 2000);
}

async function showServer() {
  try {
    const server = await (await fetch("/v2")).json();
    $("model").textContent = `guarding ${server.models.join(", ")} · backdoor-guard ${server.version}`;
  } catch (err) { /* the header stays short */ }
}

async function loadSamples() {
  const index = await (await fetch("/static/samples/index.json")).json();
  const names = Object.fromEntries(index.map((s) => [s.label, s.class_name]));
  const target = index.find((s) => s.kind === "triggered");
  if (target) $("trigger-note").textContent = `(the attacker's label: ${names[target.attack_target]})`;
  for (const sample of index) {
    const button = document.createElement("button");
    button.type = "button";
    button.title = `${sample.class_name}, test image ${sample.test_index}` +
      (sample.trigger ? `, with the ${sample.trigger} trigger` : "");
    button.dataset.file = sample.file;
    const img = document.createElement("img");
    img.src = `/static/samples/${sample.file}`;
    img.alt = button.title;
    button.append(img);
    button.addEventListener("click", async () => {
      document.querySelectorAll(".thumbs button").forEach((b) => b.classList.remove("chosen"));
      button.classList.add("chosen");
      const blob = await (await fetch(img.src)).blob();
      await classify(blob, sample.file);
    });
    $(sample.kind === "clean" ? "samples-clean" : "samples-triggered").append(button);
  }
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("result").hidden = true;
}

async function classify(blob, filename) {
  lastUpload = [blob, filename];
  $("placeholder").hidden = true;
  $("error").hidden = true;
  const form = new FormData();
  form.append("files", blob, filename);
  // Kept for this tab only, when the guard runs with GUARD_API_KEY.
  const key = sessionStorage.getItem("guard-api-key");
  let response, body;
  try {
    response = await fetch("/classify?include=restored", {
      method: "POST", body: form, headers: key ? { "X-API-Key": key } : {},
    });
    body = await response.json();
  } catch (err) {
    return showError(`The service did not answer: ${err}`);
  }
  $("key-form").hidden = response.status !== 401;
  if (!response.ok) {
    const e = body.error || {};
    return showError(`${response.status} ${e.code || ""}: ${e.message || JSON.stringify(body)}`);
  }
  if (objectUrl) URL.revokeObjectURL(objectUrl);
  objectUrl = URL.createObjectURL(blob);
  render(body.results[0], objectUrl, body);
}

function render(r, originalSrc, raw) {
  const verdict = $("verdict");
  verdict.dataset.backdoor = String(r.backdoor);
  const flagged = Object.entries(r.signals).filter(([, s]) => s.triggered).map(([name]) => name);
  verdict.innerHTML = "";
  const small = document.createElement("small");
  if (r.backdoor === null) {  // GUARD_SIGNALS=none: never shown as clean
    verdict.append("Guard off: no verdict");
    small.textContent = "the service runs with GUARD_SIGNALS=none: the model's own label, not judged";
  } else {
    verdict.append(r.backdoor ? "Backdoor trigger detected" : "No backdoor trigger found");
    small.textContent = `fused score ${fmtUnit(r.score)} ${r.backdoor ? ">" : "≤"} threshold ${fmtUnit(r.threshold)}` +
      (flagged.length ? ` · flagged by ${flagged.join(", ")}` : " · no signal fired");
  }
  verdict.append(small);

  $("label").textContent = r.class_name;
  const source = { restored: "the restored image's label", repaired: "the repaired model's label", both: "restored and repaired together" };
  $("confidence").textContent = `(${pct(r.confidence)}; ${r.backdoor ? source[r.label_source] ?? r.label_source : "the label as sent"})`;
  $("original-image").src = originalSrc;
  $("original-label").textContent = `${r.original.class_name} (${pct(r.original.confidence)})`;
  if (r.restored) {
    $("restored-image").src = `data:image/png;base64,${r.restored.image}`;
    $("restored-label").textContent = `${r.restored.class_name} (${pct(r.restored.confidence)})`;
  } else {
    $("restored-image").removeAttribute("src");
    $("restored-label").textContent = "not computed (guard off)";
  }

  const rows = Object.entries(r.signals).map(([name, s]) => {
    const tr = document.createElement("tr");
    tr.dataset.signal = name;
    const evidence = Object.entries(s)
      .filter(([k]) => !["triggered", "percentile", "class_name"].includes(k))
      .map(([k, v]) => (k === "label" ? `label ${v} (${s.class_name})` : `${k} ${fmt(v)}`))
      .join(" · ");
    for (const [text, cls] of [[name, ""], [s.triggered ? "triggered" : "quiet", s.triggered ? "triggered" : "quiet"],
                               [evidence, ""], [pct(s.percentile), ""]]) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      tr.append(td);
    }
    return tr;
  });
  $("signals").replaceChildren(...rows);
  const shown = structuredClone(raw);
  shown.results.forEach((x) => { if (x.restored?.image) x.restored.image = `${x.restored.image.slice(0, 24)}…`; });
  $("raw").textContent = JSON.stringify(shown, null, 2);
  $("result").hidden = false;
}

function wireKey() {
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("guard-api-key", $("api-key").value);
    if (lastUpload) classify(...lastUpload);
  });
}

function wireDrop() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) classify(file, file.name);
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer.files[0];
    if (file) classify(file, file.name);
  });
}

wireDrop();
wireKey();
watchReady();
showServer();
loadSamples().catch((err) => showError(`Could not load the samples: ${err}`));
