/**
 * From zod issues to the guest config's problems: each names its field path and the value
 * received, an unknown key gets the known key it is closest to, and CONFIG_INVALID lists
 * them all at once (docs/config-guest.md).
 */
import { z } from 'zod';
import { NestError, type Problem } from '../common/errors';
import { describe } from '../common/units';
import { guestSchema, unwrap } from './config-schema';

// ---------------------------------------------------------------------------------------
// From zod issues to problems
// ---------------------------------------------------------------------------------------

export function fieldPath(p: readonly (string | number)[]): string {
  let s = '';
  for (const k of p) s += typeof k === 'number' ? `[${k}]` : s === '' ? k : `.${k}`;
  return s === '' ? '(top level)' : s;
}

export function at(raw: unknown, p: readonly (string | number)[]): unknown {
  let v: unknown = raw;
  for (const k of p) {
    if (v === null || typeof v !== 'object') return undefined;
    v = (v as Record<string | number, unknown>)[k];
  }
  return v;
}

export function typeName(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'a list';
  if (typeof v === 'object') return 'a mapping';
  return `${typeof v} ${describe(v)}`;
}

export function problemsFromIssues(issues: z.ZodIssue[], raw: unknown): Problem[] {
  const out: Problem[] = [];
  for (const issue of issues) {
    const value = at(raw, issue.path);
    switch (issue.code) {
      case z.ZodIssueCode.unrecognized_keys:
        for (const key of issue.keys) {
          const known = knownKeysAt(raw, issue.path);
          const hint = suggest(key, known);
          out.push({
            field: fieldPath([...issue.path, key]),
            value: at(raw, [...issue.path, key]),
            message: `is not a known key${hint ? ` (did you mean "${hint}"?)` : ''}; known here: ${known.join(', ')}`,
          });
        }
        break;
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
        out.push({
          field: fieldPath(issue.path),
          value,
          message: `must be one of ${issue.options.map((o) => JSON.stringify(o)).join(', ')}, got ${describe(value)}`,
        });
        break;
      case z.ZodIssueCode.invalid_enum_value:
        out.push({
          field: fieldPath(issue.path),
          value,
          message: `must be one of ${issue.options.map((o) => JSON.stringify(o)).join(', ')}, got ${describe(value)}`,
        });
        break;
      case z.ZodIssueCode.too_small:
      case z.ZodIssueCode.too_big:
        out.push({
          field: fieldPath(issue.path),
          value,
          message:
            issue.type === 'array'
              ? `must have ${issue.code === 'too_small' ? 'at least' : 'at most'} ${issue.code === 'too_small' ? issue.minimum : issue.maximum} entries, got ${Array.isArray(value) ? value.length : describe(value)}`
              : issue.message,
        });
        break;
      default:
        out.push({ field: fieldPath(issue.path), value, message: issue.message });
    }
  }
  return out;
}

/** The keys the schema knows at a path (for "did you mean"). */
function knownKeysAt(raw: unknown, p: readonly (string | number)[]): string[] {
  let schema: z.ZodTypeAny = guestSchema;
  for (const k of p) {
    schema = unwrap(schema);
    if (schema instanceof z.ZodArray) schema = schema.element;
    else if (schema instanceof z.ZodObject) schema = schema.shape[k as string] ?? schema;
    else if (schema instanceof z.ZodDiscriminatedUnion) {
      const t = at(raw, [...p.slice(0, p.indexOf(k)), 'transport']);
      schema = schema.optionsMap.get(t as string)?.shape[k as string] ?? schema;
    }
  }
  schema = unwrap(schema);
  if (schema instanceof z.ZodDiscriminatedUnion) {
    const t = at(raw, [...p, 'transport']);
    const o = schema.optionsMap.get(t as string);
    return o ? Object.keys(o.shape) : [];
  }
  return schema instanceof z.ZodObject ? Object.keys(schema.shape) : [];
}

function suggest(key: string, known: string[]): string | undefined {
  let best: string | undefined;
  let bestD = 3;
  for (const k of known) {
    const d = editDistance(key.toLowerCase(), k.toLowerCase());
    if (d < bestD) {
      bestD = d;
      best = k;
    }
  }
  return best;
}

function editDistance(a: string, b: string): number {
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

export function invalid(source: string, problems: Problem[]): NestError {
  const lines = problems.map((p) => `  ${p.field}: ${p.message}`);
  return new NestError(
    'CONFIG_INVALID',
    `${source}: ${problems.length} problem${problems.length === 1 ? '' : 's'}:\n${lines.join('\n')}`,
    { problems },
  );
}
