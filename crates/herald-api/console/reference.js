// The API reference: /openapi.json rendered as a page, operations grouped by tag, each with
// its parameters, request body and answers. Schemas are shown as compact type outlines, with
// references resolved (each named schema expanded once per outline, so cycles end).

const el = (tag, cls, text) => {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
};

let components = {};

function refName(ref) {
  return ref.split('/').pop();
}

// A one-line-per-field outline of a schema.
function outline(schema, depth = 0, seen = new Set()) {
  const pad = '  '.repeat(depth);
  if (!schema) return 'any';
  if (schema.$ref) {
    const name = refName(schema.$ref);
    if (seen.has(name) || depth > 6) return name;
    const next = new Set(seen).add(name);
    return outline(components[name], depth, next);
  }
  for (const key of ['oneOf', 'anyOf', 'allOf']) {
    if (schema[key]) {
      const joiner = key === 'allOf' ? ' & ' : ' | ';
      return schema[key].map((s) => outline(s, depth, seen)).join(joiner);
    }
  }
  let type = schema.type;
  if (Array.isArray(type)) type = type.filter((t) => t !== 'null').join('|') + (schema.type.includes('null') ? '?' : '');
  if ((schema.type === 'object' || (Array.isArray(schema.type) && schema.type.includes('object'))) && schema.properties) {
    const required = new Set(schema.required || []);
    const lines = Object.entries(schema.properties).map(([name, prop]) => {
      const mark = required.has(name) ? '' : '?';
      const note = prop.description ? `  // ${prop.description.split('\n')[0]}` : '';
      return `${pad}  ${name}${mark}: ${outline(prop, depth + 1, seen)}${note}`;
    });
    return `{\n${lines.join('\n')}\n${pad}}`;
  }
  if (schema.type === 'array' || (Array.isArray(schema.type) && schema.type.includes('array'))) {
    return `[${outline(schema.items, depth, seen)}]${Array.isArray(schema.type) && schema.type.includes('null') ? '?' : ''}`;
  }
  if (schema.additionalProperties && typeof schema.additionalProperties === 'object') {
    return `{ [key]: ${outline(schema.additionalProperties, depth + 1, seen)} }`;
  }
  if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(' | ');
  return (type || 'any') + (schema.format ? ` (${schema.format})` : '');
}

function content(body) {
  const box = el('div');
  for (const [type, media] of Object.entries((body && body.content) || {})) {
    box.append(el('div', 'muted small', type));
    if (media.schema) box.append(el('pre', 'code', outline(media.schema)));
  }
  return box;
}

function operation(method, path, op) {
  const card = el('section', 'card');
  card.id = op.operationId || `${method}-${path}`;
  const head = el('h3');
  head.append(el('code', `method method-${method}`, method.toUpperCase()), ' ', el('code', '', path));
  card.append(head);
  if (op.summary) card.append(el('p', '', op.summary));
  if (op.description) card.append(el('p', 'muted', op.description));
  const security = (op.security || []).flatMap((s) => Object.keys(s));
  card.append(el('p', 'small muted', security.length ? `Authentication: ${security.join(', ')}` : 'No credentials'));
  if (op.parameters && op.parameters.length) {
    const table = el('table');
    const header = el('tr');
    for (const h of ['Parameter', 'In', 'Type', '']) header.append(el('th', '', h));
    table.append(header);
    for (const p of op.parameters) {
      const row = el('tr');
      row.append(el('td', '', p.name + (p.required ? '' : '?')), el('td', '', p.in),
        el('td', '', outline(p.schema)), el('td', 'muted', p.description || ''));
      table.append(row);
    }
    card.append(table);
  }
  if (op.requestBody) {
    card.append(el('h4', '', 'Request body'));
    card.append(content(op.requestBody));
  }
  card.append(el('h4', '', 'Answers'));
  for (const [status, response] of Object.entries(op.responses || {})) {
    const line = el('details');
    line.append(el('summary', '', `${status} ${response.description || ''}`));
    line.append(content(response));
    card.append(line);
  }
  return card;
}

async function main() {
  const root = document.getElementById('reference');
  const toc = document.getElementById('toc');
  const response = await fetch('/openapi.json');
  if (!response.ok) {
    root.textContent = `Could not load /openapi.json: HTTP ${response.status}`;
    return;
  }
  const doc = await response.json();
  components = (doc.components && doc.components.schemas) || {};
  root.textContent = '';
  const byTag = new Map((doc.tags || []).map((t) => [t.name, { tag: t, ops: [] }]));
  for (const [path, item] of Object.entries(doc.paths || {})) {
    for (const method of ['get', 'post', 'put', 'patch', 'delete']) {
      const op = item[method];
      if (!op) continue;
      const tag = (op.tags && op.tags[0]) || 'Other';
      if (!byTag.has(tag)) byTag.set(tag, { tag: { name: tag }, ops: [] });
      byTag.get(tag).ops.push([method, path, op]);
    }
  }
  const title = el('h2', '', `${doc.info.title} ${doc.info.version}`);
  root.append(title, el('p', 'muted', doc.info.description || ''));
  for (const { tag, ops } of byTag.values()) {
    if (!ops.length) continue;
    const anchor = `tag-${tag.name.replace(/\W+/g, '-')}`;
    const link = el('a', '', `${tag.name} (${ops.length})`);
    link.href = `#${anchor}`;
    toc.append(link, ' ');
    const heading = el('h2', '', tag.name);
    heading.id = anchor;
    root.append(heading);
    if (tag.description) root.append(el('p', 'muted', tag.description));
    for (const [method, path, op] of ops) root.append(operation(method, path, op));
  }
}

main().catch((e) => {
  document.getElementById('reference').textContent = `Could not render the reference: ${e}`;
});
