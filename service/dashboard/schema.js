// odeforge dashboard: a compact JSON-Schema validator for the subset pydantic emits into /openapi.json
// (no library, no CDN). Keywords: $ref (local "#/..." pointers), type, properties, required,
// additionalProperties, enum, const, minimum/maximum, exclusiveMinimum/exclusiveMaximum (numbers),
// multipleOf, minLength/maxLength/pattern, items/prefixItems/minItems/maxItems/uniqueItems, allOf,
// anyOf, oneOf, discriminator (propertyName + mapping). Unknown keywords (title, description,
// default, format, ...) are ignored: the server stays the judge, this only catches mistakes early.
// Paths are written like the server's problem+json fields: "model.hidden_dims[0]".
"use strict";

const SchemaCheck = (() => {
  const join = (path, key) => (typeof key === "number" ? `${path}[${key}]` : path ? `${path}.${key}` : key);
  const show = (v) => JSON.stringify(v);

  function resolve(root, schema) {
    let seen = 0;
    while (schema && typeof schema.$ref === "string") {
      if (!schema.$ref.startsWith("#/") || ++seen > 64) throw new Error(`unsupported $ref ${schema.$ref}`);
      schema = schema.$ref.slice(2).split("/").map((p) => p.replace(/~1/g, "/").replace(/~0/g, "~"))
        .reduce((node, key) => (node == null ? undefined : node[key]), root);
      if (schema === undefined) throw new Error("dangling $ref");
    }
    return schema;
  }

  function typeOf(v) {
    if (v === null) return "null";
    if (Array.isArray(v)) return "array";
    if (typeof v === "number") return Number.isInteger(v) ? "integer" : "number";
    return typeof v;  // string, boolean, object
  }
  const hasType = (v, t) => t === typeOf(v) || (t === "number" && typeOf(v) === "integer");

  // the schema's allowed types (after $ref; through anyOf/oneOf branches), for choosing a branch to blame
  function types(root, schema) {
    schema = resolve(root, schema);
    if (!schema || typeof schema !== "object") return null;
    if (schema.type) return [].concat(schema.type);
    if (schema.const !== undefined) return [typeOf(schema.const)];
    const branches = schema.anyOf || schema.oneOf;
    if (branches) {
      const all = branches.map((b) => types(root, b));
      return all.includes(null) ? null : all.flat();
    }
    return null;
  }

  function union(root, schema, value, path, errors, kind) {
    const branches = schema[kind];
    const disc = schema.discriminator;
    if (disc && disc.propertyName && typeOf(value) === "object") {
      const tag = value[disc.propertyName];
      const mapping = disc.mapping || {};
      const tags = Object.keys(mapping);
      if (tag === undefined) return errors.push({ path: join(path, disc.propertyName), reason: `required: one of ${tags.map(show).join(", ")}` });
      if (tags.length && !(tag in mapping)) return errors.push({ path: join(path, disc.propertyName), reason: `${show(tag)} is not one of ${tags.map(show).join(", ")}` });
      if (tags.length) return check(root, { $ref: mapping[tag] }, value, path, errors);
    }
    const results = branches.map((b) => { const e = []; check(root, b, value, path, e); return e; });
    const passing = results.filter((e) => !e.length).length;
    if (kind === "anyOf" ? passing >= 1 : passing === 1) return;
    if (passing > 1) return errors.push({ path, reason: `matches ${passing} of the allowed forms (exactly one must match)` });
    // blame the branches of the value's type: their reasons are the useful ones (Optional[x]: x's reason)
    const fitting = results.filter((_, i) => { const t = types(root, branches[i]); return !t || t.some((x) => hasType(value, x)); });
    if (fitting.length === 1) return errors.push(...fitting[0]);
    const allowed = [...new Set(branches.flatMap((b) => types(root, b) || []))];
    if (!fitting.length && allowed.length) return errors.push({ path, reason: `must be ${allowed.join(" or ")}, not ${typeOf(value)}` });
    const best = (fitting.length ? fitting : results).reduce((a, b) => (b.length < a.length ? b : a));
    errors.push(...best);
  }

  function check(root, schema, value, path, errors) {
    schema = resolve(root, schema);
    if (schema === true || schema === undefined || schema === null) return;
    if (schema === false) return errors.push({ path, reason: "not allowed" });
    if (schema.allOf) schema.allOf.forEach((s) => check(root, s, value, path, errors));
    if (schema.anyOf) union(root, schema, value, path, errors, "anyOf");
    if (schema.oneOf) union(root, schema, value, path, errors, "oneOf");
    if (schema.type !== undefined) {
      const allowed = [].concat(schema.type);
      if (!allowed.some((t) => hasType(value, t))) return errors.push({ path, reason: `must be ${allowed.join(" or ")}, not ${typeOf(value)}` });
    }
    if (schema.const !== undefined && show(value) !== show(schema.const)) errors.push({ path, reason: `must be ${show(schema.const)}` });
    if (schema.enum && !schema.enum.some((e) => show(e) === show(value))) errors.push({ path, reason: `${show(value)} is not one of ${schema.enum.map(show).join(", ")}` });
    if (typeof value === "number") {
      if (typeof schema.minimum === "number" && value < schema.minimum) errors.push({ path, reason: `must be ≥ ${schema.minimum}` });
      if (typeof schema.maximum === "number" && value > schema.maximum) errors.push({ path, reason: `must be ≤ ${schema.maximum}` });
      if (typeof schema.exclusiveMinimum === "number" && value <= schema.exclusiveMinimum) errors.push({ path, reason: `must be > ${schema.exclusiveMinimum}` });
      if (typeof schema.exclusiveMaximum === "number" && value >= schema.exclusiveMaximum) errors.push({ path, reason: `must be < ${schema.exclusiveMaximum}` });
      if (typeof schema.multipleOf === "number" && Math.abs(value / schema.multipleOf - Math.round(value / schema.multipleOf)) > 1e-9) errors.push({ path, reason: `must be a multiple of ${schema.multipleOf}` });
    }
    if (typeof value === "string") {
      const n = [...value].length;  // code points, as Python counts
      if (typeof schema.minLength === "number" && n < schema.minLength) errors.push({ path, reason: `must have at least ${schema.minLength} character(s)` });
      if (typeof schema.maxLength === "number" && n > schema.maxLength) errors.push({ path, reason: `must have at most ${schema.maxLength} characters` });
      if (typeof schema.pattern === "string") {
        let re = null;
        try { re = new RegExp(schema.pattern, "u"); } catch (_) { /* a Python-only construct: the server checks it */ }
        if (re && !re.test(value)) errors.push({ path, reason: `must match the pattern ${schema.pattern}` });
      }
    }
    if (Array.isArray(value)) {
      if (typeof schema.minItems === "number" && value.length < schema.minItems) errors.push({ path, reason: `must have at least ${schema.minItems} item(s)` });
      if (typeof schema.maxItems === "number" && value.length > schema.maxItems) errors.push({ path, reason: `must have at most ${schema.maxItems} items` });
      if (schema.uniqueItems && new Set(value.map(show)).size !== value.length) errors.push({ path, reason: "items must be unique" });
      const prefix = schema.prefixItems || [];
      value.forEach((item, i) => {
        const s = i < prefix.length ? prefix[i] : schema.items;
        if (s !== undefined) check(root, s, item, join(path, i), errors);
      });
    }
    if (typeOf(value) === "object") {
      const props = schema.properties || {};
      for (const name of schema.required || []) if (!(name in value)) errors.push({ path: join(path, name), reason: "required" });
      for (const [name, v] of Object.entries(value)) {
        if (name in props) check(root, props[name], v, join(path, name), errors);
        else if (schema.additionalProperties === false) errors.push({ path: join(path, name), reason: `unknown field (allowed: ${Object.keys(props).join(", ")})` });
        else if (schema.additionalProperties && typeof schema.additionalProperties === "object") check(root, schema.additionalProperties, v, join(path, name), errors);
      }
    }
  }

  /** Problems of ``value`` against ``schema`` (inside the document ``root`` its $refs point into):
   *  [{path, reason}] in document order, [] when it conforms. */
  function validate(schema, value, root = schema) {
    const errors = [];
    check(root, schema, value, "", errors);
    const seen = new Set();
    return errors.map((e) => ({ path: e.path || "body", reason: e.reason }))
      .filter((e) => { const k = `${e.path}\u0000${e.reason}`; return !seen.has(k) && seen.add(k); });
  }

  return { validate, resolve };
})();
