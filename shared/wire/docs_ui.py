"""A self-contained API docs page, so no service ever loads Swagger UI from a CDN.

`mount_local_docs(app)` serves GET /docs: one HTML page with inline CSS and JS (no external URL of
any kind) that fetches the app's own /openapi.json and lists every path and method with its
parameters, request body, responses and the component schemas. Create the app with
`docs_url=None, redoc_url=None` so FastAPI's CDN-backed pages are never registered.
"""
from __future__ import annotations

import html
import json

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__ - API docs</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }
  header { background: #1d2330; color: #fff; padding: 14px 24px; }
  header h1 { margin: 0; font-size: 20px; }
  header p { margin: 4px 0 0; opacity: .8; }
  header button { margin-top: 8px; font: inherit; font-size: 13px; cursor: pointer; }
  main { max-width: 1000px; margin: 0 auto; padding: 16px 24px 48px; }
  details.op { background: #fff; border: 1px solid #d8dce3; border-radius: 6px; margin: 8px 0; }
  details.op > summary { cursor: pointer; padding: 8px 12px; list-style: none; }
  details.op > div { padding: 4px 16px 12px; border-top: 1px solid #e6e9ee; }
  .method { display: inline-block; min-width: 62px; text-align: center; font-weight: 700;
            color: #fff; border-radius: 4px; padding: 2px 6px; margin-right: 8px; font-size: 12px; }
  .get { background: #2f7dd1; } .post { background: #2f9e5b; } .put { background: #c98a12; }
  .delete { background: #c7443a; } .patch { background: #7a52c7; } .other { background: #6b7280; }
  .path { font-family: ui-monospace, monospace; font-weight: 600; }
  .muted { color: #6b7280; }
  table { border-collapse: collapse; width: 100%; margin: 6px 0; }
  th, td { text-align: left; border-bottom: 1px solid #e6e9ee; padding: 4px 8px; vertical-align: top; }
  code, .schema { font-family: ui-monospace, monospace; font-size: 13px; }
  .schema ul { margin: 2px 0; padding-left: 18px; }
  .req { color: #c7443a; font-size: 12px; margin-left: 4px; }
  h2 { margin-top: 28px; }
  h4 { margin: 10px 0 4px; }
  #error { color: #c7443a; }
</style>
</head>
<body>
<header><h1>__TITLE__</h1><p id="subtitle">loading __OPENAPI_URL__ ...</p>
<button id="toggle" type="button">expand all</button></header>
<main>
  <p id="error"></p>
  <div id="intro"></div>
  <h2>Endpoints</h2><div id="paths"></div>
  <h2>Schemas</h2><div id="schemas"></div>
</main>
<script>
"use strict";
const OPENAPI_URL = __OPENAPI_URL_JSON__;
const METHODS = ["get", "post", "put", "patch", "delete", "head", "options"];
let spec = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function refName(ref) { return ref.split("/").pop(); }

function resolve(ref) {
  let node = spec;
  for (const part of ref.replace(/^#\\//, "").split("/")) node = node ? node[part] : undefined;
  return node || {};
}

function constraints(schema) {
  const notes = [];
  // Optional fields are anyOf [T, null]: their bounds live on the non-null branch.
  for (const branch of (schema.anyOf || schema.oneOf || [])) {
    if (branch.type !== "null" && !branch.$ref) {
      const inner = constraints(Object.assign({}, branch, {default: undefined}));
      if (inner) notes.push(inner.slice(2, -1));
    }
  }
  for (const key of ["format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                     "minLength", "maxLength", "pattern", "minItems", "maxItems"]) {
    if (schema[key] !== undefined) notes.push(key + ": " + schema[key]);
  }
  if (schema.enum) notes.push("one of: " + schema.enum.map(v => JSON.stringify(v)).join(", "));
  if (schema.const !== undefined) notes.push("const: " + JSON.stringify(schema.const));
  if (schema.default !== undefined) notes.push("default: " + JSON.stringify(schema.default));
  return notes.length ? " (" + notes.join("; ") + ")" : "";
}

function typeLabel(schema) {
  if (schema.$ref) return refName(schema.$ref);
  if (schema.type === "array") return "array of " + typeLabel(schema.items || {});
  for (const key of ["anyOf", "oneOf"]) {
    if (schema[key]) return schema[key].map(typeLabel).join(" | ");
  }
  if (schema.allOf) return schema.allOf.map(typeLabel).join(" & ");
  if (schema.type) return schema.type + (schema.format ? "<" + schema.format + ">" : "");
  return "any";
}

function renderSchema(schema, seen) {
  schema = schema || {};
  seen = seen || new Set();
  const box = el("div", {class: "schema"});
  if (schema.$ref) {
    const name = refName(schema.$ref);
    box.append(el("span", {}, name));
    if (!seen.has(name)) {
      const inner = new Set(seen); inner.add(name);
      box.append(renderSchema(resolve(schema.$ref), inner));
    }
    return box;
  }
  const properties = schema.properties || {};
  const required = new Set(schema.required || []);
  if (Object.keys(properties).length) {
    const list = el("ul");
    for (const [name, prop] of Object.entries(properties)) {
      const item = el("li", {}, el("b", {}, name), ": " + typeLabel(prop) + constraints(prop));
      if (required.has(name)) item.append(el("span", {class: "req"}, "required"));
      if (prop.description) item.append(el("div", {class: "muted"}, prop.description));
      const nested = prop.$ref ? prop : (prop.type === "array" ? prop.items : null);
      if (nested && nested.$ref && !seen.has(refName(nested.$ref))) {
        const inner = new Set(seen); inner.add(refName(nested.$ref));
        item.append(renderSchema(resolve(nested.$ref), inner));
      } else if (prop.properties) {
        item.append(renderSchema(prop, seen));
      }
      list.append(item);
    }
    box.append(list);
  } else {
    box.append(el("span", {}, typeLabel(schema) + constraints(schema)));
  }
  return box;
}

function renderContent(content) {
  const wrap = el("div");
  for (const [mediaType, body] of Object.entries(content || {})) {
    wrap.append(el("div", {}, el("code", {}, mediaType)));
    if (body.schema) wrap.append(renderSchema(body.schema));
  }
  return wrap;
}

function renderOperation(path, method, op) {
  const known = ["get", "post", "put", "patch", "delete"].includes(method);
  const summary = el("summary", {},
    el("span", {class: "method " + (known ? method : "other")}, method.toUpperCase()),
    el("span", {class: "path"}, path), " ",
    el("span", {class: "muted"}, op.summary || ""));
  const body = el("div");
  if (op.description) body.append(el("p", {}, op.description));
  const params = op.parameters || [];
  if (params.length) {
    const table = el("table", {}, el("tr", {}, el("th", {}, "name"), el("th", {}, "in"),
                                     el("th", {}, "type"), el("th", {}, "description")));
    for (const raw of params) {
      const p = raw.$ref ? resolve(raw.$ref) : raw;
      const schema = p.schema || {};
      const name = el("td", {}, el("code", {}, p.name));
      if (p.required) name.append(el("span", {class: "req"}, "required"));
      table.append(el("tr", {}, name, el("td", {}, p.in),
                      el("td", {}, typeLabel(schema) + constraints(schema)),
                      el("td", {}, p.description || schema.description || "")));
    }
    body.append(el("h4", {}, "Parameters"), table);
  }
  if (op.requestBody) {
    const rb = op.requestBody.$ref ? resolve(op.requestBody.$ref) : op.requestBody;
    body.append(el("h4", {}, "Request body" + (rb.required ? " (required)" : "")),
                renderContent(rb.content));
  }
  const responses = op.responses || {};
  if (Object.keys(responses).length) {
    body.append(el("h4", {}, "Responses"));
    for (const [code, raw] of Object.entries(responses)) {
      const r = raw.$ref ? resolve(raw.$ref) : raw;
      body.append(el("div", {}, el("b", {}, code), " " + (r.description || "")),
                  renderContent(r.content));
    }
  }
  return el("details", {class: "op"}, summary, body);
}

function render() {
  const info = spec.info || {};
  document.getElementById("subtitle").textContent =
    "version " + (info.version || "?") + " - OpenAPI " + (spec.openapi || "?") + " - " + OPENAPI_URL;
  if (info.description) document.getElementById("intro").append(el("p", {}, info.description));
  const paths = document.getElementById("paths");
  for (const [path, item] of Object.entries(spec.paths || {})) {
    for (const method of METHODS) {
      if (item[method]) paths.append(renderOperation(path, method, item[method]));
    }
  }
  const schemas = document.getElementById("schemas");
  const components = (spec.components || {}).schemas || {};
  for (const [name, schema] of Object.entries(components)) {
    schemas.append(el("details", {class: "op"},
      el("summary", {}, el("span", {class: "path"}, name)),
      el("div", {}, schema.description ? el("p", {}, schema.description) : null,
         renderSchema(schema, new Set([name])))));
  }
}

document.getElementById("toggle").addEventListener("click", event => {
  const opening = event.target.textContent === "expand all";
  for (const node of document.querySelectorAll("details")) node.open = opening;
  event.target.textContent = opening ? "collapse all" : "expand all";
});

fetch(OPENAPI_URL)
  .then(response => { if (!response.ok) throw new Error("HTTP " + response.status); return response.json(); })
  .then(json => { spec = json; render(); })
  .catch(error => { document.getElementById("error").textContent =
    "could not load " + OPENAPI_URL + ": " + error.message; });
</script>
</body>
</html>
"""


def render_docs_page(title: str, openapi_url: str) -> str:
    """The docs page for an app titled `title` whose schema is served at `openapi_url`."""
    return (
        _PAGE.replace("__TITLE__", html.escape(title))
        .replace("__OPENAPI_URL_JSON__", json.dumps(openapi_url).replace("<", "\\u003c"))
        .replace("__OPENAPI_URL__", html.escape(openapi_url))
    )


def mount_local_docs(app: FastAPI, path: str = "/docs") -> None:
    """Serve the self-contained docs page of `app` at GET `path` (hidden from the schema)."""
    if app.openapi_url is None:
        raise ValueError("the app has no openapi_url; there is nothing to document")
    if app.docs_url is not None or app.redoc_url is not None:
        raise ValueError("create the app with docs_url=None, redoc_url=None (their pages use a CDN)")
    page = render_docs_page(app.title, app.openapi_url)

    @app.get(path, include_in_schema=False, response_class=HTMLResponse)
    def api_docs() -> HTMLResponse:
        return HTMLResponse(page)
