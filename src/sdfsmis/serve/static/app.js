// sdfsmis serve: the page. NiiVue (vendored, BSD-2-Clause) shows the scan, the drawing and the result.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { scan: null, job: null, poll: null, labels: [], penLabel: 1, tool: "fill", resultUrl: null };
const DEFAULT_LABELS = [[1, "liver", "#e6194b"], [2, "right kidney", "#3cb44b"], [3, "left kidney", "#4363d8"],
                        [4, "spleen", "#ffe119"]];
const nv = new niivue.Niivue({ backColor: [0, 0, 0, 1], show3Dcrosshair: true, isRadiologicalConvention: true,
                                 onLocationChange: (d) => { $("where").textContent = d.string || ""; } });
window.sdfsmis = { nv, state };

function showError(msg) { const e = $("error"); e.textContent = msg; e.hidden = !msg; }
function status(msg) { $("status").textContent = msg; }
async function api(path, opts = {}) {
  const r = await fetch(path, opts);
  const text = await r.text();
  let body; try { body = JSON.parse(text); } catch { body = { error: text || r.statusText }; }
  if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
  return body;
}
function rgb(hex) { return [1, 3, 5].map((i) => parseInt(hex.substr(i, 2), 16)); }
function colourmap(labels, alpha) {
  const top = Math.max(0, ...labels.map((l) => l.id));
  const cm = { R: [], G: [], B: [], A: [], I: [], labels: [] };
  for (let i = 0; i <= top; i++) {
    const l = labels.find((x) => x.id === i);
    const [r, g, b] = l ? rgb(l.colour) : [0, 0, 0];
    cm.R.push(r); cm.G.push(g); cm.B.push(b); cm.A.push(l ? alpha : 0); cm.I.push(i); cm.labels.push(l ? l.name : "");
  }
  return cm;
}
function labelsJson() { return JSON.stringify(state.labels.map(({ id, name, colour }) => ({ id, name, colour }))); }

function renderLabels() {
  const tb = $("labels").querySelector("tbody"); tb.innerHTML = "";
  for (const l of state.labels) {
    const tr = document.createElement("tr");
    tr.innerHTML = `<td><input type="radio" name="pen" ${l.id === state.penLabel ? "checked" : ""}></td><td>${l.id}</td>` +
      `<td><input type="text" value=""></td><td><input type="color" value="${l.colour}"></td>`;
    const [radio, name, colour] = tr.querySelectorAll("input");
    name.value = l.name;
    radio.onchange = () => { state.penLabel = l.id; setTool(state.tool); };
    name.onchange = () => { l.name = name.value.trim() || `label ${l.id}`; applyColours(); };
    colour.oninput = () => { l.colour = colour.value; applyColours(); };
    tb.appendChild(tr);
  }
  applyColours();
}
function applyColours() {
  nv.setDrawColormap(colourmap(state.labels, 255));
  if (nv.volumes.length > 1) { nv.volumes[1].setColormapLabel(colourmap(state.labels, 160)); nv.updateGLVolume(); }
  renderLegend(state.job && state.job.organs);
}
function setTool(tool) {
  state.tool = tool;
  document.querySelectorAll("button.tool").forEach((b) => b.classList.toggle("active", b.dataset.tool === tool));
  nv.setDrawingEnabled(tool !== "off");
  if (tool !== "off") nv.setPenValue(tool === "erase" ? 0 : state.penLabel, tool === "fill");
}
function setView(v) {
  const t = { multi: nv.sliceTypeMultiplanar, axial: nv.sliceTypeAxial, coronal: nv.sliceTypeCoronal,
              sagittal: nv.sliceTypeSagittal }[v];
  nv.setSliceType(t);
  document.querySelectorAll("button[data-view]").forEach((b) => b.classList.toggle("active", b.dataset.view === v));
}
function syncWindow() {
  const v = nv.volumes[0]; if (!v) return;
  $("win").value = +(v.cal_max - v.cal_min).toPrecision(4); $("lev").value = +((v.cal_max + v.cal_min) / 2).toPrecision(4);
}
function applyWindow() {
  const v = nv.volumes[0]; const w = parseFloat($("win").value), l = parseFloat($("lev").value);
  if (!v || !(w > 0) || !isFinite(l)) return;
  v.cal_min = l - w / 2; v.cal_max = l + w / 2; nv.updateGLVolume();
}
function supportInfo() {
  const d = nv.drawBitmap; const dims = nv.back && nv.back.dimsRAS;
  if (!d || !dims) { $("support").textContent = ""; return; }
  const plane = dims[1] * dims[2]; const zs = [];
  for (let z = 0; z < dims[3]; z++) { for (let i = z * plane; i < (z + 1) * plane; i++) if (d[i]) { zs.push(z); break; } }
  $("support").textContent = zs.length ? `support slices (axial, RAS order): ${zs.join(", ")}` : "nothing drawn yet";
}

async function refreshScans(select) {
  const { scans } = await api("/api/scans");
  const s = $("scan"); s.innerHTML = "";
  for (const p of scans) s.add(new Option(p, p));
  if (select) s.value = select;
}
async function refreshSets() {
  const { support_sets } = await api("/api/support-sets");
  const s = $("sets"); s.innerHTML = "";
  for (const x of support_sets) s.add(new Option(`${x.name} (${x.labels.map((l) => l.name).join(", ")})`, x.name));
  $("exportset").href = s.value ? `/api/support-sets/${encodeURIComponent(s.value)}/export` : "#";
}
async function openScan(path) {
  showError(""); status(`opening ${path} …`);
  state.scan = path; state.job = null; state.resultUrl = null; renderLegend(null); $("downloads").hidden = true;
  const url = "/api/files/" + path.split("/").map(encodeURIComponent).join("/");
  await nv.loadVolumes([{ url, name: path.split("/").pop() }]);
  if (!window.sdfsmisFirstImageMs) window.sdfsmisFirstImageMs = performance.now();
  document.body.dataset.loaded = path;
  nv.createEmptyDrawing(); applyColours(); setTool(state.tool); syncWindow(); supportInfo();
  history.replaceState(null, "", "?scan=" + encodeURIComponent(path));
  status(`${path}  ${nv.back.dims.slice(1, 4).join("×")} voxels`);
}
async function annotationBlob() {
  const bytes = await nv.saveImage({ filename: "", isSaveDrawing: true });
  if (!bytes || !bytes.length) throw new Error("draw an organ on a slice first");
  return new Blob([bytes], { type: "application/octet-stream" });
}
function renderLegend(organs) {
  const tb = $("legend").querySelector("tbody"); tb.innerHTML = "";
  for (const o of organs || []) {
    const l = state.labels.find((x) => x.id === o.label) || { name: o.name, colour: o.colour || "#888888" };
    const tr = document.createElement("tr");
    tr.innerHTML = `<td><span class="swatch" style="background:${l.colour}"></span></td><td></td>` +
      `<td>${o.volume_ml.toFixed(1)}</td><td>${o.slice_range ? o.slice_range.join("–") : "none"}</td>`;
    tr.children[1].textContent = l.name;
    tb.appendChild(tr);
  }
}
async function startJob(form) {
  showError("");
  const job = await api("/api/segment", { method: "POST", body: form });
  state.job = job; $("cancel").disabled = false; $("segment").disabled = true; $("progress").value = 0;
  document.body.dataset.job = "running";
  status("segmenting …");
  clearInterval(state.poll);
  state.poll = setInterval(() => pollJob(job.id).catch((e) => showError(e.message)), 400);
}
async function pollJob(id) {
  const job = await api(`/api/jobs/${id}`);
  $("progress").value = job.progress;
  if (job.state === "queued" || job.state === "running") { status(`segmenting … ${job.done}/${job.total || "?"} slices`); return; }
  clearInterval(state.poll); $("cancel").disabled = true; $("segment").disabled = false;
  state.job = job;
  if (job.state === "done") {
    for (const x of job.labels) if (!state.labels.find((l) => l.id === x.id)) state.labels.push({ ...x });
    renderLabels();
    while (nv.volumes.length > 1) nv.removeVolumeByIndex(1);
    await nv.addVolumeFromUrl({ url: job.segmentation, name: "segmentation.nii.gz", opacity: 0.6 });
    nv.volumes[1].setColormapLabel(colourmap(state.labels, 160)); nv.updateGLVolume();
    state.resultUrl = job.segmentation;
    renderLegend(job.organs);
    $("dl-nii").href = job.segmentation; $("dl-json").href = job.summary; $("downloads").hidden = false;
    status(`done in ${job.seconds.toFixed(1)} s`);
  } else if (job.state === "failed") { showError(job.error); status("failed"); }
  else status("cancelled");
  document.body.dataset.job = job.state;
}
async function resultToDrawing() {
  if (!state.resultUrl) throw new Error("segment the volume first");
  const keep = nv.drawBitmap.slice();
  const dims = nv.back.dimsRAS; const plane = dims[1] * dims[2];
  const z = Math.round(nv.frac2vox(nv.scene.crosshairPos)[2]);
  await nv.loadDrawingFromUrl(state.resultUrl);
  const res = nv.drawBitmap;
  for (let i = 0; i < keep.length; i++) if (Math.floor(i / plane) !== z) res[i] = keep[i];
  nv.refreshDrawing(true); supportInfo();
}
function wrap(fn) { return (ev) => Promise.resolve(fn(ev)).catch((e) => { showError(e.message); status(""); }); }

$("open").onclick = wrap(() => openScan($("scan").value));
$("demo").onclick = wrap(async () => { const { scans } = await api("/api/demo", { method: "POST" });
  const q = scans.find((s) => s.includes("query")) || scans[0]; await refreshScans(q); await openScan(q); });
$("upload").onchange = wrap(async (ev) => {
  const f = ev.target.files[0]; if (!f) return; const form = new FormData(); form.append("file", f);
  status(`uploading ${f.name} …`);
  const { scan } = await api("/api/scans", { method: "POST", body: form }); ev.target.value = "";
  await refreshScans(scan); await openScan(scan); });
document.querySelectorAll("button[data-view]").forEach((b) => { b.onclick = () => setView(b.dataset.view); });
document.querySelectorAll("button.tool").forEach((b) => { b.onclick = () => setTool(b.dataset.tool); });
$("win").onchange = applyWindow; $("lev").onchange = applyWindow;
$("addlabel").onclick = () => { const id = Math.max(0, ...state.labels.map((l) => l.id)) + 1;
  state.labels.push({ id, name: `label ${id}`, colour: "#" + ((id * 2654435761) >>> 8 & 0xffffff).toString(16).padStart(6, "0") });
  state.penLabel = id; renderLabels(); setTool(state.tool === "off" ? "fill" : state.tool); };
$("undo").onclick = () => { nv.drawUndo(); supportInfo(); };
$("clear").onclick = () => { nv.closeDrawing(); nv.createEmptyDrawing(); supportInfo(); };
$("fromresult").onclick = wrap(resultToDrawing);
$("segment").onclick = wrap(async () => {
  if (!state.scan) throw new Error("open a scan first");
  const form = new FormData(); form.append("scan", state.scan); form.append("labels", labelsJson());
  form.append("annotation", await annotationBlob(), "annotation.nii"); await startJob(form); });
$("cancel").onclick = wrap(async () => { if (state.job) await api(`/api/jobs/${state.job.id}/cancel`, { method: "POST" }); });
$("saveset").onclick = wrap(async () => {
  if (!state.scan) throw new Error("open a scan first");
  const form = new FormData(); form.append("scan", state.scan); form.append("name", $("setname").value);
  form.append("labels", labelsJson()); form.append("annotation", await annotationBlob(), "annotation.nii");
  const meta = await api("/api/support-sets", { method: "POST", body: form });
  await refreshSets(); $("sets").value = meta.name; $("exportset").href = `/api/support-sets/${encodeURIComponent(meta.name)}/export`;
  status(`saved support set ${meta.name} (${meta.slices.length} slices)`); });
$("sets").onchange = () => { $("exportset").href = `/api/support-sets/${encodeURIComponent($("sets").value)}/export`; };
$("applyset").onclick = wrap(async () => {
  if (!state.scan) throw new Error("open a scan first");
  if (!$("sets").value) throw new Error("no support set saved yet");
  const form = new FormData(); form.append("scan", state.scan); form.append("support_set", $("sets").value);
  await startJob(form); });
$("importset").onchange = wrap(async (ev) => {
  const f = ev.target.files[0]; if (!f) return; const form = new FormData(); form.append("file", f);
  const meta = await api("/api/support-sets/import", { method: "POST", body: form }); ev.target.value = "";
  await refreshSets(); $("sets").value = meta.name; status(`imported support set ${meta.name}`); });
nv.onDrawingChanged = () => supportInfo();

(async () => {
  nv.attachToCanvas($("gl"));
  state.labels = DEFAULT_LABELS.map(([id, name, colour]) => ({ id, name, colour }));
  renderLabels(); setView("multi");
  const want = new URLSearchParams(location.search).get("scan");
  await Promise.all([refreshScans(want), refreshSets()]);
  if (want) await openScan(want);
  document.body.dataset.ready = "1";
})().catch((e) => { showError(e.message); document.body.dataset.ready = "1"; });
