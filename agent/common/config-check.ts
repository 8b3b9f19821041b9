/**
 * The one validation layer for config files, shared by the host broker
 * (agent/host/config.ts) and the guest agent (agent/guest/config.ts), and behind
 * `nestbroker host|guest --check` (agent/cli/check.ts).
 *
 * What it promises, whichever daemon reads the file (CONTRIBUTING.md: validate at the
 * boundary, report every problem at once naming field and value; fastify's
 * initial-config-validation is the model):
 *
 *   - the file is read with a size cap, as YAML (which includes JSON), duplicate keys and
 *     alias bombs refused; an unreadable file is CONFIG_UNREADABLE, a bad one CONFIG_INVALID;
 *   - a zod schema of `.strict()` objects finds shapes, unknown keys and single values, the
 *     single values checked by the same `ParseResult` checks the daemons use
 *     (agent/common/units.ts), so a size or a duration is refused with what was received;
 *   - cross-field checks (a floor above its allocation, two guests on one channel) run on
 *     the raw input, beside the schema and not after it, so one bad key never hides
 *     another problem;
 *   - every problem is a `Problem` (field path, value received, message), an unknown key
 *     with a "did you mean" for the nearest known key at its place and the list of keys
 *     known there.
 */
import { promises as fs } from 'node:fs';
import { parseDocument } from 'yaml';
import { z } from 'zod';
import { NestError, type Problem } from './errors';
import { describe, formatBytes, type ParseResult } from './units';

/** A check of one value: the normalised value, or a message naming what was received. */
export type Check<T> = (v: unknown) => ParseResult<T>;

/** Config files larger than this are refused before parsing (a config is a few KiB). */
export const MAX_CONFIG_BYTES = 1024 * 1024;

// ---------------------------------------------------------------------------------------
// Schema building blocks: a zod field checked by a `Check`
// ---------------------------------------------------------------------------------------

/** A required field, checked (and normalised) by `check`. */
export function field<T>(check: Check<T>) {
  return z.unknown().transform((v, ctx): T => {
    if (v === undefined) {
      ctx.addIssue({ code: z.ZodIssueCode.custom, message: 'is required' });
      return z.NEVER;
    }
    const r = check(v);
    if (!r.ok) {
      ctx.addIssue({ code: z.ZodIssueCode.custom, message: r.message });
      return z.NEVER;
    }
    return r.value;
  });
}

/** An optional field: absent stays absent. */
export function opt<T>(check: Check<T>) {
  return field(check).optional();
}

/** A field with a default (already normalised: it goes through the same check). */
export function dflt<T>(check: Check<T>, value: T) {
  return field(check).default(value as unknown);
}

// ---------------------------------------------------------------------------------------
// Single-value checks both daemons use
// ---------------------------------------------------------------------------------------

/** An integer from `min` to `max` (a YAML `1.5` or `"3"` is refused, named as received). */
export function checkInt(min: number, max: number, what = 'an integer'): Check<number> {
  return (v) =>
    typeof v === 'number' && Number.isInteger(v) && v >= min && v <= max
      ? { ok: true, value: v }
      : { ok: false, message: `must be ${what} from ${min} to ${max}, got ${describe(v)}` };
}

export function checkBool(v: unknown): ParseResult<boolean> {
  return typeof v === 'boolean'
    ? { ok: true, value: v }
    : { ok: false, message: `must be true or false, got ${describe(v)}` };
}

/** Where a metrics server listens, or a peer to reach: an IP address or a host name. */
export function checkHost(v: unknown): ParseResult<string> {
  if (typeof v === 'string' && /^[A-Za-z0-9.:-]{1,253}$/.test(v)) return { ok: true, value: v };
  return { ok: false, message: `must be an IP address or host name, got ${describe(v)}` };
}

/** A non-empty string without NUL (a path or a name the kernel or a peer reads). */
export function checkString(v: unknown): ParseResult<string> {
  if (typeof v !== 'string' || v === '')
    return { ok: false, message: `must be a non-empty string, got ${describe(v)}` };
  if (v.includes('\0')) return { ok: false, message: `must not contain NUL, got ${describe(v)}` };
  return { ok: true, value: v };
}

// ---------------------------------------------------------------------------------------
// Paths and values
// ---------------------------------------------------------------------------------------

/** `['guests', 1, 'floor', 'cpus']` → `guests[1].floor.cpus`; the empty path is `(top level)`. */
export function fieldPath(p: readonly (string | number)[]): string {
  let s = '';
  for (const k of p) s += typeof k === 'number' ? `[${k}]` : s === '' ? k : `.${k}`;
  return s === '' ? '(top level)' : s;
}

/** The raw value at a path, or undefined where the path leaves the document. */
export function valueAt(raw: unknown, p: readonly (string | number)[]): unknown {
  let v: unknown = raw;
  for (const k of p) {
    if (v === null || typeof v !== 'object') return undefined;
    v = (v as Record<string | number, unknown>)[k];
  }
  return v;
}

/** What a value is, for a message: `a mapping`, `a list`, `string "x"`. */
export function typeName(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'a list';
  if (typeof v === 'object') return 'a mapping';
  return `${typeof v} ${describe(v)}`;
}

/** A mapping, or undefined (for cross checks on the raw input). */
export function rec(v: unknown): Record<string, unknown> | undefined {
  return v !== null && typeof v === 'object' && !Array.isArray(v)
    ? (v as Record<string, unknown>)
    : undefined;
}

/** The value of a good result, undefined for a bad one (already reported by the schema). */
export function val<T>(r: ParseResult<T>): T | undefined {
  return r.ok ? r.value : undefined;
}

// ---------------------------------------------------------------------------------------
// Walking a schema
// ---------------------------------------------------------------------------------------

export function unwrap(s: z.ZodTypeAny): z.ZodTypeAny {
  for (;;) {
    if (s instanceof z.ZodOptional || s instanceof z.ZodNullable) s = s.unwrap();
    else if (s instanceof z.ZodDefault) s = s.removeDefault();
    else if (s instanceof z.ZodEffects) s = s.innerType();
    else return s;
  }
}

type AnyUnion = z.ZodDiscriminatedUnion<string, z.ZodObject<z.ZodRawShape>[]>;

/** The option of a discriminated union the raw mapping at `p` chose, if it named one. */
function chosen(u: AnyUnion, raw: unknown, p: readonly (string | number)[]) {
  const d = valueAt(raw, [...p, u.discriminator]);
  return u.optionsMap.get(d as string) as z.ZodObject<z.ZodRawShape> | undefined;
}

/** The keys the schema knows at a path of the raw document (for "did you mean"). */
export function knownKeysAt(
  root: z.ZodTypeAny,
  raw: unknown,
  p: readonly (string | number)[],
): string[] {
  let schema: z.ZodTypeAny = root;
  for (let i = 0; i < p.length; i++) {
    const k = p[i];
    schema = unwrap(schema);
    if (schema instanceof z.ZodArray) schema = schema.element;
    else if (schema instanceof z.ZodRecord) schema = schema.valueSchema;
    else if (schema instanceof z.ZodObject) schema = schema.shape[k as string] ?? schema;
    else if (schema instanceof z.ZodDiscriminatedUnion)
      schema = chosen(schema as AnyUnion, raw, p.slice(0, i))?.shape[k as string] ?? schema;
  }
  schema = unwrap(schema);
  if (schema instanceof z.ZodDiscriminatedUnion) {
    const o = chosen(schema as AnyUnion, raw, p);
    return o ? Object.keys(o.shape) : [];
  }
  return schema instanceof z.ZodObject ? Object.keys(schema.shape) : [];
}

/**
 * Every key the schema knows, as dotted paths (`projects[].memory.min`): the reference
 * tables of docs/config-guest.md and docs/host-broker.md have one row for each.
 */
export function schemaKeys(root: z.ZodTypeAny): string[] {
  const out: string[] = [];
  const walk = (s: z.ZodTypeAny, prefix: string): void => {
    s = unwrap(s);
    if (s instanceof z.ZodArray) {
      const el = unwrap(s.element);
      if (el instanceof z.ZodObject || el instanceof z.ZodDiscriminatedUnion)
        walk(el, `${prefix}[]`);
      return;
    }
    const shapes: z.ZodRawShape[] =
      s instanceof z.ZodObject
        ? [s.shape]
        : s instanceof z.ZodDiscriminatedUnion
          ? [...(s as AnyUnion).optionsMap.values()].map((o) => o.shape)
          : [];
    for (const shape of shapes)
      for (const [k, v] of Object.entries(shape)) {
        const key = prefix === '' ? k : `${prefix}.${k}`;
        if (!out.includes(key)) out.push(key);
        walk(v, key);
      }
  };
  walk(root, '');
  return out;
}

/** The top-level keys a document must have (neither optional nor defaulted). */
export function requiredKeys(root: z.ZodTypeAny): string[] {
  const s = unwrap(root);
  if (!(s instanceof z.ZodObject)) return [];
  return Object.entries(s.shape as z.ZodRawShape)
    .filter(([, v]) => !v.isOptional())
    .map(([k]) => k);
}

// ---------------------------------------------------------------------------------------
// "Did you mean"
// ---------------------------------------------------------------------------------------

/** The known key nearest to a misspelt one (at most 2 edits, case aside), if any. */
export function suggest(key: string, known: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestD = 3;
  const k0 = key.toLowerCase().replace(/[_-]/g, '');
  for (const k of known) {
    const d = editDistance(k0, k.toLowerCase());
    if (d < bestD) {
      bestD = d;
      best = k;
    }
  }
  return best;
}

/** Levenshtein distance, one row at a time. */
export function editDistance(a: string, b: string): number {
  const row = Array.from({ length: b.length + 1 }, (_, i) => i);
  for (let i = 1; i <= a.length; i++) {
    let prev = row[0];
    row[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const cur = row[j];
      row[j] = Math.min(row[j] + 1, row[j - 1] + 1, prev + (a[i - 1] === b[j - 1] ? 0 : 1));
      prev = cur;
    }
  }
  return row[b.length];
}

// ---------------------------------------------------------------------------------------
// From zod issues to problems
// ---------------------------------------------------------------------------------------

/** zod's issues → problems, each with its field path, the raw value, and a plain message. */
export function problemsFromIssues(
  root: z.ZodTypeAny,
  issues: readonly z.ZodIssue[],
  raw: unknown,
): Problem[] {
  const out: Problem[] = [];
  for (const issue of issues) {
    const value = valueAt(raw, issue.path);
    switch (issue.code) {
      case z.ZodIssueCode.unrecognized_keys: {
        const known = knownKeysAt(root, raw, issue.path);
        for (const key of issue.keys) {
          const hint = suggest(key, known);
          out.push({
            field: fieldPath([...issue.path, key]),
            value: valueAt(raw, [...issue.path, key]),
            message: `is not a known key${hint ? ` (did you mean "${hint}"?)` : ''}; known here: ${known.join(', ')}`,
          });
        }
        break;
      }
      case z.ZodIssueCode.invalid_type:
        out.push({
          field: fieldPath(issue.path),
          value,
          message:
            value === undefined
              ? 'is required'
              : `must be ${issue.expected === 'object' ? 'a mapping' : issue.expected === 'array' ? 'a list' : issue.expected}, got ${typeName(value)}`,
        });
        break;
      case z.ZodIssueCode.invalid_union_discriminator:
      case z.ZodIssueCode.invalid_enum_value:
        out.push({
          field: fieldPath(issue.path),
          value,
          message: `must be one of ${issue.options.map((o) => JSON.stringify(o)).join(', ')}, got ${describe(value)}`,
        });
        break;
      case z.ZodIssueCode.invalid_literal:
        out.push({
          field: fieldPath(issue.path),
          value,
          message: `must be ${JSON.stringify(issue.expected)}, got ${describe(value)}`,
        });
        break;
      case z.ZodIssueCode.too_small:
      case z.ZodIssueCode.too_big: {
        const small = issue.code === z.ZodIssueCode.too_small;
        const bound = small ? issue.minimum : issue.maximum;
        out.push({
          field: fieldPath(issue.path),
          value,
          message:
            issue.type === 'array'
              ? `must have ${small ? 'at least' : 'at most'} ${bound} entries, got ${Array.isArray(value) ? value.length : describe(value)}`
              : `${issue.message}, got ${describe(value)}`,
        });
        break;
      }
      default:
        out.push({ field: fieldPath(issue.path), value, message: issue.message });
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Validation and reading
// ---------------------------------------------------------------------------------------

/** CONFIG_INVALID listing every problem, one line each (`  field: message`). */
export function configInvalid(source: string, problems: Problem[]): NestError {
  const lines = problems.map((p) => `  ${p.field}: ${p.message}`);
  return new NestError(
    'CONFIG_INVALID',
    `${source}: ${problems.length} problem${problems.length === 1 ? '' : 's'}:\n${lines.join('\n')}`,
    { problems },
  );
}

export interface CrossResult {
  problems: Problem[];
  /** Allowed but probably not meant; the daemon logs them at start, `--check` prints them. */
  warnings?: Problem[];
}

/**
 * A parsed document against a schema and its cross checks. Throws CONFIG_INVALID listing
 * every problem of both; returns the schema's output and the warnings.
 */
export function checkConfig<S extends z.ZodTypeAny>(
  schema: S,
  raw: unknown,
  opts: { source: string; cross?: (raw: Record<string, unknown>) => CrossResult },
): { data: z.output<S>; warnings: Problem[] } {
  const top = rec(raw);
  if (top === undefined) {
    const need = requiredKeys(schema).map((k) => `"${k}"`);
    throw configInvalid(opts.source, [
      {
        field: '(top level)',
        value: raw,
        message: `must be a mapping${need.length ? ` with at least ${need.join(' and ')}` : ''}, got ${raw === null || raw === undefined ? 'an empty document' : typeName(raw)}`,
      },
    ]);
  }
  const parsed = schema.safeParse(raw);
  const problems = parsed.success ? [] : problemsFromIssues(schema, parsed.error.issues, raw);
  const cross = opts.cross?.(top) ?? { problems: [] };
  problems.push(...cross.problems);
  if (problems.length > 0 || !parsed.success) throw configInvalid(opts.source, problems);
  return { data: parsed.data as z.output<S>, warnings: cross.warnings ?? [] };
}

/**
 * Reads a config file: a regular file under MAX_CONFIG_BYTES, parsed as YAML (JSON is
 * YAML) with duplicate keys refused (uniqueKeys) and aliases capped (maxAliasCount), so a
 * config cannot say one thing twice or blow up on expansion. CONFIG_UNREADABLE when it
 * cannot be read, CONFIG_INVALID (with the line and column) when it is not YAML.
 */
export async function readConfigFile(file: string): Promise<unknown> {
  let text: string;
  try {
    const st = await fs.stat(file);
    if (!st.isFile())
      throw new NestError('CONFIG_UNREADABLE', `${file}: not a regular file`, {
        problems: [{ field: '(file)', value: file, message: 'is not a regular file' }],
      });
    if (st.size > MAX_CONFIG_BYTES)
      throw new NestError(
        'CONFIG_UNREADABLE',
        `${file}: larger than ${formatBytes(MAX_CONFIG_BYTES)}`,
        {
          problems: [
            {
              field: '(file)',
              value: st.size,
              message: `is larger than ${formatBytes(MAX_CONFIG_BYTES)}`,
            },
          ],
        },
      );
    text = await fs.readFile(file, 'utf8');
  } catch (e) {
    if (e instanceof NestError) throw e;
    const code = (e as NodeJS.ErrnoException).code ?? 'unknown';
    throw new NestError('CONFIG_UNREADABLE', `${file}: cannot read the config (${code})`, {
      cause: e,
      problems: [{ field: '(file)', value: file, message: `cannot be read: ${code}` }],
    });
  }
  const doc = parseDocument(text, { uniqueKeys: true, prettyErrors: true });
  if (doc.errors.length > 0)
    throw configInvalid(
      file,
      doc.errors.map((err) => ({
        field: err.linePos
          ? `(line ${err.linePos[0].line}, column ${err.linePos[0].col})`
          : '(yaml)',
        value: undefined,
        message: err.message.split('\n')[0].replace(/ at line \d+, column \d+:?$/, ''),
      })),
    );
  try {
    return doc.toJS({ maxAliasCount: 100 });
  } catch (e) {
    throw configInvalid(file, [
      { field: '(yaml)', value: undefined, message: (e as Error).message },
    ]);
  }
}

/** Freezes a normalised config all the way down: nothing changes it after start. */
export function deepFreeze<T>(o: T): T {
  if (o !== null && typeof o === 'object' && !Object.isFrozen(o)) {
    Object.freeze(o);
    for (const v of Object.values(o as object)) deepFreeze(v);
  }
  return o;
}
