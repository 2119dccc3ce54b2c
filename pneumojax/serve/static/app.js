// The page of `pneumojax serve`: the model card, then uploads scored by POST /predict.
"use strict";

const $ = (id) => document.getElementById(id);
const text = (tag, value, cls) => {
  const node = document.createElement(tag);
  node.textContent = value;
  if (cls) node.className = cls;
  return node;
};
const fixed = (v, d = 3) => (typeof v === "number" ? v.toFixed(d) : String(v));

async function showCard() {
  try {
    const response = await fetch("/model");
    if (!response.ok) throw new Error((await response.json()).detail);
    const card = await response.json();
    const m = card.model || {};
    $("card-model").textContent =
      `${m.backbone} up to ${m.cut}; weights: ${m.weights}; ${m.image_size} px` +
      (m.trainable_params ? `; ${Number(m.trainable_params).toLocaleString()} trainable parameters` : "");
    $("card-data").textContent = "Trained on: " + ((card.training_data || {}).summary || "unknown");
    const t = card.threshold || {};
    $("card-threshold").textContent = `Threshold ${fixed(t.value)}: ${t.rule || ""}`;
    const body = $("card-evaluations").querySelector("tbody");
    $("card-evaluations").hidden = !(card.evaluations || []).length;
    for (const e of card.evaluations || []) {
      const row = document.createElement("tr");
      const ci = e.auc_ci ? ` [${fixed(e.auc_ci[0])}, ${fixed(e.auc_ci[1])}]` : "";
      for (const v of [e.name + (e.data ? ` (${e.data})` : ""), e.n, fixed(e.auc) + ci,
                       fixed(e.recall), fixed(e.specificity)]) row.append(text("td", v));
      body.append(row);
    }
    $("card-use").textContent = card.intended_use || "";
    for (const limit of card.limits || []) $("card-limits").append(text("li", limit));
  } catch (error) {
    $("card-model").textContent = "model card unavailable: " + error.message;
  }
}

function resultView(file, row) {
  const box = document.createElement("div");
  box.className = "result";
  box.append(text("h3", row.name));
  const verdict = document.createElement("div");
  verdict.className = "verdict";
  const bar = document.createElement("div");
  bar.className = "bar";
  bar.title = `P(pneumonia) ${row.p_pneumonia} against the threshold ${row.threshold}`;
  const fill = document.createElement("div");
  fill.className = "fill " + row.label;
  fill.style.width = (100 * row.p_pneumonia).toFixed(2) + "%";
  bar.append(fill);
  if (typeof row.threshold === "number") {
    const mark = document.createElement("div");
    mark.className = "threshold";
    mark.style.left = (100 * row.threshold).toFixed(2) + "%";
    bar.append(mark);
  }
  const p = text("span", fixed(row.p_pneumonia, 4), "p-value");
  p.dataset.p = String(row.p_pneumonia);
  const line = document.createElement("p");
  line.append("P(pneumonia) ", p, " \u2192 ", text("span", row.label, "label " + row.label));
  const why = typeof row.threshold === "number"
    ? `threshold ${fixed(row.threshold)}, chosen on ${row.threshold_source}` : "the members' majority vote";
  verdict.append(bar, line, text("p", why, "detail"));
  box.append(verdict);
  const original = document.createElement("figure");
  const img = document.createElement("img");
  img.alt = row.name;
  img.src = URL.createObjectURL(file);  // a DICOM file is not shown here: see its heat map
  original.append(img, text("figcaption", "the image as uploaded"));
  box.append(original);
  if (row.overlay_png) {
    const figure = document.createElement("figure");
    const heat = document.createElement("img");
    heat.className = "overlay";
    heat.alt = "heat map of " + row.name;
    heat.src = "data:image/png;base64," + row.overlay_png;
    figure.append(heat, text("figcaption", row.heat_map + ": where the PNEUMONIA score comes from"));
    box.append(figure);
  }
  return box;
}

async function score(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("file", f, f.name);
  const explain = $("explain").checked ? "?explain=1" : "";
  $("status").className = "";
  $("status").textContent = `scoring ${files.length} image${files.length > 1 ? "s" : ""}...`;
  try {
    const response = await fetch("/predict" + explain, { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) throw new Error(body.detail || response.statusText);
    const results = $("results");
    body.forEach((row, i) => results.prepend(resultView(files[i], row)));
    $("status").textContent = `scored ${body.length} image${body.length > 1 ? "s" : ""}`;
    $("status").dataset.done = String(Number($("status").dataset.done || 0) + 1);
  } catch (error) {
    $("status").className = "error";
    $("status").textContent = "not scored: " + error.message;
  }
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  score([...e.dataTransfer.files]);
});
$("files").addEventListener("change", (e) => { score([...e.target.files]); e.target.value = ""; });
showCard();
