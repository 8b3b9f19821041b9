/**
 * The guest agent's local config (`/etc/nestbroker/guest.yaml`, docs/config-guest.md).
 *
 * Validated once at start, with EVERY problem reported together (fastify's
 * initial-config-validation): a zod schema of `.strict()` objects finds shapes, unknown
 * keys and single values; then cross-field checks run on the raw input, so that a bad
 * name and a min above its max in the same project are both reported. The result is fully
 * normalised (bytes and CPUs as numbers, durations in ms) and deeply frozen.
 *
 * Reference: docs/config-guest.md (one row per key), example: examples/guest.yaml.
 */
import { promises as fs } from 'fs';
import { parseDocument } from 'yaml';
import { NestError, type Problem } from '../common/errors';
import { formatBytes } from '../common/units';
import type { Resources } from '../broker/types';
import type { GuestConfig } from './config-types';
import { MAX_CONFIG_BYTES } from './config-defaults';
import { rec } from './config-values';
import { guestSchema, normalise } from './config-schema';
import { invalid, problemsFromIssues, typeName } from './config-problems';
import { crossChecks } from './config-cross';

// The parts, one file each: the normalised types (config-types.ts), defaults and bounds
// (config-defaults.ts), single-value checks (config-values.ts), the schema
// (config-schema.ts), zod issues to problems (config-problems.ts), the cross-field checks
// (config-cross.ts). This file validates and loads; the rest of the code imports from here.
export type {
  AdoptConfig,
  CommandConfig,
  GuestConfig,
  ProjectConfig,
  RestartConfig,
  RestartPolicy,
  Transport,
  UpstreamConfig,
} from './config-types';
export { GUEST_DEFAULTS } from './config-defaults';
export {
  NAME_RE,
  checkAbsolutePath,
  checkName,
  checkRelativeCgroupPath,
  checkSignal,
} from './config-values';
export { configKeys } from './config-schema';
export { fieldPath } from './config-problems';

export function deepFreeze<T>(o: T): T {
  if (o !== null && typeof o === 'object' && !Object.isFrozen(o)) {
    Object.freeze(o);
    for (const v of Object.values(o as object)) deepFreeze(v);
  }
  return o;
}

/**
 * Validate a parsed config. Throws NestError CONFIG_INVALID whose `problems` list every
 * problem found (field path, value received, message); returns a frozen, normalised config.
 */
export function validateGuestConfig(raw: unknown, source: string): GuestConfig {
  if (rec(raw) === undefined)
    throw invalid(source, [
      {
        field: '(top level)',
        value: raw,
        message: `must be a mapping with at least "guest" and "projects", got ${raw === null || raw === undefined ? 'an empty document' : typeName(raw)}`,
      },
    ]);
  const parsed = guestSchema.safeParse(raw);
  const problems = parsed.success ? [] : problemsFromIssues(parsed.error.issues, raw);
  const cross = crossChecks(raw);
  problems.push(...cross.problems);
  if (problems.length > 0 || !parsed.success) throw invalid(source, problems);
  return deepFreeze(normalise(parsed.data, cross.warnings, source));
}

/** Read, parse (YAML, which includes JSON) and validate a config file. */
export async function loadGuestConfig(file: string): Promise<GuestConfig> {
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
  // Duplicate keys are errors (uniqueKeys), aliases are capped (maxAliasCount): a config
  // cannot say one thing twice or blow up on expansion.
  const doc = parseDocument(text, { uniqueKeys: true, prettyErrors: true });
  if (doc.errors.length > 0)
    throw invalid(
      file,
      doc.errors.map((err) => ({
        field: err.linePos
          ? `(line ${err.linePos[0].line}, column ${err.linePos[0].col})`
          : '(yaml)',
        value: undefined,
        message: err.message.split('\n')[0].replace(/ at line \d+, column \d+:?$/, ''),
      })),
    );
  let raw: unknown;
  try {
    raw = doc.toJS({ maxAliasCount: 100 });
  } catch (e) {
    throw invalid(file, [{ field: '(yaml)', value: undefined, message: (e as Error).message }]);
  }
  return validateGuestConfig(raw, file);
}

/** Warnings for an allocation only known at start (detected, or given by the host). */
export function minimumsAbove(cfg: GuestConfig, allocation: Resources): Problem[] {
  const net = {
    memoryBytes: allocation.memoryBytes - cfg.reserve.memoryBytes,
    cpus: allocation.cpus - cfg.reserve.cpus,
  };
  const mem = cfg.projects.reduce((s, p) => s + p.memory.min, 0);
  const cpus = cfg.projects.reduce((s, p) => s + p.cpu.min, 0);
  const out: Problem[] = [];
  if (mem > net.memoryBytes)
    out.push({
      field: 'projects[*].memory.min',
      value: mem,
      message: `the minimums add up to ${formatBytes(mem)}, above the ${formatBytes(Math.max(0, net.memoryBytes))} left after the reserve`,
    });
  if (cpus > net.cpus + 1e-9)
    out.push({
      field: 'projects[*].cpu.min',
      value: cpus,
      message: `the minimums add up to ${cpus} CPUs, above the ${Math.max(0, net.cpus)} left after the reserve`,
    });
  return out;
}
