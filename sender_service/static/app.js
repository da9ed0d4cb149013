// The gesco web page: sends one input through the sender's public API and shows every stage.
// Plain JavaScript, no build step, no external URL: every request goes to the sender, which relays
// the receiver's status, image and maps under /receiver/.
"use strict";

// The form field of the channel SNR in POST /v1/transmissions.
const SNR_FIELD = "snr_db";
const STRIP_SNRS = [1, 5, 10, 20, 100];
const POLL_WAIT_S = 0.5; // each status request waits this long for the end (the receiver's long poll)
const FINISHED = new Set(["done", "failed", "cancelled"]);
// Shown by an image with nothing to show yet (a transparent pixel over the grey frame): an <img>
// without a picture would draw the browser's broken-image icon.
const EMPTY_IMAGE = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7";
const PNG_SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];

const $ = (id) => document.getElementById(id);
const examples = new Map(); // name -> {kind, title, blob}
let classes = [];
let running = []; // ids of the transmissions the page waits for (cancel stops them)
let stripLinks = []; // the links the page sends (GET /v1/options), for its list and the strip
let cancelRequested = false; // the user pressed Cancel during this Send or strip
let busy = false;
let detected = { kind: "label_map", why: "" }; // what the chosen input is, as detectKind() read it
let detection = Promise.resolve(); // the detection of the chosen input while it runs
let choices = 0; // inputs chosen so far: a detection that finishes after a newer choice is dropped

// The user's own Cancel, said as the status, not as an error.
class Cancelled extends Error {}

class ApiError extends Error {
  constructor(status, message, field = null, retryAfter = null) {
    super(message);
    this.status = status;
    this.field = field;
    this.retryAfter = retryAfter;
  }
}

function authHeaders() {
  const key = $("api_key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

// fetch() against the sender; any answer but 2xx becomes an ApiError carrying the API's message.
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  } catch (error) {
    throw new ApiError(0, `the sender cannot be reached (${error.message})`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function errorOf(response) {
  let message = response.statusText || "request failed";
  let field = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      field = body.error.field || null;
    } else if (body && body.detail) {
      message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    }
  } catch (_) {
    // not JSON: keep the status text
  }
  if (response.status === 401) $("key-box").open = true;
  return new ApiError(response.status, message, field, response.headers.get("Retry-After"));
}

function showError(error) {
  let text = error instanceof ApiError && error.status ? `HTTP ${error.status}: ${error.message}` : error.message;
  if (error.field) text += ` (field: ${error.field})`;
  if (error.retryAfter) text += ` Retry after ${error.retryAfter} s.`;
  $("error").textContent = text;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setStatus(text, step = null, steps = null) {
  $("status").textContent = text;
  const bar = $("progress");
  bar.hidden = steps === null;
  if (steps !== null) {
    bar.max = steps;
    bar.value = step;
  }
}

function setBusy(value) {
  busy = value;
  $("send").disabled = value;
  $("strip-button").disabled = value;
  $("cancel").disabled = !value;
}

// --- input ---------------------------------------------------------------------------------------

async function loadExamples() {
  const select = $("example");
  try {
    const list = await (await api("/v1/examples")).json();
    select.replaceChildren();
    for (const example of list) {
      examples.set(example.name, example);
      select.append(new Option(example.title, example.name));
    }
    select.append(new Option("(my upload)", ""));
    await inputChanged();
  } catch (error) {
    showError(error);
  }
}

// The form's lists, ranges and defaults from GET /v1/options (the registries the API checks
// requests against). The SNR box keeps the page's own start, 10 dB: the API's default when a
// request gives none is a noiseless 100 dB.
function fillSelect(select, choices, keepFirst = false) {
  const first = keepFirst ? [select.options[0]] : [];
  select.replaceChildren(...first, ...choices.map((choice) => new Option(choice.title, choice.name)));
}

function setRange(id, range) {
  $(id).min = String(range.min);
  $(id).max = String(range.max);
}

async function loadOptions() {
  try {
    const options = await (await api("/v1/options")).json();
    fillSelect($("channel"), options.channels);
    $("channel").value = options.defaults.channel;
    fillSelect($("snr_definition"), options.snr_definitions);
    $("snr_definition").value = options.defaults.snr_definition;
    fillSelect($("sampler"), options.samplers.map((s) => ({ name: s.name, title: `${s.title} (${s.default_steps} steps)` })), true);
    fillSelect($("downsample_factor"), options.downsample_factors.map((f) => ({ name: String(f), title: f === 1 ? "1 (none)" : String(f) })), true);
    // auto picks a link for a budget, which the page does not set
    stripLinks = options.links.filter((l) => l.name !== "auto");
    fillSelect($("link"), stripLinks);
    $("link").value = options.defaults.link;
    setRange("snr_db", options.limits.snr_db);
    setRange("steps", options.limits.steps);
    setRange("guidance", options.limits.guidance);
    $("guidance").value = String(options.defaults.guidance);
  } catch (error) {
    showError(error);
  }
}

async function loadClasses() {
  try {
    classes = await (await api("/v1/classes")).json();
    renderLegend(null);
  } catch (error) {
    showError(error);
  }
}

// What an input is, read from its first bytes by the command line client's rule (gesco/cli.py,
// guess_kind): an 8-bit greyscale or palette PNG is a label map, anything else a photo.
async function detectKind(blob) {
  const head = new Uint8Array(await blob.slice(0, 26).arrayBuffer());
  const png = head.length >= 26 && PNG_SIGNATURE.every((byte, i) => head[i] === byte) &&
    String.fromCharCode(...head.slice(12, 16)) === "IHDR";
  if (!png) return { kind: "photo", why: "not a PNG" };
  const [depth, colour] = [head[24], head[25]];
  if (depth === 8 && colour === 0) return { kind: "label_map", why: "an 8-bit greyscale PNG" };
  if (depth === 8 && colour === 3) return { kind: "label_map", why: "an 8-bit palette PNG" };
  return { kind: "photo", why: `a ${depth}-bit ${colour === 2 || colour === 6 ? "colour" : "greyscale"} PNG` };
}

const KIND_NAMES = { photo: "a photo", label_map: "a label map" };

// The chosen file or example: {blob, name}; an upload wins over the example list.
async function chosenFile() {
  const file = $("upload").files[0];
  if (file && $("example").value === "") return { blob: file, name: file.name };
  const example = examples.get($("example").value);
  if (!example) return null;
  if (!example.blob) example.blob = await (await api(example.url)).blob();
  return { blob: example.blob, name: example.name };
}

// A new example or upload: detect its kind again, and send it as detected unless overridden.
// A Send right after the choice waits for the detection (currentInput awaits `detection`).
// An older choice still loading (an example fetched from a busy sender) must not overwrite it.
function inputChanged() {
  $("kind").value = "";
  const choice = ++choices;
  detection = (async () => {
    const chosen = await chosenFile();
    const found = chosen ? await detectKind(chosen.blob) : { kind: "photo", why: "" };
    if (choice !== choices) return;
    detected = found;
    showKind();
  })();
  return detection;
}

function showKind() {
  const override = $("kind").value;
  let text = `Detected: ${KIND_NAMES[detected.kind]}` + (detected.why ? ` (${detected.why})` : "") + ".";
  if (override && override !== detected.kind) text += ` Sent as ${KIND_NAMES[override]}, as chosen.`;
  $("kind-note").textContent = text;
}

// The input to send: {blob, name, kind}, the kind as detected unless the list overrides it.
async function currentInput() {
  await detection;
  const chosen = await chosenFile();
  if (!chosen) throw new ApiError(0, "choose an example or upload an image", "file");
  return { ...chosen, kind: $("kind").value || detected.kind };
}

function formData(input, fields) {
  const form = new FormData();
  form.append("file", input.blob, input.name);
  for (const [name, value] of Object.entries(fields)) {
    if (value !== "" && value !== null && value !== undefined) form.append(name, String(value));
  }
  return form;
}

// The seed of the next Send or strip: the box's, else a new random one (a strip uses it at every
// SNR). The box keeps what the user typed, so an empty box draws anew each time; the note says
// which seed was drawn, to type in and repeat the run.
function chosenSeed() {
  if ($("seed").value !== "") return $("seed").value;
  const seed = String(Math.floor(Math.random() * 2 ** 31));
  $("seed-note").textContent = `Empty: every Send draws a new seed, so a new image (this one drew ${seed}; ` +
    "type it in to repeat the run).";
  return seed;
}

// The transmission's form fields as the page's controls set them.
function transmissionFields(input, seed) {
  return {
    kind: input.kind,
    [SNR_FIELD]: $("snr_db").value,
    snr_definition: $("snr_definition").value,
    channel: $("channel").value,
    sampler: $("sampler").value,
    steps: $("steps").value,
    guidance: $("guidance").value,
    seed,
    downsample_factor: $("downsample_factor").value,
    link: $("link").value,
  };
}

// --- images --------------------------------------------------------------------------------------

const objectUrls = new Map(); // img id -> object URL, revoked when replaced

function setImage(id, url) {
  const img = $(id);
  if (objectUrls.has(id)) URL.revokeObjectURL(objectUrls.get(id));
  objectUrls.delete(id);
  if (url && url.startsWith("blob:")) objectUrls.set(id, url);
  img.src = url || EMPTY_IMAGE;
  return loaded(img);
}

// Resolves once the image is shown; one that cannot be shown goes back to empty.
function loaded(img) {
  if (img.complete && img.naturalWidth > 0) return Promise.resolve();
  return new Promise((resolve, reject) => {
    img.onload = () => resolve();
    img.onerror = () => {
      img.src = EMPTY_IMAGE;
      reject(new ApiError(0, `the image ${img.alt} could not be shown`));
    };
  });
}

// Fetched with the API key header (an <img src> could not send it), shown from a blob URL.
async function relayedImage(path) {
  const blob = await (await api(path)).blob();
  return URL.createObjectURL(blob);
}

function relayPath(id, suffix = "") {
  return `/receiver/v1/transmissions/${id}${suffix}`;
}

function resetStages() {
  for (const id of ["img-input", "img-segmentation", "img-received", "img-fds", "img-generated"]) setImage(id, null);
  $("img-generated").classList.remove("natural");
  $("caption-generated").textContent = "Generated image";
  $("transmitted-maps").replaceChildren();
  $("numbers").tBodies[0].replaceChildren();
}

function renderLegend(presentIds) {
  const list = $("legend");
  list.replaceChildren();
  for (const entry of classes) {
    const item = document.createElement("li");
    if (presentIds && !presentIds.includes(entry.id)) item.className = "absent";
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = entry.colour;
    item.append(swatch, `${entry.id} ${entry.name}`);
    list.append(item);
  }
}

function renderPreview(input, preview) {
  renderLegend(preview.semantic.present_class_ids);
  const tiles = $("transmitted-maps");
  tiles.replaceChildren();
  for (const tile of preview.transmitted_maps) {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = `transmitted map of ${tile.name}`;
    img.src = tile.png;
    const caption = document.createElement("figcaption");
    caption.textContent = tile.name;
    figure.append(img, caption);
    tiles.append(figure);
  }
  $("stage-segmentation").querySelector("figcaption").textContent =
    input.kind === "photo" ? "Segmentation (label map sent)" : "Label map sent (no segmentation)";
  return setImage("img-segmentation", preview.segmentation_png);
}

// --- numbers -------------------------------------------------------------------------------------

function fmt(value, digits = 2) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return Number.isInteger(value) ? value.toLocaleString("en") : value.toFixed(digits);
  return String(value);
}

function timings(record) {
  return Object.entries(record || {}).map(([stage, ms]) => `${stage} ${fmt(ms, 1)} ms`).join(", ") || "–";
}

// What the link spent, and what a digital link would need for the photo: its JPEG's bits over an
// AWGN channel's capacity at the same SNR, log2(1 + SNR) bits per complex channel use (Shannon),
// which no digital link can beat.
function linkRows(preview, record) {
  const bits = record.bits;
  const semantic = preview.semantic;
  const rows = [["Sent", `${fmt(bits.channel_uses)} complex channel uses (${fmt(bits.num_symbols)} real analog ` +
    "symbols, two per use)" + (bits.bandwidth_ratio ? `: bandwidth ratio ${fmt(bits.bandwidth_ratio, 4)} channel ` +
    `uses per value of the ${semantic.height}×${semantic.width}×3 source` : "")]];
  const perValue = bits.payload_bits / bits.num_symbols;
  const coded = semantic.compression === "jpeg" ? "their JPEG bytes" :
    `${fmt(perValue)} bit${perValue === 1 ? "" : "s"} a value`;
  rows.push(["Bits", `none on the channel: the maps go as analog symbols. A digital link would carry them as ` +
    `${fmt(bits.payload_bits)} bits (${coded}).`]);
  const channel = record.channel;
  if (bits.image_bits_jpeg && channel) {
    const snrDb = channel.requested_snr_db + semantic.average_power_snr_offset_db[channel.snr_definition];
    const capacity = Math.log2(1 + 10 ** (snrDb / 10));
    const uses = Math.ceil(bits.image_bits_jpeg / capacity);
    rows.push(["Digital link", `the photo as JPEG (quality ${bits.image_jpeg_quality}) is ${fmt(bits.image_bits_jpeg)} ` +
      `bits; at ${fmt(snrDb, 1)} dB average-power SNR a channel carries at most ${fmt(capacity, 2)} bits a channel ` +
      `use (log2(1 + SNR)), so it needs at least ${fmt(uses)} channel uses, ` +
      `${fmt(uses / bits.channel_uses, 2)}× this link's.`]);
  }
  return rows;
}

function renderNumbers(preview, sent, status) {
  const rows = [];
  rows.push(["Transmission", sent ? sent.id : "–"]);
  rows.push(["Semantic maps", `${preview.semantic.present_class_ids.length} present classes, ` +
    `${preview.semantic.map_height}×${preview.semantic.map_width} each, ` +
    `downsampling ${preview.semantic.downsample_factor}, compression ${preview.semantic.compression}`]);
  const record = status || sent;
  if (record) rows.push(...linkRows(preview, record));
  const channel = record && record.channel;
  if (channel) {
    rows.push(["Channel", `${channel.model}, ${fmt(channel.channel_uses)} channel uses`]);
    rows.push(["SNR", `requested ${fmt(channel.requested_snr_db)} dB, measured ${fmt(channel.measured_snr_db)} dB ` +
      `(${channel.snr_definition})`]);
  }
  rows.push(["Sender timings", timings(preview.timings_ms) + " (preview of the same input)"]);
  if (status) {
    const s = status.sampling;
    rows.push(["Sampling", `${s.sampler}, ${s.steps} steps, guidance ${fmt(s.guidance)}, seed ${s.seed}, ` +
      `FDS ${s.use_fds ? "on" : "off"}`]);
    rows.push(["Receiver timings", timings(status.timings_ms)]);
    const m = status.model;
    rows.push(["Model", `${m.name} (${m.trained ? "trained" : "UNTRAINED"}` +
      (m.training_steps ? `, ${fmt(m.training_steps)} training steps` : "") +
      `, ${m.image_height}×${m.image_width}, ${fmt(m.parameters)} parameters)`]);
  }
  const segmenter = preview.segmenter;
  if (segmenter && segmenter.used) {
    rows.push(["Segmenter", `${segmenter.checkpoint || "none"} (${segmenter.trained ? "trained" : "UNTRAINED"})`]);
  }
  const body = $("numbers").tBodies[0];
  body.replaceChildren();
  for (const [name, value] of rows) {
    const row = body.insertRow();
    const head = document.createElement("th");
    head.scope = "row";
    head.textContent = name;
    row.append(head);
    row.insertCell().textContent = value;
  }
}

// --- following a transmission --------------------------------------------------------------------

function describe(status) {
  if (status.status === "queued") return ["queued at the receiver", null, null];
  if (status.status === "running" && status.progress) {
    const { step, steps } = status.progress;
    return [`sampling: step ${step} of ${steps}`, step, steps];
  }
  // "done" is said once the images are shown, not while they are still being fetched.
  if (status.status === "done") return ["generated: fetching the images", null, null];
  return [status.status, null, null];
}

// Long-polls the relayed status until the transmission has finished; `onStatus` sees every answer.
async function follow(id, onStatus) {
  for (;;) {
    const status = await (await api(`${relayPath(id)}?wait_s=${POLL_WAIT_S}`)).json();
    onStatus(status);
    if (FINISHED.has(status.status)) return status;
  }
}

function finishedError(status) {
  return new ApiError(0, `the transmission ${status.id} ${status.status === "done" ? "is done" : status.status}` +
    (status.error ? `: ${status.error}` : ""));
}

// Follow the user's eyes to the results on a narrow screen, where they start below the form.
function revealResults() {
  if ($("state").getBoundingClientRect().top > window.innerHeight / 2) $("state").scrollIntoView({ block: "start" });
}

// A transmission the page now waits for; one accepted after Cancel was pressed is cancelled at once.
function track(id) {
  running.push(id);
  if (cancelRequested) cancelAll([id]);
}

// Ends a Send or strip whose transmission the user cancelled; any other end of one is an error.
function requireDone(status) {
  if (status.status === "cancelled" && cancelRequested) throw new Cancelled(`cancelled: ${status.id}`);
  if (status.status !== "done") throw finishedError(status);
}

function startRun() {
  clearError();
  cancelRequested = false;
  setBusy(true);
  revealResults();
}

function endRun(error) {
  if (error instanceof Cancelled) {
    setStatus(error.message);
  } else if (error) {
    showError(error);
    setStatus("stopped");
  }
  running = [];
  setBusy(false);
}

async function send(event) {
  event.preventDefault();
  if (busy) return;
  resetStages();
  startRun();
  let failure = null;
  try {
    const input = await currentInput();
    const fields = transmissionFields(input, chosenSeed());
    setStatus("segmenting and encoding");
    const preview = await (await api("/v1/preview", {
      method: "POST", body: formData(input, { kind: input.kind, downsample_factor: fields.downsample_factor }),
    })).json();
    await setImage("img-input", input.kind === "photo" ? URL.createObjectURL(input.blob) : preview.segmentation_png);
    await renderPreview(input, preview);
    renderNumbers(preview, null, null);
    if (cancelRequested) throw new Cancelled("cancelled before sending");
    setStatus("sending over the channel");
    const sent = await (await api("/v1/transmissions", { method: "POST", body: formData(input, fields) })).json();
    track(sent.id);
    renderNumbers(preview, sent, null);
    const status = await follow(sent.id, (s) => setStatus(...describe(s)));
    renderNumbers(preview, sent, status);
    requireDone(status);
    const [received, fds, generated] = await Promise.all([
      relayedImage(relayPath(sent.id, "/maps/received_labels.png?colour=true")),
      relayedImage(relayPath(sent.id, "/maps/fds_labels.png?colour=true")),
      relayedImage(relayPath(sent.id, "/image")),
    ]);
    await Promise.all([setImage("img-received", received), setImage("img-fds", fds), setImage("img-generated", generated)]);
    $("img-generated").classList.add("natural");
    $("caption-generated").textContent = generatedCaption(status);
    setStatus(`done: ${sent.id}`);
  } catch (error) {
    failure = error;
  } finally {
    endRun(failure);
  }
}

// The generated image's size and what made it: each stage with its model and time.
function generatedCaption(status) {
  const made = (status.stages || []).map((stage) => `${stage.name} by ${stage.model} (${Math.round(stage.ms)} ms)`);
  return `Generated image, ${status.output.width}x${status.output.height}` + (made.length ? `: ${made.join(", then ")}` : "");
}

// --- SNR strip -----------------------------------------------------------------------------------

function stripCell(row, text) {
  const cell = row.insertCell();
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.alt = text;
  img.src = EMPTY_IMAGE;
  const caption = document.createElement("figcaption");
  caption.textContent = "…";
  figure.append(img, caption);
  cell.append(figure);
  return { img, caption };
}

async function strip() {
  if (busy) return;
  startRun();
  $("strip-box").hidden = false;
  const table = $("strip");
  table.tHead.replaceChildren();
  table.tBodies[0].replaceChildren();
  const head = table.tHead.insertRow();
  head.append(document.createElement("th"));
  for (const snr of STRIP_SNRS) {
    const th = document.createElement("th");
    th.textContent = `${snr} dB`;
    head.append(th);
  }
  const rows = {};
  // One generated row per link when the box is ticked (each at its own default coding), else the form's link.
  const links = $("strip_links").checked ? stripLinks : stripLinks.filter((l) => l.name === $("link").value);
  const generatedRows = links.map((l) => [`link:${l.name}`, `generated: ${l.title}`]);
  for (const [key, title] of [...generatedRows, ["analog", "analog (pixels)"]]) {
    const row = table.tBodies[0].insertRow();
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = title;
    row.append(th);
    rows[key] = STRIP_SNRS.map((snr) => stripCell(row, `${title} at ${snr} dB`));
  }
  let failure = null;
  try {
    const input = await currentInput();
    const fields = transmissionFields(input, chosenSeed());
    const analog = api("/v1/analog", {
      method: "POST",
      body: formData(input, {
        kind: input.kind, snrs_db: STRIP_SNRS.join(","), channel: fields.channel,
        snr_definition: fields.snr_definition, seed: fields.seed,
      }),
    }).then((r) => r.json()).then((body) => Promise.all(body.results.map((result, i) => {
      rows.analog[i].caption.textContent = `measured ${fmt(result.measured_snr_db)} dB`;
      rows.analog[i].img.src = result.png;
      return loaded(rows.analog[i].img);
    })));
    const sends = [];
    for (const link of links) {
      // The maps link keeps the form's downsampling; the others send their whole map.
      const linkFields = { ...fields, link: link.name, downsample_factor: link.name === "maps" ? fields.downsample_factor : "" };
      for (const [i, snr] of STRIP_SNRS.entries()) {
        if (cancelRequested) throw new Cancelled("strip cancelled");
        setStatus(`sending ${link.name} at ${snr} dB`);
        const sent = await (await api("/v1/transmissions", {
          method: "POST", body: formData(input, { ...linkFields, [SNR_FIELD]: snr }),
        })).json();
        sends.push({ id: sent.id, cell: rows[`link:${link.name}`][i] });
        track(sent.id);
      }
    }
    let done = 0;
    setStatus(`strip: 0 of ${sends.length} generated`);
    const semantic = sends.map(async ({ id, cell }) => {
      const status = await follow(id, () => {});
      if (status.status === "failed" && status.link && status.link.name === "digital") {
        // The digital link's cliff: the CRC says the map was lost, and the cell says so.
        cell.caption.textContent = `${status.link.scheme}: ${status.error.split(":")[0]}`;
      } else {
        requireDone(status);
        cell.caption.textContent = `measured ${fmt(status.channel.measured_snr_db)} dB, ${status.link ? status.link.scheme : ""}`;
        cell.img.src = await relayedImage(relayPath(id, "/image"));
        await loaded(cell.img);
      }
      done += 1;
      setStatus(`strip: ${done} of ${sends.length} generated`);
    });
    await Promise.all([analog, ...semantic]);
    setStatus("strip done");
  } catch (error) {
    failure = error instanceof Cancelled ? new Cancelled("strip cancelled") : error;
  } finally {
    endRun(failure);
  }
}

async function cancelAll(ids) {
  for (const id of ids) {
    try {
      await api(relayPath(id, "/cancel"), { method: "POST" });
    } catch (error) {
      if (error.status !== 409) showError(error); // 409: it had finished already
    }
  }
}

function cancel() {
  cancelRequested = true;
  setStatus("cancelling");
  return cancelAll(running.slice());
}

document.addEventListener("DOMContentLoaded", () => {
  $("send-form").addEventListener("submit", send);
  $("strip-button").addEventListener("click", strip);
  $("cancel").addEventListener("click", cancel);
  $("upload").addEventListener("change", () => {
    if ($("upload").files.length) $("example").value = "";
    inputChanged().catch(showError);
  });
  $("example").addEventListener("change", () => inputChanged().catch(showError));
  $("kind").addEventListener("change", showKind);
  resetStages();
  loadOptions();
  loadExamples();
  loadClasses();
});
