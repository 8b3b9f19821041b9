/**
 * Checks a Limits value at the boundary, reporting every problem at once (fastify style),
 * before any directory is made or file written.
 */
import { CgroupError, type Problem } from './errors';
import { checkCpuMax, checkCpuWeight, checkMax, normalizeCpuList } from './formats';
import type { Limits } from './types';

const KEYS: Record<string, readonly string[]> = {
  limits: ['memory', 'cpu', 'cpus', 'pidsMax'],
  'limits.memory': ['min', 'low', 'high', 'max'],
  'limits.cpu': ['max', 'weight'],
};

function unknownKeys(obj: object, field: string, problems: Problem[]): void {
  for (const k of Object.keys(obj)) {
    if (!KEYS[field].includes(k)) {
      problems.push({
        field: `${field}.${k}`,
        value: (obj as Record<string, unknown>)[k],
        message: `${field}.${k} is not a known limit`,
      });
    }
  }
}

function attempt(problems: Problem[], field: string, value: unknown, f: () => void): void {
  try {
    f();
  } catch (e) {
    problems.push({ field, value, message: e instanceof Error ? e.message : String(e) });
  }
}

/** Returns the limits with cpus in canonical form; LIMIT_INVALID listing every problem. */
export function validateLimits(limits: Limits | undefined): Limits {
  if (limits === undefined) return {};
  const problems: Problem[] = [];
  if (typeof limits !== 'object' || limits === null) {
    throw new CgroupError(
      'LIMIT_INVALID',
      `limits must be an object, got ${JSON.stringify(limits)}`,
      {
        field: 'limits',
        value: limits,
      },
    );
  }
  unknownKeys(limits, 'limits', problems);
  const out: Limits = {};
  const m = limits.memory;
  if (m !== undefined) {
    unknownKeys(m, 'limits.memory', problems);
    out.memory = {};
    for (const k of ['min', 'low'] as const) {
      if (m[k] === undefined) continue;
      attempt(problems, `limits.memory.${k}`, m[k], () => {
        const v = checkMax(`memory.${k}`, m[k]);
        if (v === 'max') throw new Error(`memory.${k} must be bytes, got "max"`);
        out.memory![k] = v;
      });
    }
    for (const k of ['high', 'max'] as const) {
      if (m[k] === undefined) continue;
      attempt(problems, `limits.memory.${k}`, m[k], () => {
        out.memory![k] = checkMax(`memory.${k}`, m[k]);
      });
    }
  }
  const c = limits.cpu;
  if (c !== undefined) {
    unknownKeys(c, 'limits.cpu', problems);
    out.cpu = {};
    if (c.max !== undefined)
      attempt(problems, 'limits.cpu.max', c.max, () => (out.cpu!.max = checkCpuMax(c.max!)));
    if (c.weight !== undefined) {
      attempt(
        problems,
        'limits.cpu.weight',
        c.weight,
        () => (out.cpu!.weight = checkCpuWeight(c.weight)),
      );
    }
  }
  if (limits.cpus !== undefined) {
    attempt(
      problems,
      'limits.cpus',
      limits.cpus,
      () => (out.cpus = normalizeCpuList(limits.cpus, 'cpuset.cpus')),
    );
  }
  if (limits.pidsMax !== undefined) {
    attempt(
      problems,
      'limits.pidsMax',
      limits.pidsMax,
      () => (out.pidsMax = checkMax('pids.max', limits.pidsMax)),
    );
  }
  if (problems.length > 0) {
    throw new CgroupError('LIMIT_INVALID', problems.map((p) => p.message).join('; '), {
      field: problems[0].field,
      value: problems[0].value,
      problems,
    });
  }
  return out;
}
