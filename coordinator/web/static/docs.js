// /docs: renders /openapi.json. Operations grouped by tag; each shows its role, parameters,
// request body and answers, with schemas drawn as trees ($ref followed, cycles cut).
"use strict";

function refName(ref) { return ref.split("/").pop(); }

function typeLabel(schema) {
  if (!schema) return "any";
  if (schema.$ref) return refName(schema.$ref);
  if (schema.anyOf || schema.oneOf) return (schema.anyOf || schema.oneOf).map(typeLabel).join(" | ");
  if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(" | ");
  if (schema.const !== undefined) return JSON.stringify(schema.const);
  if (schema.type === "array") return typeLabel(schema.items) + "[]";
  if (schema.type === "object" && schema.additionalProperties && !schema.properties)
    return "{string: " + typeLabel(schema.additionalProperties) + "}";
  return Array.isArray(schema.type) ? schema.type.join(" | ") : (schema.type || "any");
}

function schemaTree(doc, schema, seen) {
  seen = seen || new Set();
  if (!schema) return el("span", {class: "type", text: "any"});
  if (schema.$ref) {
    const name = refName(schema.$ref);
    const target = doc.components.schemas[name];
    if (seen.has(name) || !target) return el("span", {class: "type", text: name});
    const next = new Set(seen); next.add(name);
    return el("details", {class: "schema"},
      el("summary", {}, el("span", {class: "type", text: name}),
        target.description ? el("span", {class: "desc", text: " — " + target.description}) : null),
      schemaTree(doc, target, next));
  }
  const list = schema.anyOf || schema.oneOf;
  if (list) return el("div", {class: "union"}, el("span", {class: "muted", text: "one of:"}),
    el("ul", {}, list.map((s) => el("li", {}, schemaTree(doc, s, seen)))));
  if (schema.type === "array") return el("div", {}, el("span", {class: "muted", text: "array of "}),
    schemaTree(doc, schema.items, seen));
  if (schema.properties) {
    const required = new Set(schema.required || []);
    return el("table", {class: "props"}, el("tbody", {},
      Object.entries(schema.properties).map(([name, prop]) => el("tr", {},
        el("td", {class: "prop"}, el("code", {text: name}), required.has(name) ? el("span", {class: "req", text: " *"}) : null),
        el("td", {}, el("span", {class: "type", text: typeLabel(prop)}),
          prop.description ? el("div", {class: "desc", text: prop.description}) : null,
          prop.default !== undefined ? el("div", {class: "muted", text: "default " + JSON.stringify(prop.default)}) : null,
          (prop.$ref || prop.properties || prop.anyOf || (prop.items && prop.items.$ref)) ? schemaTree(doc, prop.items && prop.items.$ref ? prop.items : prop, seen) : null)))));
  }
  return el("span", {class: "type", text: typeLabel(schema)});
}

function contentBlock(doc, content) {
  return Object.entries(content || {}).map(([media, body]) => el("div", {class: "media"},
    el("code", {class: "muted", text: media}),
    body.schema && (body.schema.$ref || body.schema.properties || body.schema.anyOf || body.schema.oneOf)
      ? schemaTree(doc, body.schema) : el("span", {class: "desc", text: " " + ((body.schema && body.schema.description) || "")})));
}

function operation(doc, path, method, op) {
  const params = (op.parameters || []).map((p) => el("tr", {},
    el("td", {}, el("code", {text: p.name})), el("td", {class: "muted", text: p.in}),
    el("td", {class: "type", text: typeLabel(p.schema)}), el("td", {class: "desc", text: p.description || ""})));
  const answers = Object.entries(op.responses || {}).map(([status, r]) => el("div", {class: "answer"},
    el("span", {class: "status s" + status[0], text: status}), el("span", {class: "desc", text: " " + r.description}),
    contentBlock(doc, r.content)));
  const ws = op["x-websocket"];
  return el("details", {class: "op", id: op.operationId, dataset: {method: method, path: path}},
    el("summary", {},
      el("span", {class: "method m-" + method, text: ws ? "WS" : method.toUpperCase()}),
      el("code", {class: "path", text: path}),
      el("span", {class: "summary", text: op.summary || ""}),
      el("span", {class: "role", text: op["x-role"] || ""})),
    op.description ? el("p", {class: "desc", text: op.description}) : null,
    params.length ? el("table", {class: "params"}, el("tbody", {}, params)) : null,
    op.requestBody ? el("div", {}, el("h4", {text: "Body"}), contentBlock(doc, op.requestBody.content)) : null,
    ws ? el("div", {}, el("h4", {text: "Messages"}), el("div", {text: "from the node:"}), schemaTree(doc, ws.client),
      el("div", {text: "from the coordinator:"}), schemaTree(doc, ws.server)) : null,
    el("h4", {text: "Answers"}), answers);
}

function render(doc) {
  const info = document.getElementById("docs-info");
  clear(info).append(el("h2", {text: doc.info.title + " " + doc.info.version + " (OpenAPI " + doc.openapi + ")"}),
    el("p", {class: "desc", text: doc.info.description || ""}));
  const byTag = new Map();
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      const tag = (op.tags || ["other"])[0];
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push(operation(doc, path, method, op));
    }
  }
  const ops = clear(document.getElementById("docs-ops"));
  for (const [tag, items] of byTag) ops.append(el("section", {class: "tag"}, el("h3", {text: tag}), items));
  document.getElementById("docs-status").textContent = Object.keys(doc.paths).length + " paths";
}

fetch("/openapi.json").then((r) => {
  if (!r.ok) throw new Error("HTTP " + r.status);
  return r.json();
}).then(render).catch((e) => {
  document.getElementById("docs-status").textContent = "could not load /openapi.json: " + e.message;
});
